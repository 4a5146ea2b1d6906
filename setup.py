"""Build script: the packages and the ``apl_adapter._C`` extension (csrc/).

Metadata lives in pyproject.toml. This file exists for what pyproject cannot say: the C++/CUDA
extension. Build it without build isolation so it compiles against the installed torch:

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The CPU kernel always builds. The CUDA kernel is added when the installed torch is a CUDA build
and nvcc is found (``APL_FORCE_CUDA=1`` to insist, ``APL_NO_EXTENSION=1`` to skip the extension).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _packages() -> tuple[list[str], dict[str, str]]:
    # export/ installs as `apl_export`: a bare top-level `export` module would clash with anything.
    adapter = find_packages(include=["apl_adapter", "apl_adapter.*"])
    export = ["apl_export" + p[len("export") :] for p in find_packages(include=["export", "export.*"])]
    return adapter + export, {"apl_export": "export"}


def _extensions() -> tuple[list, dict]:
    if os.environ.get("APL_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cu_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    if not cpp_sources:
        return [], {}
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) or os.environ.get("APL_FORCE_CUDA") == "1"
    if with_cuda and cu_sources:
        ext = CUDAExtension(
            "apl_adapter._C",
            cpp_sources + cu_sources,
            include_dirs=[str(CSRC)],
            define_macros=[("APL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "apl_adapter._C",
            cpp_sources,
            include_dirs=[str(CSRC)],
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"apl_adapter": ["world/assets/**/*", "py.typed"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
