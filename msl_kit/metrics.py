"""Retrieval metrics: exact blocked kNN, Recall@K, MAP@R, R-precision, NMI.

Pure maths (torch, numpy, scikit-learn). The kNN never builds the N x N similarity matrix: it
walks (block x block) tiles on the embeddings' device and keeps a running top-k per row. In
the query = gallery case each off-diagonal tile S_ab = X_a X_b^T serves row block a and,
read by columns, row block b, so only half the matrix products are computed.

Ranking is exact and deterministic: a running top-k entry is one int64 key that orders
(score descending, gallery index ascending), so equal scores always put the lower gallery
index first, whatever the block size or block order. `metric="euclidean"` ranks by the score
-|q - g|^2 = 2 q.g - |q|^2 - |g|^2 (float32), so the smallest squared distance comes first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Sequence

import numpy as np
import torch
from torch import Tensor

from msl_kit.errors import MslKitError

DEFAULT_BLOCK_SIZE = 4096  # 64 MiB float32 tile; see bench/knn.py for the measurements
_EMPTY_KEY = torch.iinfo(torch.int64).min  # sorts below every real key
_LOW32 = 0xFFFFFFFF
Array = Tensor | np.ndarray  # embeddings: (N, D) floats; labels: (N,) integers
METRICS = ("ip", "euclidean")  # rank by largest inner product, or by smallest squared distance
# A query with no same-class gallery item: a miss in Recall@K, or left out of it (PML's way)
LONE_QUERIES = {
    "miss": "count as misses in Recall@K, which then cannot reach 1 (lone_queries='miss')",
    "skip": "are left out of Recall@K (lone_queries='skip')",
}


class EmbeddingsError(MslKitError, ValueError):
    """Vectors or labels that cannot be ranked (shape, NaN / inf, overflow, non-integer labels);
    the message names the argument and what to do."""


def _choice(name: str, value: object, options: Collection[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def _as_embeddings(x: Array, name: str) -> Tensor:
    x = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise EmbeddingsError(
            f"{name} must be a non-empty 2-D (N, D) array; got shape {tuple(x.shape)}"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise EmbeddingsError(f"{name} must be real numbers; got {x.dtype}")
    # fp16 matmul is fine on CUDA (ranking stays float32); the CPU computes in float32
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        x = x.float()
    if not bool(torch.isfinite(x.sum(1, dtype=torch.float32)).all()):  # one pass over x
        raise EmbeddingsError(
            f"{name} contains NaN, inf or values near the float32 limit; "
            f"fix (or rescale) the model output before evaluating"
        )
    return x


def _check_norms(x: Tensor, name: str, metric: str = "ip") -> None:
    """Refuse rows whose inner products could overflow the score dtype (metrics only; `knn`
    itself ranks whatever scores come out, inf included)."""
    # |q . g| <= |q| |g| (also for every partial sum of the product), so rows shorter than
    # sqrt(max) (half that for squared distances) cannot overflow; longer ones rank inf / NaN
    limit = math.sqrt(torch.finfo(x.dtype).max) / (2 if metric == "euclidean" else 1)
    longest = float(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).max())
    if not longest < limit:
        raise EmbeddingsError(
            f"{name} has rows of norm up to {longest:.3g}: inner products would "
            f"overflow {x.dtype} (norms must stay below {limit:.3g}); "
            f"L2-normalise or rescale the embeddings before evaluating"
        )


def _as_labels(labels: Array, n: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iubf":  # strings, objects: torch's error says nothing useful
            raise EmbeddingsError(
                f"{name} must be integers; got {labels.dtype} values (map class names to ints "
                f"first, e.g. np.unique(labels, return_inverse=True)[1])"
            )
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise EmbeddingsError(
            f"{name} must be 1-D (one integer per item); got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise EmbeddingsError(
            f"{name} must be integers; got {labels.dtype} (map class names to ints first)"
        )
    if len(labels) != n:
        raise EmbeddingsError(f"{name} has {len(labels)} entries but there are {n} embeddings")
    return labels.to("cpu", torch.int64)


def _keys(sims: Tensor, index: Tensor) -> Tensor:
    """int64 keys whose integer order is (sim descending, index ascending), for float32 sims."""
    bits = (sims + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 so they tie
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone int image of a float
    return ordered.to(torch.int64) * 2**32 + (_LOW32 - index)


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    sims = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).view(torch.float32)
    sims = torch.where(keys == _EMPTY_KEY, float("-inf"), sims)
    return sims, _LOW32 - (keys & _LOW32)


def _mask_nonzero(mask: Tensor) -> Tensor:
    """Flat positions of the True entries of a contiguous mask, ascending."""
    flat = mask.view(-1)
    if flat.device.type != "cpu" or flat.numel() % 8:
        return torch.nonzero(flat).squeeze(1)
    # after the first tile the mask is sparse: find the non-zero 8-byte words, then their bytes
    words = flat.view(torch.int64)
    word_pos = torch.nonzero(words).squeeze(1)
    within = torch.nonzero(words.index_select(0, word_pos).view(torch.uint8).view(-1, 8))
    return word_pos.index_select(0, within[:, 0]) * 8 + within[:, 1]


def _merge(run_keys: Tensor, rows: Tensor, cand_keys: Tensor) -> Tensor:
    """Top-k of each row's running keys plus its new candidates (rows grouped ascending)."""
    if rows.numel() == 0:
        return run_keys
    n_rows, k = run_keys.shape
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    padded = run_keys.new_full((n_rows, int(counts.max())), _EMPTY_KEY)
    padded[rows, slot] = cand_keys
    return torch.cat([run_keys, padded], 1).topk(k, dim=1).values  # keys are unique: no ties


def _update(
    run_keys: Tensor,
    sims: Tensor,
    col_offset: int,
    mask: Tensor,
    *,
    by_cols: bool,
    diag: bool,
    init: bool,
) -> Tensor:
    """Fold tile `sims` into the running keys of its rows (or of its columns if by_cols)."""
    k = run_keys.shape[1]
    run_sims, _ = _decode(run_keys[:, -1])
    groups = 4 * k
    per_group = sims.shape[1] // groups
    if init and not by_cols and per_group >= 1 + int(diag):
        # the k-th best of 4k column-group maxima is k distinct items' scores, so an exact
        # lower bound on the final k-th score; cheaper than a topk over the whole tile
        group_max = sims[:, : groups * per_group].reshape(len(sims), per_group, groups).amax(1)
        run_sims = torch.maximum(run_sims, group_max.topk(k, dim=1).values[:, -1])
    torch.ge(sims, run_sims[None, :] if by_cols else run_sims[:, None], out=mask)  # ties kept
    if diag:
        mask.diagonal().fill_(False)
    pos = _mask_nonzero(mask)
    cand_sims = sims.view(-1).index_select(0, pos)
    tile_rows, tile_cols = pos // sims.shape[1], pos % sims.shape[1]
    if not by_cols:
        return _merge(run_keys, tile_rows, _keys(cand_sims, tile_cols + col_offset))
    tile_cols, order = torch.sort(tile_cols)  # regroup the candidates by column
    cand_keys = _keys(
        cand_sims.index_select(0, order), tile_rows.index_select(0, order) + col_offset
    )
    return _merge(run_keys, tile_cols, cand_keys)


def knn(
    query: Array,
    k: int,
    gallery: Array | None = None,
    *,
    exclude_self: bool | None = None,
    block_size: int | None = None,
    metric: str = "ip",
) -> tuple[Tensor, Tensor]:
    """Exact top-k gallery items by inner product for each query: (Q, k) sims and indices
    (`metric="euclidean"`: smallest squared distance first, the scores being -|q - g|^2).

    `gallery=None` means the queries are the gallery; then `exclude_self` (default True) drops
    each query's own index (duplicates of it stay). With a gallery, `exclude_self=True` drops
    gallery item i for query i. Ties rank the lower gallery index first. Inputs: tensors or
    numpy arrays, finite; scores float32 (on CUDA, fp16/bf16 inputs multiply in half precision).
    Memory stays O(block_size^2 + Q k) on the embeddings' device."""
    x = _as_embeddings(query, "query")
    symmetric = gallery is None
    g = x if symmetric else _as_embeddings(gallery, "gallery").to(x.device, x.dtype)
    if g.shape[1] != x.shape[1]:
        raise ValueError(f"query has dimension {x.shape[1]} but gallery has {g.shape[1]}")
    exclude_self = symmetric if exclude_self is None else bool(exclude_self)
    euclidean = _choice("metric", metric, METRICS) == "euclidean"
    sq_x = x.float().square().sum(1) if euclidean else None
    sq_g = sq_x if symmetric or not euclidean else g.float().square().sum(1)
    n_query, n_gallery = x.shape[0], g.shape[0]
    available = n_gallery - int(exclude_self)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an int in [1, {available}] (gallery size"
            f"{' minus the query itself' if exclude_self else ''}); got {k!r}"
        )
    b = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    run = torch.full((n_query, int(k)), _EMPTY_KEY, dtype=torch.int64, device=x.device)
    starts_q, starts_g = range(0, n_query, b), range(0, n_gallery, b)
    # one tile and one mask buffer, reused: a fresh 64 MiB tensor per tile costs page faults
    tile_numel = min(b, n_query) * min(b, n_gallery)
    tile_buf = torch.empty(tile_numel, dtype=x.dtype, device=x.device)
    mask_buf = torch.empty(tile_numel, dtype=torch.bool, device=x.device)

    def tile(q0: int, g0: int) -> tuple[Tensor, Tensor]:
        xq, xg = x[q0 : q0 + b], g[g0 : g0 + b]
        sims = torch.mm(xq, xg.T, out=tile_buf[: len(xq) * len(xg)].view(len(xq), len(xg)))
        sims = sims.float()
        if sq_x is not None:  # -|q - g|^2, one value per pair: symmetric tiles stay symmetric
            sims = sims.mul_(2).sub_(sq_x[q0 : q0 + b, None]).sub_(sq_g[None, g0 : g0 + b])
        return sims, mask_buf[: sims.numel()].view(sims.shape)

    if symmetric:
        for a0 in starts_q:  # diagonal tiles first: every row block then has a tight threshold
            s, mask = tile(a0, a0)
            if exclude_self:
                s.diagonal().fill_(float("-inf"))
            run[a0 : a0 + b] = _update(
                run[a0 : a0 + b], s, a0, mask, by_cols=False, diag=exclude_self, init=True
            )
        for a0 in starts_q:
            for b0 in range(a0 + b, n_query, b):
                s, mask = tile(a0, b0)
                run[a0 : a0 + b] = _update(
                    run[a0 : a0 + b], s, b0, mask, by_cols=False, diag=False, init=False
                )
                run[b0 : b0 + b] = _update(
                    run[b0 : b0 + b], s, a0, mask, by_cols=True, diag=False, init=False
                )
    else:
        for q0 in starts_q:
            for g0 in starts_g:
                s, mask = tile(q0, g0)
                diag = exclude_self and q0 == g0  # one grid: only these tiles hold pairs (i, i)
                if diag:
                    s.diagonal().fill_(float("-inf"))
                run[q0 : q0 + b] = _update(
                    run[q0 : q0 + b], s, g0, mask, by_cols=False, diag=diag, init=g0 == 0
                )
    return _decode(run)


def _neighbour_hits(
    embeddings: Array,
    labels: Array,
    k_needed: Callable[[Tensor], int],
    gallery: Array | None,
    gallery_labels: Array | None,
    block_size: int | None,
    metric: str = "ip",
    lone_queries: str = "miss",
) -> tuple[Tensor, Tensor]:
    """(Q, k) bool: does the j-th neighbour share the query's label; and each query's R."""
    _choice("metric", metric, METRICS)
    _choice("lone_queries", lone_queries, LONE_QUERIES)
    x = _as_embeddings(embeddings, "embeddings")
    _check_norms(x, "embeddings", metric)
    q_labels = _as_labels(labels, x.shape[0], "labels")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("pass both gallery and gallery_labels, or neither (query = gallery)")
    g_labels, self_count = q_labels, 1
    if gallery is not None:
        g = _as_embeddings(gallery, "gallery")
        _check_norms(g, "gallery", metric)
        g_labels, self_count = _as_labels(gallery_labels, g.shape[0], "gallery_labels"), 0
    uniq, counts = torch.unique(g_labels, return_counts=True)
    pos = torch.searchsorted(uniq, q_labels).clamp_max(len(uniq) - 1)
    r = torch.where(uniq[pos] == q_labels, counts[pos], 0) - self_count
    lonely = int((r == 0).sum())
    if lonely:
        warnings.warn(
            f"{lonely} of {len(r)} queries have no relevant item in the gallery (their "
            f"class has one image, or none in the gallery): they {LONE_QUERIES[lone_queries]}, and "
            f"are left out of MAP@R and R-precision (nan when no query has one)",
            UserWarning,
            stacklevel=3,
        )
    k = k_needed(r)
    available = len(g_labels) - self_count
    if k > available:
        raise ValueError(
            f"k={k} exceeds the {available} gallery items each query can retrieve; use smaller ks"
        )
    _, idx = knn(x, k, None if gallery is None else g, block_size=block_size, metric=metric)
    hits = g_labels[idx.cpu()] == q_labels[:, None]
    return hits, r


def _check_ks(ks: int | Sequence[int]) -> list[int]:
    """A positive int or a sequence of them (bools are not ranks)."""
    items = list(ks) if isinstance(ks, (list, tuple, range, np.ndarray)) else [ks]
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in items):
        raise TypeError(f"ks must be a positive int or a sequence of them; got {ks!r}")
    if not items or min(items) < 1:
        raise ValueError(f"ks must be positive ints, e.g. (1, 2, 4, 8); got {ks!r}")
    return [int(k) for k in items]


def _check_max_r(max_r: int | None) -> int | None:
    """None (never clip R) or a positive int, checked as `ks` is (bools are not ranks)."""
    if max_r is None:
        return None
    if isinstance(max_r, bool) or not isinstance(max_r, (int, np.integer)):
        raise TypeError(f"max_r must be a positive int or None (no clipping); got {max_r!r}")
    if max_r < 1:
        raise ValueError(f"max_r must be a positive int (e.g. 1000) or None; got {max_r!r}")
    return int(max_r)


def _recall(hits: Tensor, r: Tensor, ks: list[int], lone_queries: str) -> dict[int, float]:
    """R@K per K over every query, or over those with a relevant item ("skip"; nan if none)."""
    found = (hits.cumsum(1) > 0)[r > 0 if lone_queries == "skip" else slice(None)]
    return {k: float(found[:, k - 1].double().mean()) if len(found) else math.nan for k in ks}


def recall_at_k(
    embeddings: Array,
    labels: Array,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    gallery: Array | None = None,
    gallery_labels: Array | None = None,
    block_size: int | None = None,
    metric: str = "ip",
    lone_queries: str = "miss",
) -> dict[int, float]:
    """Fraction of queries with at least one same-label item among their top-K, for each K.

    Query = gallery (the query itself excluded by index) unless `gallery` and
    `gallery_labels` are given (In-Shop style, nothing excluded). Ranking by inner product
    (`metric="ip"`) or smallest Euclidean distance (`"euclidean"`). A query with no same-label
    gallery item (a one-image class) counts as a miss (`lone_queries="miss"`: R@K is at most
    the fraction of queries with one) or is left out (`"skip"`, PML's; nan if none is left).
    """
    ks = _check_ks(ks)
    where = (gallery, gallery_labels, block_size, metric, lone_queries)
    hits, r = _neighbour_hits(embeddings, labels, lambda r: max(ks), *where)
    return _recall(hits, r, ks, lone_queries)


def retrieval_metrics(
    embeddings: Array,
    labels: Array,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    gallery: Array | None = None,
    gallery_labels: Array | None = None,
    max_r: int | None = 1000,
    block_size: int | None = None,
    metric: str = "ip",
    lone_queries: str = "miss",
) -> dict[str, float]:
    """Recall@K for each K plus "map@r" and "r_precision" (Musgrave et al., 2020).

    R is the number of gallery items sharing the query's label (the query itself excluded in
    the query = gallery case). R-precision = same-label items in the top R / R; MAP@R = sum of
    precision@i over the same-label ranks i <= R, divided by R. Queries with R = 0 are left
    out of map@r and r_precision (nan if none is left); in recall they count as misses or
    are left out, as `lone_queries` says (see `recall_at_k`, also for `metric`).
    A class larger than `max_r` would make the kNN wide (Q x R keys), so the ranking of those
    queries stops at `max_r`, with a warning: MAP@R counts the ranks past it as misses (still
    divided by the true R: a lower bound, as pytorch-metric-learning's AccuracyCalculator with
    k = max_r) and R-precision is taken over the first max_r ranks (as PML's). `max_r=None`
    never clips.
    """
    ks = _check_ks(ks)
    max_r = _check_max_r(max_r)
    clip = {"r": None}

    def k_needed(r: Tensor) -> int:
        r_max = int(r.max())
        if max_r is not None and r_max > max_r:
            clip["r"] = r_max
            r_max = int(max_r)
        return max(max(ks), r_max)

    where = (gallery, gallery_labels, block_size, metric, lone_queries)
    hits, r = _neighbour_hits(embeddings, labels, k_needed, *where)
    cut = r
    if clip["r"] is not None:
        warnings.warn(
            f"the largest class has R={clip['r']} > max_r={max_r}: for those queries MAP@R "
            f"counts the ranks past {max_r} as misses (a lower bound) and R-precision is "
            f"precision@{max_r}, as pytorch-metric-learning's; pass max_r=None for exact values",
            stacklevel=2,
        )
        cut = r.clamp_max(max_r)
    out = {f"recall@{k}": v for k, v in _recall(hits, r, ks, lone_queries).items()}
    ranks = torch.arange(1, hits.shape[1] + 1)
    relevant = hits & (ranks[None, :] <= cut[:, None])
    has_r = r > 0
    precision_at_hits = relevant.cumsum(1).double() / ranks * relevant
    map_r = precision_at_hits.sum(1) / r.clamp_min(1).double()  # the true R
    r_precision = relevant.sum(1).double() / cut.clamp_min(1).double()
    out["map@r"] = float(map_r[has_r].mean()) if has_r.any() else float("nan")
    out["r_precision"] = float(r_precision[has_r].mean()) if has_r.any() else float("nan")
    return out


def nmi(embeddings: Array, labels: Array, *, seed: int = 0, n_init: int = 10) -> float:
    """NMI between the labels and k-means clusters (k = number of classes) of the embeddings."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = _as_embeddings(embeddings, "embeddings").float().cpu().numpy()
    y = _as_labels(labels, x.shape[0], "labels").numpy()
    clusters = KMeans(len(np.unique(y)), n_init=n_init, random_state=seed).fit_predict(x)
    return float(normalized_mutual_info_score(y, clusters))
