"""Paged KV attention (model/paged_attention.py): write_kv, decode and prefill on both backends against
float64 references on contiguous keys/values gathered from the pages.

Every cache is built with NaN in each slot no sequence owns (the rest of a last page, spare pages),
block tables hold shuffled page ids and garbage past each row's pages, and outputs are NaN-prefilled:
a kernel that reads a stale slot, a page past a row's end or forgets a row fails. Lengths cross page
edges (0 = padding row, 1, page-1, page, page+1); GQA ratios 1, 2 and 8.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from m1_kernels.dispatch import backend_error
from m1_kernels.model import paged_attention as PA
from m1_kernels.model.paged_attention import paged_attention_decode, paged_attention_prefill, write_kv
from m1_kernels.reference.attention import gather_paged, softmax_attention
from numerics import DEVICE, assert_within_2x, nan_filled_outputs

ON_GPU = DEVICE.type == "cuda"
needs_triton = pytest.mark.skipif(backend_error("triton", DEVICE) is not None, reason="triton backend unavailable here")


def build_cache(lengths, Hkv, D, PS, dtype, seed):
    """Pages holding the first lengths[b] tokens of each row b (NaN everywhere else), a shuffled block
    table with garbage entries past each row's pages, and the stored keys/values."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(L / PS) for L in lengths]
    P = sum(need) + 2
    width = max(need + [1]) + 1
    perm = torch.randperm(P, generator=g)
    table = torch.randint(-3, P + 3, (len(lengths), width), generator=g)
    k_pages = torch.full((P, Hkv, PS, D), float("nan"), dtype=torch.float64)
    v_pages = k_pages.clone()
    used = 0
    for b, L in enumerate(lengths):
        ids = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = ids
        t = torch.arange(L)
        k_pages[ids[t // PS], :, t % PS] = torch.randn(L, Hkv, D, generator=g, dtype=torch.float64)
        v_pages[ids[t // PS], :, t % PS] = torch.randn(L, Hkv, D, generator=g, dtype=torch.float64)
    to = dict(device=DEVICE, dtype=dtype)
    return k_pages.to(**to), v_pages.to(**to), table.to(device=DEVICE, dtype=torch.int32)


def contiguous_kv(k_pages, v_pages, table, b, L):
    """Row b's first L keys and values [L, Hkv, D], float64 on the CPU."""
    kp, vp = k_pages.cpu().double(), v_pages.cpu().double()
    return gather_paged(kp, table[b].cpu(), L), gather_paged(vp, table[b].cpu(), L)


def decode_reference(q, k_pages, v_pages, table, lengths, scale):
    out = []
    for b, L in enumerate(lengths):
        if L == 0:
            out.append(torch.zeros(q.shape[1:], dtype=torch.float64))
            continue
        k, v = contiguous_kv(k_pages, v_pages, table, b, L)
        out.append(softmax_attention(q[b].cpu().double()[None, None], k[None], v[None], scale=scale)[0, 0])
    return torch.stack(out)


def prefill_reference(q, k_pages, v_pages, table, cu, lengths, scale):
    out = []
    for n, L in enumerate(lengths):
        if cu[n + 1] > cu[n]:
            k, v = contiguous_kv(k_pages, v_pages, table, n, L)
            out.append(softmax_attention(q[cu[n]:cu[n + 1]].cpu().double()[None], k[None], v[None], scale=scale)[0])
    return torch.cat(out) if out else torch.zeros(0, *q.shape[1:], dtype=torch.float64)


def lengths_near(PS, cap):
    """Lengths that cross page edges, and some anywhere up to cap."""
    edges = [L for L in (0, 1, PS - 1, PS, PS + 1, 2 * PS + 1) if 0 <= L <= cap]
    return st.one_of(st.sampled_from(edges), st.integers(0, cap))


def cu_of(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------------------------------------------
# Decode

@given(data=st.data(), PS=st.sampled_from([1, 3, 4, 16]), Hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 8]), D=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_decode_torch_matches_reference(data, PS, Hkv, group, D, dtype, seed):
    lengths = data.draw(st.lists(lengths_near(PS, 40), min_size=1, max_size=4))
    k_pages, v_pages, table = build_cache(lengths, Hkv, D, PS, dtype, seed)
    q = torch.randn(len(lengths), Hkv * group, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    with nan_filled_outputs():
        o = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, D ** -0.5, backend="torch")
    ref = decode_reference(q, k_pages, v_pages, table, lengths, D ** -0.5)
    assert o.dtype == dtype
    assert_within_2x("o", o, ref, ref.to(dtype))


@needs_triton
@given(data=st.data(), PS=st.sampled_from([1, 3, 4, 16, 32]), Hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 8]), D=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.float16]), forced=st.sampled_from([None, 1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_decode_triton_matches_reference(data, PS, Hkv, group, D, dtype, forced, seed):
    """`forced`: a split count with 16-key tiles (splits of >= 32 keys: several per row at these
    lengths, page-local tiles when PS is 16 or 32); None: the public op's own choice."""
    lengths = data.draw(st.lists(lengths_near(PS, 100), min_size=1, max_size=3))
    k_pages, v_pages, table = build_cache(lengths, Hkv, D, PS, dtype, seed)
    q = torch.randn(len(lengths), Hkv * group, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = D ** -0.5
    with nan_filled_outputs():
        if forced is None:
            o = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, scale, backend="triton")
        else:
            o = PA._decode_triton(q, k_pages, v_pages, table, seq_lens, scale, splits=forced, tile=(16, 4, 1))
        baseline = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, scale, backend="torch")
    ref = decode_reference(q, k_pages, v_pages, table, lengths, scale)
    assert o.dtype == dtype
    assert_within_2x("o", o, ref, baseline)
    assert torch.all(o[seq_lens == 0] == 0), "padding rows must be zeros"


@needs_triton
@pytest.mark.parametrize("chunk", [32, 2])
def test_decode_split_combine_at_long_rows(chunk, monkeypatch):
    """Many splits per row (the B = 1 long-context case) and rows whose lengths leave some splits empty;
    the combine reads the splits `chunk` at a time (2: its running max is rescaled between steps)."""
    monkeypatch.setattr(PA, "COMBINE_CHUNK", chunk)
    lengths = [300, 33, 0, 130]
    k_pages, v_pages, table = build_cache(lengths, 2, 32, 16, torch.float32, 3)
    q = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    ref = decode_reference(q, k_pages, v_pages, table, lengths, 0.2)
    with nan_filled_outputs():
        baseline = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, 0.2, backend="torch")
        for splits in (4, 16):
            o = PA._decode_triton(q, k_pages, v_pages, table, seq_lens, 0.2, splits=splits, tile=(16, 4, 1))
            assert_within_2x(f"o ({splits} splits)", o, ref, baseline)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_decode_equals_prefill_of_last_token(backend):
    """Decode of each row's last token == prefill with one query per sequence (same cache)."""
    lengths = [5, 17, 1, 32]
    k_pages, v_pages, table = build_cache(lengths, 2, 16, 4, torch.float32, 7)
    q = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    with nan_filled_outputs():
        dec = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, 0.25, backend=backend)
        pre = paged_attention_prefill(q, k_pages, v_pages, table, cu_of([1, 1, 1, 1]), seq_lens, 0.25, backend=backend)
    torch.testing.assert_close(dec, pre, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_decode_page_id_out_of_range_gives_nan_row(backend):
    """The device-side guard (values are checked on the host for CPU tensors only): a wild page id makes
    its row NaN and leaves the other rows right; nothing outside the cache is read."""
    lengths = [20, 20]
    k_pages, v_pages, table = build_cache(lengths, 1, 16, 4, torch.float32, 1)
    table[0, 2] = k_pages.shape[0] + 1000
    q = torch.randn(2, 2, 16).to(DEVICE)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    impl = PA.TORCH.impl if backend == "torch" else PA.TRITON.impl
    o = impl.decode(q, k_pages, v_pages, table, seq_lens, 0.25)
    assert torch.isnan(o[0]).all()
    ref = decode_reference(q[1:], k_pages, v_pages, table[1:], lengths[1:], 0.25)
    torch.testing.assert_close(o[1:].double().cpu(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Prefill

@st.composite
def prefill_shapes(draw, PS, cap):
    """(seq_lens, query counts): each sequence's queries are its last q tokens, 0 <= q <= L."""
    lengths = draw(st.lists(lengths_near(PS, cap), min_size=1, max_size=3))
    counts = [draw(st.sampled_from(sorted({0, min(1, L), L, L // 2}))) for L in lengths]
    return lengths, counts


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@given(data=st.data(), PS=st.sampled_from([1, 4, 16]), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 8]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_prefill_matches_reference(backend, data, PS, Hkv, group, dtype, seed):
    lengths, counts = data.draw(prefill_shapes(PS, 80))
    D = 16
    k_pages, v_pages, table = build_cache(lengths, Hkv, D, PS, dtype, seed)
    cu = cu_of(counts)
    q = torch.randn(sum(counts), Hkv * group, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    with nan_filled_outputs():
        o = paged_attention_prefill(q, k_pages, v_pages, table, cu, seq_lens, D ** -0.5, backend=backend)
        baseline = paged_attention_prefill(q, k_pages, v_pages, table, cu, seq_lens, D ** -0.5, backend="torch")
    ref = prefill_reference(q, k_pages, v_pages, table, cu.tolist(), lengths, D ** -0.5)
    assert o.dtype == dtype
    assert_within_2x("o", o, ref, ref.to(dtype) if backend == "torch" else baseline)


@needs_triton
def test_prefill_triton_many_query_blocks():
    """Sequences spanning several query blocks next to empty ones (the block -> sequence map)."""
    lengths, counts = [150, 0, 40, 90, 1], [150, 0, 9, 70, 1]
    k_pages, v_pages, table = build_cache(lengths, 2, 32, 16, torch.float32, 11)
    cu = cu_of(counts)
    q = torch.randn(sum(counts), 4, 32, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    with nan_filled_outputs():
        o = paged_attention_prefill(q, k_pages, v_pages, table, cu, seq_lens, 0.2, backend="triton")
        baseline = paged_attention_prefill(q, k_pages, v_pages, table, cu, seq_lens, 0.2, backend="torch")
    assert_within_2x("o", o, prefill_reference(q, k_pages, v_pages, table, cu.tolist(), lengths, 0.2), baseline)


# ---------------------------------------------------------------------------------------------------
# write_kv

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@given(PS=st.sampled_from([1, 3, 16]), T=st.integers(0, 12), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
def test_write_kv_writes_its_slots_and_skips_padding(backend, PS, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    P, Hkv, D = 7, 2, 16
    slots = torch.randperm(P * PS, generator=g)[:T]
    T = slots.numel()
    slots = torch.where(torch.rand(T, generator=g) < 0.3, -1 - torch.randint(0, 5, (T,), generator=g), slots)
    k = torch.randn(T, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(T, Hkv, D, generator=g).to(DEVICE, dtype)
    k_pages = torch.randn(P, Hkv, PS, D, generator=g).to(DEVICE, dtype)
    v_pages = torch.randn(P, Hkv, PS, D, generator=g).to(DEVICE, dtype)
    k_want, v_want = k_pages.clone(), v_pages.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            k_want[s // PS, :, s % PS] = k[t]
            v_want[s // PS, :, s % PS] = v[t]
    write_kv(k, v, k_pages, v_pages, slots.to(DEVICE), backend=backend)
    assert torch.equal(k_pages, k_want) and torch.equal(v_pages, v_want)


@needs_triton
def test_write_kv_takes_strided_inputs():
    """k, v as views of a fused projection ([T, 2, Hkv, D] -> strided [T, Hkv, D])."""
    kv = torch.randn(5, 2, 3, 16).to(DEVICE)
    k_pages, v_pages = (torch.zeros(4, 3, 2, 16, device=DEVICE) for _ in range(2))
    slots = torch.tensor([0, 7, -1, 3, 4], device=DEVICE)
    write_kv(kv[:, 0], kv[:, 1], k_pages, v_pages, slots, backend="triton")
    assert torch.equal(k_pages[3, :, 1], kv[1, 0]) and torch.equal(v_pages[2, :, 0], kv[4, 1])
    assert torch.equal(k_pages[1, :, 1], kv[3, 0])


# ---------------------------------------------------------------------------------------------------
# Bad inputs

def _decode_args():
    k_pages, v_pages, table = build_cache([5, 9], 2, 16, 4, torch.float32, 0)
    q = torch.randn(2, 4, 16, device=DEVICE)
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, block_table=table,
                seq_lens=torch.tensor([5, 9], dtype=torch.int32, device=DEVICE), scale=0.25)


@pytest.mark.parametrize("change, error, name", [
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    (lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "seq_lens"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "q"),
    (lambda a: a.update(q=a["q"][..., :8]), ValueError, "q"),
    (lambda a: a.update(q=a["q"].half()), TypeError, "q"),
    (lambda a: a.update(v_pages=a["v_pages"][:, :1]), ValueError, "v_pages"),
    (lambda a: a.update(k_pages=a["k_pages"][0]), ValueError, "k_pages"),
    (lambda a: a.update(q=a["q"].mT.contiguous().mT), ValueError, "q"),
])
def test_decode_bad_inputs_raise(change, error, name):
    args = _decode_args()
    change(args)
    with pytest.raises(error, match=name):
        paged_attention_decode(**args)


@pytest.mark.skipif(ON_GPU, reason="values are checked on CPU tensors only (a check would synchronise the GPU)")
@pytest.mark.parametrize("change, name", [
    (lambda a: a["seq_lens"].fill_(100), "seq_lens"),
    (lambda a: a["seq_lens"].fill_(-1), "seq_lens"),
    (lambda a: a["block_table"].fill_(-1), "block_table"),
])
def test_decode_bad_values_raise_on_cpu(change, name):
    args = _decode_args()
    change(args)
    with pytest.raises(ValueError, match=name):
        paged_attention_decode(**args)


@pytest.mark.skipif(ON_GPU, reason="values are checked on CPU tensors only")
@pytest.mark.parametrize("cu, lens, name", [
    ([0, 3, 2], [5, 9], "cu_seqlens_q"),
    ([0, 3, 4], [5, 9], "cu_seqlens_q"),       # does not end at Ttot = 3
    ([1, 2, 3], [5, 9], "cu_seqlens_q"),
    ([0, 3, 3], [2, 9], "seq_lens"),           # 3 queries but 2 cached tokens
])
def test_prefill_bad_values_raise_on_cpu(cu, lens, name):
    args = _decode_args()
    args["q"] = torch.randn(3, 4, 16)
    with pytest.raises(ValueError, match=name):
        paged_attention_prefill(args["q"], args["k_pages"], args["v_pages"], args["block_table"],
                                torch.tensor(cu, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), 0.25)


def test_prefill_bad_cu_seqlens_type_raises():
    args = _decode_args()
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        paged_attention_prefill(args["q"], args["k_pages"], args["v_pages"], args["block_table"],
                                torch.tensor([0, 1, 2], device=DEVICE), args["seq_lens"], 0.25)


def test_write_kv_bad_inputs_raise():
    k_pages, v_pages = torch.zeros(3, 2, 4, 16, device=DEVICE), torch.zeros(3, 2, 4, 16, device=DEVICE)
    k, v = torch.randn(2, 2, 16, device=DEVICE), torch.randn(2, 2, 16, device=DEVICE)
    slots = torch.tensor([0, 5], device=DEVICE)
    with pytest.raises(TypeError, match="slot_mapping"):
        write_kv(k, v, k_pages, v_pages, slots.int())
    with pytest.raises(ValueError, match="k"):
        write_kv(k[:, :1], v, k_pages, v_pages, slots)
    with pytest.raises(TypeError, match="v"):
        write_kv(k, v.half(), k_pages, v_pages, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k, v, k_pages, v_pages, slots[:1])
    if not ON_GPU:
        with pytest.raises(ValueError, match="slot_mapping"):
            write_kv(k, v, k_pages, v_pages, torch.tensor([0, 12]))
        with pytest.raises(ValueError, match="slot_mapping"):
            write_kv(k, v, k_pages, v_pages, torch.tensor([5, 5]))


def test_triton_rejects_head_dim_it_cannot_tile():
    k_pages, v_pages, table = build_cache([5], 1, 24, 4, torch.float32, 0)
    q = torch.randn(1, 2, 24, device=DEVICE)
    seq_lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    if backend_error("triton", DEVICE) is None:
        with pytest.raises(ValueError, match="head dims"):
            paged_attention_decode(q, k_pages, v_pages, table, seq_lens, 0.2, backend="triton")
    ref = decode_reference(q, k_pages, v_pages, table, [5], 0.2)
    o = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, 0.2, backend="torch")
    torch.testing.assert_close(o.double().cpu(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU: bf16 at M1 shapes (H 64, Hkv 8, D 128, pages of 16), contexts up to 32K, CUDA graphs

M1 = dict(H=64, Hkv=8, D=128, PS=16)


def m1_cache(lengths, seed, page_size=M1["PS"]):
    """A bf16 cache built on the GPU (the CPU builder is too slow for 32K-token rows)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    Hkv, D, PS = M1["Hkv"], M1["D"], page_size
    need = [math.ceil(L / PS) for L in lengths]
    P = sum(need) + 4
    width = max(need + [1]) + 1
    perm = torch.randperm(P, generator=g, device="cuda")
    table = torch.randint(-3, P + 3, (len(lengths), width), generator=g, device="cuda", dtype=torch.int32)
    k_pages = torch.full((P, Hkv, PS, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    v_pages = k_pages.clone()
    used = 0
    for b, L in enumerate(lengths):
        ids = perm[used:used + need[b]]
        used += need[b]
        table[b, :need[b]] = ids.int()
        t = torch.arange(L, device="cuda")
        k_pages[ids[t // PS], :, t % PS] = torch.randn(L, Hkv, D, generator=g, device="cuda").bfloat16()
        v_pages[ids[t // PS], :, t % PS] = torch.randn(L, Hkv, D, generator=g, device="cuda").bfloat16()
    return k_pages, v_pages, table


def gathered_on_gpu(pages, table, n, L):
    """Sequence n's first L rows [L, Hkv, D] in float64 (reference.gather_paged, vectorised for 32K rows)."""
    ids = table[n, :math.ceil(L / pages.shape[2])].long()
    return pages[ids].double().transpose(1, 2).reshape(-1, pages.shape[1], pages.shape[3])[:L]


def reference_on_gpu(q, k_pages, v_pages, table, lengths, scale):
    """The float64 reference (reference.attention) row by row, on the GPU: 32K-token rows are slow on a CPU."""
    out = []
    for b, L in enumerate(lengths):
        if L == 0:
            out.append(torch.zeros(q.shape[1:], dtype=torch.float64, device="cuda"))
            continue
        k, v = gathered_on_gpu(k_pages, table, b, L), gathered_on_gpu(v_pages, table, b, L)
        out.append(softmax_attention(q[b].double()[None, None], k[None], v[None], scale=scale)[0, 0])
    return torch.stack(out)


@pytest.mark.gpu
@pytest.mark.xdist_group("large_memory")
@pytest.mark.parametrize("B, ctx", [(1, 32768), (8, 32768), (64, 4096), (256, 1024)])
def test_decode_bf16_m1_shapes(B, ctx):
    """Mixed lengths up to ctx (one row at ctx exactly, padding rows at B >= 8)."""
    g = torch.Generator().manual_seed(B)
    lengths = torch.randint(0, ctx + 1, (B,), generator=g).tolist()
    lengths[0] = ctx
    if B >= 8:
        lengths[1] = 0
    k_pages, v_pages, table = m1_cache(lengths, B)
    q = torch.randn(B, M1["H"], M1["D"], device="cuda").bfloat16()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    scale = M1["D"] ** -0.5
    with nan_filled_outputs():
        o = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, scale)
        baseline = paged_attention_decode(q, k_pages, v_pages, table, seq_lens, scale, backend="torch")
    assert_within_2x("o", o, reference_on_gpu(q, k_pages, v_pages, table, lengths, scale), baseline)


@pytest.mark.gpu
@pytest.mark.xdist_group("large_memory")
@pytest.mark.parametrize("page_size", [16, 64])
def test_prefill_bf16_m1_shapes(page_size):
    """Chunked prefill: sequences continue cached prefixes (4K and 1K tokens) or start fresh (2000)."""
    lengths, counts = [4096 + 1024, 2000, 1024 + 1, 0], [1024, 2000, 1, 0]
    k_pages, v_pages, table = m1_cache(lengths, 5, page_size)
    cu = cu_of(counts)
    q = torch.randn(sum(counts), M1["H"], M1["D"], device="cuda").bfloat16()
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    scale = M1["D"] ** -0.5
    with nan_filled_outputs():
        o = paged_attention_prefill(q, k_pages, v_pages, table, cu, seq_lens, scale)
        baseline = paged_attention_prefill(q, k_pages, v_pages, table, cu, seq_lens, scale, backend="torch")
    ref = [softmax_attention(q[cu[n]:cu[n + 1]].double()[None], gathered_on_gpu(k_pages, table, n, L)[None],
                             gathered_on_gpu(v_pages, table, n, L)[None], scale=scale)[0]
           for n, L in enumerate(lengths) if counts[n]]
    assert_within_2x("o", o, torch.cat(ref), baseline)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_decode_cuda_graph_equals_eager(B):
    """Capture write_kv + decode once, then replay with new tokens, lengths and page tables."""
    Hkv, D, PS, H = M1["Hkv"], M1["D"], M1["PS"], M1["H"]
    max_pages, P = 64, B * 64 + 8
    k_pages = torch.randn(P, Hkv, PS, D, device="cuda").bfloat16()
    v_pages = torch.randn_like(k_pages)
    static = dict(q=torch.zeros(B, H, D, device="cuda", dtype=torch.bfloat16),
                  k=torch.zeros(B, Hkv, D, device="cuda", dtype=torch.bfloat16),
                  v=torch.zeros(B, Hkv, D, device="cuda", dtype=torch.bfloat16),
                  slots=torch.full((B,), -1, dtype=torch.int64, device="cuda"),
                  table=torch.zeros(B, max_pages, dtype=torch.int32, device="cuda"),
                  lens=torch.zeros(B, dtype=torch.int32, device="cuda"))

    def step(s):
        write_kv(s["k"], s["v"], k_pages, v_pages, s["slots"])
        return paged_attention_decode(s["q"], k_pages, v_pages, s["table"], s["lens"], D ** -0.5)

    step(static)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static)
    for trial in range(3):
        g = torch.Generator(device="cuda").manual_seed(trial)
        lens = torch.randint(0, max_pages * PS, (B,), generator=g, device="cuda", dtype=torch.int32)
        table = torch.randperm(P, generator=g, device="cuda")[:B * max_pages].view(B, max_pages).int()
        last = (lens.long() - 1).clamp(min=0)[:, None]      # the new token's position (rows with lens 0: none)
        new = dict(q=torch.randn(B, H, D, generator=g, device="cuda").bfloat16(),
                   k=torch.randn(B, Hkv, D, generator=g, device="cuda").bfloat16(),
                   v=torch.randn(B, Hkv, D, generator=g, device="cuda").bfloat16(),
                   lens=lens, table=table,
                   slots=torch.where(lens > 0, table.long().gather(1, last // PS)[:, 0] * PS + last[:, 0] % PS, -1))
        for name, value in new.items():
            static[name].copy_(value)
        pages_before = k_pages.clone(), v_pages.clone()
        graph.replay()
        replayed = out.clone()
        k_pages.copy_(pages_before[0])
        v_pages.copy_(pages_before[1])
        eager = step(new)
        assert torch.equal(replayed, eager)
