"""The parallel model (model/parallel, docs/parallel.md) against the plain model, on processes spawned
inside pytest: gloo on CPU (world sizes 4 and 2), NCCL on GPUs (the `gpu` test).

Each spawn runs many checks (process start and imports dominate the cost). A check builds the tiny
fp32 model with the torch backend, a parallel copy on some mesh, runs one training step of both on
the same global batch and compares the loss, every gradient (gathered to full tensors) and every
parameter after an AdamW step, within 1e-5 of the reference's largest magnitude. Every rank also
runs the single-process reference itself (same seed), so no result crosses processes except through
the code under test.
"""

import copy
import faulthandler
import functools
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from m1_kernels.lightning_ops import lightning_attn, slopes
from m1_kernels.model import M1Config, M1ForCausalLM, parallelize
from m1_kernels.model.parallel import (from_pretrained_parallel, lightning_attn_cp, load_sharded, save_sharded,
                                       shard_batch, split_sizes)
from m1_kernels.model.parallel.expert import ExpertParallelMoE
from m1_kernels.moe_ops import SparseMoE, route
from m1_kernels.reference import lightning as RL

SPAWN_TIMEOUT_S = int(os.environ.get("M1_PARALLEL_TIMEOUT", "300"))
RTOL = 1e-5                 # of the reference's largest magnitude, per tensor
B, T = 3, 7                 # rows per dp rank and tokens: neither divides by 2 or 4


# ---------------------------------------------------------------------------------------------------
# Harness

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, backend, checks, deadline):
    # A hang (ranks waiting in different collectives) prints every rank's stack before the timeout.
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time() - 15), exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        for name, args in checks:
            globals()[name](*args)
    finally:
        dist.destroy_process_group()


def spawn(world, checks, backend="gloo"):
    """Run `checks` ((name of a function of this module, args) pairs) in order on `world` fresh
    processes; fail on the first exception of any rank, or after SPAWN_TIMEOUT_S."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), backend, checks, time.time() + SPAWN_TIMEOUT_S),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"checks on {world} processes timed out after {SPAWN_TIMEOUT_S} s")


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close(what, out, ref, rtol=RTOL):
    out, ref = _full(out).detach().double().cpu(), _full(ref).detach().double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), \
        f"{what}: max error {err:.3e} > {rtol:.0e} x {scale:.3e} (rank {dist.get_rank()})"


def _mesh(names, shape):
    return init_device_mesh(_device().type, shape, mesh_dim_names=names)


def _meshes(world):
    """The meshes every world size runs: each dim alone, and dp with ep and with cp."""
    half = (2, world // 2) if world >= 4 else (1, world)
    return [(("dp",), (world,)), (("ep",), (world,)), (("cp",), (world,)), (("dp", "ep"), half),
            (("dp", "cp"), half[::-1])]


def _dp(mesh):
    names = mesh.mesh_dim_names
    return (mesh["dp"].size(), mesh["dp"].get_local_rank()) if "dp" in names else (1, 0)


def _tiny(backend="torch", changes=None, seed=0):
    torch.manual_seed(seed)
    return M1ForCausalLM(M1Config.preset("tiny").replace(**(changes or {})), backend=backend).to(_device())


def _batch(rows, tokens, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens + 1), generator=g).to(_device())
    return ids[:, :-1], ids[:, 1:]


@functools.cache
def _reference(dp, backend="torch", changes=(), tokens=T):
    """The plain model's first two AdamW steps on the global batches (dp * B rows) of seeds 0 and 1:
    per step the batch, logits, loss, gradients and the parameters after the step. Cached: every
    check of one process with the same dp compares against the same run."""
    ref = _tiny(backend, dict(changes))
    optimizer = _adamw(ref)
    steps = []
    for seed in range(2):
        x, y = _batch(dp * B, tokens, ref.config.vocab_size, seed)
        logits = ref(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
        optimizer.step()
        params = {name: p.detach().clone() for name, p in ref.named_parameters()}
        steps.append(dict(x=x, y=y, logits=logits.detach(), loss=loss.detach(), grads=grads, params=params))
    return steps


def _parallel_step(par, mesh, io, x, y, optimizer):
    """One step of the parallel model on this rank's dp share (x, y) of the global batch; returns (the
    logits this rank receives, the global loss summed from every rank's share)."""
    tokens = y.numel()                               # of the dp share: the mean's denominator
    if io == "local":
        x, y = shard_batch(x, mesh), shard_batch(y, mesh)
    logits = par(x)
    # full: every rank of an ep x cp group computes its dp share's mean; local: its block's part of it.
    share = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum") / tokens
    optimizer.zero_grad()
    share.backward()
    total = share.detach().clone()
    dist.all_reduce(total)
    dp, _ = _dp(mesh)
    copies = dist.get_world_size() // dp if io == "full" else 1
    return logits.detach(), total / copies / dp


def _compare_step(what, par, mesh, io, optimizer, ref, rtol):
    """One AdamW step of the parallel model against `ref` (a step of `_reference`): logits, loss, every
    gradient and every parameter after the step."""
    _, dp_rank = _dp(mesh)
    mine = slice(dp_rank * B, (dp_rank + 1) * B)
    logits, loss = _parallel_step(par, mesh, io, ref["x"][mine], ref["y"][mine], optimizer)
    expected = ref["logits"][mine] if io == "full" else shard_batch(ref["logits"][mine], mesh)
    assert_close(f"{what}: logits", logits, expected, rtol)
    assert_close(f"{what}: loss", loss, ref["loss"], rtol)
    names = [name for name, _ in par.named_parameters()]
    assert names == list(ref["grads"]), f"{what}: parameter names {names} != {list(ref['grads'])}"
    for name, p in par.named_parameters():
        assert_close(f"{what}: grad {name}", p.grad, ref["grads"][name], rtol)
    optimizer.step()
    for name, p in par.named_parameters():
        assert_close(f"{what}: {name} after the step", p, ref["params"][name], rtol)


def _adamw(model):
    # eps well above the smallest gradients: Adam's first step is sign(g) where |g| << eps is not, and
    # a sign amplifies rounding differences of near-zero gradients without bound. foreach=False: the
    # expert and dense DTensors live on different meshes.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, foreach=False)


def check_model(names, shape, io="full", backend="torch", changes=None, rtol=RTOL, tokens=T):
    """Loss, gradients and an AdamW step of the parallel model against the plain one (fp32)."""
    mesh = _mesh(names, shape)
    par = parallelize(_tiny(backend, changes), mesh, io=io)
    ref = _reference(_dp(mesh)[0], backend, tuple(sorted((changes or {}).items())), tokens)[0]
    _compare_step(f"{names}{shape} io={io} T={tokens} {changes or ''}", par, mesh, io, _adamw(par), ref, rtol)


def check_bf16(names, shape, backend="torch", changes=None):
    """param_dtype=bf16: layers compute in bf16 on fp32 master weights, the final norm and LM head in
    fp32, gradients reduced and kept in fp32; the loss stays near the fp32 model's."""
    mesh = _mesh(names, shape)
    par = parallelize(_tiny(backend, changes), mesh, param_dtype=torch.bfloat16)
    seen = {}

    def record(label):
        def hook(module, args, out):
            seen.setdefault(label, module.weight.dtype)
        return hook

    for label, module in (("qkv_proj", par.model.layers[0].self_attn.qkv_proj), ("lm_head", par.lm_head),
                          ("norm", par.model.norm)):
        module.register_forward_hook(record(label))
    dp, dp_rank = _dp(mesh)
    ref = _reference(dp, backend, tuple(sorted((changes or {}).items())))[0]
    mine = slice(dp_rank * B, (dp_rank + 1) * B)
    logits, loss = _parallel_step(par, mesh, "full", ref["x"][mine], ref["y"][mine], _adamw(par))
    assert seen == {"qkv_proj": torch.bfloat16, "lm_head": torch.float32, "norm": torch.float32}, seen
    assert logits.dtype == torch.float32
    assert_close("bf16 loss", loss, ref["loss"], rtol=2e-2)
    for name, p in par.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(_full(p.grad)).all(), name


def check_expert_parallel():
    """ExpertParallelMoE on its own against SparseMoE: uneven token counts (rank 0 has none), random
    routing, every token on one expert (top-1), every token on two experts (top-2, the others idle)."""
    world = dist.get_world_size()
    mesh = _mesh(("ep",), (world,))
    rank, device = dist.get_rank(), _device()
    H, FFN, E, N = 16, 8, 4, 13
    sizes = [0] + split_sizes(N, world - 1)
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    for top_k, skew in ((2, None), (1, "one"), (2, "two")):
        torch.manual_seed(1)
        ref = SparseMoE(H, FFN, E, top_k, backend="torch").to(device)
        x = torch.randn(N, H, device=device)
        if skew:       # inputs near +1 and gate rows along ones: experts 0 (then 1) win every token
            x = 0.1 * x + 1.0
            with torch.no_grad():
                ref.gate.weight.zero_()
                ref.gate.weight[0], ref.gate.weight[1] = 5.0, 2.0
        counts = torch.bincount(route(x, ref.gate.weight, top_k, backend="torch")[1].flatten().long(), minlength=E)
        if skew:
            assert counts.tolist() == ([N, 0, 0, 0] if skew == "one" else [N, N, 0, 0]), counts
        par = ExpertParallelMoE.convert(copy.deepcopy(ref), mesh["ep"])
        dout = torch.randn(N, H, device=device)
        x_ref = x.clone().requires_grad_()
        (ref(x_ref) * dout).sum().backward()
        x_par = x[mine].clone().requires_grad_()
        out = par(x_par)
        (out * dout[mine]).sum().backward()
        what = f"ep={world} top_k={top_k} skew={skew}"
        assert_close(f"{what}: out", out, ref(x)[mine].detach())
        assert_close(f"{what}: dx", x_par.grad, x_ref.grad[mine])
        dgate = par.gate.weight.grad.clone()
        dist.all_reduce(dgate)
        assert_close(f"{what}: dgate", dgate, ref.gate.weight.grad)
        for name in ("gate_up_proj", "down_proj"):
            assert_close(f"{what}: d{name}", getattr(par.experts, name).grad, getattr(ref.experts, name).grad)


def _random_packing(total, g):
    """cu_seqlens over `total` tokens: 1 to 6 sequences, zero-length ones allowed."""
    cuts = torch.randint(0, total + 1, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g)
    return [0] + sorted(cuts.tolist()) + [total]


def check_lightning_cp():
    """lightning_attn_cp against lightning_attn on the whole sequence: outputs and q/k/v gradients, for
    batches split in uneven chunks (an empty one too) and for packed sequences whose boundaries fall
    anywhere, at chunk edges included; the packed outputs also against the float64 reference."""
    world, rank, device = dist.get_world_size(), dist.get_rank(), _device()
    group = _mesh(("cp",), (world,))["cp"].get_group()
    H, D, total = 2, 8, 23
    g = torch.Generator().manual_seed(2)
    edge = split_sizes(total, world)[0]
    cases = [(2, None, split_sizes(11, world)), (2, None, [0] * (world - 1) + [11]),
             (2, None, [11 - (world - 1)] + [1] * (world - 1)),
             (1, [0, edge, total], None), (1, [0, 0, 3, edge + 1, edge + 1, total], [total] + [0] * (world - 1))]
    cases += [(1, _random_packing(total, g), None) for _ in range(4)]
    for layer in (0, 3):                       # fast and slow decays
        slope = slopes(H, layer, 4, device=device)
        for rows, cu, sizes in cases:
            T_all = total if cu is not None else sum(sizes)
            q, k, v, dout = (torch.randn(rows, T_all, H, D, generator=g).to(device) for _ in range(4))
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
            ref = [t.clone().requires_grad_() for t in (q, k, v)]
            o_ref, _ = lightning_attn(*ref, slope, cu_seqlens=cu_t, backend="torch")
            (o_ref * dout).sum().backward()
            chunks = sizes if cu is None or sizes is not None else split_sizes(total, world)
            mine = slice(sum(chunks[:rank]), sum(chunks[:rank + 1]))
            local = [t[:, mine].clone().requires_grad_() for t in (q, k, v)]
            o = lightning_attn_cp(*local, slope, group, cu_seqlens=cu_t,
                                  chunk_sizes=sizes if cu is not None else None, backend="torch")
            (o * dout[:, mine]).sum().backward()
            what = f"layer {layer} rows {rows} cu {cu} chunks {chunks}"
            assert_close(f"{what}: o", o, o_ref[:, mine].detach())
            for name, t, r in zip("qkv", local, ref):
                if t.numel() == 0:          # an empty chunk: nothing to differentiate
                    continue
                assert_close(f"{what}: d{name}", t.grad, r.grad[:, mine])
            if cu is not None:
                o64, _ = RL.lightning_attn_varlen(RL.lightning_attn_recurrent, q.double(), k.double(), v.double(),
                                                  slope.double(), cu)
                assert_close(f"{what}: o vs float64", o, o64[:, mine])


def check_arguments():
    """Bad arguments raise TypeError/ValueError naming them."""
    world = dist.get_world_size()
    ep = _mesh(("ep",), (world,))
    with pytest.raises(TypeError, match="M1ForCausalLM"):
        parallelize(torch.nn.Linear(2, 2), ep)
    with pytest.raises(TypeError, match="DeviceMesh"):
        parallelize(_tiny(), "ep")
    with pytest.raises(ValueError, match="mesh dims"):
        parallelize(_tiny(), _mesh(("tp",), (world,)))
    with pytest.raises(ValueError, match="io"):
        parallelize(_tiny(), ep, io="both")
    with pytest.raises(TypeError, match="param_dtype"):
        parallelize(_tiny(), ep, param_dtype=torch.int32)
    with pytest.raises(ValueError, match="num_local_experts"):
        parallelize(_tiny(changes={"num_local_experts": 3}), ep)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        parallelize(_tiny(changes={"tie_word_embeddings": True}), ep, param_dtype=torch.bfloat16)
    model = parallelize(_tiny(), ep)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(model, ep)
    ids = torch.zeros(2, 3, dtype=torch.long, device=_device())
    with pytest.raises(ValueError, match="last_token_only"):
        model(ids, last_token_only=True)
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=object())
    group = _mesh(("cp",), (world,))["cp"].get_group()
    q = torch.randn(1, 4, 2, 8, device=_device())
    slope = slopes(2, 0, 4, device=_device())
    with pytest.raises(TypeError, match="group"):
        lightning_attn_cp(q, q, q, slope, ep)
    with pytest.raises(ValueError, match="chunk_sizes"):
        lightning_attn_cp(q, q, q, slope, group, chunk_sizes=[4] * world)
    cu = torch.tensor([0, 4 * world], dtype=torch.int32, device=_device())
    with pytest.raises(ValueError, match="chunk_sizes"):
        lightning_attn_cp(q, q, q, slope, group, cu_seqlens=cu, chunk_sizes=[4] * (world + 1))
    with pytest.raises(ValueError, match="B == 1"):
        lightning_attn_cp(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), slope, group,
                          cu_seqlens=cu)
    with pytest.raises(ValueError, match="shard_batch"):
        shard_batch(torch.zeros(3), ep)
    with pytest.raises(ValueError, match="split_sizes"):
        split_sizes(-1, 2)


def _write_pretrained(folder, names):
    """Rank 0 writes the reference model (seed 0) as a multi-file safetensors checkpoint."""
    if dist.get_rank() == 0:
        _tiny().save_pretrained(folder, max_shard_bytes=40_000, names=names)
    dist.barrier()


def check_from_pretrained(folder, names, shape):
    """A safetensors checkpoint (both namings, several files) loaded straight into a sharded model:
    every parameter equals the original, no rank holds more than its shards, the logits match."""
    mesh = _mesh(names, shape)
    ref = _tiny()
    x, _ = _batch(B, T, ref.config.vocab_size, seed=5)
    for naming in ("original", "transformers"):
        path = os.path.join(folder, f"pretrained-{naming}-{dist.get_world_size()}")
        _write_pretrained(path, naming)
        model = from_pretrained_parallel(path, mesh, backend="torch")
        params = dict(model.named_parameters())
        assert list(params) == [n for n, _ in ref.named_parameters()]
        local = 0
        for name, q in ref.named_parameters():
            assert_close(f"{naming} {name}", params[name], q, rtol=0)
            assert params[name].to_local().numel() < q.numel(), f"{name} is not sharded"
            local += params[name].to_local().numel()
        total = sum(q.numel() for q in ref.parameters())
        assert local <= 1.25 * total / dist.get_world_size(), f"rank {dist.get_rank()} holds {local} of {total}"
        assert_close(f"{naming} logits", model(x), ref(x).detach())


def check_save_checkpoint(folder, names, shape):
    """One checked AdamW step on `names` x `shape`, then a DCP checkpoint of the model and optimizer."""
    mesh = _mesh(names, shape)
    par = parallelize(_tiny(), mesh)
    optimizer = _adamw(par)
    _compare_step(f"{names}{shape} before saving", par, mesh, "full", optimizer, _reference(_dp(mesh)[0])[0], RTOL)
    save_sharded(os.path.join(folder, "dcp"), par, optimizer)


def check_load_checkpoint(folder, names, shape):
    """The checkpoint of check_save_checkpoint (other world size and mesh) loaded into a model that
    started elsewhere (another seed); its next step equals the reference's second step."""
    mesh = _mesh(names, shape)
    first, second = _reference(_dp(mesh)[0])
    par = parallelize(_tiny(seed=123), mesh)
    optimizer = _adamw(par)
    load_sharded(os.path.join(folder, "dcp"), par, optimizer)
    for name, p in par.named_parameters():     # the saving run's step matched the reference within RTOL
        assert_close(f"loaded {name}", p, first["params"][name])
    _compare_step(f"resumed on {names}{shape}", par, mesh, "full", optimizer, second, RTOL)


# ---------------------------------------------------------------------------------------------------
# Tests

@st.composite
def _chunked_packing(draw):
    """(cu_seqlens, chunk sizes): up to 40 tokens in up to 6 sequences (zero-length ones too) over up to
    5 chunks (empty ones too); sequence boundaries often fall on chunk edges."""
    total = draw(st.integers(0, 40))
    world = draw(st.integers(1, 5))
    edges = sorted(draw(st.lists(st.integers(0, total), min_size=world - 1, max_size=world - 1)))
    cuts = draw(st.lists(st.one_of(st.integers(0, total), st.sampled_from([0, *edges, total])), max_size=5))
    bounds = [0, *edges, total]
    return [0, *sorted(cuts), total], [b - a for a, b in zip(bounds[:-1], bounds[1:])]


@settings(max_examples=150)        # host arithmetic on at most 40 tokens: cheap, and the cases are many
@given(_chunked_packing(), st.integers(0, 3))
def test_packed_plan_reassembles_the_sequence(packing, layer):
    """The host-side plan of lightning_attn_cp for packed sequences, in float64 on one process: each
    chunk from zero states, its initial state from the other chunks' last states with the plan's
    coefficients, the correction on its first piece: together, exactly the whole packed sequence."""
    from m1_kernels.model.parallel.context import _packed_plan
    cu, sizes = packing
    H, D = 2, 4
    slope = RL.slopes(H, layer, 4)
    g = torch.Generator().manual_seed(len(cu) * 41 + sum(sizes))
    q, k, v = (torch.randn(1, cu[-1], H, D, generator=g, dtype=torch.float64) for _ in range(3))
    whole, _ = RL.lightning_attn_varlen(RL.lightning_attn_recurrent, q, k, v, slope, cu)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    pieces, lasts = [], []
    for r, (a, n) in enumerate(zip(starts, sizes)):
        local, _, _, _ = _packed_plan(cu, sizes, r)
        o, finals = RL.lightning_attn_varlen(RL.lightning_attn_recurrent, q[:, a:a + n], k[:, a:a + n],
                                             v[:, a:a + n], slope, local)
        pieces.append(o)
        lasts.append(finals[-1])
    for r, (a, n) in enumerate(zip(starts, sizes)):
        _, first, carry, exponent = _packed_plan(cu, sizes, r)
        init = sum((torch.exp(-slope * e)[:, None, None] * lasts[j] for j, (c, e) in enumerate(zip(carry, exponent))
                    if c), torch.zeros(H, D, D, dtype=torch.float64))
        t = torch.arange(first, dtype=torch.float64)
        decay = torch.exp(-slope[None, :] * (t[:, None] + 1))                           # [first, H]
        pieces[r][0, :first] += torch.einsum("thd,hde->the", q[0, a:a + first] * decay[..., None], init)
    assert torch.allclose(torch.cat(pieces, dim=1), whole, rtol=1e-12, atol=1e-12)


def test_initial_state_correction_gradcheck(monkeypatch):
    """The correction's hand-written backward (blockwise: blocks of 3 tokens here) against autograd's
    numerical gradients, in float64, with the correction stopping at `first`."""
    from m1_kernels.model.parallel import context
    monkeypatch.setattr(context, "_CORRECTION_BLOCK", 3)
    g = torch.Generator().manual_seed(3)
    B, T, H, D, Dv, first = 2, 8, 2, 3, 4, 7
    o = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    init = torch.randn(B, H, D, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    slope = RL.slopes(H, 0, 4)
    fn = lambda o, q, init: context._InitialStateCorrection.apply(o, q, init, slope, first, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (o, q, init))
    decay = torch.exp(-slope[None, :] * (torch.arange(first, dtype=torch.float64)[:, None] + 1))
    expected = o.detach().clone()
    qd = q.detach()[:, :first] * decay[..., None]
    expected[:, :first] += 0.5 * torch.einsum("bthd,bhde->bthe", qd, init.detach())
    assert torch.allclose(fn(o, q, init), expected)


@pytest.fixture(scope="module")
def world_4(tmp_path_factory):
    """The world-size-4 run (its checkpoint feeds the world-size-2 run): every mesh (("cp",) with 3
    tokens, ("dp", "ep") in the checkpoint check), a 3-D mesh, io="local", EP and CP on their own,
    safetensors loading, a DCP save on ("dp", "ep")."""
    folder = str(tmp_path_factory.mktemp("parallel"))
    spawn(4, [
        ("check_model", (("dp",), (4,))),
        ("check_model", (("ep",), (4,))),                                        # a rank with no rows
        ("check_model", (("cp",), (4,), "full", "torch", None, RTOL, 3)),      # a rank with no tokens
        ("check_model", (("dp", "cp"), (2, 2))),
        ("check_model", (("dp", "ep", "cp"), (1, 2, 2))),
        ("check_model", (("ep", "cp"), (2, 2), "local")),
        ("check_expert_parallel", ()),
        ("check_lightning_cp", ()),
        ("check_from_pretrained", (folder, ("dp", "ep"), (2, 2))),
        ("check_save_checkpoint", (folder, ("dp", "ep"), (2, 2))),     # also the ("dp", "ep") model check
    ])
    return folder


# One xdist worker runs both (--dist loadgroup): the world-size-4 spawn behind the fixture runs once.
@pytest.mark.xdist_group("parallel_gloo")
def test_world_size_4(world_4):
    assert os.path.isdir(os.path.join(world_4, "dcp"))


@pytest.mark.xdist_group("parallel_gloo")
def test_world_size_2(world_4):
    """Every mesh, io="local", bf16 compute, EP and CP on their own, argument checks, safetensors
    loading, and the world-size-4 checkpoint resumed on ("dp", "cp")."""
    spawn(2, [("check_model", (names, shape)) for names, shape in _meshes(2)] + [
        ("check_model", (("cp",), (2,), "local")),
        ("check_bf16", (("dp",), (2,))),
        ("check_expert_parallel", ()),
        ("check_lightning_cp", ()),
        ("check_arguments", ()),
        ("check_from_pretrained", (world_4, ("ep",), (2,))),
        ("check_load_checkpoint", (world_4, ("dp", "cp"), (2, 1))),
    ])


# Widths the Triton and CUDA kernels take (head dim 64), 8 experts so that ep may reach 8.
GPU_CHANGES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, rotary_dim=32,
                   intermediate_size=128, num_local_experts=8, vocab_size=512)
GPU_RTOL = 1e-4     # the EP path runs the expert MLP as two grouped GEMMs, the plain one fused


@pytest.mark.gpu
def test_nccl_matches_plain_model():
    """The same checks over NCCL with the default GPU backends, on M1_PARALLEL_WORLD GPUs (1, 2, 4 or 8;
    default 1: every mesh dim of size 1, so every code path runs with one rank)."""
    world = int(os.environ.get("M1_PARALLEL_WORLD", "1"))
    if world > torch.cuda.device_count():
        pytest.fail(f"M1_PARALLEL_WORLD={world} but {torch.cuda.device_count()} GPUs are visible")
    meshes = _meshes(world) + ([(("dp", "ep", "cp"), (world // 4, 2, 2) if world > 1 else (1, 1, 1))]
                               if world % 4 == 0 or world == 1 else [])
    spawn(world, [("check_model", (names, shape, "full", None, GPU_CHANGES, GPU_RTOL)) for names, shape in meshes]
          + [("check_bf16", (("dp",), (world,), None, GPU_CHANGES))], backend="nccl")
