"""What every apl-train run shares, whatever the model family: the run folder and its checks, the learning-rate
schedule, the trackers, the loss log, the data mixture check and the result. :mod:`~apl_adapter.training.loop`
(Stable Diffusion 1.x / 2.x) and :mod:`~apl_adapter.training.flow_loop` (SD3 / FLUX) both build on it."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..errors import APLAdapterError
from .config import TrainConfig
from .data import DataFormatError

LOSS_LOG_NAME = "loss.csv"
ADAPTER_DIR = "adapter"


@dataclass
class TrainResult:
    """What a run produced."""

    adapter_dir: Path
    steps: int
    final_loss: float
    seconds: float
    losses: list[tuple[int, float]]


def lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, start_step: int = 0):
    """diffusers' schedule ``config.lr_schedule`` over ``config.steps``, placed at ``start_step`` (a resumed run
    follows the schedule it was started on, which is a function of the step alone). Step it after each
    ``optimizer.step()``; the learning rate of step ``k`` (0-based) is ``lr`` times the schedule at ``k``.
    """
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:  # LambdaLR scales from each group's initial_lr when it does not start at 0
        group.setdefault("initial_lr", config.lr)
    return get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps,
        last_epoch=start_step - 1,
    )  # fmt: skip


def check_mixture(data: Any, config: TrainConfig) -> None:
    """Refuse a mixture the data cannot give (``data``: anything with ``identity_rows`` / ``preservation_rows``)."""
    if config.identity_fraction > 0 and len(data.identity_rows) == 0:
        raise DataFormatError(
            f"identity_fraction={config.identity_fraction} but {config.data} has no kind='identity' rows; add "
            "identity triplets (apl-train generate-identity-data) or set --identity-fraction 0."
        )
    if config.identity_fraction < 1 and len(data.preservation_rows) == 0:
        raise DataFormatError(
            f"identity_fraction={config.identity_fraction} but {config.data} has no kind='preservation' rows; add "
            "captioned images without people or set --identity-fraction 1 (then nothing keeps other prompts intact)."
        )


def trackers(report_to: str) -> list[str]:
    """The Accelerate trackers ``--report-to`` asks for, each installed (else a clear error naming the package)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if "tensorboard" in available else []
    if report_to == "all":
        return available
    known = [t.value for t in LoggerType if t.value != "all"]
    wanted = [name.strip() for name in report_to.split(",") if name.strip()]
    for name in wanted:
        if name not in known:
            raise APLAdapterError(f"--report-to {name}: not an Accelerate tracker; choose from {', '.join(known)}.")
        if name not in available:
            raise APLAdapterError(
                f"--report-to {name}: the {name} package is not installed. Install it (pip install {name}) or pass "
                "--report-to none."
            )
    return wanted


def tracker_config(config: TrainConfig) -> dict:
    """Trackers take scalars and strings (TensorBoard's hparams refuse lists)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()}


def read_loss_log(path: Path, up_to: int) -> list[tuple[int, float]]:
    """The ``(step, loss)`` rows of a run's ``loss.csv`` up to step ``up_to`` (a resumed run keeps those)."""
    if not path.is_file():
        return []
    with path.open() as handle:
        rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]
    return [row for row in rows if row[0] <= up_to]


def write_loss_log(path: Path, losses: list[tuple[int, float]]) -> None:
    """Write ``loss.csv`` (a temporary file, then renamed)."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows((step, f"{loss:.6g}") for step, loss in losses)
    tmp.replace(path)


def check_run_folder(config: TrainConfig, out: Path, can_resume: bool = True) -> None:
    """A new run needs a new folder; a resumed run must keep the settings it was started with (or say it changes
    them with ``resume_with_new_settings``). ``can_resume=False`` (a loop without checkpoints) leaves ``--resume``
    out of the advice."""
    if out.exists() and not out.is_dir():
        raise APLAdapterError(f"--out {out} is a file; choose a folder for the run (adapter/, checkpoints, logs).")
    if not config.resume:
        held = [name for name in ("adapter", "train_config.json") if (out / name).exists()]
        held += sorted(p.name for p in out.glob("checkpoint-*"))[:2]
        if held:
            advice = "Choose a new --out."
            if can_resume:
                advice = "Pass --resume latest to continue it, or choose a new --out."
            raise APLAdapterError(
                f"{out} already holds a training run ({', '.join(held)}); training there would overwrite it. {advice}"
            )
        return
    saved_path = out / "train_config.json"
    if config.resume_with_new_settings or not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APLAdapterError(f"{saved_path} cannot be read ({err}); resume with --resume-with-new-settings.") from err
    changed = config.differences(saved if isinstance(saved, dict) else {})
    if changed:
        raise APLAdapterError(
            f"--resume would continue the run in {out} with other settings: {', '.join(changed)}. Resume with the "
            "run's settings, or pass --resume-with-new-settings to change them on purpose (recorded in "
            "train_config.json)."
        )


def new_accelerator(mixed_precision: str, log_with: list[str] | None = None, logging_dir: Path | None = None):
    """An Accelerator for this run. Accelerate keeps one global state per process and refuses a second run
    (in the same notebook or test session) with another precision; the per-run part of that state is reset,
    the process group (``PartialState``, set by ``accelerate launch``) is kept."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with or None, project_dir=logging_dir)


def record_loss(
    accelerator: Accelerator, loss: torch.Tensor, done: int, losses: list[tuple[int, float]], progress: Any
) -> float:
    """One logging step's loss (the mean over processes), appended to ``losses`` and shown on ``progress``; a clear
    error when it is not finite. Both training loops call it."""
    value = accelerator.gather(loss.detach()[None]).mean().item()
    if not math.isfinite(value):
        raise APLAdapterError(f"The loss became {value} at step {done}; lower --lr or use fp32.")
    losses.append((done, value))
    progress.set_postfix(loss=f"{value:.4g}")
    return value


def draw_rows(
    config: TrainConfig, step: int, process: int, identity_rows: torch.Tensor, preservation_rows: torch.Tensor
) -> tuple[torch.Generator, list[int]]:
    """The data rows of one step's batch, a pure function of ``(seed, step, process)``: each row is an identity
    triplet with probability ``identity_fraction``, else a preservation pair. Returns the step's generator too, for
    the loop to draw the rest of the batch (noise, timesteps) from the same stream."""
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1_009 + process)
    is_identity = torch.rand(config.batch_size, generator=generator) < config.identity_fraction
    position = torch.rand(config.batch_size, generator=generator)
    rows = []
    for identity, where in zip(is_identity.tolist(), position.tolist()):
        pool = identity_rows if identity else preservation_rows  # check_mixture: never empty here
        rows.append(int(pool[int(where * len(pool))]))
    return generator, rows
