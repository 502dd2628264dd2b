"""Distributed helpers that degrade to no-ops when no process group is initialised.

The contrastive losses of :mod:`grain.train.losses` are computed on the *global* batch: every rank gathers the
features of every other rank, computes the very same global loss, and lets gradients flow only into its own
(local) features. :func:`gather_with_local_grad` does the gathering (ranks may hold different numbers of rows),
:func:`scale_local_grad` undoes DDP's gradient averaging for such losses, and :func:`scale_grad` is the general
"same value, scaled gradient" tool both rely on.

Every function here is a *collective* when a process group exists: all ranks must call it, in the same order,
whatever their local data (e.g. also with 0 local rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group; 0 without a group."""
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks in the default group; 1 without a group."""
    return torch_dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """A copy of ``t`` summed over all ranks (any shape; no gradient flows through the reduction).

    Without a process group this is the identity (a detached copy of ``t``).
    """
    out = t.detach().clone()
    if is_distributed():
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def _all_sizes(n: int, device: torch.device) -> list[int]:
    """The dim-0 size of every rank (collective)."""
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(get_world_size())]
    torch_dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def gather_with_local_grad(x: Tensor, sizes: list[int] | None = None) -> tuple[Tensor, int]:
    """All-gather ``x`` along dim 0 from every rank; only the local slice stays attached to the graph.

    Args:
        x: ``[n_r, *rest]`` on rank ``r``; ``n_r`` may differ between ranks (0 included), ``rest`` and the dtype
            must be the same everywhere. Any dtype ``all_gather`` supports (float embeddings, long indices...).
        sizes: every rank's ``n_r`` when the caller knows them (:func:`all_gather_ints`); otherwise they are
            gathered here, which on a GPU reads device memory back (a host sync per call).

    Returns:
        ``(x_all, offset)`` where ``x_all`` is ``[sum_r n_r, *rest]``, the rows of rank 0, then rank 1, ...; the
        rows of this rank (``x_all[offset : offset + n_r]``) are the live ``x`` itself, so gradients of anything
        computed from ``x_all`` flow into ``x``, while the other ranks' rows are constants. ``offset`` is the
        number of rows held by lower ranks. Without a process group: ``(x, 0)``.

    Implementation: gather every rank's size, pad to the maximum, ``all_gather`` the padded (detached) copies,
    trim each to its true size and put the live ``x`` back in this rank's place.
    """
    if not is_distributed():
        return x, 0
    rank = get_rank()
    if sizes is None:
        sizes = _all_sizes(x.shape[0], x.device)
    elif len(sizes) != get_world_size() or sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes {sizes} do not fit rank {rank}'s {x.shape[0]} rows in a world of {get_world_size()}")
    offset = sum(sizes[:rank])
    max_n = max(sizes)
    if max_n == 0:  # nothing anywhere: every rank agrees, so skipping the collective is safe
        return x, offset
    padded = x.new_zeros((max_n, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    chunks = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(chunks, padded.contiguous())
    pieces = [chunk[:n] for chunk, n in zip(chunks, sizes)]
    pieces[rank] = x
    return torch.cat(pieces, dim=0), offset


def scale_grad(t: Tensor, factor: float) -> Tensor:
    """``t`` unchanged in value, but the gradient flowing back through it multiplied by ``factor``.

    Computed as ``factor * t + (1 - factor) * t.detach()``; returns ``t`` itself when ``factor == 1``.
    """
    if factor == 1:
        return t
    return factor * t + (1.0 - factor) * t.detach()


def scale_local_grad(loss: Tensor) -> Tensor:
    """``W * loss - (W - 1) * loss.detach()``: same value, gradient multiplied by the world size ``W``.

    Why: each rank computes the *same global* loss ``L`` from gathered features (:func:`gather_with_local_grad`),
    but the gradient reaches only its local features, so rank ``r`` back-propagates ``dL/dx_r`` into the
    parameters through its own samples only: ``g_r = J_r^T dL/dx_r``. The single-process gradient on the global
    batch is the sum ``sum_r J_r^T dL/dx_r``, while DDP *averages* the rank gradients, i.e. yields
    ``(1/W) sum_r g_r``. Multiplying each rank's gradient by ``W`` makes DDP's average equal the single-process
    gradient exactly.

    Caveat: a replicated tensor that enters the global loss directly on every rank (e.g. ``logit_scale``) gets
    the *full* ``dL/ds`` on every rank, so after this ``W`` scaling it must have its own gradient divided by
    ``W`` (``scale_grad(s, 1 / W)`` before use), which :class:`grain.train.losses.GrainCriterion` does.

    Without a process group (``W == 1``) ``loss`` is returned unchanged.
    """
    return scale_grad(loss, float(get_world_size()))


_HOST_GROUP: Any = None


def host_group() -> Any:
    """A process group for small host-side exchanges: the default group when it is gloo (CPU training), else a gloo
    group over the same ranks, made once (a collective: every rank's first call must be in step). Exchanging
    Python numbers over it never touches the GPU, so it costs no device sync."""
    global _HOST_GROUP
    if torch_dist.get_backend() == "gloo":
        return None  # the default group
    if _HOST_GROUP is None:
        _HOST_GROUP = torch_dist.new_group(backend="gloo")
    return _HOST_GROUP


def all_gather_ints(local: dict[str, int]) -> dict[str, list[int]]:
    """Every rank's integers ``local`` (same keys everywhere), in rank order: ``{key: [v_0, v_1, ...]}``, over the
    host group (collective).

    The training step calls it once with its batch's row counts (images, descriptions, matched pairs), so the
    contrastive losses can all-gather features of known sizes without reading sizes back from the GPU; logging
    steps use it to agree on rank 0's decisions. Without a process group: ``{key: [v]}``.
    """
    keys = sorted(local)
    if not is_distributed():
        return {k: [int(local[k])] for k in keys}
    mine = torch.tensor([int(local[k]) for k in keys], dtype=torch.long)
    out = [torch.zeros_like(mine) for _ in range(get_world_size())]
    torch_dist.all_gather(out, mine, group=host_group())
    table = torch.stack(out).tolist()
    return {k: [row[i] for row in table] for i, k in enumerate(keys)}


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj, group=host_group())  # pickles travel over gloo, not the GPU
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        torch.distributed.barrier()
