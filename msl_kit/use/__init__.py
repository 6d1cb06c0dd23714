"""Use what you trained: embed a folder, a CSV or a dataset split into an index file
(`embed`), search it (`search`, exact or with faiss), export the model as a torch.export or
TorchScript module that needs no msl_kit (`export`). The index format and exact search live
in `index`."""

from msl_kit.use.embedding import EmbedError, embed
from msl_kit.use.exporting import ExportError, export
from msl_kit.use.index import Embeddings, Hits
from msl_kit.use.retrieval import search

__all__ = ["EmbedError", "Embeddings", "ExportError", "Hits", "embed", "export", "search"]
