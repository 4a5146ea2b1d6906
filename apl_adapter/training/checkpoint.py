"""Training checkpoints: a PEFT adapter folder plus the optimizer state, written atomically.

``checkpoint-N/`` = ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by
``apply_apl`` like any adapter) + ``optimizer.safetensors`` (Adam's moments and step) +
``trainer_state.json`` (``{"step": N}``). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_folder
from ..errors import APLAdapterError
from ..tuners.apl.serialization import check_adapter_folder, save_adapter

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(peft_model, optimizer: torch.optim.Optimizer, step: int, out: str | Path) -> Path:
    """Write ``out/checkpoint-<step>``: a temporary folder first, renamed when complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"checkpoint-{step}"
    with atomic_folder(target, replace=True) as staging:
        save_adapter(peft_model, staging / "adapter")
        for item in (staging / "adapter").iterdir():
            os.replace(item, staging / item.name)
        (staging / "adapter").rmdir()
        save_file(_optimizer_tensors(optimizer), str(staging / OPTIMIZER_NAME))
        (staging / STATE_NAME).write_text(json.dumps({"step": step}) + "\n")
    return target


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def list_checkpoints(out: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders in ``out``, oldest (smallest N) first."""
    found = sorted(
        (int(match.group(1)), path)
        for path in Path(out).glob("checkpoint-*")
        if (match := _CHECKPOINT_RE.match(path.name)) and (path / STATE_NAME).is_file()
    )
    return [path for _, path in found]


def prune_checkpoints(out: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoint folders of ``out`` (``--checkpoints-total-limit``); return
    what was deleted."""
    old = list_checkpoints(out)[:-keep]
    for path in old:
        shutil.rmtree(path)
    return old


def find_checkpoint(resume: str, out: str | Path) -> Path:
    """Resolve ``--resume``: a checkpoint folder, or ``latest`` = the highest ``checkpoint-N`` in ``out``."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise APLAdapterError(f"--resume latest: no checkpoint-N folder in {out}; train without --resume first.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise APLAdapterError(
            f"--resume {resume}: not a training checkpoint ({STATE_NAME} missing). Pass a checkpoint-N folder "
            "written by apl-train, or 'latest'."
        )
    return path


def load_checkpoint(path: Path, prefix: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Copy the checkpoint's prefix tensors into ``prefix`` (see
    :func:`apl_adapter.tuners.apl.model.prefix_parameters`) and its Adam state into ``optimizer``; return its step."""
    tensors = check_adapter_folder(path)
    saved = {key.rsplit(".", 1)[-1]: value for key, value in tensors.items()}
    if set(saved) != set(prefix):
        raise APLAdapterError(
            f"Checkpoint {path} holds {sorted(saved)} but this run trains {sorted(prefix)}: --prefix-depth differs. "
            "Resume with the same --prefix-depth, or start a new run."
        )
    for name, param in prefix.items():
        if saved[name].shape != param.shape:
            raise APLAdapterError(
                f"Checkpoint {path} holds {name} of shape {tuple(saved[name].shape)} but this run builds "
                f"{tuple(param.shape)}: the base model's text encoder (width, layers) or --prefix-len differs. "
                "Resume with the same base model and --prefix-len, or start a new run."
            )
    device = next(iter(prefix.values())).device
    with torch.no_grad():
        for name, param in prefix.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    step = _checkpoint_step(path)
    state_dict = optimizer.state_dict()
    try:
        moments = load_file(str(path / OPTIMIZER_NAME))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
        state_dict["state"] = state
        optimizer.load_state_dict(state_dict)
    except Exception as err:  # safetensors' own errors for truncated / corrupt files, or foreign keys and shapes
        raise APLAdapterError(
            f"{path / OPTIMIZER_NAME} cannot be used ({type(err).__name__}: {err}); the checkpoint is corrupted. "
            "Resume from an earlier checkpoint-N folder (--resume <run>/checkpoint-N)."
        ) from err
    return step


def _checkpoint_step(path: Path) -> int:
    """The step in ``trainer_state.json``: a non-negative integer, or a clear error for a corrupted file."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
        step = state["step"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise APLAdapterError(
            f'{path / STATE_NAME} is corrupted ({type(err).__name__}: {err}); expected {{"step": N}}. Resume from '
            "an earlier checkpoint-N folder."
        ) from err
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise APLAdapterError(f"{path / STATE_NAME}: step must be a non-negative integer, got {step!r}; corrupted.")
    return step
