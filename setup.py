"""Build barber._C: the CPU extension always, CUDA kernels when torch is a CUDA build and nvcc exists.

Knobs (environment variables):
  BARBER_NO_NATIVE=1   install the pure-Python package only (ops fall back to barber.reference)
  BARBER_NO_CUDA=1     build the CPU extension only, even with a CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST CUDA architectures (default here: "8.0;9.0")
  MAX_JOBS             parallel compile jobs (ninja)

Install with `pip install --no-build-isolation -e .` so pip uses the torch already installed.
"""

import os

from setuptools import setup

CPU_SOURCES = [
    "csrc/ops.cpp",
    "csrc/cpu/mask_ops.cpp",
    "csrc/cpu/pack_ops.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/mask_ops.cu",
    "csrc/cuda/pack_ops.cu",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _cuda_decision():
    """Return (use_cuda, reason). Never depends on a GPU being present."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("BARBER_NO_CUDA"):
        return False, "BARBER_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, f"torch {torch.__version__} has CUDA {torch.version.cuda} but nvcc/CUDA_HOME was not found"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"


def _extensions():
    if _flag("BARBER_NO_NATIVE"):
        print("barber build: pure Python (BARBER_NO_NATIVE is set); ops use barber.reference")
        return [], {}

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda, reason = _cuda_decision()
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    include_dirs = [os.path.abspath("csrc")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_tag = f'"{torch.version.cuda}"'
        define = [("BARBER_WITH_CUDA", None), ("BARBER_CUDA_VERSION", cuda_tag)]
        ext = CUDAExtension(
            "barber._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
        print(f"barber build: CPU + CUDA ({reason}; arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension(
            "barber._C",
            CPU_SOURCES,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
        print(f"barber build: CPU only ({reason})")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
