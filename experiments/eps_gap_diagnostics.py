"""Where a prefix acts: the APL objective's gap per timestep band, without and with a trained prefix.

For identity triplets the gap ``mean (eps(z_t, t, c1) - eps(z_t, t, c2))^2`` is what APL has to close;
with the prefix it becomes ``eps([AP] + c1)`` against the same target, so ``ratio`` < 1 is the part
closed, and ``name_share`` is how much of the name's own direction ``eps(c1) - eps(c2)`` is left (a
norm hides that: two prefixes with the same gap kept 0.28 and 0.42 of it at t >= 800 on the sibling
model, and the one keeping more anonymized there half as often). For preservation pairs (c1 = c2 = a
caption) the gap is 0 without the prefix and is the damage the prefix does with it - which
classifier-free guidance multiplies at sampling time.
Everything is the frozen model's own ``eps``, on the training data's images, seeded.

With ``split`` (CLI ``--split``) the prefixed context is taken apart (:func:`split_prefixed_states`):
the gap with only the prefix's own output states added (the prompt's states as without a prefix),
and with only the prompt's states as the prefix changed them (the prefix's own states left out).
CLIP is causal, so the prefix's states are the same for every prompt; the UNet reads both.

    python experiments/eps_gap_diagnostics.py --base world-base/ --data apl-data/ --adapter runs/apl/adapter

Example:

```python
>>> from experiments.eps_gap_diagnostics import eps_gap_by_timestep
>>> from apl_adapter.world import model_path
>>> # the shipped world's base, the demo's data and a 1,200-step m = 10 prefix (docs/experiments/2026-12-02-world.md)
>>> rows = eps_gap_by_timestep(model_path("base"), "demo-out/data", "runs/apl/adapter")  # doctest: +SKIP
>>> [(row.kind, row.t_low, round(row.ratio, 2)) for row in rows][:2]  # doctest: +SKIP
[('identity', 0, 0.36), ('identity', 143, 0.41)]

```
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apl_adapter.errors import APLAdapterError
from apl_adapter.training.base_model import load_frozen_parts
from apl_adapter.training.data import read_metadata
from apl_adapter.training.loop import encode_data
from apl_adapter.training.objective import name_share  # the loss's own formula, so the two cannot drift apart


@dataclass
class GapRow:
    """The mean squared ``eps`` gap of one kind of example in one timestep band ``[t_low, t_high)``."""

    kind: str  # "identity" or "preservation"
    t_low: int
    t_high: int
    gap_without: float  # plain c1 vs c2 (0 for preservation pairs)
    gap_with: float | None  # [AP] + c1 vs c2; None without an adapter
    gap_prefix_states: float | None = None  # only the prefix's own states added (``split``)
    gap_prompt_states: float | None = None  # only the prompt's states changed by the prefix (``split``)
    #: identity rows: the median share r of the name's direction d = eps(c1) - eps(c2) the prefixed prediction keeps,
    #: r = <eps([AP] + c1) - eps(c2), d> / ||d||^2 (1 = all of it, 0 = none; CFG multiplies what is kept)
    name_share: float | None = None

    @property
    def ratio(self) -> float:
        """``gap_with / gap_without``: the part of the gap the prefix leaves (inf where there was none)."""
        if self.gap_with is None:
            return float("nan")
        return self.gap_with / self.gap_without if self.gap_without > 0 else float("inf")


def split_prefixed_states(
    prefixed: torch.Tensor, plain: torch.Tensor, num_virtual_tokens: int
) -> dict[str, torch.Tensor]:
    """Take apart what a prefix changes in the UNet's context, as two whole contexts.

    Args:
        prefixed: ``(B, L, D)`` text-encoder states with the prefix (``[BOS][P1..Pm] prompt ...``).
        plain: ``(B, L, D)`` states of the same prompts without it (``[BOS] prompt ...``).
        num_virtual_tokens: ``m``.

    Returns:
        ``"prefix_states"``: ``prefixed`` with every position after the prefix taken from ``plain``
        (shifted by ``m``), so the prefix's own states are the only change; ``"prompt_states"``:
        ``plain`` with its first ``L - 1 - m`` prompt positions taken from ``prefixed``, so the change
        the prefix made to the prompt's states is the only one. Both ``(B, L, D)``.
    """
    if prefixed.shape != plain.shape:
        raise APLAdapterError(
            f"prefixed and plain states differ in shape: {tuple(prefixed.shape)} vs {tuple(plain.shape)}"
        )
    m, length = num_virtual_tokens, prefixed.shape[1]
    if not 0 < m < length - 1:
        raise APLAdapterError(f"num_virtual_tokens must be in [1, {length - 2}] for {length} positions, got {m}")
    prefix_states = torch.cat([prefixed[:, : 1 + m], plain[:, 1 : length - m]], dim=1)
    prompt_states = torch.cat([plain[:, :1], prefixed[:, 1 + m :], plain[:, length - m :]], dim=1)
    return {"prefix_states": prefix_states, "prompt_states": prompt_states}


@torch.no_grad()
def eps_gap_by_timestep(
    base: str | Path,
    data: str | Path,
    adapter: str | Path | None = None,
    bands: int = 7,
    samples: int = 64,
    seed: int = 0,
    c2: str = "attribute",
    device: str = "cpu",
    split: bool = False,
) -> list[GapRow]:
    """The objective's gap per timestep band for ``samples`` examples of each kind (see the module docstring).

    Args:
        base: local diffusers folder of the frozen model.
        data: an APL data folder (``metadata.jsonl`` + images).
        adapter: a trained APL adapter folder; without one only ``gap_without`` is measured.
        bands: equal-width timestep bands over ``[0, num_train_timesteps)``.
        samples: examples (drawn with replacement per band) of each kind per band.
        device: where the frozen models run (``"cuda"`` for a real SD folder); sampling stays on the CPU.
        split: also measure the two halves of :func:`split_prefixed_states` (needs ``adapter``).
    """
    from peft import PeftModel

    if bands < 1 or samples < 1:
        raise APLAdapterError(f"bands and samples must be >= 1, got {bands} and {samples}")
    if split and adapter is None:
        raise APLAdapterError("split takes the prefixed context apart, so it needs an adapter: pass --adapter")
    parts = load_frozen_parts(base)
    run_on = torch.device(device)
    encoded = encode_data(parts, read_metadata(data, c2_mode=c2), None, run_on)
    text_encoder = parts.text_encoder.to(run_on)
    encoder = PeftModel.from_pretrained(text_encoder, str(adapter)).to(run_on) if adapter else None
    unet, scheduler = parts.unet.to(run_on), parts.noise_scheduler
    prefix_len = encoder.peft_config[encoder.active_adapter].num_virtual_tokens if encoder is not None else 0
    if split and getattr(encoder.peft_config[encoder.active_adapter], "hide_prefix_rows", False):
        raise APLAdapterError(
            f"{adapter} hides its prefix rows (hide_prefix_rows): the UNet never reads them, so there are no prefix "
            "states to split off; run without --split"
        )

    def states(ids, prefixed: bool) -> torch.Tensor:
        if encoder is None:
            return text_encoder(ids)[0]
        if prefixed:
            return encoder(ids)[0]
        with encoder.disable_adapter():
            return encoder(ids)[0]

    def eps(noisy, t, context) -> torch.Tensor:
        return unet(noisy, t, encoder_hidden_states=context).sample.float()

    generator = torch.Generator().manual_seed(seed)
    total = scheduler.config.num_train_timesteps
    edges = [round(total * k / bands) for k in range(bands + 1)]
    rows = []
    for kind, pool in (("identity", encoded.identity_rows), ("preservation", encoded.preservation_rows)):
        if len(pool) == 0:
            continue
        for low, high in itertools.pairwise(edges):
            picks = pool[torch.randint(0, len(pool), (samples,), generator=generator)]
            t = torch.randint(low, high, (samples,), generator=generator)
            latents = encoded.latent_mean[picks]
            noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), t)
            noisy, t = noisy.to(run_on, unet.dtype), t.to(run_on)
            c1, c2_ids = encoded.c1_ids[picks].to(run_on), encoded.c2_ids[picks].to(run_on)
            plain = states(c1, prefixed=False)
            eps_plain = eps(noisy, t, plain)
            # preservation pairs have c2 == c1: their target is the plain eps, not a second UNet pass
            target = eps_plain if torch.equal(c1, c2_ids) else eps(noisy, t, states(c2_ids, prefixed=False))
            row = GapRow(kind, low, high, F.mse_loss(eps_plain, target).item(), None)
            if encoder is not None:
                prefixed = states(c1, prefixed=True)
                eps_prefixed = eps(noisy, t, prefixed)
                row.gap_with = F.mse_loss(eps_prefixed, target).item()
                if kind == "identity":
                    row.name_share = name_share(eps_prefixed - target, eps_plain - target).median().item()
                if split:
                    halves = split_prefixed_states(prefixed, plain, prefix_len)
                    row.gap_prefix_states = F.mse_loss(eps(noisy, t, halves["prefix_states"]), target).item()
                    row.gap_prompt_states = F.mse_loss(eps(noisy, t, halves["prompt_states"]), target).item()
            rows.append(row)
    return rows


def format_rows(rows: list[GapRow]) -> str:
    """A Markdown table of :func:`eps_gap_by_timestep`'s rows (two more columns for a ``split`` run)."""
    split = any(row.gap_prefix_states is not None for row in rows)
    header = "| kind | t | gap without prefix | gap with prefix | with / without | name share kept |"
    rule = "|---|---|---|---|---|---|"
    if split:
        header += " prefix states only | prompt states only |"
        rule += "---|---|"
    lines = [header, rule]

    def value(gap: float | None) -> str:
        return "-" if gap is None else f"{gap:.5f}"

    for row in rows:
        ratio = "-" if row.gap_with is None or row.gap_without == 0 else f"{row.ratio:.2f}"
        share = "-" if row.name_share is None else f"{row.name_share:.2f}"
        line = (
            f"| {row.kind} | [{row.t_low}, {row.t_high}) | {row.gap_without:.5f} | {value(row.gap_with)} | {ratio} "
            f"| {share} |"
        )
        if split:
            line += f" {value(row.gap_prefix_states)} | {value(row.gap_prompt_states)} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python experiments/eps_gap_diagnostics.py",
        description=__doc__.split("Example:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, help="Local diffusers folder of the base model.")
    parser.add_argument("--data", required=True, help="APL data folder (metadata.jsonl + images).")
    parser.add_argument("--adapter", default=None, help="Trained adapter folder (apl-train writes <out>/adapter).")
    parser.add_argument("--bands", type=int, default=7, help="Timestep bands (default 7).")
    parser.add_argument("--samples", type=int, default=64, help="Examples of each kind per band (default 64).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of examples, timesteps and noise.")
    parser.add_argument("--c2", choices=("attribute", "empty"), default="attribute", help="Identity target prompt.")
    parser.add_argument("--device", default="cpu", help="Where the models run: cpu (default) or cuda.")
    parser.add_argument(
        "--split",
        action="store_true",
        help="Also measure the gap with only the prefix's own states added and with only the prompt's states "
        "changed (needs --adapter).",
    )
    args = parser.parse_args(argv)
    try:
        rows = eps_gap_by_timestep(
            args.base, args.data, args.adapter, args.bands, args.samples, args.seed, args.c2, args.device, args.split
        )
    except (APLAdapterError, FileNotFoundError) as err:
        print(f"diagnostics: error: {err}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
