"""Builds stepflow_ext._C from csrc/: the CPU kernels always, the CUDA kernels when possible.

Build against the torch you run: `pip install --no-build-isolation .` (README, "Install").

STEPFLOW_CUDA=auto (default) compiles csrc/cuda/*.cu when torch was built with CUDA and nvcc
is found; STEPFLOW_CUDA=1 requires it, STEPFLOW_CUDA=0 skips it. nvcc's CUDA major must be
torch's (torch.version.cuda); the build stops with an explanation otherwise. CUDA_HOME defaults
to /usr/local/cuda when that exists (torch would otherwise guess /usr/local and fail to link).
TORCH_CUDA_ARCH_LIST overrides the default archs "8.0;9.0+PTX" (sm_80 and sm_90 code, plus
compute_90 PTX that newer GPUs JIT-compile). The toolkit's own headers always win; headers it lacks
(cusparse.h & co., which ATen's CUDA headers include) come from pip's site-packages/nvidia/*/include,
searched after it. The torch version built against is recorded in _C (`_C.torch_version`);
stepflow_ext refuses to import under another torch. STEPFLOW_BUILD_EXT=0 installs the Python
package without compiling (the Makefile then builds _C once, in place).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
DEFAULT_ARCHS = "8.0;9.0+PTX"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
# Where build front ends put the build requirements they install for an isolated build:
# pip's <tmp>/pip-build-env-*, pypa/build's <tmp>/build-env-*, uv's cache builds-v0/.
ISOLATED_MARKS = ("build-env-", "builds-v0")


def say(line: str) -> None:
    print(f"stepflow-ext: {line}", file=sys.stderr, flush=True)


def check_build_isolation() -> None:
    """An isolated build compiles against the torch the build front end resolved from
    `torch>=2.4` in a temporary environment, not necessarily the torch this Python runs.
    Stop when they differ (the result would not import); otherwise say what happens."""
    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    if not any(mark in torch_site for mark in ISOLATED_MARKS):
        return
    # pip's isolation only hides this interpreter's site-packages (PYTHONPATH -> its sitecustomize).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                               env=env, capture_output=True, text=True, timeout=600, cwd="/")
        lines = probe.stdout.split() if probe.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        lines = []
    installed = lines[-1] if lines else None
    fix = "`pip install --no-build-isolation .` builds against the installed torch"
    if installed is None:
        say(f"isolated build: compiling against torch {torch.__version__} from the temporary build "
            f"environment ({torch_site}), and this Python has no torch: the result imports only under "
            f"torch {torch.__version__}; install your torch first, then {fix}.")
    elif installed != torch.__version__:
        raise SystemExit(
            f"stepflow-ext: pip's isolated build resolved torch {torch.__version__} into a temporary "
            f"environment, but this Python runs torch {installed}, which could not import the result; "
            f"{fix} (stopped before compiling).")
    else:
        say(f"isolated build: compiling against torch {torch.__version__} from the temporary build "
            f"environment, the same version as this Python's torch; {fix} without a second torch install.")


def nvcc_path():
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    return nvcc if nvcc and os.path.exists(nvcc) else None


def nvcc_release(nvcc: str):
    """(major, minor) of `nvcc --version`, or None when it cannot be read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def build_cuda() -> bool:
    mode = os.environ.get("STEPFLOW_CUDA", "auto").strip().lower()
    if mode not in {"0", "1", "auto"}:
        raise SystemExit(f"STEPFLOW_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False
    nvcc = nvcc_path()
    available = torch.version.cuda is not None and nvcc is not None
    if mode == "1" and not available:
        raise SystemExit("stepflow-ext: STEPFLOW_CUDA=1 but torch has no CUDA or nvcc was not found "
                         f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
                         f"CUDA_HOME={os.environ.get('CUDA_HOME')}, nvcc={nvcc}); "
                         "STEPFLOW_CUDA=0 builds the CPU kernels only.")
    if not available:
        return False
    release = nvcc_release(nvcc)
    torch_major = int(torch.version.cuda.split(".")[0])
    if release is not None and release[0] != torch_major:
        raise SystemExit(
            f"stepflow-ext: nvcc ({nvcc}) is CUDA {release[0]}.{release[1]} but torch {torch.__version__} "
            f"was built with CUDA {torch.version.cuda}; the CUDA majors must match. Point CUDA_HOME at a "
            f"CUDA {torch_major}.x toolkit, or install a torch built for CUDA {release[0]}, or build the "
            "CPU kernels only with STEPFLOW_CUDA=0 (stepflow_ext.cuda_compiled is then False and the ops "
            "take CPU tensors only).")
    return True


def cuda_library_include_flags() -> list:
    """Headers that ATen's CUDA headers include (cusparse.h, cublas_v2.h, ...) and a minimal
    toolkit lacks; pip's CUDA torch ships them in site-packages/nvidia/*/include.

    That folder also holds CUDA runtime headers (cuda_runtime_api.h, ...) of whatever CUDA
    version pip resolved, which must not shadow the toolkit's (nvcc's own version): it goes in
    as -isystem, searched after every -I folder, the toolkit's $CUDA_HOME/include among them.
    """
    cuda_home = os.environ.get("CUDA_HOME", "")
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")))
    return ["-isystem", os.path.dirname(found[-1])] if found else []


def extensions():
    check_build_isolation()
    with_cuda = build_cuda()
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
    defines = [("STEPFLOW_VERSION", f'"{VERSION}"'), ("STEPFLOW_CUDA_ARCHS", f'"{archs}"'),
               ("STEPFLOW_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]  # no implicit FMA; the C++ standard is the one torch asks for
    include = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        sources.remove(os.path.join("csrc", "cpu", "no_cuda.cpp"))
        after_toolkit = cuda_library_include_flags()
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + after_toolkit
        return [CUDAExtension("stepflow_ext._C", sources, include_dirs=include, define_macros=defines,
                              extra_compile_args={"cxx": cxx + after_toolkit, "nvcc": nvcc},
                              extra_link_args=["-fopenmp"])]
    return [CppExtension("stepflow_ext._C", sources, include_dirs=include, define_macros=defines,
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(
    version=VERSION,
    ext_modules=extensions() if os.environ.get("STEPFLOW_BUILD_EXT", "1") != "0" else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
