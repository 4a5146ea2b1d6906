"""Loading TensorRT: which builder module to import, and the environment a plugin-parsing process needs.

The builder module is chosen at run time: ``tensorrt`` where installed (GPU machines), else the
TensorRT-RTX wheels (module ``tensorrt_rtx``, or ``tensorrt_rtx_bindings`` as the standalone wheel
names it), which parse ONNX and build serialized engines on a CPU-only machine. The two must not
be loaded in one process, so only the first found is imported.

TensorRT-RTX 1.7's ONNX parser ``dlopen``s ``libtensorrt_rtx.so`` (unversioned) for plugin nodes, and the wheel
ships only ``libtensorrt_rtx.so.1``: :func:`plugin_process_env` gives the environment (``LD_LIBRARY_PATH`` with a
symlink) a process that parses plugin nodes needs; without it the parser aborts the process. The loader path is
read when TensorRT loads, so that process must be started with it (a child process).

A leaf module: the engine builder (:mod:`.engines`), the plugin (:mod:`.trt_plugin`) and the TensorRT runtime all
load TensorRT through it, and it imports nothing of apl_export but its errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

from .errors import TensorRTUnavailableError

BUILDER_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")


def load_tensorrt(prefer: str | None = None) -> ModuleType:
    """Import the first TensorRT builder available (``prefer`` first, if given)."""
    names = (prefer, *BUILDER_MODULES) if prefer else BUILDER_MODULES
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "Builder"):  # the `tensorrt` placeholder wheel on PyPI has no Builder
            return module
    raise TensorRTUnavailableError(
        "--trt needs a TensorRT builder, and none is installed: install `tensorrt` on a GPU machine, or the "
        "TensorRT-RTX wheels anywhere (pip install 'apl-adapter[trt]'). The ONNX export is complete without it."
    )


def builder_name(trt: ModuleType) -> str:
    """``"<module> <version>"``, as the manifest records the builder (its first word is what to load again)."""
    return f"{trt.__name__.split('_bindings')[0]} {trt.__version__}"


def tensorrt_rtx_library_dir() -> Path | None:
    """A folder holding ``libtensorrt_rtx.so`` -> the wheel's ``libtensorrt_rtx.so.1`` (None without the wheel)."""
    try:
        spec = importlib.util.find_spec("tensorrt_rtx_libs")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    versioned = Path(next(iter(spec.submodule_search_locations))) / "libtensorrt_rtx.so.1"
    if not versioned.exists():
        return None
    folder = Path(tempfile.gettempdir()) / f"apl-trt-rtx-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    link = folder / "libtensorrt_rtx.so"
    if not (link.is_symlink() and link.resolve() == versioned.resolve()):
        tmp = folder / f".link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(versioned)
        tmp.replace(link)  # atomic: concurrent builders never see a half-made link
    return folder


def plugin_process_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a process that parses ONNX with plugin nodes using TensorRT-RTX (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    folder = tensorrt_rtx_library_dir()
    if folder is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(folder), env.get("LD_LIBRARY_PATH", "")) if p)
    return env
