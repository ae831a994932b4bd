"""MoE cases at MiniMax-M1 shapes (E32 top-2, H6144, F9216, bf16): the expert GEMM pair + SwiGLU alone
and the whole fused_moe, forward and forward+backward, 64 to 32768 tokens, uniform and skewed routing,
plus the tensor-parallel shard (F 1152) and the expert-parallel shard (4 local experts).

Peers: the torch._grouped_mm pipeline (our "torch" backend on CUDA bf16: softmax top-k router, torch
sort, torch._grouped_mm for both GEMMs, PyTorch SwiGLU, weighted combine) and, at small token counts,
the per-expert loop of reference/moe.py.

Floors: FLOPs = 6 M H F for the GEMM pair (M = tokens * top_k; 3x that forward+backward) against the
measured matmul rate, and bytes = the active experts' weights read once (plus x and y) against the
measured copy bandwidth; the harness takes the larger, so large token counts are judged on FLOPs and
decode on the weight read.
"""

import torch

from m1_kernels.dispatch import available_backends
from m1_kernels.moe_ops import ops, torch_backend
from m1_kernels.reference import moe as RM

from .harness import Case

M1 = dict(E=32, top_k=2, H=6144, F=9216)


def _problem(tokens, E, H, F, routing, device, dtype, seed=0):
    """x [tokens, H], gate [E, H], gate_up [E, 2F, H], down [E, H, F]. A constant input feature with a
    per-expert gate column skews the router: "skewed" gives p(e) ~ 1/(e+1)^1.2 before top-k."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    gate = torch.randn(E, H, generator=g) * H ** -0.5
    if routing == "skewed":
        x[:, 0] = 1.0
        gate[:, 0] = -1.2 * torch.log1p(torch.arange(E, dtype=torch.float32))
    gate_up = torch.randn(E, 2 * F, H, device=device, dtype=dtype) * H ** -0.5
    down = torch.randn(E, H, F, device=device, dtype=dtype) * F ** -0.5
    return x, gate, gate_up, down


def _offsets(x, gate, top_k):
    """Expert offsets of the sorted rows and the number of experts that receive any (on the CPU)."""
    _, ids = torch_backend.route(x, gate, top_k, True)
    counts = torch.bincount(ids.flatten().long(), minlength=gate.shape[0])
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32), int((counts > 0).sum())


def _name(what, tokens, E, top_k, H, F, routing, backward):
    return f"{what} {'fwd+bwd' if backward else 'fwd'} E{E} top{top_k} H{H} F{F} T{tokens} {routing}"


def _kernel_backends(device):
    if device.type != "cuda":  # the Triton interpreter is for tests, not for timing
        return []
    return [b for b in available_backends(ops.FUSED_MOE_BACKENDS, device) if b != "torch"]


def _runner(fn, backward):
    def call(inputs):
        out = fn(inputs)
        if backward:
            torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                                inputs[-1])
    return call


def gemm_pair_case(device, tokens, E, top_k, H, F, routing="uniform", backward=False, loop_peer=False,
                   dtype=torch.bfloat16):
    """The two grouped GEMMs with SwiGLU between them over already sorted rows."""
    x_cpu, gate, _, _ = _problem(tokens, E, H, 1, routing, "cpu", dtype)
    offsets, active = _offsets(x_cpu, gate, top_k)
    M = tokens * top_k

    def make():
        _, _, gate_up, down = _problem(0, E, H, F, routing, device, dtype)
        x = torch.randn(M, H, device=device, dtype=dtype)
        dy = torch.randn(M, H, device=device, dtype=dtype) if backward else None
        return (x.requires_grad_(backward), gate_up.requires_grad_(backward), down.requires_grad_(backward),
                offsets.to(device), dy)

    def grouped_mm_pair(i):
        x, gate_up, down, off = i[:4]
        h = torch_backend.swiglu(torch_backend.grouped_gemm(x, gate_up, off, "nk"))
        return torch_backend.grouped_gemm(h, down, off, "nk")

    def loop_pair(i):
        x, gate_up, down, off = i[:4]
        b = off.tolist()
        return torch.cat([RM.expert(x[b[e]:b[e + 1]], gate_up[e], down[e]) for e in range(E)])

    impls = {f"ours[{b}]": _runner(lambda i, b=b: ops._expert_mlp(i[0], i[1], i[2], i[3], backward, b)[0],
                                   backward)
             for b in _kernel_backends(device)}
    impls["torch._grouped_mm pair"] = _runner(grouped_mm_pair, backward)
    if loop_peer:
        impls["per-expert loop"] = _runner(loop_pair, backward)
    passes, elem = (3 if backward else 1), torch.finfo(dtype).bits // 8
    weight_bytes = active * 3 * H * F * elem * passes          # read forward; read for dX and dW written
    return Case("moe gemm pair", _name("gemm pair+SwiGLU", tokens, E, top_k, H, F, routing, backward), make,
                impls, bytes=weight_bytes + 2 * M * H * elem * passes, flops=6.0 * M * H * F * passes,
                max_sets=1, params=dict(tokens=tokens, E=E, top_k=top_k, H=H, F=F, routing=routing,
                                        backward=backward, active_experts=active))


def fused_case(device, tokens, E, top_k, H, F, routing="uniform", backward=False, loop_peer=False,
               dtype=torch.bfloat16):
    """The whole layer: route, permute, GEMM pair + SwiGLU, weighted combine."""
    x_cpu, gate_cpu, _, _ = _problem(tokens, E, H, 1, routing, "cpu", dtype)
    _, active = _offsets(x_cpu, gate_cpu, top_k)
    M = tokens * top_k

    def make():
        _, _, gate_up, down = _problem(0, E, H, F, routing, device, dtype)
        x = x_cpu.to(device=device, dtype=dtype)
        gate = gate_cpu.to(device=device, dtype=dtype)
        dout = torch.randn(tokens, H, device=device, dtype=dtype) if backward else None
        return (x.requires_grad_(backward), gate.requires_grad_(backward), gate_up.requires_grad_(backward),
                down.requires_grad_(backward), dout)

    def run(backend):
        return lambda i: ops.fused_moe(i[0], i[1], i[2], i[3], top_k, backend=backend)

    impls = {f"ours[{b}]": _runner(run(b), backward) for b in _kernel_backends(device)}
    pipeline = "torch._grouped_mm pipeline" if device.type == "cuda" else "ours[torch]"
    impls[pipeline] = _runner(run("torch"), backward)
    if loop_peer:
        impls["per-expert loop"] = _runner(lambda i: RM.moe(i[0], i[1], i[2], i[3], top_k), backward)
    passes, elem = (3 if backward else 1), torch.finfo(dtype).bits // 8
    weight_bytes = active * 3 * H * F * elem * passes
    return Case("moe fused", _name("fused_moe", tokens, E, top_k, H, F, routing, backward), make, impls,
                bytes=weight_bytes + 2 * tokens * H * elem * passes, flops=6.0 * M * H * F * passes,
                max_sets=1, params=dict(tokens=tokens, E=E, top_k=top_k, H=H, F=F, routing=routing,
                                        backward=backward, active_experts=active))


def cases(device):
    if device.type != "cuda":  # the CPU paths at a toy shape (the interpreter is for tests, not timing)
        toy = dict(E=8, top_k=2, H=64, F=128)
        return [fused_case(device, 64, **toy, dtype=torch.float32, loop_peer=True),
                fused_case(device, 64, **toy, dtype=torch.float32, backward=True)]
    out = []
    for tokens in (64, 1024, 8192, 32768):
        out.append(gemm_pair_case(device, tokens, **M1, loop_peer=tokens <= 1024))
    out += [gemm_pair_case(device, t, **M1, routing="skewed") for t in (64, 8192)]
    out += [gemm_pair_case(device, 8192, **dict(M1, F=1152)),           # tensor-parallel shard (8 ranks)
            gemm_pair_case(device, 8192, **dict(M1, E=4))]              # expert-parallel shard (4 local)
    out += [gemm_pair_case(device, 8192, **M1, backward=True)]
    for tokens in (64, 1024, 8192, 32768):
        out.append(fused_case(device, tokens, **M1, loop_peer=tokens <= 1024))
    out += [fused_case(device, 8192, **M1, routing="skewed"),
            fused_case(device, 8192, **dict(M1, F=1152)),
            fused_case(device, 8192, **dict(M1, E=4))]
    out += [fused_case(device, t, **M1, backward=True) for t in (1024, 8192)]
    out += [fused_case(device, 8192, **dict(M1, F=1152), backward=True)]
    return out
