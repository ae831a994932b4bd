"""Build: the pure-Python packages always; the CUDA extension `m1_kernels._cuda` when nvcc is found.

The extension links no libtorch (kernels take raw device pointers, see docs/design.md, "Backends") and links cudart
statically, so one build serves any PyTorch version. Environment:

- ``M1_BUILD_CUDA=0``       skip the extension (pure-Python install).
- ``M1_CUDA_ARCHS="90a"``   semicolon-separated SM targets (default ``90a``: wgmma/TMA need it).
- ``CUDA_HOME``             toolkit root (default: the directory above ``nvcc`` on PATH).
- ``MAX_JOBS``              parallel nvcc jobs for ninja.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXT_NAME = "m1_kernels._cuda"


def _find_cuda_home():
    if os.environ.get("M1_BUILD_CUDA", "1") == "0":
        return None, "M1_BUILD_CUDA=0"
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc on PATH may be a wrapper script, so also try the usual toolkit roots
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates += ["/usr/local/cuda"] + sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home, None
    return None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"


def _cutlass_include():
    """CUTLASS/CuTe headers from the nvidia-cutlass wheel, located without importing it."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if (inc / "cutlass" / "cutlass.h").exists() else None


class NinjaCudaBuild(build_ext):
    """Compiles csrc/*.cu with nvcc and csrc/*.cpp with the host compiler through one ninja file."""

    def build_extension(self, ext):
        cuda_home = Path(ext.cuda_home)
        import pybind11

        archs = [a.strip() for a in os.environ.get("M1_CUDA_ARCHS", "90a").split(";") if a.strip()]
        gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
        includes = [ROOT / "csrc", Path(pybind11.get_include()), Path(sysconfig.get_paths()["include"]),
                    cuda_home / "include"]
        cutlass = _cutlass_include()
        if cutlass is not None:
            includes.append(cutlass)
        elif any("cutlass/" in (ROOT / s).read_text() for s in ext.sources):
            raise RuntimeError("csrc/ needs CUTLASS headers: pip install --no-deps nvidia-cutlass==4.2.0.0")
        inc = " ".join(f"-I{p}" for p in includes)
        defines = f"-DM1_CUDA_ARCHS=\\\"{';'.join(archs)}\\\""

        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)

        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {cuda_home / 'bin' / 'nvcc'}",
            f"cxx = {os.environ.get('CXX', 'c++')}",
            f"nvcc_flags = -O3 -std=c++17 {gencode} --expt-relaxed-constexpr -Xcompiler -fPIC "
            f"-Xcompiler -fvisibility=hidden -lineinfo {defines} {inc}",
            f"cxx_flags = -O3 -std=c++17 -fPIC -fvisibility=hidden {defines} {inc}",
            f"ldflags = -shared -L{cuda_home / 'lib64'} -lcudart_static -ldl -lrt -lpthread",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule cxx",
            "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cxx $in $ldflags -o $out",
        ]
        objects = []
        for src in ext.sources:
            src = (ROOT / src).resolve()
            obj = build_dir / (src.name + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: {'nvcc' if src.suffix == '.cu' else 'cxx'} {src}")
        lines.append(f"build {out}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg  # the PyPI wheel ships the binary
            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        cmd = [ninja, "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        print(f"[m1] building {EXT_NAME} for sm_{', sm_'.join(archs)} with {cuda_home / 'bin' / 'nvcc'}")
        subprocess.check_call(cmd)


# The top-level folders install under the one import root `m1_kernels` (docs/design.md, "Layout").
PACKAGE_DIR = {"m1_kernels": "m1_kernels", **{f"m1_kernels.{name}": name for name in
                                               ("lightning_ops", "moe_ops", "reference", "model", "trainer", "bench")}}


class BuildPyWithoutTests(build_py):
    """Leaves pytest files (bench/test_bench.py, bench/conftest.py) out of the wheel: they run from a
    checkout (`pytest bench --benchmark-only`); an install needs only the cases and the report."""

    def find_package_modules(self, package, package_dir):
        return [(pkg, module, path) for pkg, module, path in super().find_package_modules(package, package_dir)
                if not (module.startswith("test_") or module == "conftest")]


def _packages():
    packages = []
    for root, folder in PACKAGE_DIR.items():
        if (ROOT / folder / "__init__.py").exists():
            packages += [root] + [f"{root}.{sub}" for sub in find_packages(where=str(ROOT / folder))]
    return packages


def _extensions():
    cuda_home, why_not = _find_cuda_home()
    if cuda_home is None:
        print(f"[m1] building without the CUDA extension: {why_not}", file=sys.stderr)
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[up]*")
                     if p.suffix in (".cu", ".cpp"))
    ext = Extension(EXT_NAME, sources=sources)
    ext.cuda_home = str(cuda_home)
    return [ext]


setup(
    name="minimax-m1-kernels",
    version="0.1.0",
    description="Lightning attention and MoE kernels (Triton, CUDA/CUTLASS) for MiniMax-M1",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    # numpy: the Triton interpreter (CPU paths) fails without it; safetensors: model checkpoints;
    # tqdm: the engine's progress bar (on by default at a terminal).
    install_requires=["torch>=2.6", "triton>=3.2; platform_system=='Linux'", "numpy", "safetensors", "tqdm"],
    extras_require={
        "hf": ["transformers>=5"],                       # replace_hf_modules, the equivalence tests
        # plots, `pytest bench --benchmark-only`, and flash-linear-attention's kernels as a peer (GPU)
        "bench": ["matplotlib", "pytest-benchmark", "fla-core"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "transformers>=5"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": NinjaCudaBuild, "build_py": BuildPyWithoutTests},
    zip_safe=False,
)
