"""The ``apl-eval`` run: validate inputs, generate base and APL images, measure, write the report.

Example:

```python
>>> from apl_adapter.evaluation import EvalSettings, evaluate
>>> report = evaluate(EvalSettings(base="sd15", adapter="apl-prefix", identities="ids.json",  # doctest: +SKIP
...                                prompts="prompts.txt", out="eval-out"))
>>> report["identity"]["apl"]["top1_accuracy"], report["identity"]["apl"]["face_presence_rate"]  # doctest: +SKIP
```
"""

from __future__ import annotations

import datetime
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import replace_folder, staging_folder
from ..errors import APLAdapterError, check_at_least, check_output_folder
from ..metrics.base import identity_metrics
from ..metrics.faces import (
    FaceEmbedder,
    FaceGalleryRecognizer,
    FaceMatch,
    build_gallery,
    gallery_consistency,
    load_rgb,
)
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from ..tuners.apl.serialization import check_adapter_folder
from .generation import GenerationSettings, Job, generate, load_pipeline, slug
from .specs import EvalInputError, Identity, PromptSet, load_identities, load_prompts

logger = logging.getLogger(__name__)
REPORT_VERSION = 1
CHUNK = 64  # images held in memory at once while scoring


@dataclass
class EvalSettings:
    """Everything one ``apl-eval`` run needs (the CLI fills it from its flags)."""

    base: str
    adapter: str
    identities: str
    prompts: str
    out: str
    adapter_2: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int = PAPER_STEPS
    guidance_scale: float = PAPER_GUIDANCE_SCALE
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    recognizer: str = "dlib"
    dlib_detector: str = "hog"
    dlib_upsample: int = 1
    insightface_pack: str | None = None
    same_person_distance: float | None = None
    closed_set: bool = False
    clip_model: str | None = None
    fid_model: str | None = None
    fid_reference: str | None = None
    grid_rows: int = 12
    overwrite: bool = False


def check_paths(settings: EvalSettings) -> None:
    """Fail before any generation when a path given on the command line does not exist."""
    checks = [
        ("--base", settings.base, "a diffusers pipeline folder"),
        ("--adapter", settings.adapter, "a saved APL adapter folder (adapter_config.json + weights)"),
        ("--adapter-2", settings.adapter_2, "a saved APL adapter folder for SDXL's text_encoder_2"),
        ("--identities", settings.identities, "a JSON identities file or a folder of photo folders"),
        ("--prompts", settings.prompts, "a text file, one prompt per line"),
        ("--insightface-pack", settings.insightface_pack, "an unpacked InsightFace ONNX pack folder"),
        ("--clip-model", settings.clip_model, "a local transformers CLIP folder"),
        ("--fid-model", settings.fid_model, "a local TorchScript (.pt) or ONNX feature network"),
        ("--fid-reference", settings.fid_reference, "a folder of real images"),
    ]
    for flag, value, what in checks:
        if value is not None and not Path(value).expanduser().exists():
            raise EvalInputError(f"{flag} {value} does not exist. Fix: pass {what}; nothing is downloaded.")
    if settings.recognizer == "insightface" and not settings.insightface_pack:
        raise EvalInputError("--recognizer insightface needs --insightface-pack <folder of the pack's ONNX files>")
    if settings.fid_reference and not settings.fid_model:
        raise EvalInputError("--fid-reference needs --fid-model (the feature network the FID is computed with)")
    for adapter in (settings.adapter, settings.adapter_2):
        if adapter is not None:
            check_adapter_folder(adapter)  # a broken adapter fails now, not after the base images
    if not settings.seeds:
        raise EvalInputError("--seeds is empty: give at least one seed")
    numbers = [("--steps", settings.steps, 1), ("--dlib-upsample", settings.dlib_upsample, 0),
               ("--grid-rows", settings.grid_rows, 0), ("--height", settings.height or 8, 8),
               ("--width", settings.width or 8, 8)]  # fmt: skip
    check_at_least(*numbers, error=EvalInputError)
    if settings.same_person_distance is not None and not settings.same_person_distance > 0:
        raise EvalInputError(
            f"--same-person-distance must be > 0, got {settings.same_person_distance} (dlib: 0.6, insightface: 1.14)."
        )
    check_output_folder(settings.out, settings.overwrite, error=EvalInputError)


def make_embedder(settings: EvalSettings) -> FaceEmbedder:
    """The face backend chosen by ``settings.recognizer``."""
    if settings.recognizer == "dlib":
        from ..metrics.dlib_faces import DlibFaceEmbedder

        embedder = DlibFaceEmbedder(detector=settings.dlib_detector, upsample=settings.dlib_upsample)
    elif settings.recognizer == "insightface":
        from ..metrics.insightface_faces import InsightFaceEmbedder

        embedder = InsightFaceEmbedder(settings.insightface_pack)
    else:
        raise EvalInputError(f"unknown recognizer {settings.recognizer!r}; use 'dlib' or 'insightface'")
    if settings.same_person_distance is not None:
        embedder.same_person_distance = settings.same_person_distance
    return embedder


def make_jobs(identities: list[str], prompts: PromptSet) -> list[Job]:
    """One job per (identity, template) and one per prompt without a person."""
    jobs = [
        Job(f"id{i:03d}-t{t}-{slug(name, 20)}", template.format(name=name), name, template)
        for i, name in enumerate(identities)
        for t, template in enumerate(prompts.templates)
    ]
    jobs += [Job(f"np{i:03d}-{slug(prompt, 20)}", prompt) for i, prompt in enumerate(prompts.neutral)]
    return jobs


def evaluate(settings: EvalSettings) -> dict:
    """Run the whole evaluation and write the report folder ``settings.out``; returns the report dict.

    Everything is written into a temporary folder beside ``out`` and renamed at the end, so a
    failed or interrupted run leaves no half-written report behind.
    """
    check_paths(settings)
    identities = load_identities(settings.identities)
    prompts = load_prompts(settings.prompts)
    skipped: list[str] = [p for identity in identities for p in identity.problems]

    out = Path(settings.out).expanduser()
    work = staging_folder(out, "partial")
    try:
        report = _run(settings, identities, prompts, skipped, work)
        from .report import write_report

        write_report(report, work)
        replace_folder(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _run(settings: EvalSettings, identities: list[Identity], prompts: PromptSet, skipped: list[str], work: Path):
    embedder = make_embedder(settings)
    recognizer = None
    if prompts.templates:
        gallery = build_gallery(embedder, {i.name: i.references for i in identities if i.references}, progress=True)
        skipped += gallery.skipped
        if not gallery.embeddings:  # asked to measure identities and could measure none: not a report
            raise EvalInputError(
                "No identity can be measured: the prompts file has {name} templates, but no identity has a usable "
                f"reference face ({'; '.join(skipped) or 'no identities given'}). Fix: give each identity photos in "
                "which a face is found, or drop the {name} lines to measure image quality only."
            )
        recognizer = FaceGalleryRecognizer(embedder, gallery.embeddings, open_set=not settings.closed_set)
    elif identities:
        skipped.append("identity metrics: the prompts file has no {name} template; identities not used")
    people = recognizer.identities if recognizer else []
    jobs = make_jobs(people, prompts)
    if not jobs:
        raise EvalInputError(
            "Nothing to evaluate: no identity has a usable reference face and the prompts file has no prompt "
            f"without a person. Skipped: {'; '.join(skipped)}"
        )
    base_paths, apl_paths = _draw_images(settings, jobs, work)

    records = [
        {
            "key": job.key,
            "prompt": job.prompt,
            "identity": job.identity,
            "template": job.template,
            "seed": int(seed),
            "base": str(base.relative_to(work)),
            "apl": str(apl.relative_to(work)),
        }
        for job in jobs
        for seed, base, apl in zip(settings.seeds, base_paths[job.key], apl_paths[job.key])
    ]
    identities_by_name = {i.name: i for i in identities}
    warnings: list[str] = []
    report = {
        "apl_eval_version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "skipped": skipped,
        "warnings": warnings,
        "identity": measure_identity(recognizer, embedder, records, work, warnings),
        "quality": _quality_section(settings, records, work, identities_by_name, skipped),
        "images": records,
    }
    return _jsonable(report)


def _draw_images(
    settings: EvalSettings, jobs: list[Job], work: Path
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Every job's images without and with the prefix (same seeds) under ``work/images/{base,apl}``; the pipeline
    is dropped on return, before the measuring models load."""
    from ..pipelines import apply_apl, remove_apl, with_and_without_apl

    pipe = load_pipeline(settings.base, settings.device, settings.dtype)
    try:  # the adapter must fit this pipeline's text encoder; find out before generating anything
        remove_apl(apply_apl(pipe, settings.adapter, settings.adapter_2))
    except (APLAdapterError, RuntimeError, ValueError) as error:
        raise EvalInputError(f"--adapter {settings.adapter} does not fit the pipeline in --base: {error}") from error
    generation = GenerationSettings(
        seeds=settings.seeds,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        negative_prompt=settings.negative_prompt,
    )

    def draw(prefixed: bool) -> dict[str, list[Path]]:
        folder, desc = ("apl", "APL images") if prefixed else ("base", "base images")
        return generate(pipe, jobs, generation, work / "images" / folder, desc, settings.device)

    return with_and_without_apl(pipe, settings.adapter, draw, settings.adapter_2)


def measure_identity(recognizer, embedder: FaceEmbedder, records: list[dict], work: Path, warnings: list[str]) -> dict:
    """The report's identity section for generated images already on disk.

    ``records`` rows hold ``identity`` (``None`` for prompts without a person) and the ``base`` and
    ``apl`` image paths relative to ``work``; each identity row gains ``base_face`` / ``apl_face``.
    Gallery warnings are appended to ``warnings``.
    """
    rows = [r for r in records if r["identity"] is not None]
    if recognizer is None or not rows:
        return {"skipped": "no identity with a usable reference face, or no {name} template"}
    gallery_rows, gallery_warnings = gallery_consistency(recognizer.gallery, embedder.same_person_distance)
    warnings.extend(gallery_warnings)
    section = {
        "recognizer": recognizer.name,
        "same_person_distance": embedder.same_person_distance,
        "open_set": recognizer.open_set,
        "identities": recognizer.identities,
        "gallery": gallery_rows,
    }
    targets = [r["identity"] for r in rows]
    for variant in ("base", "apl"):
        observations: list[FaceMatch] = []
        for row in tqdm(rows, desc=f"faces ({variant})", unit="img"):
            observations.append(recognizer.observe([load_rgb(work / row[variant])])[0])
            row[f"{variant}_face"] = _face_record(observations[-1], row["identity"], embedder.same_person_distance)
        metrics = identity_metrics(observations, targets)
        _add_distance_stats(metrics, observations, targets, embedder.same_person_distance)
        section[variant] = metrics
    return section


def _face_record(obs: FaceMatch, target: str, threshold: float) -> dict:
    return {
        "face_present": obs.face_present,
        "presence_score": obs.presence_score,
        "top1": obs.top1,
        "score": obs.score_for(target),
        "distance": obs.distances.get(target) if obs.face_present else None,
        "same_person": obs.is_same_person(target, threshold),
        "box": list(obs.box) if obs.box else None,
    }


def _add_distance_stats(metrics: dict, observations: list[FaceMatch], targets: list[str], threshold: float) -> None:
    """Same-person rate (no face = not the person) and mean distance over faces found, overall and per identity."""

    def stats(pairs):
        distances = [o.distances[t] for o, t in pairs if o.face_present]
        return {
            "same_person_rate": sum(o.is_same_person(t, threshold) for o, t in pairs) / len(pairs),
            "mean_distance": float(np.mean(distances)) if distances else None,
        }

    pairs = list(zip(observations, targets))
    metrics.update(stats(pairs))
    for name, row in metrics["per_identity"].items():
        row.update(stats([(o, t) for o, t in pairs if t == name]))


def _quality_section(settings: EvalSettings, records: list[dict], work: Path, identities, skipped: list[str]) -> dict:
    from ..metrics.quality import pair_similarity

    section: dict = {}
    neutral = [r for r in records if r["identity"] is None]
    if neutral:
        per_pair = []
        for row in neutral:
            sim = pair_similarity(load_rgb(work / row["base"]), load_rgb(work / row["apl"]))
            row.update(sim)
            per_pair.append(sim)
        psnr = [p["psnr"] for p in per_pair if math.isfinite(p["psnr"])]
        section["unchanged"] = {
            "num_pairs": len(per_pair),
            "mean_ssim": float(np.mean([p["ssim"] for p in per_pair])),
            "mean_psnr": float(np.mean(psnr)) if psnr else None,
            "identical_pairs": len(per_pair) - len(psnr),
        }
    else:
        section["unchanged"] = {"skipped": "the prompts file has no prompt without a person"}
    section["clip_score"] = _clip_section(settings, records, work, identities, skipped)
    section["fid"] = _fid_section(settings, neutral, work, skipped)
    return section


def _clip_section(settings: EvalSettings, records: list[dict], work: Path, identities, skipped: list[str]) -> dict:
    if not settings.clip_model:
        return {"skipped": "no --clip-model given"}
    from ..metrics.quality import CLIPScorer

    try:
        scorer = CLIPScorer.from_pretrained(settings.clip_model, device=settings.device)
    except Exception as error:  # loaders raise many types for a malformed folder; skip the metric, say why
        skipped.append(f"CLIP score: could not load {settings.clip_model}: {error}")
        return {"skipped": f"could not load {settings.clip_model}: {error}"}
    section: dict = {"model": settings.clip_model}
    # identity images are also scored against the anonymous description the prefix should keep
    anonymous = [_anonymous_prompt(r, identities) for r in records]
    for variant in ("base", "apl"):
        prompt_scores, described = [], []
        for start in tqdm(range(0, len(records), CHUNK), desc=f"CLIP score ({variant})", unit="chunk"):
            chunk = records[start : start + CHUNK]
            images = [load_rgb(work / r[variant]) for r in chunk]  # chunks keep memory flat on big runs
            prompt_scores += scorer.score(images, [r["prompt"] for r in chunk])
            described += scorer.score(images, anonymous[start : start + CHUNK])
        for row, score, desc_score in zip(records, prompt_scores, described):
            row[f"{variant}_clip"] = score
            if row["identity"] is not None:
                row[f"{variant}_clip_anonymous"] = desc_score
        groups = {
            "neutral": [s for r, s in zip(records, prompt_scores) if r["identity"] is None],
            "identity": [s for r, s in zip(records, prompt_scores) if r["identity"] is not None],
            "identity_anonymous": [s for r, s in zip(records, described) if r["identity"] is not None],
        }
        section[variant] = {k: (float(np.mean(v)) if v else None) for k, v in groups.items()}
    return section


def _anonymous_prompt(row: dict, identities) -> str:
    if row["identity"] is None:
        return row["prompt"]
    attributes = identities[row["identity"]].attributes if row["identity"] in identities else None
    return row["template"].format(name=attributes or "a person")


def _fid_section(settings: EvalSettings, neutral: list[dict], work: Path, skipped: list[str]) -> dict:
    if not settings.fid_model:
        return {"skipped": "no --fid-model given"}
    if len(neutral) < 2:
        return {"skipped": "FID needs at least 2 images from prompts without a person"}
    from ..metrics.faces import list_images
    from ..metrics.quality import FeatureExtractor, frechet_distance

    try:
        extractor = FeatureExtractor.from_path(settings.fid_model)
    except Exception as error:  # torch.jit / onnxruntime raise their own types for a bad file; skip, say why
        skipped.append(f"FID: could not load {settings.fid_model}: {error}")
        return {"skipped": f"could not load {settings.fid_model}: {error}"}
    features = {
        v: np.concatenate(
            [extractor([load_rgb(work / r[v]) for r in neutral[s : s + CHUNK]]) for s in range(0, len(neutral), CHUNK)]
        )
        for v in ("base", "apl")
    }
    section = {
        "model": settings.fid_model,
        "num_images": len(neutral),
        "feature_dim": int(features["base"].shape[1]),
        "base_vs_apl": frechet_distance(features["base"], features["apl"]),
    }
    if section["num_images"] < section["feature_dim"]:
        section["note"] = "fewer images than feature dimensions: FID is biased high; compare only like with like"
    if settings.fid_reference:
        references = []
        for path in list_images(settings.fid_reference):
            try:
                references.append(load_rgb(path))
            except ValueError as error:
                skipped.append(f"FID reference: {error}")
        if len(references) >= 2:
            real = extractor(references)
            section["num_reference_images"] = len(references)
            section["reference_vs_base"] = frechet_distance(real, features["base"])
            section["reference_vs_apl"] = frechet_distance(real, features["apl"])
        else:
            skipped.append(f"FID reference: {settings.fid_reference} has fewer than 2 readable images")
    return section


def _jsonable(value):
    """Non-finite floats become ``None`` (JSON has no inf/NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
