"""`python -m m1_kernels.bench` on a CPU: where results go, and --only that matches nothing."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from m1_kernels.bench.__main__ import default_out, main

ROOT = Path(__file__).resolve().parents[1]


def test_only_matching_nothing_lists_the_cases_and_fails(capsys):
    assert main(["--only", "no case is called this", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "no case matches --only no case is called this" in err
    assert "lightning decode: decode B" in err  # the available cases, as 'group: name'


def test_cpu_results_go_to_an_ignored_folder():
    out = Path(default_out(torch.device("cpu")))
    assert out == ROOT / "bench" / "results-cpu"
    assert Path(default_out(torch.device("cuda"))) == ROOT / "bench" / "results"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "cpu-x86_64.json")], cwd=ROOT)
    assert ignored.returncode == 0, "bench/results-cpu/ must be ignored by git"


def test_cpu_run_writes_its_rows(tmp_path):
    assert main(["--only", "lightning decode", "--out", str(tmp_path), "--no-plots"]) == 0
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["group"] == "lightning decode" for r in rows)
    assert all(r["median_ms"] > 0 for r in rows if "error" not in r)
    assert any(r["ours"] and "error" not in r for r in rows)


def test_rows_record_the_configs_the_autotuner_chose_for_them(monkeypatch):
    """A row names the configs its implementation's autotuned kernels chose while it was timed; a row whose
    kernels tuned nothing new records none."""
    triton = pytest.importorskip("triton")
    from m1_kernels.bench.harness import Case, run_case

    @triton.jit
    def kernel(x, N):
        pass

    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})], key=["N"])(kernel)
    module = types.ModuleType("m1_kernels.fake_kernels")
    module.scale_kernel = tuned
    monkeypatch.setitem(sys.modules, module.__name__, module)
    choose = lambda x: tuned.cache.setdefault((x.numel(),), tuned.configs[1])  # what a first launch does  # noqa: E731
    case = Case("g", "c", lambda: torch.ones(3), {"ours[a]": choose, "peer": lambda x: x + 1})
    rows = run_case(case, torch.device("cpu"), {})
    assert rows[0]["tuned_configs"] == {"fake_kernels.scale_kernel": {"(3,)": str(tuned.configs[1])}}
    assert "tuned_configs" not in rows[1]
    assert all("tuned_configs" not in r for r in run_case(case, torch.device("cpu"), {}))  # nothing new


def test_trainer_report_measures_logprob_and_d_hidden_errors(tmp_path):
    """The trainer cases' report on the CPU: every implementation's log-prob error and d hidden error against
    float64; the fp32 paths at fp32 rounding, the bf16 head orders of magnitude worse (so the check can fail)."""
    assert main(["--only", "trainer lm-head", "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "cpu-x86_64-trainer_logprobs.json").read_text())["rows"]}
    for impl in ("ours[torch]", "ours[one-pass loss]", "fp32 head (torch)"):
        assert rows[impl]["max_logp_error"] < 1e-5 and rows[impl]["dhidden_rel_error"] < 1e-5, impl
    assert rows["bf16 head (torch)"]["dhidden_rel_error"] > 1e-4


def test_profile_tables_shorten_kernel_names_to_what_tells_them_apart():
    from m1_kernels.bench.profile_case import short_name
    mul = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<at::native::BinaryFunctor<"
           "c10::BFloat16, float, c10::BFloat16, at::native::binary_internal::MulFunctor<float> > >(at::"
           "TensorIteratorBase&, at::native::BinaryFunctor<c10::BFloat16, float, c10::BFloat16, at::native::"
           "binary_internal::MulFunctor<float> > const&)::{lambda(int)#1}>(int, ...)")
    assert short_name(mul) == "elementwise_kernel<BinaryFunctor, MulFunctor>"
    assert short_name("nvjet_sm90_tst_192x192_64x3_1x2_h_badd_coopB_NTN") == \
        "nvjet_sm90_tst_192x192_64x3_1x2_h_badd_coopB_NTN"
    long_plain = "k" * 200
    assert short_name(long_plain) == "k" * 78 + ".." and len(short_name(long_plain, 40)) == 40


@pytest.mark.parametrize("what", ["dH = dY W_down + SwiGLU bwd", "dX = d[g|u] W_gate_up", "dW_down = dY^T h",
                                  "dW_gate_up = d[g|u]^T X"])
def test_moe_backward_gemm_cases_time_the_backward_products(what):
    """Each 'moe backward GEMMs' case runs the product its name says: the triton backend (interpreted here)
    on the case's own inputs, against a per-expert float64 loop, with an empty expert among uneven ones."""
    from m1_kernels.bench.cases_moe import BACKWARD_GEMMS, backward_gemm_inputs
    from m1_kernels.moe_ops import triton_backend
    from m1_kernels.reference import moe as RM

    E, H, F = 3, 32, 48
    offsets = torch.tensor([0, 37, 37, 90], dtype=torch.int32)
    names, ours, _, _ = BACKWARD_GEMMS[what]
    i = backward_gemm_inputs(names, offsets, E, H, F, torch.device("cpu"), torch.float32)
    got = ours(triton_backend, i)
    d = {k: v.double() for k, v in i.items() if k != "offsets"}
    if what.startswith("dH"):  # the gradient of silu(gate) * up for dh = dY W_down
        preact = d["preact"].requires_grad_()
        h = torch.nn.functional.silu(preact[:, :F]) * preact[:, F:]
        h.backward(RM.grouped_gemm(d["dy"], d["down"], offsets, "kn"))
        want = preact.grad
    elif what.startswith("dX"):
        want = RM.grouped_gemm(d["d_preact"], d["gate_up"], offsets, "kn")
    elif what.startswith("dW_down"):
        want = RM.grouped_gemm_weight_grad(d["h"], d["dy"], offsets, "nk")
    else:
        want = RM.grouped_gemm_weight_grad(d["x"], d["d_preact"], offsets, "nk")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
