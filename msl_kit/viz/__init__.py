"""Figures for the notebooks and the README: data and embeddings (`figures`), retrieval grids
(`retrieval`), what MS mining does in a batch and over a run (`mining`), sweep heatmaps
(`sweep`), shared helpers (`common`). matplotlib, pandas and umap are imported inside the
functions."""

from msl_kit.viz.common import (
    NEG_COLOR,
    POS_COLOR,
    QUERY_COLOR,
    SPLIT_COLORS,
    as_image_array,
    fig_ax,
    new_figure,
    show_image,
    to_numpy,
    to_png,
)
from msl_kit.viz.figures import (
    class_counts,
    class_group,
    class_groups,
    dataset_overview,
    embedding_2d,
    embedding_figure,
    embeddings_before_after,
    recall_curves,
    sample_grid,
    spread_points,
)
from msl_kit.viz.mining import (
    gpw_figure,
    mined_fractions,
    mining_dynamics,
    mining_history,
    other_pair_losses,
    pair_weight_figure,
    similarity_heatmap,
    similarity_histograms,
    weight_heatmap,
    weight_scatter,
    weights_over_training,
)
from msl_kit.viz.retrieval import hits_grid, retrieval_grid
from msl_kit.viz.sweep import (
    sensitivity_heatmap,
)

__all__ = [
    "NEG_COLOR",
    "POS_COLOR",
    "QUERY_COLOR",
    "other_pair_losses",
    "SPLIT_COLORS",
    "as_image_array",
    "class_counts",
    "class_group",
    "class_groups",
    "dataset_overview",
    "embedding_2d",
    "embedding_figure",
    "embeddings_before_after",
    "fig_ax",
    "gpw_figure",
    "hits_grid",
    "mined_fractions",
    "mining_dynamics",
    "mining_history",
    "new_figure",
    "pair_weight_figure",
    "recall_curves",
    "retrieval_grid",
    "sample_grid",
    "sensitivity_heatmap",
    "show_image",
    "similarity_heatmap",
    "similarity_histograms",
    "spread_points",
    "to_numpy",
    "to_png",
    "weight_heatmap",
    "weight_scatter",
    "weights_over_training",
]
