"""The grouped-GEMM kernels (forward and weight gradient), the few-token kernels and the router's kernels
compile for Hopper (sm_90) on any machine, GPU or not, to what the performance design needs: cp.async
multi-stage pipelines feeding wgmma for the large tiles, and shared memory within the 227 KB an H100
block may use.
This catches GPU-only compile errors and a silently unpipelined K loop before the GPU run.

Compilation runs in a subprocess without TRITON_INTERPRET (the interpreter, which the CPU tests use,
replaces triton.language's functions for the whole process)."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

H100_SMEM = 227 * 1024
M1_ROWS = {"decode": 128, "prefill": 16384}          # 64 and 8192 tokens, top-2
CASES = ([(regime, epilogue, "nk", tma) for regime in M1_ROWS for epilogue in (0, 1, 2) for tma in (False, True)]
         + [("prefill", 0, "kn", tma) for tma in (False, True)])


OPS = r"ttng\.warp_group_dot\b|ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local"


def compile_for_hopper(kernel, pointers, constexprs, divisible=(), num_warps=4, num_stages=3):
    """Compile `kernel` (jitted, autotuned or not) for sm_90 as a launch with these pointer types (other
    runtime arguments i32), constexprs and 16-divisible arguments; returns its shared memory in bytes and
    the counts of the ttgir ops that multiply (wgmma) and copy asynchronously (cp.async, TMA)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.metadata.shared, collections.Counter(re.findall(OPS, compiled.asm["ttgir"]))


def compile_report(regime, epilogue, layout, tma):
    """Compile the first config the autotuner would try at M1 shapes, specialised as a real bf16 launch
    (unit strides, 16-divisible pointers and sizes, or TMA descriptors); returns its config, shared
    memory and the ops that load and multiply."""
    import torch

    from m1_kernels.moe_ops.triton import grouped_gemm as G

    N, K = (9216, 6144) if epilogue in (1, 2) else (6144, 9216)
    bf16_operand = torch.empty(0, dtype=torch.bfloat16)
    config = G._prune(G._configs(False), dict(a=bf16_operand, E=32, N=N, K=K), M_BUCKET=M1_ROWS[regime],
                      EPILOGUE=epilogue)[0]
    constexprs = dict(EPILOGUE=epilogue, STORE_PREACT=epilogue == 1, USE_TMA=tma, W_KN=layout == "kn",
                      DOT_PRECISION="tf32", BLOCK_E=32, EVEN_K=True, EVEN_N=True, **config.kwargs)
    constexprs["stride_ak"] = 1
    constexprs["stride_wk" if layout == "nk" else "stride_wn"] = 1
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    w_box = [1, bk, bn] if layout == "kn" else [1, bn, bk]
    pointers = {"a": f"tensordesc<bf16[{bm},{bk}]>" if tma else "*bf16",
                "w": f"tensordesc<bf16[{','.join(map(str, w_box))}]>" if tma else "*bf16",
                "offsets_ptr": "*i32", "out_ptr": "*bf16", "preact_ptr": "*bf16"}
    divisible = {n for n, t in pointers.items() if t.startswith("*")} | {
        "stride_am", "stride_we", "stride_om", "stride_pm", "N", "K", "stride_wn" if layout == "nk" else "stride_wk"}
    shared, ops = compile_for_hopper(G.grouped_gemm_kernel, pointers, constexprs, divisible, config.num_warps,
                                     config.num_stages)
    return dict(config=str(config), block_m=bm, shared=shared, wgmma=ops["ttng.warp_group_dot"],
                async_copies=ops["ttg.async_copy_global_to_local"] + ops["ttng.async_tma_copy_global_to_local"],
                tma_copies=ops["ttng.async_tma_copy_global_to_local"], loads=3 if epilogue == 1 else 2)


def wgrad_reports():
    """Every weight-gradient config at M1's shape (dW_down: P = H, Q = F), compiled as a bf16 launch."""
    from m1_kernels.moe_ops.triton import grouped_gemm as G

    pointers = dict(p_ptr="*bf16", q_ptr="*bf16", offsets_ptr="*i32", out_ptr="*bf16")
    divisible = set(pointers) | {"P", "Q", "stride_pr", "stride_qr", "stride_oe", "stride_op"}
    out = []
    for config in G._wgrad_configs(False):
        constexprs = dict(DOT_PRECISION="tf32", EVEN_P=True, EVEN_Q=True, stride_pc=1, stride_qc=1,
                          stride_oq=1, **config.kwargs)
        shared, ops = compile_for_hopper(G.grouped_wgrad_kernel, pointers, constexprs, divisible, config.num_warps,
                                         config.num_stages)
        out.append(dict(config=str(config), shared=shared, wgmma=ops["ttng.warp_group_dot"],
                        async_copies=ops["ttg.async_copy_global_to_local"], loads=2))
    return out


# Few-token kernels at M1 width: every config the autotuner may try where its tiles are largest (an
# expert with 64 rows), the first one with a single row.
FEW_TOKEN_CASES = [(kernel, rows) for kernel in ("gate_up_kernel", "down_kernel") for rows in (64, 16)]


def few_token_reports(kernel_name, block_m):
    """Compile the configs the pruning keeps for a bf16 launch at H6144 F9216 with an expert's rows
    padded to block_m (all of them at 64 rows, the first at fewer)."""
    import torch

    from m1_kernels.moe_ops.triton import few_token as FT

    gate_up = kernel_name == "gate_up_kernel"
    tile = "BLOCK_F" if gate_up else "BLOCK_N"
    kept = FT._prune(2 if gate_up else 1)(FT._configs(False, tile), dict(w_ptr=torch.empty(0, dtype=torch.bfloat16)),
                                          BLOCK_M=block_m)
    return [_few_token_report(kernel_name, block_m, config) for config in (kept if block_m >= 64 else kept[:1])]


def _few_token_report(kernel_name, block_m, config):
    from m1_kernels.moe_ops.triton import few_token as FT

    gate_up = kernel_name == "gate_up_kernel"
    constexprs = dict(DOT_PRECISION="tf32", BLOCK_M=block_m, EVEN_K=True, **config.kwargs)
    if gate_up:
        constexprs.update(TOP_K=2, stride_wh=1)
        pointers = dict(x_ptr="*bf16", w_ptr="*bf16", h_ptr="*bf16")
        divisible = {"H", "F", "stride_xn", "stride_we", "stride_wf", "stride_hm"}
    else:
        constexprs.update(stride_wf=1)
        pointers = dict(h_ptr="*bf16", w_ptr="*bf16", weights_ptr="*fp32", ys_ptr="*fp32")
        divisible = {"H", "F", "stride_hm", "stride_we", "stride_wh", "stride_ys"}
    pointers.update(sorted_idx_ptr="*i32", offsets_ptr="*i32", active_ptr="*i32")
    shared, ops = compile_for_hopper(getattr(FT, kernel_name), pointers, constexprs, divisible | set(pointers),
                                     config.num_warps, config.num_stages)
    return dict(config=str(config), shared=shared, wgmma=ops["ttng.warp_group_dot"],
                async_copies=ops["ttg.async_copy_global_to_local"])


# The few-token path's other kernels at M1 decode shapes (E32 top-2, 1 to 64 tokens) and at the largest
# expert count: each must compile for Hopper (their reshapes and one-hot sorts have no CPU-only twin).
ROUTE_PLAN_SHAPES = [(16, 32, 2, 2), (64, 32, 2, 2), (16, 32, 8, 8), (64, 256, 2, 2), (32, 64, 4, 3)]


def few_token_small_kernels_compile():
    """Shared memory of each compiled launch of the routing, plan and slot-sum kernels."""
    from m1_kernels.moe_ops.triton import few_token as FT

    def shared(fn, pointers, constexprs):
        return compile_for_hopper(fn, pointers, constexprs)[0]

    plan_pointers = dict(partial_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32", sorted_idx_ptr="*i32",
                         offsets_ptr="*i32", active_ptr="*i32")
    out = [shared(FT.router_logits_kernel, dict(x_ptr="*bf16", gate_ptr="*bf16", partial_ptr="*fp32"),
                  dict(EXACT_16BIT_DOT=True, BLOCK_N=n, BLOCK_E=32, BLOCK_H=128)) for n in (16, 64)]
    out += [shared(FT.route_plan_kernel, plan_pointers, dict(TOP_K=k, RENORMALIZE=True, BLOCK_N=n, BLOCK_E=e,
                                                              BLOCK_K=bk, BLOCK_S=min(e, n * k)))
            for n, e, bk, k in ROUTE_PLAN_SHAPES]
    out.append(shared(FT.slot_sum_kernel, dict(ys_ptr="*fp32", out_ptr="*bf16"), dict(TOP_K=2, BLOCK_H=1024)))
    return out


# The router's forward and backward at M1's expert count and at the largest, tiled as the backend launches
# them (BLOCK_E, the token kernels' BLOCK_H, the gate-gradient kernel's BLOCK_H): bf16 x with a bf16
# router (tensor-core logits) or an fp32 one (ieee dots).
ROUTE_TILES = [(32, 128, 64), (256, 16, 16)]


def routing_kernels_compile():
    """Shared memory of each compiled launch of the router's forward and backward kernels."""
    from m1_kernels.moe_ops.triton import routing as R

    out = []
    for gate in ("bf16", "fp32"):
        exact = gate == "bf16"
        for block_e, block_h, gate_block_h in ROUTE_TILES:
            out.append(compile_for_hopper(R.route_kernel, dict(x_ptr="*bf16", gate_ptr=f"*{gate}", weights_ptr="*fp32",
                                                                ids_ptr="*i32"),
                                          dict(TOP_K=2, RENORMALIZE=True, EXACT_16BIT_DOT=exact, BLOCK_N=16,
                                               BLOCK_E=block_e, BLOCK_H=block_h, BLOCK_K=2))[0])
            for store_dlogits, store_dx in ((True, True), (True, False), (False, True)):
                # A gradient not asked for is launched with a None pointer, which Triton makes a constexpr.
                outputs = dict(dlogits_ptr=("*fp32", store_dlogits), dx_ptr=("*bf16", store_dx))
                pointers = dict(x_ptr="*bf16", gate_ptr=f"*{gate}", ids_ptr="*i32", dweights_ptr="*fp32",
                                **{name: kind for name, (kind, stored) in outputs.items() if stored})
                constexprs = dict(TOP_K=2, RENORMALIZE=True, EXACT_16BIT_DOT=exact, STORE_DLOGITS=store_dlogits,
                                  STORE_DX=store_dx, BLOCK_N=16, BLOCK_E=block_e, BLOCK_H=block_h,
                                  **{name: None for name, (_, stored) in outputs.items() if not stored})
                out.append(compile_for_hopper(R.route_backward_kernel, pointers, constexprs)[0])
            out.append(compile_for_hopper(R.route_gate_grad_kernel,
                                          dict(dlogits_ptr="*fp32", x_ptr="*bf16", partial_ptr="*fp32"),
                                          dict(BLOCK_N=32, BLOCK_E=block_e, BLOCK_H=gate_block_h))[0])
    return out


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_moe_compile as t; "
            "print(json.dumps([[t.compile_report(*c) for c in t.CASES], "
            "[t.few_token_reports(*c) for c in t.FEW_TOKEN_CASES], t.few_token_small_kernels_compile(), "
            "t.wgrad_reports(), t.routing_kernels_compile()]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    grouped, few_token, small, wgrad, routing = json.loads(done.stdout.strip().splitlines()[-1])
    return {**dict(zip(CASES, grouped)), **dict(zip(FEW_TOKEN_CASES, few_token)), "few-token small kernels": small,
            "wgrad": wgrad, "routing": routing}


def assert_pipelined(r):
    """Loads issued ahead of their iteration: a pipelined loop has a prologue of copies before it, so more
    copies than loads per iteration (an unpipelined one waits for each load it has just issued)."""
    assert r["async_copies"] >= 2 * r["loads"], (
        f"{r['config']}: {r['async_copies']} async copies for {r['loads']} loads per iteration: not pipelined")


@pytest.mark.parametrize("case", CASES, ids=[f"{r}-epilogue{e}-{l}-{'tma' if t else 'ptr'}" for r, e, l, t in CASES])
def test_m1_config_compiles_pipelined_for_hopper(reports, case):
    r = reports[case]
    assert r["shared"] <= H100_SMEM, f"{r['config']} needs {r['shared']} B of shared memory"
    assert r["async_copies"] > 0, f"{r['config']}: the K loop is not pipelined (no cp.async / TMA)"
    assert (r["tma_copies"] > 0) == case[3], f"{r['config']}: TMA copies {r['tma_copies']} with TMA={case[3]}"
    assert_pipelined(r)
    if r["block_m"] >= 64:
        assert r["wgmma"] > 0, f"{r['config']}: no wgmma"


def test_weight_gradient_configs_compile_pipelined_for_hopper(reports):
    """Every config's row loop pipelines its loads into wgmma."""
    for r in reports["wgrad"]:
        assert r["shared"] <= H100_SMEM, f"{r['config']} needs {r['shared']} B of shared memory"
        assert r["wgmma"] > 0, f"{r['config']}: no wgmma"
        assert_pipelined(r)


@pytest.mark.parametrize("case", FEW_TOKEN_CASES, ids=[f"{k}-rows{r}" for k, r in FEW_TOKEN_CASES])
def test_few_token_configs_compile_pipelined_for_hopper(reports, case):
    assert reports[case], "the pruning keeps no config"
    for r in reports[case]:
        assert r["shared"] <= H100_SMEM, f"{r['config']} needs {r['shared']} B of shared memory"
        assert r["async_copies"] > 0, f"{r['config']}: the weight stream is not pipelined (no cp.async)"
        if case[1] >= 64:
            assert r["wgmma"] > 0, f"{r['config']}: no wgmma"


def test_few_token_routing_plan_and_sum_kernels_compile_for_hopper(reports):
    assert all(shared <= H100_SMEM for shared in reports["few-token small kernels"])


def test_routing_forward_and_backward_kernels_compile_for_hopper(reports):
    assert len(reports["routing"]) == 5 * 2 * len(ROUTE_TILES)
    assert all(shared <= H100_SMEM for shared in reports["routing"])
