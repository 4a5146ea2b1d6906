"""Stage ``evaluate`` and the world card (``out/world_card.json``) that every build run merges into."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..evaluate import evaluate_world
from .recognizer import publish_recognizer

if TYPE_CHECKING:
    from .context import BuildContext


def run_evaluate(ctx: BuildContext) -> None:
    """Sample ``config.eval_models`` and measure the world's bars with the recognizers."""
    publish_recognizer(ctx)  # the measurements use out/recognizer
    ctx.metrics.update(
        evaluate_world(ctx.out, ctx.world, num_scenes=ctx.config.card_scenes, kinds=ctx.config.eval_models, log=ctx.log)
    )


def write_world_card(ctx: BuildContext, timings: dict[str, float]) -> dict[str, Any]:
    """Merge this run's config, timings and metrics into the card: stages may run in separate processes."""
    config = ctx.config
    card: dict[str, Any] = {"seed": config.seed, "build_config": asdict(config), "timings_s": timings}
    card_path = ctx.out / "world_card.json"
    previous = json.loads(card_path.read_text()) if card_path.is_file() else {}
    previous.setdefault("timings_s", {}).update(timings)
    previous.setdefault("metrics", {}).update(ctx.metrics)
    card = {**previous, **{k: v for k, v in card.items() if k != "timings_s"}, "timings_s": previous["timings_s"]}
    card_path.write_text(json.dumps(card, indent=1))
    return card
