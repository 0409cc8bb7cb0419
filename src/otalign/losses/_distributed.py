"""Data-parallel helpers: gather 1-D values from all processes with gradients, global means.

Convention (the one DDP, FSDP and DeepSpeed assume): every process computes the same global loss
from the gathered values, and the backward pass sums over processes the gradient that each
process's loss sends to a value. A process therefore receives ``world_size`` times the
single-process gradient for its own values, and the usual averaging of parameter gradients
across processes gives exactly the single-process gradient of the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(enabled: bool = True) -> bool:
    """True when ``enabled`` and a ``torch.distributed`` process group with more than one process is running."""
    return enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherVariable(torch.autograd.Function):
    """All-gather a 1-D tensor whose length differs per process; backward sums over processes."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        padded = local.new_zeros(max(sizes))
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous())
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size], None


def all_gather_with_grad(*values: torch.Tensor, enabled: bool = True) -> tuple[torch.Tensor, ...]:
    """Concatenate each 1-D tensor of ``values`` over all processes, in rank order, with gradients.

    The tensors may have different lengths on different processes. All of them travel in one
    collective (one ``all_reduce`` in the backward pass), so every process must call this with
    the same number of tensors. Outside a multi-process run the inputs are returned unchanged.

    Args:
        values: 1-D tensors (n_k,) on this process, one dtype and device.
        enabled: gather across processes when ``torch.distributed`` is running.

    Returns:
        One tensor per input, (sum over processes of n_k,); its gradient flows back to this
        process's part (see the module docstring for the scaling).
    """
    if not is_distributed(enabled):
        return values
    local = torch.cat(values)
    counts = torch.tensor([v.shape[0] for v in values], device=local.device, dtype=torch.long)
    table = [torch.empty_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(table, counts)
    per_rank = [t.tolist() for t in table]  # per_rank[r][k]: length of values[k] on process r
    gathered = _AllGatherVariable.apply(local, [sum(row) for row in per_rank])
    chunks = iter(gathered.split([n for row in per_rank for n in row]))
    by_rank = [[next(chunks) for _ in values] for _ in per_rank]
    return tuple(torch.cat([row[k] for row in by_rank]) for k in range(len(values)))


def global_mean(values: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """Mean of the 1-D ``values`` over all processes (all-reduced sum / count), detached.

    Args:
        values: (n,) values on this process; ``n`` may differ per process.
        enabled: gather across processes when ``torch.distributed`` is running.

    Returns:
        Scalar mean of every process's values, no gradient.
    """
    values = values.detach()
    total = torch.stack([values.sum(), torch.tensor(float(values.shape[0]), dtype=values.dtype, device=values.device)])
    if is_distributed(enabled):
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total[0] / total[1]
