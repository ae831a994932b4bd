"""Expert parallelism: each rank of an "ep" group holds E / ep experts; tokens travel to them and back.

One MoE layer on a rank with local tokens x [N, H]:

    weights, ids = route(x)                          every token's top-k experts (all E of them)
    x_sorted, sorted_idx, offsets = permute(x, ids)  rows grouped by global expert, so the rows bound
                                                     for rank j (experts j*E_l ... (j+1)*E_l - 1) are
                                                     contiguous
    counts all-to-all                                each rank learns how many rows of its experts
                                                     every other rank sends (the one host sync)
    rows all-to-all                                  rows arrive grouped by source rank, then expert
    reorder to expert-major; the local experts (the `experts` container, given a forward so that
    FSDP2 gathers and reduces its weights around it): SwiGLU as two grouped GEMMs; reorder back
    rows all-to-all back (the split sizes swapped)   each row returns to where it came from
    out = unpermute(y_sorted, sorted_idx, weights)   the weighted combine

The all-to-alls are torch's functional collectives, whose backward is the all-to-all with the split
sizes swapped, so the backward mirrors the forward. Uneven counts (an expert with every token,
experts with none, ranks with no tokens) are ordinary cases: the splits are whatever routing gives.
The expert weights are DTensors sharded on dim 0 over the "ep" mesh, so checkpoints see their global
shape [E, ...].
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from m1_kernels.moe_ops import SparseMoE, grouped_gemm, permute, route, unpermute
from m1_kernels.moe_ops.torch_backend import swiglu


def _expert_major(counts, total):
    """Rows received grouped by (source rank, local expert) -> grouped by (local expert, source rank).

    counts: [ep, E_l] rows from each source for each local expert (device). Returns (order, offsets):
    received[order] is expert-major, offsets [E_l + 1] int32 its expert boundaries."""
    flat = counts.flatten()
    starts = (flat.cumsum(0) - flat).view_as(counts)
    seg_len = counts.t().flatten()
    seg_start = starts.t().flatten()
    out_start = seg_len.cumsum(0) - seg_len
    shift = torch.repeat_interleave(seg_start - out_start, seg_len, output_size=total)
    order = torch.arange(total, device=counts.device) + shift
    offsets = torch.cat([counts.new_zeros(1), counts.sum(0).cumsum(0)]).to(torch.int32)
    return order, offsets


def _local(weight):
    """This rank's experts of an expert weight (a DTensor sharded over "ep"), differentiably."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class GroupedExperts(nn.Module):
    """What SparseMoE's `experts` container becomes under expert parallelism: the same two weights,
    plus a forward over rows grouped by local expert (FSDP2 hooks a module's forward)."""

    gate_up_proj: nn.Parameter
    down_proj: nn.Parameter
    backend: str | None

    def forward(self, x_sorted, offsets):
        h = swiglu(grouped_gemm(x_sorted, _local(self.gate_up_proj), offsets, backend=self.backend))
        return grouped_gemm(h, _local(self.down_proj), offsets, backend=self.backend)


class ExpertParallelMoE(SparseMoE):
    """SparseMoE whose experts are spread over the ranks of an "ep" group (see the module docstring).

    Parameters keep SparseMoE's names; experts.gate_up_proj / down_proj become DTensors of global
    shape [E, ...] sharded on dim 0 over the "ep" mesh."""

    ep_group: dist.ProcessGroup

    @classmethod
    def convert(cls, module: SparseMoE, ep_mesh) -> "ExpertParallelMoE":
        """Turn `module` into this class in place, keeping only this rank's experts (works on meta)."""
        ep = ep_mesh.size()
        if module.num_experts % ep:
            raise ValueError(f"the ep mesh size {ep} must divide the number of experts {module.num_experts}")
        per_rank = module.num_experts // ep
        first = ep_mesh.get_local_rank() * per_rank
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(module.experts, name)
            mine = full.detach()[first:first + per_rank].clone()     # a copy frees the other experts
            sharded = DTensor.from_local(mine, ep_mesh, [Shard(0)], run_check=False)
            setattr(module.experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        module.experts.__class__ = GroupedExperts
        module.experts.backend = module.backend
        module.__class__ = cls
        module.ep_group = ep_mesh.get_group()
        return module

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        E, ep = self.num_experts, dist.get_world_size(self.ep_group)
        weights, ids = route(x, self.gate.weight, self.top_k, backend=self.backend)
        x_sorted, sorted_idx, offsets = permute(x, ids, E, backend=self.backend)
        with torch.no_grad():
            counts = (offsets[1:] - offsets[:-1]).long()                          # rows per global expert
            received = funcol.all_to_all_single(counts, None, None, self.ep_group).view(ep, E // ep)
            send, recv = torch.stack([counts.view(ep, -1).sum(1), received.sum(1)]).tolist()
            order, local_offsets = _expert_major(received, sum(recv))
        x_recv = funcol.all_to_all_single_autograd(x_sorted, recv, send, self.ep_group)
        x_local = x_recv[order]
        y_local = self.experts(x_local, local_offsets)
        y_recv = y_local[torch.argsort(order)]
        y_sorted = funcol.all_to_all_single_autograd(y_recv, send, recv, self.ep_group)
        return unpermute(y_sorted, sorted_idx, weights, backend=self.backend).view(shape)
