"""How much of a name's own direction a prefix leaves in the text encoder's output, per section (text encoder only).

A late name is taught to the DreamBooth UNet after the prefix is trained, and that UNet reads it only through what
the encoder writes. For every person of a section in every person template, with ``m`` a mean over rows::

    d = m(tau(c1)) - m(tau(c2))                   c1 the name prompt, c2 its description, plain encoder
    r = <m(tau([AP] + c1)) - m(tau(c2)), d> / ||d||^2     1 = the name untouched, 0 = encoded like its description
    orth = ||the rest of that change|| / ||d||

``summary``: ``m`` over all 77 rows (what ``--text-name-direction`` holds); ``subject``: over the subject's own rows
(the name's tokens in ``c1``, the description's in ``c2``: what differs after the template's common start and
before its common end). Prints ``r`` and ``orth`` per section and the subject rows' rms change.

    python experiments/text_name_share.py apl_adapter/world/assets/apl-prefix demo-out/run/adapter

Used in docs/experiments/2026-12-06-text-name-direction.md.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel

from apl_adapter.training.objective import name_share
from apl_adapter.world.models import load_world_pipeline
from apl_adapter.world.spec import WorldSpec


def subject_span(ids: list[int], other: list[int], eos: int) -> tuple[int, int]:
    """Rows of ``ids`` that differ from ``other`` after their common start and before their common end (before EOS).

    >>> subject_span([0, 5, 6, 7, 9, 1], [0, 5, 8, 9, 1], eos=1)
    (2, 4)
    """
    end, other_end = ids.index(eos), other.index(eos)
    start = 0
    while start < min(end, other_end) and ids[start] == other[start]:
        start += 1
    tail = 0
    while tail < min(end, other_end) - start and ids[end - 1 - tail] == other[other_end - 1 - tail]:
        tail += 1
    return start, end - tail


def shares(adapter: str, assets: str | None = None) -> dict[str, dict[str, float]]:
    """``{section: {summary_r, summary_orth, subject_r, subject_orth, subject_rms}}`` for one adapter folder."""
    world = WorldSpec.from_seed(0)
    pipe = load_world_pipeline("base", assets)
    encoder = PeftModel.from_pretrained(pipe.text_encoder, adapter).eval()
    tokenizer = pipe.tokenizer
    eos = tokenizer.eos_token_id
    templates = range(len(world.person_templates))

    def ids(prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids

    out = {}
    for section, people in {"seen": world.seen, "unseen": world.unseen, "late": world.late}.items():
        c1 = ids([world.identity_prompt(p.name, i) for p in people for i in templates])
        c2 = ids([world.attribute_prompt(p.name, i) for p in people for i in templates])
        with torch.no_grad():
            prefixed = encoder(input_ids=c1)[0]
            with encoder.disable_adapter():
                name, described = encoder(input_ids=c1)[0], encoder(input_ids=c2)[0]
        rows: dict[str, list[float]] = {k: [] for k in ("summary_r", "summary_orth", "subject_r", "subject_orth")}
        rms = []
        for b in range(len(c1)):
            (a0, a1) = subject_span(c1[b].tolist(), c2[b].tolist(), eos)
            (b0, b1) = subject_span(c2[b].tolist(), c1[b].tolist(), eos)
            views = {
                "summary": (name[b].mean(0), described[b].mean(0), prefixed[b].mean(0)),
                "subject": (name[b, a0:a1].mean(0), described[b, b0:b1].mean(0), prefixed[b, a0:a1].mean(0)),
            }
            for view, (plain_name, plain_described, with_prefix) in views.items():
                d, change = plain_name - plain_described, with_prefix - plain_described
                r = name_share(change[None], d[None])[0]
                rows[f"{view}_r"].append(float(r))
                rows[f"{view}_orth"].append(float((change - r * d).norm() / d.norm()))
            rms.append(float((prefixed[b, a0:a1] - name[b, a0:a1]).square().mean().sqrt()))
        out[section] = {key: sum(v) / len(v) for key, v in rows.items()} | {"subject_rms": sum(rms) / len(rms)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", help="APL adapter folders trained on the world's base model")
    parser.add_argument("--assets", default=None, help="world assets folder (default: the shipped world)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for adapter in args.adapters:
        cells = []
        for section, s in shares(adapter, args.assets).items():
            cells.append(
                f"{section}: summary r {s['summary_r']:+.2f} orth {s['summary_orth']:.2f}, "
                f"subject r {s['subject_r']:+.2f} orth {s['subject_orth']:.2f} rms {s['subject_rms']:.2f}"
            )
        print(adapter, "|", " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
