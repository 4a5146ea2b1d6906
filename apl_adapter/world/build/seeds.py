"""The build's random streams, each a named offset from ``BuildConfig.seed`` (the stage modules draw from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeedOffsets:
    """What each random stream of a build adds to ``BuildConfig.seed``: distinct, so no two stages draw the same
    numbers, and fixed, so a stage re-run alone draws what it drew in the full build.

    Base legs carry their own offsets (``BasePhase.seed``, ``BasePhase.sampler_seed``: 0 and 31 for the shipped leg);
    a leg's name contrast draws its people from ``sampler_seed + 1``. Keep a leg's ``sampler_seed`` clear of the
    offsets below and of ``x - 1`` for each of them."""

    base_renders: int = 11
    late_renders: int = 12
    sibling_renders: int = 13
    auxiliary_renders: int = 14
    recognizer_renders: int = 21
    recognizer_sibling_renders: int = 22
    lookalikes: int = 23
    lookalikes_sibling: int = 24
    recognizer_calibration: int = 25
    sibling_training: int = 1
    sibling_sampler: int = 41
    dreambooth_training: int = 2
    dreambooth_sampler: int = 51
    auxiliary_training: int = 3
    auxiliary_sampler: int = 61


SEEDS = SeedOffsets()
