"""TensorRT engines from the exported ONNX files: one profile per engine, strongly typed.

The builder is whichever TensorRT :func:`.tensorrt_loader.load_tensorrt` finds: ``tensorrt`` on GPU machines, else
the TensorRT-RTX wheels, which parse ONNX and build serialized engines on a CPU-only machine.

Precision comes from the ONNX file (strongly typed network, as TensorRT demo/Diffusion): export
with ``--fp16`` for fp16 engines. ``tensorrt`` engines use and update a shared timing cache
(``engines/timing.cache``); TensorRT-RTX ignores timing caches (it tunes at load time, with its
runtime cache), so none is written for it.

Models whose manifest entry lists ``plugins`` (the fast text encoder's ``apl::PrefixAttention`` nodes) are built
in a child process (``python -m apl_export.engines --plugin-build``) started with
:func:`apl_export.tensorrt_loader.plugin_process_env` (TensorRT-RTX's ONNX parser needs that loader path before
TensorRT loads); the child registers the plugin before parsing.

Without a GPU an engine cannot be deserialized, so what is checked here is the parsed network
(I/O names, dtypes, ranks), the profile that was set, and that the builder returned a plan.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from .errors import ExportError
from .memory import GIB, check_fits, engine_need_bytes
from .tensorrt_loader import builder_name, load_tensorrt, plugin_process_env
from .trt_plugin.plugin import register_plugin

ENGINE_DIR = "engines"
TIMING_CACHE = "timing.cache"
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT demo/Diffusion's default: good engines, bounded build time
_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


def build_engines(staging: Path, manifest: dict, fp16: bool, progress: Callable[[str], None] = print) -> dict:
    """Build one engine per exported model into ``<staging>/engines``; returns the manifest's ``engines`` entry."""
    trt = load_tensorrt()
    check_engine_memory(staging, manifest, builder_name(trt))
    engine_dir = staging / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    engines = {}
    for name, model in manifest["models"].items():
        request = {
            "onnx_path": str(staging / model["path"]),
            "engine_path": str(engine_dir / f"{name}.plan"),
            "inputs": model["inputs"],
            "outputs": model["outputs"],
            "profile": model["profile"],
            "timing_cache": str(engine_dir / TIMING_CACHE),
        }
        if model.get("plugins"):
            plugins = ", ".join(model["plugins"])
            progress(f"  {name}: building with {builder_name(trt)} and the {plugins} plugin (child process)")
            engines[name] = build_in_plugin_process(trt, request)
            engines[name]["plugins"] = model["plugins"]
        else:
            progress(f"  {name}: building with {builder_name(trt)}")
            engines[name] = _build_request(trt, request)
        engines[name]["path"] = f"{ENGINE_DIR}/{name}.plan"
    return {"builder": builder_name(trt), "fp16": fp16, "models": engines}


def onnx_weight_bytes(onnx_path: Path) -> int:
    """Bytes of an exported model's weights: ``model.onnx`` and its external data (``model.onnx_data``), if any."""
    return sum(p.stat().st_size for p in (onnx_path, onnx_path.with_name("model.onnx_data")) if p.exists())


def check_engine_memory(staging: Path, manifest: dict, builder: str) -> None:
    """Before any engine is built: stop, naming the model, its ONNX size and the memory needed and available, when
    the largest build would not fit (:func:`apl_export.memory.engine_need_bytes`)."""
    sizes = {name: onnx_weight_bytes(staging / model["path"]) for name, model in manifest["models"].items()}
    name, size = max(sizes.items(), key=lambda item: item[1])
    precision = "fp16" if manifest.get("fp16") else "fp32"
    check_fits(
        engine_need_bytes(size),
        f"Building the TensorRT engine of {name} ({size / GIB:.1f} GiB of {precision} ONNX weights) with {builder}",
        f"Build the engines on a machine with at least {engine_need_bytes(size) / GIB:.1f} GiB of memory (a GPU "
        "server), from the published ONNX folder"
        + ("." if manifest.get("fp16") else ", or export with --fp16, which halves the weights and the build."),
    )


def _build_request(trt: ModuleType, request: dict) -> dict:
    paths = {k: Path(request[k]) for k in ("onnx_path", "engine_path", "timing_cache")}
    return build_engine(trt, **paths, inputs=request["inputs"], outputs=request["outputs"], profile=request["profile"])


def build_in_plugin_process(trt: ModuleType, request: dict) -> dict:
    """Build one engine whose graph holds ``apl::PrefixAttention`` nodes, in a child process with the plugin's
    environment (:func:`apl_export.tensorrt_loader.plugin_process_env`); returns what :func:`build_engine` returns."""
    cmd = [sys.executable, "-m", "apl_export.engines", "--plugin-build", "--module", trt.__name__]
    result = subprocess.run(cmd, input=json.dumps(request), env=plugin_process_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(
            f"TensorRT could not build {request['onnx_path']} with the apl::PrefixAttention plugin "
            f"(exit {result.returncode}): {result.stderr.strip()[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _plugin_build_main(argv: list[str] | None = None) -> int:
    """Child-process entry: read a build request (JSON) on stdin, register the plugin, build, print the result."""
    parser = argparse.ArgumentParser(description="build one TensorRT engine with the apl::PrefixAttention plugin")
    parser.add_argument("--plugin-build", action="store_true", required=True, help="the only action")
    parser.add_argument("--module", default=None, help="TensorRT module the parent process built with")
    args = parser.parse_args(argv)
    try:
        trt = load_tensorrt(args.module)
        register_plugin(trt)
        result = _build_request(trt, json.loads(sys.stdin.read()))
    except ExportError as err:
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def build_engine(
    trt: ModuleType,
    onnx_path: Path,
    engine_path: Path,
    inputs: list[dict],
    outputs: list[dict],
    profile: dict[str, list[list[int]]],
    timing_cache: Path | None = None,
) -> dict:
    """Parse ``onnx_path``, check its I/O against the manifest, build with one min/opt/max profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    io = network_io(network)
    check_network_io(io, inputs, outputs, onnx_path)

    config = builder.create_builder_config()
    config.builder_optimization_level = BUILDER_OPTIMIZATION_LEVEL
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(trt_profile)
    set_profile = {name: [list(s) for s in trt_profile.get_shape(name)] for name in profile}
    if set_profile != {k: [list(s) for s in v] for k, v in profile.items()}:
        raise ExportError(f"{onnx_path}: TensorRT kept profile {set_profile}, asked for {profile}.")

    use_cache = timing_cache is not None and not trt.__name__.startswith("tensorrt_rtx")
    if use_cache:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plan = builder.build_serialized_network(network, config)
    if plan is None or plan.nbytes == 0:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}; see the messages above.")
    build_s = time.perf_counter() - start
    tmp = engine_path.with_suffix(".plan.tmp")
    with open(tmp, "wb") as handle:
        handle.write(memoryview(plan))
    tmp.replace(engine_path)
    if use_cache:
        timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return {"io": io, "profile": set_profile, "bytes": engine_path.stat().st_size, "build_s": round(build_s, 2)}


def network_io(network) -> dict[str, dict]:
    """``{name: {"mode", "dtype", "shape"}}`` of a parsed network (-1 marks a dynamic dim)."""
    io = {}
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):  # fmt: skip
        for i in range(count):
            tensor = get(i)
            dtype = _DTYPES.get(tensor.dtype.name)
            io[tensor.name] = {
                "mode": mode,
                "dtype": str(np.dtype(dtype)) if dtype else tensor.dtype.name,
                "shape": list(tensor.shape),
            }
    return io


def check_network_io(io: dict[str, dict], inputs: list[dict], outputs: list[dict], where: Path) -> None:
    """The parsed network must have the manifest's I/O: names in order, dtypes, fixed dims."""
    for mode, expected in (("input", inputs), ("output", outputs)):
        names = [n for n, v in io.items() if v["mode"] == mode]
        if names != [t["name"] for t in expected]:
            raise ExportError(f"{where}: TensorRT sees {mode}s {names}, expected {[t['name'] for t in expected]}.")
        for tensor in expected:
            got = io[tensor["name"]]
            dims = [d if isinstance(d, int) else -1 for d in tensor["dims"]]
            if got["dtype"] != tensor["dtype"] or got["shape"] != dims:
                raise ExportError(
                    f"{where}: TensorRT {mode} {tensor['name']} is {got['dtype']}{got['shape']}, "
                    f"expected {tensor['dtype']}{dims}."
                )


if __name__ == "__main__":
    sys.exit(_plugin_build_main())
