"""Approximate nearest neighbours with faiss: a flat (exact) index, IVF-Flat, IVF-PQ or HNSW
over a gallery's vectors, with the recall each costs measured against exact search.

`spec` says what may be asked (kinds, knobs, their defaults from faiss's wiki, the checks),
`recall` how recall is measured (on held-out gallery vectors), `faiss_index` builds and
searches (`AnnIndex`), `kept` keeps an index beside FILE.npz, tied to its vectors' sha256.
"""

from msl_kit.use.ann.faiss_index import AnnIndex
from msl_kit.use.ann.kept import open_index
from msl_kit.use.ann.spec import KINDS, AnnError, IndexSpec, vectors_sha256

__all__ = ["KINDS", "AnnError", "AnnIndex", "IndexSpec", "open_index", "vectors_sha256"]
