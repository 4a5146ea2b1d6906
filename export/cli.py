"""``apl-export``: a Stable Diffusion (1.x / 2.x, 3, FLUX.1) folder + APL adapter(s) -> validated ONNX (+ TensorRT,
+ Triton for SD 1.x / 2.x)."""

from __future__ import annotations

import argparse
import sys

from apl_adapter.console import add_common_options, run_cli

from .onnx_export import DEFAULT_OPSET, MIN_OPSET
from .specs import ShapeRange, ShapeRanges

EPILOG = """\
stages (each prints its progress):
  1 load      the diffusers folder and the adapter (its PyTorch forward is the reference)
  2 onnx      text_encoder (with the APL prefix), negative_text_encoder (plain, for the negative
              prompt), unet, vae_decoder; graph cleanup; fp16 with --fp16
  3 validate  onnx.checker, I/O names and shapes, onnxruntime vs PyTorch on real and random inputs
              (fp32: text encoder 1e-4, UNet 1e-3, VAE 3e-4; fp16: 2e-2). Any failure stops the export.
  4 layout    <out>/<model>/model.onnx + config.json, tokenizer/, scheduler/, model_index.json,
              apl_export.json (I/O, profiles, validation results)
  5 engines   --trt: <out>/engines/<model>.plan, one min/opt/max profile each
    triton    --triton: <out>/triton/apl_pipeline (prompt in, image out; the parts run inside it), CLIENT.md;
              --triton-expose-parts adds <out>/triton/<part>/config.pbtxt + 1/model.{plan,onnx}

prefix modes:
  baked   the prefix is a constant of text_encoder, whose only input is input_ids: no caller can
          encode a prompt without it (default, for production apps)
  input   the prefix (m, D) is a second input: a new adapter of the same m needs no re-export

text encoders (--text-encoder):
  standard  CLIP with the prefix in its input; runs in onnxruntime and TensorRT (default)
  fast      the prefix's per-layer keys/values are constants and only the prompt positions run:
            one apl::PrefixAttention TensorRT plugin node per layer. Baked prefix and fp32 only;
            TensorRT runtime only (ONNX Runtime cannot run the node), so it is validated with
            onnx's ReferenceEvaluator (the node in NumPy) and its PyTorch graph vs the adapter (1e-5)

SD3 / FLUX.1 (model_index.json: StableDiffusion3Pipeline / FluxPipeline):
  --adapter is a folder in the pipeline's layout, one adapter subfolder per text encoder
  (text_encoder/, text_encoder_2/, text_encoder_3/), any subset; encoders without one are exported
  plain. Graphs (prefix baked, input_ids int32 only):
    SD3   text_encoder, text_encoder_2  CLIP: penultimate_hidden_state (B,77,D), text_embeds (B,P)
          text_encoder_3                T5: last_hidden_state (B,L,4096), L = --max-sequence-length
          negative_text_encoder[_N]     plain copies of the prefixed encoders, for the negative prompt
          transformer                   hidden_states (2B,C,h,w), encoder_hidden_states (2B,77+L,J),
                                        pooled_projections (2B,P), timestep (2B,) -> model_output
    FLUX  text_encoder                  CLIP: pooler_output (B,768)
          text_encoder_2                T5: last_hidden_state (B,L,4096)
          transformer                   hidden_states (B,S,C) packed, encoder_hidden_states (B,L,J),
                                        pooled_projections (B,P), timestep (B,), img_ids (S,3),
                                        txt_ids (L,3) [, guidance (B,) for FLUX.1-dev] -> model_output
    both  vae_decoder                   latent_sample (B,C,h,w) -> sample (B,3,H,W)
  --max-sequence-length: the T5 window L (default: the pipeline's, SD3 256, FluxPipeline 512; pass 256
  for FLUX.1-schnell). The transformers are always exported with dynamo (TorchScript has no rms_norm).
  Validation as above (text encoders 1e-4, transformer 1e-3, VAE 3e-4). Before loading, the memory the
  export needs (fp32 weights + ONNX copies of the largest model) is compared with what the machine has;
  before --trt, each engine build's too: a stop names the sizes and what to do. --models exports a
  subset (the others are not loaded). Not available for these families: --prefix-mode input,
  --text-encoder fast, --triton, a runtime pipeline.

examples:
  apl-export sd15/ --adapter apl-prefix/ --out sd15-apl-onnx/
  apl-export sd15/ --adapter apl-prefix/ --out sd15-apl-trt/ --trt --fp16 --batch 1:1:4 --height 512:512:768
  apl-export sd15/ --adapter apl-prefix/ --out repo/ --triton --prefix-mode input --overwrite
  apl-export sd15/ --adapter apl-prefix/ --out sd15-apl-fast/ --text-encoder fast --trt
  apl-export sd3-medium/ --adapter sd3-apl/ --out sd3-apl-onnx/ --height 1024 --width 1024
  apl-export flux-schnell/ --adapter flux-apl/ --out flux-apl-onnx/ --max-sequence-length 256 --trt
  apl-export sd3-medium/ --adapter sd3-apl/ --out sd3-clip/ --models text_encoder,text_encoder_2

The output is written next to --out and renamed at the end: a failed export leaves nothing behind.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apl-export",
        description="Export a Stable Diffusion 1.x/2.x, SD3 or FLUX.1 pipeline whose text encoders always apply their "
        "APL anonymization prefixes, to validated ONNX and optionally TensorRT engines (and, for SD 1.x/2.x, a Triton "
        "repository).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="diffusers pipeline folder (from save_pretrained), e.g. sd15/")
    parser.add_argument(
        "--adapter",
        required=True,
        help="APL adapter folder (adapter_config.json + safetensors); SD3 / FLUX: a folder with one adapter subfolder "
        "per text encoder (text_encoder/, text_encoder_2/, text_encoder_3/), any subset",
    )
    parser.add_argument("--out", required=True, help="output folder to create (must be new or empty, or --overwrite)")
    parser.add_argument("--trt", action="store_true", help="also build TensorRT engines (tensorrt or TensorRT-RTX)")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights and activations (fp32 inputs/outputs)")
    parser.add_argument("--prefix-mode", choices=["baked", "input"], default="baked", help="see 'prefix modes'")
    parser.add_argument("--batch", default="1:1:4", help="prompts per call, N or MIN:OPT:MAX (default 1:1:4)")
    parser.add_argument(
        "--height",
        help="image height in pixels, N or MIN:OPT:MAX (default: the model's native size, unet (SD3: transformer) "
        "sample_size x VAE factor, as diffusers: 512 for SD 1.x, 768 for SD 2.x-768, 1024 for SD3 / FLUX)",
    )
    parser.add_argument("--width", help="image width in pixels, N or MIN:OPT:MAX (default: the native size)")
    parser.add_argument(
        "--triton",
        action="store_true",
        help="also write a Triton Inference Server repository: one Python-backend pipeline model, prompt strings in, "
        "images out, the parts inside it (no client can skip the prefix)",
    )
    parser.add_argument(
        "--triton-expose-parts",
        action="store_true",
        help="with --triton, also publish text_encoder, negative_text_encoder, unet and vae_decoder as models of "
        "their own (clients driving the loop themselves; the plain encoder and the UNet then let them skip the prefix)",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="SD3 / FLUX: the T5 window the graphs take (default: the pipeline's, SD3 256, FLUX 512; FLUX.1-schnell "
        "uses 256)",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="SD3 / FLUX: comma list of the graphs to export (default all): text_encoder, text_encoder_2, "
        "text_encoder_3, transformer, vae_decoder; the others are not loaded (e.g. the CLIP encoders alone on a "
        "machine too small for T5-XXL)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default 19)")
    parser.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript"],
        default="dynamo",
        help="torch.onnx exporter: dynamo (default, robust) or torchscript (tracing; ~10x faster on tiny models, "
        "see benchmarks/bench_export_unet.py for SD 1.5)",
    )
    parser.add_argument(
        "--text-encoder",
        choices=["standard", "fast"],
        default="standard",
        help="text-encoder graph: 'standard' (default; runs anywhere, onnxruntime-validated) or 'fast' (the prefix's "
        "per-layer keys/values baked as constants, only the prompt positions computed, one apl::PrefixAttention "
        "TensorRT plugin node per layer; needs the baked prefix mode, fp32, and the TensorRT runtime: ONNX Runtime "
        "cannot run it; see 'text encoders')",
    )
    add_common_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from apl_adapter import PromptTruncationWarning

    # tracing feeds full-length prompts, which is what the warning is about; nothing a user asked for is cut
    return run_cli("apl-export", lambda: _export(args), args, hidden=(PromptTruncationWarning,))


def _export(args: argparse.Namespace) -> int:
    from .exporter import ExportOptions, export_pipeline

    ranges = ShapeRanges(
        batch=ShapeRange.parse(args.batch, "batch"),
        height=ShapeRange.parse(args.height, "height") if args.height else None,
        width=ShapeRange.parse(args.width, "width") if args.width else None,
    )
    options = ExportOptions(
        prefix_mode=args.prefix_mode,
        ranges=ranges,
        fp16=args.fp16,
        opset=args.opset,
        exporter=args.exporter,
        text_encoder=args.text_encoder,
        trt=args.trt,
        triton=args.triton,
        triton_expose_parts=args.triton_expose_parts,
        overwrite=args.overwrite,
        max_sequence_length=args.max_sequence_length,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models is not None else None,
    )
    export_pipeline(args.model, args.adapter, args.out, options, progress=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
