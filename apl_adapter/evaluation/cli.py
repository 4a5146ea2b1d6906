"""``apl-eval``: how much identity still leaks through an APL prefix, and what it costs in quality."""

from __future__ import annotations

import argparse
import sys

from ..console import add_common_options, command_settings_of, run_cli, seed_list
from ..sampling import PAPER_GUIDANCE_SCALE, PAPER_STEPS
from .runner import EvalSettings, evaluate

EPILOG = """\
example:
  apl-eval --base ./sd15 --adapter ./apl-prefix --identities ids.json --prompts prompts.txt --out eval-out

identities: a JSON file {"identities": [{"name": "Ann Lee", "references": "refs/ann_lee",
  "attributes": "a woman with short black hair"}]} (paths relative to the file), or a folder with
  one sub-folder of photos per identity (refs/Ann_Lee/*.jpg).
prompts: a text file, one prompt per line; lines with {name} are identity templates, the others
  are prompts without a person (the prefix should leave those unchanged).

what is measured (report.json, report.md, report.html, grid.png in --out):
  identity  face presence, top-1 identification against the reference gallery (open-set: only a
            face within the same-person distance counts), same-person rate, mean/max cosine to
            the references per identity; no face = miss and score 0, presence reported beside it.
  quality   SSIM/PSNR base vs APL on prompts without a person (always); CLIP score with
            --clip-model; FID with --fid-model (+ --fid-reference for real images).
nothing is downloaded: every model is read from a path you give.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apl-eval",
        description="Generate each prompt with and without an APL prefix (same seeds), then measure identity "
        "leakage with an offline face recognizer and image quality with weights you supply by path.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--base", required=True, help="diffusers pipeline folder (model_index.json), e.g. a local SD 1.5")
    io.add_argument("--adapter", required=True, help="saved APL adapter folder (from save_pretrained / apl-train)")
    io.add_argument("--adapter-2", help="SDXL only: APL adapter folder for text_encoder_2 (optional)")
    io.add_argument("--identities", required=True, help="identities JSON file or folder of per-person photo folders")
    io.add_argument("--prompts", required=True, help="prompts text file ({name} templates + prompts without people)")
    io.add_argument("--out", required=True, help="report folder to create (must be new or empty, or --overwrite)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    gen = parser.add_argument_group("generation (the authors' defaults)")
    gen.add_argument(
        "--seeds", type=seed_list, default=[0, 1, 2, 3], help="one image per seed, a comma list (default: 0,1,2,3)"
    )
    gen.add_argument("--steps", type=int, default=PAPER_STEPS, help=f"DDIM steps (default: {PAPER_STEPS}, the paper)")
    gen.add_argument(
        "--guidance-scale",
        type=float,
        default=PAPER_GUIDANCE_SCALE,
        help=f"classifier-free guidance (default: {PAPER_GUIDANCE_SCALE:g}, the paper)",
    )
    gen.add_argument("--height", type=int, help="image height (default: the model's)")
    gen.add_argument("--width", type=int, help="image width (default: the model's)")
    gen.add_argument("--negative-prompt", help="negative prompt (never prefixed)")
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="model dtype")

    faces = parser.add_argument_group("face recognizer")
    faces.add_argument(
        "--recognizer", choices=["dlib", "insightface"], default="dlib", help="dlib (bundled, default) or insightface"
    )
    faces.add_argument("--dlib-detector", choices=["hog", "cnn"], default="hog", help="dlib face detector")
    faces.add_argument("--dlib-upsample", type=int, default=1, help="dlib detector upsampling (finds smaller faces)")
    faces.add_argument("--insightface-pack", help="folder of an InsightFace ONNX pack you have (e.g. buffalo_l)")
    faces.add_argument(
        "--same-person-distance", type=float, help="embedding distance threshold (default: dlib 0.6, insightface 1.14)"
    )
    faces.add_argument("--closed-set", action="store_true", help="top-1 always names the closest identity")

    quality = parser.add_argument_group("quality (optional, weights by path)")
    quality.add_argument("--clip-model", help="local transformers CLIP folder (CLIPModel + CLIPProcessor files)")
    quality.add_argument("--fid-model", help="local FID feature network: TorchScript .pt or .onnx (input 299x299)")
    quality.add_argument("--fid-reference", help="folder of real images to compute FID against (needs --fid-model)")
    quality.add_argument("--grid-rows", type=int, default=12, help="prompts shown in grid.png (default: 12)")
    add_common_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("apl-eval", lambda: _evaluate(EvalSettings(**command_settings_of(args))), args)


def _evaluate(settings: EvalSettings) -> int:
    report = evaluate(settings)
    for line in report["skipped"]:
        print(f"apl-eval: skipped: {line}", file=sys.stderr)
    for line in report["warnings"]:
        print(f"apl-eval: warning: {line}", file=sys.stderr)
    identity = report["identity"]
    if "skipped" not in identity:
        for variant in ("base", "apl"):
            m = identity[variant]
            print(
                f"{variant:>4}: face presence {m['face_presence_rate']:.3f}  top-1 {m['top1_accuracy']:.3f}  "
                f"same-person {m['same_person_rate']:.3f}  mean cosine {m['mean_identity_score']:.3f}"
            )
    print(f"report: {settings.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
