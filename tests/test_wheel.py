"""The package as a user installs it: a wheel built without the CUDA extension, installed into an empty
folder and used from outside the checkout.

The interpreter under test runs with `-S` (no site-packages processing, so the editable install's
finder, which a .pth file would activate, never runs) and a PYTHONPATH of the install folder plus the
environment's site-packages (torch, triton). The optional dependencies (the extras) are blocked in it,
so the core install is shown to import and run without them.
"""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

# One worker builds the wheel once for all tests here (pytest-xdist --dist loadgroup).
pytestmark = pytest.mark.xdist_group("wheel")

ROOT = Path(__file__).resolve().parents[1]
DIST = "minimax-m1-kernels"
PUBLIC_PACKAGES = ["m1_kernels", "m1_kernels.dispatch", "m1_kernels.lightning_ops", "m1_kernels.moe_ops",
                   "m1_kernels.reference", "m1_kernels.model", "m1_kernels.bench"]
# Local build state that must not reach the build copy (stale build/ trees would end up in the wheel).
# Import names of optional peers that this environment may lack, and the distributions providing them.
_ABSENT_PEERS = {"fla": "fla-core"}
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                      "*.so", "results*", ".wheels", ".prebuilt", ".notes", ".pytest_cache")


def _requirement_name(line: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(path of the wheel, folder it was installed into with pip --target)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, out, target = tmp / "src", tmp / "dist", tmp / "site"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    env = dict(os.environ, M1_BUILD_CUDA="0")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # --no-index: the build and the install must work offline, from what bootstrap.sh installed.
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout}\n{build.stderr}"
    (path,) = out.glob("*.whl")
    install = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(path)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, f"pip install --target failed:\n{install.stdout}\n{install.stderr}"
    return path, target


def _metadata(path):
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    core, extras = set(), set()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.removeprefix("Requires-Dist:")
            (extras if "extra ==" in req else core).add(_requirement_name(req))
    return core, extras


def _run_outside(target, tmp_path, code, *args):
    """Run `code` (or `-m ...` args) in a clean interpreter from a folder outside the checkout."""
    # This environment's package folders (torch, triton), as they are on sys.path (a venv's, or a system
    # Python's dist-packages), and nothing else of sys.path: not the checkout.
    site_dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    site_dirs += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    paths = [str(target)] + [p for p in dict.fromkeys(site_dirs) if os.path.isdir(p)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "M1_"))}
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONNOUSERSITE="1")
    cmd = [sys.executable, "-S"] + (["-c", code] if code else []) + list(args)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_only_the_import_root(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"m1_kernels"}, f"top-level names besides m1_kernels: {sorted(tops - dist_info)}"
    assert len(dist_info) == 1
    for module in ("m1_kernels/lightning_ops/triton/chunk.py", "m1_kernels/moe_ops/triton/grouped_gemm.py",
                   "m1_kernels/model/modeling.py", "m1_kernels/reference/moe.py", "m1_kernels/bench/__main__.py"):
        assert module in names, f"{module} missing from the wheel"
    stray = [n for n in names if re.search(r"(^|/)(test_[^/]*|conftest)\.py$", n) or n.endswith((".so", ".pyc"))]
    assert not stray, f"pytest files, binaries or bytecode in a wheel built without CUDA: {stray}"


def test_wheel_declares_what_it_imports(wheel):
    """Every third-party module the installed code imports comes from a declared distribution (core or
    an extra); numpy is core because the Triton interpreter (the CPU path of the kernels) needs it."""
    path, _ = wheel
    core, extras = _metadata(path)
    assert {"torch", "triton", "numpy", "safetensors"} <= core, core
    assert {"transformers", "matplotlib", "pytest", "hypothesis"} <= extras, extras
    owners = importlib.metadata.packages_distributions()
    undeclared = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(zf.read(name), filename=name)):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top == "m1_kernels":
                        continue
                    dists = {_requirement_name(d) for d in owners.get(top, [_ABSENT_PEERS.get(top, top)])}
                    if not dists & (core | extras):
                        undeclared.setdefault(top, []).append(name)
    assert not undeclared, f"imported but not declared in setup.py: {undeclared}"


_OPS = textwrap.dedent("""
    import importlib, importlib.metadata, json, sys

    blocked = set(sys.argv[1].split(","))

    class BlockExtras:
        # The extras are installed in this environment; a core install does not have them.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} belongs to an extra, not to the core install")

    sys.meta_path.insert(0, BlockExtras())
    import torch
    import m1_kernels
    for name in sys.argv[2].split(","):
        importlib.import_module(name)
    from m1_kernels import lightning_ops, moe_ops
    from m1_kernels.reference import lightning as ref_lightning, moe as ref_moe

    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 37, 3, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g) * 0.3 for _ in range(3))
    slope = lightning_ops.slopes(H, 1, 8)
    o, state = lightning_ops.lightning_attn(q, k, v, slope, output_final_state=True, backend="torch")
    o64, state64 = ref_lightning.lightning_attn_recurrent(q.double(), k.double(), v.double(), slope.double())

    N, Hm, F, E = 11, 8, 6, 4
    x = torch.randn(N, Hm, generator=g)
    gate, gate_up, down = torch.randn(E, Hm, generator=g), torch.randn(E, 2 * F, Hm, generator=g), torch.randn(E, Hm, F, generator=g)
    out = moe_ops.fused_moe(x, gate, gate_up, down, top_k=2, backend="torch")
    out64 = ref_moe.moe(x.double(), gate.double(), gate_up.double(), down.double(), 2)

    err = lambda a, b: (a.double() - b).abs().max().item() / b.abs().max().item()
    print(json.dumps({"file": m1_kernels.__file__, "lightning": err(o, o64), "state": err(state, state64),
                      "moe": err(out, out64), "torch": torch.__file__}))
""")


def _extras_modules(extras):
    """Top-level module names that the extras' distributions provide in this environment."""
    owners = importlib.metadata.packages_distributions()
    return sorted(mod for mod, dists in owners.items() if {_requirement_name(d) for d in dists} & extras)


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    path, target = wheel
    core, extras = _metadata(path)
    blocked = _extras_modules(extras - core)
    assert "transformers" in blocked and "matplotlib" in blocked
    packages = PUBLIC_PACKAGES + (["m1_kernels.trainer"] if (target / "m1_kernels" / "trainer").is_dir() else [])
    run = _run_outside(target, tmp_path, _OPS, ",".join(blocked), ",".join(packages))
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # The editable install and the checkout must not leak in: the root comes from the install folder.
    assert Path(result["file"]).resolve().is_relative_to(target.resolve()), result["file"]
    assert not Path(result["file"]).resolve().is_relative_to(ROOT), result["file"]
    assert result["lightning"] < 1e-5 and result["state"] < 1e-5 and result["moe"] < 1e-5, result


def test_installed_bench_entry_point(wheel, tmp_path):
    _, target = wheel
    run = _run_outside(target, tmp_path, None, "-m", "m1_kernels.bench", "--help")
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert "--only" in run.stdout
