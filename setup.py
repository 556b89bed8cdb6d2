"""Builds stepflow_ext._C from csrc/: the CPU kernels always, the CUDA kernels when possible.

STEPFLOW_CUDA=auto (default) compiles csrc/cuda/*.cu when torch was built with CUDA and nvcc
is found; STEPFLOW_CUDA=1 requires it, STEPFLOW_CUDA=0 skips it. CUDA_HOME defaults to
/usr/local/cuda when that exists (torch would otherwise guess /usr/local and fail to link).
TORCH_CUDA_ARCH_LIST overrides the default archs "8.0;9.0". STEPFLOW_BUILD_EXT=0 installs the
Python package without compiling (the Makefile then builds _C once, in place).
"""
import glob
import os
import shutil

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    mode = os.environ.get("STEPFLOW_CUDA", "auto").strip().lower()
    if mode not in {"0", "1", "auto"}:
        raise SystemExit(f"STEPFLOW_CUDA must be 0, 1 or auto, got {mode!r}")
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    available = torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)
    if mode == "1" and not available:
        raise SystemExit("STEPFLOW_CUDA=1 but torch has no CUDA or nvcc was not found "
                         f"(torch.version.cuda={torch.version.cuda}, nvcc={nvcc})")
    return available if mode == "auto" else mode == "1"


def cuda_library_includes() -> list:
    """Headers that ATen's CUDA headers include (cusparse.h, cublas_v2.h, ...).

    A minimal CUDA toolkit may lack them; pip's torch ships them in site-packages/nvidia/*/include.
    """
    cuda_home = os.environ.get("CUDA_HOME", "")
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h")))
    return [os.path.dirname(found[-1])] if found else []


def extensions():
    with_cuda = build_cuda()
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
    defines = [("STEPFLOW_VERSION", f'"{VERSION}"'), ("STEPFLOW_CUDA_ARCHS", f'"{archs}"')]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]  # no implicit FMA; the C++ standard is the one torch asks for
    include = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        sources.remove(os.path.join("csrc", "cpu", "no_cuda.cpp"))
        include += cuda_library_includes()
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return [CUDAExtension("stepflow_ext._C", sources, include_dirs=include, define_macros=defines,
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                              extra_link_args=["-fopenmp"])]
    return [CppExtension("stepflow_ext._C", sources, include_dirs=include, define_macros=defines,
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(
    version=VERSION,
    ext_modules=extensions() if os.environ.get("STEPFLOW_BUILD_EXT", "1") != "0" else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
