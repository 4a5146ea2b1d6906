"""What the demo trains and benches: its data, its training settings and its bench (the ``DEMO_*`` recipe).

The paper's recipe at world scale (``apl_adapter.world.data``): identity triplets for the seen
names only with c1 = "a photo of <Name>" and c2 = the same template with the person's attribute
description, preservation pairs = scene renders with captions in all of the world's caption
templates; the other person templates stay held out. One change from the paper's data: the
identity images are the base model's drawings of c2 (the anonymous face the prefix should give),
not of c1 (``DEMO_IMAGES_FROM``; docs/experiments/2026-12-02-world.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..bench.protocol import BenchModels, BenchReaders, BenchSpec
    from ..training import TrainConfig

# World-scale training settings (docs/experiments/2026-12-02-world.md: the sweep that chose them). 400 steps at
# lr 1e-2 (10x the paper's rate for ~50x fewer steps) fit the demo's 10-minute budget; batch 16
# anonymizes more than the paper's batch 1. Identity images drawn from the description anonymize
# far more per triplet than images of the person, so 20% identity triplets (the paper: 50%) and the
# paper's m = 10 do it; with images of the person the sweep needed m = 20 and 40% for less.
DEMO_STEPS = 400
DEMO_LR = 1e-2
DEMO_PREFIX_LEN = 10
DEMO_BATCH_SIZE = 16
DEMO_IDENTITY_FRACTION = 0.2
# On the world without a look-alike floor a shallow prefix loses scenes as it loses names (2.0-3.9 points at 10-67
# points of seen fall, with or without text preservation); a deep prefix whose own rows the UNet never sees, its
# prompt rows held by a light text preservation, keeps them (docs/experiments/2026-12-06-hidden-prefix-rows.md).
# The deep prefix costs no time here: the same 3 steps a second as the shallow one.
DEMO_PREFIX_DEPTH: Literal["shallow", "deep"] = "deep"
DEMO_HIDE_PREFIX_ROWS = True
DEMO_TEXT_PRESERVE = 0.03
#: the prompt that draws the identity images ("name": the paper's data)
DEMO_IMAGES_FROM: Literal["name", "description"] = "description"
DEMO_PER_NAME = 16  # base-model images per seen name
DEMO_NUM_SCENES = 320  # scene renders (preservation pairs)
#: the demo's bench: the training template and the one least like it (held out), half the scenes - a table in
#: minutes; the full protocol on held-out seeds is docs/experiments/2026-12-03-goals-table.md
DEMO_BENCH_TEMPLATES = (0, 4)
DEMO_BENCH_SCENES = 48
SHORT_LABEL = "short prefix trained by this demo"
SHIPPED_LABEL = "full-strength prefix shipped in the package"


def write_demo_data(
    folder: str | Path,
    per_name: int = DEMO_PER_NAME,
    num_scenes: int = DEMO_NUM_SCENES,
    assets: str | Path | None = None,
    images_from: Literal["name", "description"] = DEMO_IMAGES_FROM,
) -> int:
    """Write the demo's training data (also the acceptance test's) as an ``apl-train`` folder; returns its rows.

    Identity triplets use "a photo of <Name>" only (template 0: the other person templates stay
    held out for the bench), their images sampled from the base model with the prompt
    ``images_from`` names; scenes are rendered with captions in every caption template (the prefix
    must leave every person-free prompt alone).
    """
    from ..world.data import write_apl_dataset

    return write_apl_dataset(
        folder, images_per_person=per_name, num_scenes=num_scenes, templates=[0], assets=assets,
        images_from=images_from,
    )  # fmt: skip


def demo_train_config(
    data: str | Path,
    out: str | Path,
    assets: str | Path | None = None,
    steps: int = DEMO_STEPS,
    batch_size: int = DEMO_BATCH_SIZE,
    lr: float = DEMO_LR,
    prefix_len: int = DEMO_PREFIX_LEN,
    identity_fraction: float = DEMO_IDENTITY_FRACTION,
) -> TrainConfig:
    """The demo's :class:`~apl_adapter.training.TrainConfig` on the world base model (also the acceptance test's)."""
    from ..training import TrainConfig
    from ..world.models import model_path

    return TrainConfig(
        base=str(model_path("base", assets)), data=str(data), out=str(out), steps=steps, batch_size=batch_size,
        lr=lr, prefix_len=prefix_len, identity_fraction=identity_fraction, log_every=10,
        prefix_depth=DEMO_PREFIX_DEPTH, hide_prefix_rows=DEMO_HIDE_PREFIX_ROWS, text_preserve=DEMO_TEXT_PRESERVE,
    )  # fmt: skip


def demo_bench_inputs(
    seeds: Sequence[int],
    train_data: str | Path | None,
    assets: str | Path | None,
    base_cache: str | Path | None,
) -> tuple[BenchSpec, BenchModels, BenchReaders]:
    """The bench of the demo: every section and name, :data:`DEMO_BENCH_TEMPLATES`, :data:`DEMO_BENCH_SCENES`."""
    from ..bench.world import world_bench_inputs

    spec, models, readers = world_bench_inputs(
        seeds=list(seeds), train_data=train_data, assets=assets, num_scenes=DEMO_BENCH_SCENES, base_cache=base_cache
    )
    spec.person_templates = [spec.person_templates[i] for i in DEMO_BENCH_TEMPLATES]
    spec.train_templates = [t for t in spec.train_templates if t in spec.person_templates]
    return spec, models, readers
