"""Cross-batch memory (XBM; Wang, Zhang, Huang, Scott, CVPR 2020) for pair-based losses.

Embeddings drift slowly once training settles, so detached embeddings from recent
iterations are still good references: a FIFO of them lets each anchor meet thousands of
negatives instead of one batch's worth, at the cost of one (B, M) matrix product.

Training step (XBM's order): compute the batch loss; once the memory is active, enqueue the
current batch *first* and then compute the anchors-against-memory term, so the current batch
is among the references too (as detached copies):

    loss_fn = build_loss("contrastive")  # any pair loss of the registry, MS included
    loss = loss_fn(emb, labels)
    if xbm.active(it):
        xbm.enqueue(emb.detach(), labels, indices)
        loss = loss + xbm.weight * xbm.loss(loss_fn.from_sim, emb, labels, indices)

`xbm_step_loss` does exactly that. Under DDP pass the all-gathered batch (see
`distributed.global_batch_loss(..., indices=...)`) so every rank keeps the same memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# loss_fn(sim (B, M), labels (B,), ref_labels (M,), ignore (B, M) bool) -> 0-dim tensor,
# called with keywords ref_labels= and ignore=: the `from_sim` of any pair loss of the registry
# (MS, contrastive, triplet, binomial, lifted), or `multi_similarity_loss` (the readable MS).
SimLossFn = Callable[..., Tensor]


class CrossBatchMemory:
    """A FIFO ring buffer of detached embeddings, their labels and their dataset indices.

    The buffer is allocated at the first enqueue with that batch's width and device, in
    float32 (float64 for float64 batches); later batches must have the same width. `size` is
    the number of embeddings kept; `start_iteration` the first iteration at which the memory is used
    (XBM switches it on after the embeddings have settled); `weight` scales the memory term.
    """

    def __init__(self, size: int, start_iteration: int = 0, weight: float = 1.0) -> None:
        if size < 1:
            raise ValueError(
                f"memory size must be positive, got {size}; e.g. the training set size"
            )
        self.size = int(size)
        self.start_iteration = int(start_iteration)
        self.weight = float(weight)
        self.embeddings: Tensor | None = None
        self.labels: Tensor | None = None
        self.indices: Tensor | None = None
        self.ptr = 0  # the slot the next entry goes to
        self.count = 0  # filled slots; always the prefix [0, count) until the buffer wraps

    def __len__(self) -> int:
        return self.count

    def active(self, iteration: int) -> bool:
        """True from `start_iteration` on."""
        return iteration >= self.start_iteration

    def _allocate(self, like: Tensor) -> None:
        # fp16 / bf16 batches from autocast are stored in float32: the memory outlives many
        # steps and feeds a loss that is computed in float32 anyway.
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.embeddings = torch.zeros((self.size, like.shape[1]), dtype=dtype, device=like.device)
        self.labels = torch.zeros(self.size, dtype=torch.long, device=like.device)
        self.indices = torch.zeros(self.size, dtype=torch.long, device=like.device)

    def _move_to(self, device: torch.device) -> None:
        # A memory restored from a CPU checkpoint follows the model to its device.
        if self.embeddings is not None and self.embeddings.device != device:
            self.embeddings = self.embeddings.to(device)
            self.labels = self.labels.to(device)
            self.indices = self.indices.to(device)

    def enqueue(self, embeddings: Tensor, labels: Tensor, indices: Tensor) -> None:
        """Append a batch, overwriting the oldest entries once full (detaches `embeddings`)."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if labels.shape != (n,) or indices.shape != (n,):
            raise ValueError(
                f"need one label and one dataset index per embedding: got {n} embeddings, "
                f"labels {tuple(labels.shape)}, indices {tuple(indices.shape)}"
            )
        if self.embeddings is None:
            self._allocate(embeddings)
        elif embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"memory holds {self.embeddings.shape[1]}-d embeddings but got "
                f"{embeddings.shape[1]}-d; use a new CrossBatchMemory (or reset()) after "
                "changing the embedding size"
            )
        self._move_to(embeddings.device)
        device = self.embeddings.device
        embeddings = embeddings.detach().to(self.embeddings.dtype)
        labels = labels.detach().to(device=device, dtype=torch.long)
        indices = indices.detach().to(device=device, dtype=torch.long)
        if n >= self.size:  # only the newest `size` entries would survive anyway
            keep = slice(n - self.size, n)
            embeddings, labels, indices = embeddings[keep], labels[keep], indices[keep]
            n = self.size
        slots = (self.ptr + torch.arange(n, device=device)) % self.size
        self.embeddings[slots] = embeddings
        self.labels[slots] = labels
        self.indices[slots] = indices
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    def reset(self) -> None:
        """Forget every entry and the width (the next enqueue allocates afresh)."""
        self.embeddings = self.labels = self.indices = None
        self.ptr = self.count = 0

    def loss(
        self, loss_fn_sim: SimLossFn, embeddings: Tensor, labels: Tensor, indices: Tensor
    ) -> Tensor:
        """The anchors-against-memory term: `loss_fn_sim(sim, labels, ref_labels=, ignore=)`.

        sim = embeddings @ memory^T (B, M). Every memory entry with the anchor's own dataset
        index is ignored, so the copy just enqueued (similarity 1) is never the anchor's own
        positive; older copies of the same item go too (PML drops only the copy just enqueued,
        which is the same thing while the memory holds each item at most once).
        Stored order does not matter to the loss, so the buffer is used as it lies. An empty
        memory gives a zero that still back-propagates.
        """
        if self.count == 0:
            return embeddings.sum() * 0.0
        self._move_to(embeddings.device)
        memory = self.embeddings[: self.count]
        ref_labels = self.labels[: self.count]
        ref_indices = self.indices[: self.count]
        # Formed outside autocast in the memory's precision, as the MS loss forms its own S.
        with torch.autocast(embeddings.device.type, enabled=False):
            sim = embeddings.to(memory.dtype) @ memory.T
        ignore = indices.to(ref_indices.device).view(-1, 1) == ref_indices.view(1, -1)
        return loss_fn_sim(sim, labels, ref_labels=ref_labels, ignore=ignore)

    def state_dict(self) -> dict:
        """Plain tensors (CPU) and numbers only, so `torch.load(weights_only=True)` reads it."""
        state = {
            "size": self.size,
            "start_iteration": self.start_iteration,
            "weight": self.weight,
            "ptr": self.ptr,
            "count": self.count,
        }
        if self.embeddings is not None:
            # The filled entries are always the prefix [0, count); the rest is never read.
            state["embeddings"] = self.embeddings[: self.count].detach().cpu().clone()
            state["labels"] = self.labels[: self.count].cpu().clone()
            state["indices"] = self.indices[: self.count].cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore exactly what `state_dict` saved (tensors stay on the CPU until next used)."""
        if int(state["size"]) != self.size:
            raise ValueError(
                f"checkpoint memory holds {state['size']} entries but this one {self.size}; "
                f"set the memory size to {state['size']} to resume"
            )
        self.start_iteration = int(state["start_iteration"])
        self.weight = float(state["weight"])
        self.reset()
        if "embeddings" in state:
            stored = state["embeddings"]
            self._allocate(stored)
            count = stored.shape[0]
            self.embeddings[:count] = stored
            self.labels[:count] = state["labels"]
            self.indices[:count] = state["indices"]
        self.ptr = int(state["ptr"])
        self.count = int(state["count"])


def xbm_step_loss(
    memory: CrossBatchMemory | None,
    iteration: int,
    batch_loss: Tensor,
    loss_fn_sim: SimLossFn,
    embeddings: Tensor,
    labels: Tensor,
    indices: Tensor,
) -> Tensor:
    """`batch_loss` plus, once `memory` is active, `memory.weight` x the memory term.

    Enqueues the current batch before computing the memory term (XBM's order). With no
    memory, or before `start_iteration`, returns `batch_loss` and leaves the memory untouched.
    """
    if memory is None or not memory.active(iteration):
        return batch_loss
    memory.enqueue(embeddings.detach(), labels, indices)
    return batch_loss + memory.weight * memory.loss(loss_fn_sim, embeddings, labels, indices)
