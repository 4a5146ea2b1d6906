"""The stage table: every stage of ``apl-world build`` in run order, what it needs and writes, what runs it.

:func:`.driver.build_world` runs the selected rows in this order and the CLI's ``--stages`` offers these names; each
stage writes its result under ``--work`` or ``--out`` so that a later stage can be re-run alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import run_base
from .card import run_evaluate
from .config import BuildConfig
from .finetunes import run_auxiliary, run_dreambooth, run_sibling
from .recognizer import run_recognizer
from .vae import run_vae

if TYPE_CHECKING:
    from .context import BuildContext


@dataclass(frozen=True)
class Stage:
    name: str
    #: stages whose results this one reads (from this build, or from the world already in --out/--work)
    needs: tuple[str, ...]
    #: what it writes, relative to --out or --work
    writes: tuple[str, ...]
    run: Callable[[BuildContext], None]

    def timing_key(self, config: BuildConfig) -> str:
        """Its entry in the world card's ``timings_s``: an evaluation is keyed by the models it sampled."""
        if self.name == "evaluate":
            return "evaluate_" + "+".join(config.eval_models)
        return self.name


STAGE_TABLE: tuple[Stage, ...] = (
    # on renders of faces and scenes, both styles
    Stage("vae", needs=(), writes=("work/vae",), run=run_vae),
    # on renders, half of them VAE round trips
    Stage("recognizer", needs=("vae",), writes=("work/recognizer", "out/recognizer"), run=run_recognizer),
    # text encoder + UNet from scratch on name prompts (seen + unseen people), attribute prompts (random people who
    # are not in the world) and scene captions, with 10% empty prompts
    Stage("base", needs=("vae",), writes=("work/base-leg<k>", "out/base"), run=run_base),
    # the base UNet on the sibling style
    Stage("sibling", needs=("vae", "base"), writes=("out/sibling",), run=run_sibling),
    # not in the shipped world: training through it measured no gain (docs/experiments/2026-12-03-training-variance.md)
    Stage("auxiliary", needs=("vae", "base"), writes=("out/auxiliary",), run=run_auxiliary),
    # the base UNet on the late people, with the base data as prior preservation
    Stage("dreambooth", needs=("vae", "base"), writes=("out/dreambooth",), run=run_dreambooth),
    # samples the eval models and measures the world's bars with the recognizer
    Stage(
        "evaluate",
        needs=("recognizer", "base", "sibling", "dreambooth"),
        writes=("out/world_card.json",),
        run=run_evaluate,
    ),
)

STAGES = tuple(stage.name for stage in STAGE_TABLE)
