"""Lightning attention cases: prefill (forward, forward+backward) and decode at M1 shapes.

Peers: flash-linear-attention (`chunk_simple_gla` with g_gamma = -slope, scale 1.0, for prefill;
`fused_recurrent_simple_gla` for decode), when importable, and our torch backend.
"""

import torch

from m1_kernels import lightning_ops
from m1_kernels.dispatch import available_backends
from m1_kernels.lightning_ops.backends import OP_BACKENDS
from m1_kernels.model.config import M1Config

from .harness import Case

M1 = M1Config.preset("minimax-m1")
H, D, LAYERS = M1.num_attention_heads, M1.head_dim, M1.num_hidden_layers
H_TP8 = H // 8   # one GPU's heads under 8-way tensor parallelism


def _fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception:  # fla is an optional peer (and needs a GPU)
        return None
    return chunk_simple_gla, fused_recurrent_simple_gla


def _our_backends(op, device):
    """Backend names to time for `op`: on the CPU only "torch" (the Triton interpreter is a test tool, not
    a path)."""
    return [b.name for b in available_backends(OP_BACKENDS[op], device) if device.type == "cuda" or b.name == "torch"]


def _prefill_case(device, name, B, T, H, D, dtype, backward, slope, cu_seqlens, torch_peer, params,
                  initial_states=False, cuda_graph=False):
    """One prefill case (fixed-length or packed): ours per backend, fla chunk, the torch backend. With
    initial_states, every sequence starts from a given fp32 state (a serving prefill continuing cached
    states, a packed training batch of continued sequences); its gradient is taken too. With cuda_graph,
    timed as replays of a CUDA graph: the GPU time, without the host's launch work, which short calls
    are bound by when timed alone (bench/NOTES.md, session 9)."""
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1

    def make():
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) * D ** -0.5 for _ in range(3))
        do = torch.randn_like(v) if backward else None
        h0 = (torch.randn(N, H, D, D, device=device) * 0.05).requires_grad_(backward) if initial_states else None
        return q.requires_grad_(backward), k.requires_grad_(backward), v.requires_grad_(backward), h0, do

    def run(fn):
        def call(inputs):
            q, k, v, h0, do = inputs
            o = fn(q, k, v, h0)
            if backward:
                torch.autograd.grad(o, (q, k, v) if h0 is None else (q, k, v, h0), do)
        return call

    impls = {}
    for backend in _our_backends("lightning_attn", device):
        if backend == "torch" and not torch_peer:
            continue
        label = f"ours[{backend}]" if backend != "torch" or device.type == "cpu" else "torch (fp32 blockwise)"
        impls[label] = run(lambda q, k, v, h0, b=backend: lightning_ops.lightning_attn(
            q, k, v, slope, initial_state=h0, cu_seqlens=cu_seqlens, backend=b)[0])
    fla = _fla() if device.type == "cuda" else None
    if fla is not None:
        chunk, cu64 = fla[0], None if cu_seqlens is None else cu_seqlens.long()
        impls["fla chunk"] = run(lambda q, k, v, h0: chunk(q, k, v, g_gamma=-slope, scale=1.0, initial_state=h0,
                                                          cu_seqlens=cu64)[0])
    io = B * T * H * 4 * D * (torch.finfo(dtype).bits // 8)            # q, k, v read; o written
    io += N * H * D * D * 4 if initial_states else 0                    # the initial states read
    return Case("lightning prefill", name + (" (graph)" if cuda_graph else ""), make, impls,
                bytes=io * (3 if backward else 1), cuda_graph=cuda_graph,
                params=dict(params, H=H, D=D, T=T, dtype=str(dtype), backward=backward,
                            initial_states=initial_states, graph=cuda_graph))


def prefill_cases(device, B, H, D, T, dtype, backward=False, layer=0, torch_peer=True, cuda_graph=False):
    mode = "fwd+bwd" if backward else "fwd"
    name = f"{mode} B{B} H{H} D{D} T{T} {str(dtype).removeprefix('torch.')}"
    slope = lightning_ops.slopes(H, layer, LAYERS, device=device)
    return _prefill_case(device, name, B, T, H, D, dtype, backward, slope, None, torch_peer, dict(B=B),
                         cuda_graph=cuda_graph)


def varlen_case(device, H, D, lengths, dtype=torch.bfloat16, backward=False, initial_states=False, torch_peer=True):
    """A pack of sequences of mixed lengths (empty and length-1 included), one state each."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T = int(sum(lengths))
    slope = lightning_ops.slopes(H, 0, LAYERS, device=device)
    mode = "fwd+bwd" if backward else "fwd"
    start = " from states" if initial_states else ""
    name = f"varlen {mode} N{len(lengths)}{start} H{H} D{D} T{T} {str(dtype).removeprefix('torch.')}"
    return _prefill_case(device, name, 1, T, H, D, dtype, backward, slope, cu, torch_peer, dict(lengths=list(lengths)),
                         initial_states)


def packed_lengths(count, low, high, seed=0):
    """`count` sequence lengths drawn uniformly from [low, high] (a serving step's or a packed batch's mix)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=g).tolist()


def decode_case(device, B, H, D, dtype=torch.bfloat16):
    slope = lightning_ops.slopes(H, 0, LAYERS, device=device)

    def make():
        q, k, v = (torch.randn(B, H, D, device=device, dtype=dtype) for _ in range(3))
        state = torch.randn(B, H, D, D, device=device) * 0.1
        slots = torch.arange(B, dtype=torch.int32, device=device)
        return q, k, v, state, slots

    impls = {}
    for backend in _our_backends("lightning_attn_decode", device):
        label = f"ours[{backend}]" if backend != "torch" or device.type == "cpu" else "torch"
        impls[label] = (lambda x, b=backend: lightning_ops.lightning_attn_decode(
            x[0], x[1], x[2], slope, x[3], slot_idx=x[4], backend=b))
    fla = _fla() if device.type == "cuda" else None
    if fla is not None:
        recurrent = fla[1]
        impls["fla fused_recurrent"] = lambda x: recurrent(
            x[0][:, None], x[1][:, None], x[2][:, None], g_gamma=-slope, scale=1.0, initial_state=x[3],
            output_final_state=True)
    state_bytes = 2 * B * H * D * D * 4                  # fp32 state read once and written once
    return Case("lightning decode", f"decode B{B} H{H} D{D} fp32 state (graph)", make, impls, bytes=state_bytes,
                params=dict(B=B, H=H, D=D), cuda_graph=True)


def cases(device):
    if device.type != "cuda":
        return [prefill_cases(device, 1, 4, 64, 512, torch.float32),
                prefill_cases(device, 1, 4, 64, 512, torch.float32, backward=True),
                varlen_case(device, 4, 64, [200, 0, 1, 311], torch.float32),
                varlen_case(device, 4, 64, [30, 90, 17], torch.float32, backward=True, initial_states=True),
                decode_case(device, 8, 4, 64, torch.float32)]
    out = [prefill_cases(device, 1, H, D, T, torch.bfloat16, torch_peer=T <= 32768) for T in (8192, 32768)]
    out += [prefill_cases(device, 1, H, D, T, torch.bfloat16, backward=True, torch_peer=False) for T in (8192, 32768)]
    # Tensor-parallel shard, long contexts: memory must stay linear (rows record peak_mem_GiB).
    out += [prefill_cases(device, 1, H_TP8, D, T, torch.bfloat16, backward=bwd, torch_peer=T <= 131072 and not bwd)
            for T in (131072, 1 << 20) for bwd in (False, True)]
    pack = [8192, 1, 0, 3000, 12000, 64, 7000, 2447]                 # 32768 tokens
    out += [varlen_case(device, H, D, pack, backward=bwd) for bwd in (False, True)]
    # Short and packed, as training and serving produce them: single sequences of 2K-8K tokens, and packs of
    # many 200-3000-token sequences continuing from states (about 32K tokens per pack).
    out += [prefill_cases(device, 1, H, D, T, torch.bfloat16, backward=bwd, torch_peer=False)
            for T in (2048, 4096) for bwd in (False, True)]
    for count, (low, high) in ((160, (100, 300)), (20, (1000, 2200))):
        lengths = packed_lengths(count, low, high)
        out += [varlen_case(device, H, D, lengths, backward=bwd, initial_states=True, torch_peer=False)
                for bwd in (False, True)]
    out += [decode_case(device, B, heads, D) for heads in (H, H_TP8) for B in (16, 64, 128, 256)]
    # The short cases once more from CUDA graphs (GPU time); last, as a peer that cannot be captured fails here.
    out += [prefill_cases(device, 1, H, D, T, torch.bfloat16, backward=bwd, torch_peer=False, cuda_graph=True)
            for T in (2048, 4096) for bwd in (False, True)]
    return out
