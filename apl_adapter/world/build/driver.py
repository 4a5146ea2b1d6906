"""``build_world``: run the selected rows of the stage table, then write the world card."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..spec import WorldSpec
from .banks import TrainingBanks
from .card import write_world_card
from .config import BuildConfig
from .context import BuildContext
from .recognizer import publish_recognizer
from .stages import STAGE_TABLE


def build_world(config: BuildConfig, out: Path, work: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the requested stages; models go to ``out`` (a diffusers folder per model), caches to ``work``."""
    out, work = Path(out), Path(work)
    world = WorldSpec.from_seed(config.seed)
    banks = TrainingBanks.render(world, config, log)  # first: a setting no render can meet fails with nothing written
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ctx = BuildContext(config, world, out, work, log, banks)
    timings: dict[str, float] = {}
    for stage in STAGE_TABLE:
        if stage.name in config.stages:
            t0 = time.time()
            stage.run(ctx)
            timings[stage.timing_key(config)] = time.time() - t0
    publish_recognizer(ctx)
    return write_world_card(ctx, timings)
