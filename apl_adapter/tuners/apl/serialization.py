"""Safe reading and atomic writing of APL adapter folders (PEFT's format, safetensors only).

A saved adapter is PEFT's folder: ``adapter_config.json`` + ``adapter_model.safetensors``.
Pickle checkpoints (``adapter_model.bin``, ``*.pt``) are refused: loading one can run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from ...atomic import atomic_folder
from ...errors import APLAdapterError
from ...model_card import pipeline_of, write_model_card
from .constants import INIT_METHODS, PREFIX_DEPTHS, TEXT_ENCODER_TYPES, max_virtual_tokens
from .peft_type import PEFT_TYPE_NAME

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_adapter_folder(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Check that ``folder`` holds a loadable APL adapter and return its tensors.

    Raises :class:`APLAdapterError` naming the problem and the fix for: a missing folder or
    config, a pickle-only checkpoint, a truncated or corrupted safetensors file, a prefix with
    NaN/Inf values, or a prefix whose shape disagrees with the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise APLAdapterError(f"No adapter folder at {folder}: pass the folder written by save_pretrained().")
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise APLAdapterError(
                f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); apl-adapter loads safetensors only, "
                "because unpickling can run arbitrary code. Re-save the adapter with save_pretrained() "
                "(safe_serialization=True, the default)."
            )
        raise APLAdapterError(f"{weights_path} is missing: the adapter folder is incomplete; re-save it.")
    if not config_path.is_file():
        raise APLAdapterError(f"{config_path} is missing: the adapter folder is incomplete; re-save it.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APLAdapterError(f"{config_path} is not valid JSON ({err}); the file is corrupted, re-save it.") from err
    check_adapter_config(config, config_path)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers and data
        raise APLAdapterError(
            f"{weights_path} cannot be read ({type(err).__name__}: {err}); the file is truncated or corrupted. "
            "Re-save the adapter or copy it again."
        ) from err
    check_prefix_tensors(tensors, config, weights_path)
    return tensors


# No trained prefix comes near this (CLIP's token embeddings have norms below 1): values this large overflow
# fp16 and the layer norms, so the images come out NaN.
MAX_PREFIX_ABS = 1e4


def check_adapter_config(config: object, config_path: Path) -> None:
    """Refuse an ``adapter_config.json`` that is not an APL config PEFT and the encoder can use.

    Each field is checked by type as well as value: ``"4"`` is not a prefix length and ``"false"`` is not False.
    """

    def refuse(problem: str) -> APLAdapterError:
        return APLAdapterError(f"{config_path}: {problem}. Re-save the adapter with apl-train or save_pretrained().")

    if not isinstance(config, dict):
        raise refuse(f"the config is a JSON {type(config).__name__}, not an object")
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE_NAME:
        what = "has no peft_type" if peft_type is None else f"is a {peft_type!r} adapter"
        raise APLAdapterError(
            f"{config_path} {what}, not an APL prefix (peft_type 'APL'); apl-adapter loads APL adapters only. "
            "Load other PEFT adapters with peft itself."
        )
    kind = config.get("text_encoder_type")
    if kind is not None and kind not in TEXT_ENCODER_TYPES:
        raise refuse(f"text_encoder_type must be one of {', '.join(TEXT_ENCODER_TYPES)} (or absent), got {kind!r}")
    m = config.get("num_virtual_tokens")
    limit = max_virtual_tokens(kind)
    if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= limit:
        raise refuse(f"num_virtual_tokens must be an integer from 1 to {limit}, got {m!r}")
    if kind == "t5" and config.get("prefix_depth") == "deep":
        raise refuse("a deep prefix for a T5 encoder is not supported (prefix_depth must be 'shallow' for T5)")
    width = config.get("token_dim")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width <= 0):
        raise refuse(f"token_dim must be a positive integer, got {width!r}")
    choices = {"prefix_init": INIT_METHODS, "prefix_depth": PREFIX_DEPTHS}
    for field, allowed in choices.items():
        if field in config and config[field] not in allowed:
            raise refuse(f"{field} must be one of {', '.join(allowed)}, got {config[field]!r}")
    for flag in ("apply_to_negative_prompt", "hide_prefix_rows"):
        value = config.get(flag, False)
        if not isinstance(value, bool):
            raise refuse(f"{flag} must be true or false (JSON booleans), got {value!r}")
    if kind == "t5" and config.get("hide_prefix_rows", False):
        raise refuse("hide_prefix_rows is not supported for a T5 encoder (it must be false for T5)")


def expected_tensor_names(config: dict[str, Any]) -> tuple[str, ...]:
    """The tensors an APL adapter of this config holds, by name: the prefix, plus the deep rows when deep."""
    deep = config.get("prefix_depth", "shallow") == "deep"
    return ("apl_prefix", "apl_deep_keys", "apl_deep_values") if deep else ("apl_prefix",)


# Where PEFT saves the prefix: CLIPTextModel keeps its embeddings at the top, CLIPTextModelWithProjection under
# text_model (a prefix loads into either class when the widths match); T5EncoderModel at encoder.embed_tokens.
PREFIX_PARENTS = ("base_model.model.embeddings", "base_model.model.text_model.embeddings")
T5_PREFIX_PARENTS = ("base_model.model.encoder.embed_tokens",)


def prefix_parents(config: dict[str, Any]) -> tuple[str, ...]:
    """Where an adapter of this config keeps its tensors (configs without ``text_encoder_type`` are CLIP's)."""
    return T5_PREFIX_PARENTS if config.get("text_encoder_type") == "t5" else PREFIX_PARENTS


def check_prefix_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], weights_path: Path) -> None:
    """Refuse a weights file that holds anything but the prefix tensors its config declares, or bad values.

    An adapter is a prefix and nothing else: PEFT would load any other tensor into the base model (a key ending
    in ``final_layer_norm.weight`` rewrites the encoder), so every key must be ``<PREFIX_PARENTS>.<name>``
    (``<T5_PREFIX_PARENTS>.<name>`` for T5); a renamed key is refused too (PEFT would keep a random prefix in its
    place and only warn).
    """
    expected = expected_tensor_names(config)
    parents = prefix_parents(config)
    found: dict[str, torch.Tensor] = {}
    extra = []
    for key, value in tensors.items():
        parent, _, name = key.rpartition(".")
        if name in expected and parent in parents and name not in found:
            found[name] = value
        else:
            extra.append(key)
    if extra:
        raise APLAdapterError(
            f"{weights_path} holds tensors that are not part of an APL prefix: {', '.join(sorted(extra)[:6])}"
            f"{' ...' if len(extra) > 6 else ''}. An APL adapter holds only {', '.join(expected)}; refusing to load "
            "it, because PEFT would write the others into the text encoder. Use the adapter apl-train saved."
        )
    missing = [name for name in expected if name not in found]
    if missing:
        raise APLAdapterError(
            f"{weights_path} lacks {', '.join(missing)} (keys: {sorted(tensors)[:5]}); the config declares a "
            f"{config.get('prefix_depth', 'shallow')} prefix. The folder mixes files of two adapters; re-save it."
        )
    m = config.get("num_virtual_tokens")
    width = found["apl_prefix"].shape[-1] if found["apl_prefix"].ndim == 2 else None
    if config.get("token_dim") is not None and width is not None and config["token_dim"] != width:
        raise APLAdapterError(
            f"{weights_path}: the prefix is {width} wide but the config says token_dim={config['token_dim']}; "
            "the folder mixes files of two adapters. Re-save it."
        )
    for name, value in found.items():
        if not torch.isfinite(value).all():
            raise APLAdapterError(
                f"{weights_path}: {name} contains NaN or Inf values; the training diverged. "
                "Use an earlier checkpoint or lower the learning rate."
            )
        if value.numel() and value.abs().max() > MAX_PREFIX_ABS:
            raise APLAdapterError(
                f"{weights_path}: {name} holds values up to {value.abs().max().item():.3g} (a usable prefix stays "
                f"far below {MAX_PREFIX_ABS:g}); the encoder would overflow and images come out NaN. The training "
                "diverged: use an earlier checkpoint or lower the learning rate."
            )
        rows = 2 if name == "apl_prefix" else 3
        if value.ndim != rows or (m is not None and value.shape[-2] != m) or value.shape[-1] != width:
            raise APLAdapterError(
                f"{weights_path}: {name} has shape {tuple(value.shape)}, but the config says "
                f"num_virtual_tokens={m}; the folder mixes files of two adapters."
            )
    if "apl_deep_keys" in found and found["apl_deep_keys"].shape != found["apl_deep_values"].shape:
        raise APLAdapterError(
            f"{weights_path}: deep keys {tuple(found['apl_deep_keys'].shape)} and values "
            f"{tuple(found['apl_deep_values'].shape)} differ in shape; the folder mixes files of two adapters."
        )


def save_adapter(
    model: PeftModel, save_directory: str | os.PathLike[str], recipe: dict[str, Any] | None = None, **kwargs: Any
) -> Path:
    """Atomically save a PEFT model's adapter: write into a temporary sibling folder, then rename.

    A crash mid-save leaves the previous adapter (if any) intact and no partial folder behind. The folder gets an
    APL model card (``README.md``: what the prefix is, how to apply it, the base model by its id, ``recipe``).
    Raises :class:`APLAdapterError` when ``save_directory`` exists as a file.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise APLAdapterError(f"Cannot save the adapter to {target}: a file with that name exists. Choose a folder.")
    with atomic_folder(target, replace=True) as staging:
        model.save_pretrained(str(staging), safe_serialization=True, **kwargs)
        folder = _adapter_dir(staging, kwargs)
        check_adapter_folder(folder)
        name = (kwargs.get("selected_adapters") or ["default"])[0]
        encoder_path = getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)
        write_model_card(folder, model.peft_config[name], recipe, base_model=pipeline_of(encoder_path))
    return target


def _adapter_dir(root: Path, kwargs: dict[str, Any]) -> Path:
    names = kwargs.get("selected_adapters") or ["default"]
    name = names[0]
    return root if name == "default" else root / name
