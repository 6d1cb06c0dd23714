"""msl_kit: a research kit built around the Multi-Similarity loss (Wang et al., CVPR 2019).

Submodules are imported lazily so that `import msl_kit` stays cheap (no umap, no matplotlib).
"""

__version__ = "0.1.0"
