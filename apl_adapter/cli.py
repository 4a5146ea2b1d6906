"""``apl-adapter``: look inside a saved APL adapter before deploying it.

apl-adapter inspect apl-prefix/          # config, prefix shape and norms; exit 2 if unusable
"""

from __future__ import annotations

import argparse
import json
import sys

from .console import add_common_options, add_version_option, run_cli
from .tuners.apl.serialization import CONFIG_NAME, check_adapter_folder


def _inspect(folder: str) -> dict:
    tensors = check_adapter_folder(folder)
    with open(f"{folder}/{CONFIG_NAME}") as handle:
        config = json.load(handle)
    return {
        "folder": folder,
        "peft_type": config.get("peft_type"),
        # adapters saved before the field existed are CLIP prefixes
        "text_encoder_type": config.get("text_encoder_type") or "clip",
        "num_virtual_tokens": config.get("num_virtual_tokens"),
        "token_dim": config.get("token_dim"),
        "prefix_init": config.get("prefix_init"),
        "prefix_depth": config.get("prefix_depth", "shallow"),
        "hide_prefix_rows": config.get("hide_prefix_rows", False),
        "apply_to_negative_prompt": config.get("apply_to_negative_prompt"),
        # check_adapter_folder admits only the prefix tensors the config declares
        "tensors": {
            key: {
                "shape": list(value.shape),
                "dtype": str(value.dtype),
                # (m,) for the prefix; (num_layers, m) for a deep prefix's keys / values
                "row_norms": value.float().norm(dim=-1).tolist(),
            }
            for key, value in tensors.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apl-adapter",
        description="Inspect a saved APL adapter (PEFT folder: adapter_config.json + adapter_model.safetensors).",
        epilog="Example: apl-adapter inspect runs/apl/adapter",
    )
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="validate an adapter folder and print its config and prefix statistics")
    inspect.add_argument("folder", help="adapter folder written by save_pretrained() or apl-train")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_common_options(inspect, threads=False, version=False)
    args = parser.parse_args(argv)
    return run_cli("apl-adapter", lambda: _print_inspection(args.folder, args.json), args)


def _print_inspection(folder: str, as_json: bool) -> int:
    info = _inspect(folder)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"APL adapter at {info['folder']}, for a {info['text_encoder_type'].upper()} text encoder")
    print(
        f"  prefix: {info['num_virtual_tokens']} vectors x {info['token_dim']}, {info['prefix_depth']} "
        f"(init: {info['prefix_init']})"
    )
    if info["hide_prefix_rows"]:
        print("  prefix rows: hidden (the denoiser sees only the prompt's rows, computed behind the prefix)")
    print(f"  negative prompt prefixed: {info['apply_to_negative_prompt']}")
    for key, tensor in info["tensors"].items():
        norms = tensor["row_norms"]
        if norms and isinstance(norms[0], list):  # deep rows: one line per layer would flood; give the range
            flat = [n for layer in norms for n in layer]
            print(f"  {key}: {tuple(tensor['shape'])} {tensor['dtype']}, row norms {min(flat):.2f}..{max(flat):.2f}")
            continue
        print(
            f"  {key}: {tuple(tensor['shape'])} {tensor['dtype']}, row norms [{', '.join(f'{n:.2f}' for n in norms)}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
