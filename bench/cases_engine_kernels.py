"""Engine kernels at M1 shapes: paged-KV decode attention and the fp32-accurate LM head.

Paged decode (H 64, Hkv 8, D 128, bf16 cache, shuffled pages, every row at the full context): floor =
the K/V bytes each row must read once (sum of lengths x Hkv x D x 2 x 2 B) plus q and o; timed inside
CUDA graphs, as the engine runs it. Peer: the torch path (every row's pages gathered, then SDPA with
the query heads of a kv head as query rows), where its gathered copy fits.

LM head (V 200064, H 6144, bf16 weight): floor = the weight read once plus activations and fp32 logits
(small N), or 2 N H V FLOPs at the bf16 matmul rate (large N; the fp32 activation's three pieces
triple the dots, so 1/3 is that row's ceiling). Peers: F.linear in bf16 (fast, logits rounded to
bf16) and the fp32 head that converts the weight on every call (what the model did before).
"""

import functools

import torch
import torch.nn.functional as F

from m1_kernels.model.lm_head import lm_head_logits
from m1_kernels.model.paged_attention import paged_attention_decode

from .harness import Case

PEER_GATHER_TOKENS = 1 << 21   # the torch peer copies every row's K/V: beyond 2M tokens (8.6 GB) it is skipped


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def paged_decode_case(device, B, ctx, H=64, Hkv=8, D=128, page_size=16, dtype=torch.bfloat16):
    pages_per_row = ctx // page_size
    scale = D ** -0.5

    def make():
        P = B * pages_per_row
        k_pages = torch.randn(P, Hkv, page_size, D, device=device, dtype=dtype)
        v_pages = torch.randn_like(k_pages)
        table = torch.randperm(P, device=device).view(B, pages_per_row).to(torch.int32)
        seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
        return torch.randn(B, H, D, device=device, dtype=dtype), k_pages, v_pages, table, seq_lens

    ours = "triton" if device.type == "cuda" else "torch"   # the Triton interpreter is a test tool, not a path
    impls = {f"ours[{ours}]": lambda x: paged_attention_decode(*x, scale, backend=ours)}
    if device.type == "cuda" and B * ctx <= PEER_GATHER_TOKENS:
        impls["torch gather + SDPA"] = lambda x: paged_attention_decode(*x, scale, backend="torch")
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = B * ctx * Hkv * D * 2 * elem
    return Case("paged decode", f"decode B{B} ctx{ctx} H{H}/{Hkv} D{D} page{page_size} {_name(dtype)} (graph)", make,
                impls, bytes=kv_bytes + 2 * B * H * D * elem, cuda_graph=True,
                params=dict(B=B, ctx=ctx, H=H, Hkv=Hkv, D=D, page_size=page_size, dtype=_name(dtype)))


@functools.cache
def _head_weight(device, V, H):
    """One weight shared by the LM-head cases (2.5 GB at M1 size: made once, when the first of them runs)."""
    return torch.randn(V, H, device=device, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)


def lm_head_case(device, N, hidden_dtype, V=200064, H=6144):
    def make():
        return torch.randn(N, H, device=device).mul_(3).to(hidden_dtype), _head_weight(device, V, H)

    ours = "triton" if device.type == "cuda" else "torch"
    impls = {f"ours[{ours}]": lambda x: lm_head_logits(x[0], x[1], backend=ours),
             "F.linear bf16 (inexact)": lambda x: F.linear(x[0].to(torch.bfloat16), x[1]),
             "fp32 head (weight converted)": lambda x: F.linear(x[0].float(), x[1].float())}
    in_elem = torch.finfo(hidden_dtype).bits // 8
    return Case("lm head", f"lm_head N{N} V{V} H{H} {_name(hidden_dtype)} hidden, bf16 weight", make, impls,
                bytes=V * H * 2 + N * H * in_elem + N * V * 4, flops=2 * N * H * V,
                params=dict(N=N, V=V, H=H, hidden_dtype=_name(hidden_dtype)))


def cases(device):
    if device.type != "cuda":
        return [paged_decode_case(device, 2, 256, H=8, Hkv=2, D=64, dtype=torch.float32),
                lm_head_case(device, 4, torch.float32, V=1000, H=256)]
    out = [paged_decode_case(device, B, ctx) for B in (1, 64, 256) for ctx in (1024, 32768)]
    out.append(paged_decode_case(device, 64, 32768, page_size=64))   # the page-size choice, at the largest peer shape
    out += [lm_head_case(device, N, torch.bfloat16) for N in (1, 64, 256, 8192)]
    out += [lm_head_case(device, N, torch.float32) for N in (1, 256, 8192)]
    return out
