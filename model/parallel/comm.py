"""Collectives the parallel model needs beyond FSDP2: uneven splits and gathers along any dim.

Everything goes through torch.distributed: the functional collectives (autograd-aware, the backward
of an all-gather is a reduce-scatter of the gradients) or plain `dist` calls inside a custom
autograd.Function where the backward is local.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def split_sizes(n: int, parts: int) -> list[int]:
    """How `n` items split over `parts` ranks: the first n % parts ranks get one more (torch.tensor_split)."""
    if n < 0 or parts < 1:
        raise ValueError(f"split_sizes needs n >= 0 and parts >= 1, got n={n}, parts={parts}")
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def all_gather_sizes(n: int, group, device) -> list[int]:
    """Every rank's `n`, in group rank order (one tiny all-gather; a host sync on GPUs)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(out, mine, group=group)
    return out.tolist()


def _pad_front_dim(x, length):
    """x with dim 0 zero-padded to `length` rows (collectives need equal sizes on every rank)."""
    if x.shape[0] == length:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])]).contiguous()


def _unpad_cat(gathered, sizes):
    """The first sizes[r] rows of each rank's equal block of `gathered`, concatenated."""
    block = max(sizes)
    return torch.cat([gathered[r * block: r * block + n] for r, n in enumerate(sizes)])


def gather_varlen(x, dim: int, sizes: list[int], group):
    """Concatenate every rank's `x` along `dim` (rank r contributes sizes[r] entries); differentiable,
    the backward reduce-scatters the gradient, so each rank gets the sum of all uses of its slice."""
    moved = _pad_front_dim(x.movedim(dim, 0), max(sizes))
    gathered = funcol.all_gather_tensor_autograd(moved, 0, group)
    return _unpad_cat(gathered, sizes).movedim(0, dim)


class _GatherReplicated(torch.autograd.Function):
    """Forward: all-gather along a dim. Backward: this rank's slice of the incoming gradient, with no
    communication, which is right when every rank computes the same loss from the gathered tensor."""

    @staticmethod
    def forward(ctx, x, dim, sizes, group):
        moved = _pad_front_dim(x.movedim(dim, 0), max(sizes))
        out = moved.new_empty(len(sizes) * moved.shape[0], *moved.shape[1:])
        dist.all_gather_into_tensor(out, moved, group=group)
        rank = dist.get_rank(group)
        ctx.dim, ctx.start, ctx.size = dim, sum(sizes[:rank]), sizes[rank]
        return _unpad_cat(out, sizes).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.size), None, None, None


def gather_replicated(x, dim: int, sizes: list[int], group):
    """All-gather `x` along `dim` (rank r holds sizes[r] entries) for a loss every rank computes alike:
    the backward hands each rank its own slice of the (identical) gradient."""
    return _GatherReplicated.apply(x, dim, sizes, group)
