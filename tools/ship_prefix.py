"""Make ``apl_adapter/world/assets/apl-prefix`` (the full-strength prefix the package ships) from a training run.

The adapter is re-saved through :func:`apl_adapter.save_adapter`, so the shipped folder has the current model card
(with the training recipe and, if given, the goals table) and names its base model by its world name, not by the
path of the machine that trained it. ``recipe.json`` beside the weights says how to make it again and where it was
chosen and measured.

    python tools/ship_prefix.py RUN_DIR --table docs/experiments/<date>-goals-table.md \\
        --chosen-on "apl-bench seed 0" --measured-on "apl-bench seeds 500, 501, every scene in every caption"
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from peft import PeftModel

from apl_adapter import save_adapter
from apl_adapter.atomic import write_text_atomic
from apl_adapter.training import TrainConfig
from apl_adapter.world.models import SHIPPED_PREFIX, load_world_pipeline, model_path


def summary_of(recipe: dict) -> str:
    """One line for reports: ``deep prefix (m = 10), identity push 0.3, 400 steps at lr 0.01, batch 16``."""
    parts = [f"{recipe['prefix_depth']} prefix (m = {recipe['prefix_len']})"]
    if recipe.get("hide_prefix_rows"):
        parts.append("its rows hidden from the UNet")
    if recipe.get("identity_push"):
        parts.append(f"identity push {recipe['identity_push']:g}")
    if recipe.get("name_direction"):
        parts.append(f"name direction {recipe['name_direction']:g}")
    if recipe.get("text_name_direction"):
        parts.append(f"text name direction {recipe['text_name_direction']:g}")
    if recipe.get("push_without_attributes"):
        parts.append("push without the attributes' pulls")
    if recipe.get("attribute_hold"):
        parts.append(f"attribute hold {recipe['attribute_hold']:g}")
    if recipe.get("text_attribute_hold"):
        parts.append(f"text attribute hold {recipe['text_attribute_hold']:g}")
    if recipe.get("text_preserve"):
        parts.append(f"text preservation {recipe['text_preserve']:g}")
    if recipe.get("attribute_boost"):
        parts.append(f"attribute boost {recipe['attribute_boost']:g}")
    parts.append(f"{recipe['steps']} steps at lr {recipe['lr']:g}, batch {recipe['batch_size']}")
    parts.append(f"{recipe['identity_fraction']:.0%} identity triplets")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="apl-train output folder (adapter/ and train_config.json)")
    parser.add_argument("--table", type=Path, default=None, help="Markdown goals table to put in the model card")
    parser.add_argument("--chosen-on", required=True, help="the bench seeds the recipe was chosen on")
    parser.add_argument("--measured-on", required=True, help="the held-out bench seeds of the reported table")
    parser.add_argument("--data", default="", help="how the training data was made (a command)")
    parser.add_argument("--out", type=Path, default=SHIPPED_PREFIX)
    args = parser.parse_args(argv)

    saved = json.loads((args.run / "train_config.json").read_text())
    known = {f.name for f in fields(TrainConfig)}
    recipe = TrainConfig(**{k: v for k, v in saved.items() if k in known}).recipe()  # the model card's recipe
    encoder = load_world_pipeline("base").text_encoder
    model = PeftModel.from_pretrained(encoder, str(args.run / "adapter"))
    model.peft_config["default"].base_model_name_or_path = model_path("base").name
    bench = args.table.read_text() if args.table else None
    save_adapter(model, args.out, recipe=recipe)
    if bench:
        from apl_adapter.model_card import write_model_card

        write_model_card(args.out, model.peft_config["default"], recipe, bench_markdown=bench, base_model="base")
    card = {
        "summary": summary_of(recipe),
        "train_config": recipe,
        "data": args.data,
        "chosen_on": args.chosen_on,
        "measured_on": args.measured_on,
        "world": "the shipped world (apl_adapter/world/assets, world seed 0); another world's models do not match it",
        "reproduce": "apl-train --base apl_adapter/world/assets/base --data DATA --out RUN "
        + " ".join(
            f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
            for k, v in recipe.items()
            if k not in ("base", "data") and v is not False  # a flag is written when on
        ),
    }
    write_text_atomic(args.out / "recipe.json", json.dumps(card, indent=2) + "\n")
    print(f"shipped prefix written to {args.out}: {card['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
