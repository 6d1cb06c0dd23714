"""msl_kit: a research kit built around the Multi-Similarity loss (Wang et al., CVPR 2019).

`import msl_kit` loads nothing else (no torch): import what you use from its subpackages,
e.g. `from msl_kit.losses import MultiSimilarityLoss`, `from msl_kit.use import embed`.
docs/architecture.md maps the subpackages and their layers.
"""

__version__ = "0.1.0"
