"""Export a Stable Diffusion 3 / FLUX.1 pipeline with APL prefixes: the stages of :mod:`.exporter`, for these families.

1. memory: the components' parameter counts (safetensors headers) against the memory the export needs
   (:mod:`.memory`), before anything is loaded;
2. load the pipeline in fp32 and attach the adapters: ``--adapter`` is a folder in the pipeline's layout, one
   subfolder per encoder (``text_encoder/``, ``text_encoder_2/``, ``text_encoder_3/``), any subset; encoders without
   one are exported plain;
3. ONNX export and validation of every graph (:mod:`.flow_models`) against PyTorch with onnxruntime, fatal on failure
   (:func:`apl_export.exporter.export_and_validate`, the SD 1.x machinery);
4. layout: tokenizers, scheduler config, ``model_index.json``, ``apl_export.json``;
5. ``--trt``: TensorRT engines (:mod:`.engines`), after a memory check of each build.

Prefixes are baked (the graphs take ``input_ids`` only). What SD 1.x exports have and these do not - ``--prefix-mode
input``, ``--text-encoder fast``, ``--triton``, a runtime pipeline - is refused by name before anything runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path

import torch

from apl_adapter.families import SD3, PipelineFamily

from .errors import ExportError
from .flow_models import (
    TRANSFORMER,
    VAE_DECODER,
    EncoderSlot,
    LoadedFlowPipeline,
    attention_score_bytes,
    flow_models,
    negative_prompt_encoders,
)
from .memory import GIB, ComponentSizes, check_fits, export_need_bytes
from .specs import ShapeRanges
from .stages import (
    FORMAT_VERSION,
    ExportOptions,
    Progress,
    build_engines_and_publish,
    check_out_keeps_inputs,
    export_and_validate,
    prepare_output,
    read_model_index,
)

#: the T5 window a pipeline's ``max_sequence_length`` may take (both pipelines refuse more than 512)
MAX_WINDOW = 512


def check_flow_options(family: PipelineFamily, options: ExportOptions) -> None:
    """Refuse, by name, what SD 1.x exports have and SD3 / FLUX exports do not."""
    title = family.title
    if options.prefix_mode != "baked":
        raise ExportError(
            f"--prefix-mode {options.prefix_mode} is not supported for {title}: its exports bake each encoder's prefix "
            "into its graph (input_ids only); a prefix input exists for SD 1.x / 2.x only. Drop --prefix-mode."
        )
    if options.text_encoder != "standard":
        raise ExportError(
            f"--text-encoder {options.text_encoder} (the apl::PrefixAttention TensorRT plugin) is not supported for "
            f"{title}: the plugin path is built for SD 1.x / 2.x CLIP only, and T5 cannot use it at all (T5 attends "
            "both ways, so its prefix keys and values depend on the prompt and cannot be baked as constants). Use "
            "--text-encoder standard."
        )
    if options.triton or options.triton_expose_parts:
        raise ExportError(
            f"--triton is not supported for {title}: the Triton repository serves SD 1.x / 2.x pipelines only (its "
            "pipeline model runs the UNet loop). Drop --triton; the ONNX graphs and --trt engines are exported."
        )


def export_flow_pipeline(
    model_dir: Path,
    adapter_dir: Path,
    out: Path,
    options: ExportOptions,
    family: PipelineFamily,
    class_name: str,
    progress: Progress = print,
) -> Path:
    """Export an SD3 / FLUX folder with the adapters of ``adapter_dir`` (one subfolder per encoder) to ``out``."""
    check_flow_options(family, options)
    check_components(model_dir, family, class_name)
    check_out_keeps_inputs(out, {"model": model_dir, "--adapter": adapter_dir})
    selection = selected_models(family, class_name, options.models)
    adapters = {k: v for k, v in adapter_folders(adapter_dir, family, class_name).items() if k in selection}
    window = check_window(family, class_name, options.max_sequence_length, adapters)
    progress(f"[1/5] memory check, loading {model_dir} ({class_name}) and adapters for {', '.join(adapters) or '-'}")
    check_export_memory(model_dir, family, class_name, selection, window, options.ranges)
    staging = prepare_output(out, options.overwrite)
    try:
        loaded = load_flow_pipeline(model_dir, adapters, family, class_name, window, selection)
        ranges = options.ranges.resolved(loaded.native_size)
        ranges.check_image_multiple(loaded.image_multiple)
        progress("[2/5] ONNX export and [3/5] validation against PyTorch")
        exported = {}
        for model in flow_models(loaded, ranges):
            exported[model.spec.name] = export_and_validate(model, staging, options, progress)
        manifest = flow_manifest(loaded, options, ranges, exported)
        progress("[4/5] folder layout: configs, tokenizers, scheduler, model_index.json")
        write_flow_layout(loaded, staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return build_engines_and_publish(staging, out, manifest, options, progress)


# ----------------------------------------------------------------------------------------------------------------
# Adapters and loading
# ----------------------------------------------------------------------------------------------------------------


#: the transformer class each family's graphs are written for
TRANSFORMER_CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def check_components(model_dir: Path, family: PipelineFamily, class_name: str) -> None:
    """Refuse, naming them, components the export would silently leave out (a ControlNet, an IP-Adapter image
    encoder...) and a transformer of another class: the graphs would not be the pipeline the folder describes."""
    index = read_model_index(model_dir)
    known = {"scheduler", "vae", TRANSFORMER, *family.encoders, "tokenizer", "tokenizer_2", "tokenizer_3"}
    known |= {"feature_extractor"}  # the IP-Adapter's image preprocessing: no weights
    present = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    extra = sorted(set(present) - known)
    base = "StableDiffusion3Pipeline" if family is SD3 else "FluxPipeline"
    if extra:
        raise ExportError(
            f"{model_dir} ({class_name}) has {', '.join(extra)}, which apl-export does not export: the graphs would "
            f"run without it. Export the text-to-image {base} folder (without those components)."
        )
    transformer = index.get(TRANSFORMER)
    expected = TRANSFORMER_CLASSES[family.name]
    if isinstance(transformer, list) and len(transformer) == 2 and transformer[1] != expected:
        raise ExportError(
            f"{model_dir}'s transformer is a {transformer[1]}; apl-export exports {expected} for {family.title}."
        )


def selected_models(family: PipelineFamily, class_name: str, models: tuple[str, ...] | None) -> tuple[str, ...]:
    """The graphs to export (``--models``; default all): encoder names, ``transformer``, ``vae_decoder``."""
    known = (*family.encoders, TRANSFORMER, VAE_DECODER)
    if models is None:
        return known
    unknown = [name for name in models if name not in known]
    if unknown or not models:
        raise ExportError(
            f"--models {','.join(models)}: {class_name} exports {', '.join(known)}; name some of these (a prefixed "
            "encoder's plain negative-prompt copy comes with it)."
        )
    return tuple(name for name in known if name in models)


def adapter_folders(adapter_dir: Path, family: PipelineFamily, class_name: str) -> dict[str, Path]:
    """``{encoder: its adapter folder}`` from an adapter folder in the pipeline's layout; clear errors otherwise."""
    layout = ", ".join(f"{name}/" for name in family.encoders)
    if (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(
            f"--adapter {adapter_dir} is a single adapter; a {class_name} has several text encoders, so pass a folder "
            f"with one subfolder per encoder ({layout}, any subset), e.g. move it into {adapter_dir}/text_encoder/ if "
            "it was saved from the first CLIP encoder."
        )
    if not adapter_dir.is_dir():
        raise ExportError(
            f"No adapter folder at {adapter_dir}; pass a folder with one subfolder per encoder ({layout})."
        )
    found = {p.name: p for p in sorted(adapter_dir.iterdir()) if (p / "adapter_config.json").is_file()}
    unknown = sorted(set(found) - set(family.encoders))
    if unknown:
        raise ExportError(
            f"--adapter {adapter_dir} has adapters in {', '.join(f'{u}/' for u in unknown)}, but {class_name} has "
            f"text encoders {', '.join(family.encoders)} only; rename or remove those subfolders."
        )
    if not found:
        raise ExportError(
            f"--adapter {adapter_dir} holds no adapter for any encoder: expected subfolders {layout} (any subset), "
            "each an APL adapter saved with save_pretrained."
        )
    return {name: found[name] for name in family.encoders if name in found}


def check_export_memory(
    model_dir: Path,
    family: PipelineFamily,
    class_name: str,
    selection: tuple[str, ...] | None = None,
    window: int = 256,
    ranges: ShapeRanges | None = None,
) -> None:
    """Stop before loading when exporting the ``selection`` (default: every graph) of this pipeline at ``ranges``
    needs more memory than the machine has (see :mod:`.memory`), naming the models' sizes, the memory needed and
    available, and what to do. The VAE is always loaded (its factor sizes the latents). With the transformer, one
    attention score matrix of its validation at the opt size is added (it grows with the fourth power of the side)."""
    selection = selection or (*family.encoders, TRANSFORMER, VAE_DECODER)
    loaded = [name for name in (*family.encoders, TRANSFORMER) if name in selection]
    sizes = ComponentSizes.read(model_dir, (*loaded, "vae"))
    need = export_need_bytes(sizes)
    attention = ""
    if TRANSFORMER in selection:
        config = _read_json(model_dir / TRANSFORMER / "config.json")
        vae_factor = 2 ** (len(_read_json(model_dir / "vae" / "config.json")["block_out_channels"]) - 1)
        scores = attention_score_bytes(family, config, vae_factor, window, ranges or ShapeRanges())
        need += scores
        attention = f" plus {scores / GIB:.1f} GiB for one attention score matrix of the transformer at the opt size"
    total = 4 * sum(sizes.parameters.values())
    largest, count = sizes.largest
    check_fits(
        need,
        f"Exporting {model_dir} ({class_name}: {sizes.describe()} parameters, {total / GIB:.1f} GiB in fp32)",
        f"The export holds every component in fp32 (the PyTorch reference) and up to three ONNX copies of the largest, "
        f"{largest} ({4 * count / GIB:.1f} GiB){attention}; --fp16 converts after export and does not lower this. "
        "A smaller --height / --width opt lowers the attention part. Export on a "
        f"machine with at least {need / GIB:.1f} GiB of memory (e.g. a GPU server's host) and build the engines "
        "there (--trt; --fp16 halves an engine build's memory), or export fewer graphs here with --models (e.g. "
        "--models text_encoder,text_encoder_2,vae_decoder: the CLIP encoders of SD3 need about 11 GiB).",
    )


def _read_json(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} is missing or not valid JSON ({err}); re-save the pipeline.") from err


def load_flow_pipeline(
    model_dir: Path,
    adapters: dict[str, Path],
    family: PipelineFamily,
    class_name: str,
    window: int,
    selection: tuple[str, ...],
) -> LoadedFlowPipeline:
    """Load the ``selection``'s components in fp32 (the others are skipped) and attach each adapter to its encoder
    (``PeftModel``, the reference)."""
    from peft import PeftModel

    import apl_adapter  # noqa: F401 - registers the APL PEFT type
    from apl_adapter import APLAdapterError, check_adapter_folder
    from apl_adapter.tuners.apl.model import prefix_embedding_of
    from apl_adapter.tuners.apl.prefix import text_encoder_type_of

    for folder in adapters.values():
        try:
            check_adapter_folder(folder)
        except APLAdapterError as err:
            raise ExportError(f"--adapter {folder}: {err}") from err
    cls = pipeline_class(family, class_name)
    skipped = {name: None for name in (*family.encoders, TRANSFORMER) if name not in selection}
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32, **skipped)
    slots = []
    for index, name in enumerate(family.encoders):
        model = getattr(pipe, name, None)
        if model is None:
            if name in adapters:
                raise ExportError(f"{model_dir} has no {name} (it was saved without it), but --adapter has {name}/.")
            continue
        tokenizer = getattr(pipe, "tokenizer" if index == 0 else f"tokenizer_{index + 1}")
        slot = EncoderSlot(name, text_encoder_type_of(model), model.eval(), tokenizer)
        if name in adapters:
            try:
                peft_model = PeftModel.from_pretrained(model, str(adapters[name])).eval()
            except APLAdapterError as err:
                raise ExportError(f"--adapter {adapters[name]} does not fit {name} of {model_dir}: {err}") from err
            weights = prefix_embedding_of(peft_model.get_base_model()).active_prefix_weights.detached()
            config = peft_model.peft_config["default"]
            slot.model, slot.prefix, slot.adapter_dir = peft_model, weights, adapters[name]
            slot.apply_to_negative_prompt = bool(config.apply_to_negative_prompt)
        slots.append(slot)
    transformer = pipe.transformer.eval() if pipe.transformer is not None else None
    if transformer is not None:
        config = transformer.config
    else:  # not exported: its config still sizes the images (sample_size, patch_size)
        from diffusers.configuration_utils import FrozenDict

        config = FrozenDict(json.loads((model_dir / TRANSFORMER / "config.json").read_text()))
    return LoadedFlowPipeline(
        family, class_name, slots, transformer, config, pipe.vae.eval(), pipe.scheduler, window, selection
    )


def pipeline_class(family: PipelineFamily, class_name: str) -> type:
    """The diffusers class a ``model_index.json`` names (its family's text-to-image pipeline if unknown)."""
    import diffusers

    default = diffusers.StableDiffusion3Pipeline if family is SD3 else diffusers.FluxPipeline
    return getattr(diffusers, class_name, default)


def check_window(family: PipelineFamily, class_name: str, window: int | None, adapters: dict[str, Path]) -> int:
    """The T5 window to export at (``--max-sequence-length``, else the pipeline's default: SD3 256, FLUX 512),
    checked before anything loads: it must hold the T5 prefix (read from its ``adapter_config.json``) and EOS, and
    stay within what the pipelines accept."""
    if window is None:
        call = pipeline_class(family, class_name).__call__
        window = int(inspect.signature(call).parameters["max_sequence_length"].default)
    t5 = family.encoders[-1]  # SD3's text_encoder_3, FLUX's text_encoder_2
    m = 0
    if t5 in adapters:
        m = int(json.loads((adapters[t5] / "adapter_config.json").read_text()).get("num_virtual_tokens", 0))
    if not m + 1 < window <= MAX_WINDOW:
        raise ExportError(
            f"--max-sequence-length {window} does not fit {t5} (T5): the window must be longer than the {m}-vector "
            f"prefix plus EOS and at most {MAX_WINDOW} (SD3 uses 256, FLUX.1-dev 512, FLUX.1-schnell 256)."
        )
    return window


# ----------------------------------------------------------------------------------------------------------------
# Manifest and layout
# ----------------------------------------------------------------------------------------------------------------


def flow_manifest(loaded: LoadedFlowPipeline, options: ExportOptions, ranges, exported: dict) -> dict:
    """``apl_export.json`` of an SD3 / FLUX export (engines are added by the TensorRT stage)."""
    encoders = {}
    for slot in loaded.encoders:
        entry: dict = {"type": slot.kind, "hidden_size": slot.width, "prefix": None}
        if slot.prefix is not None and slot.adapter_dir is not None:
            weights = slot.adapter_dir / "adapter_model.safetensors"
            entry.update(
                prefix="deep" if slot.prefix.is_deep else "shallow",
                hide_prefix_rows=slot.prefix.hide_rows,
                num_virtual_tokens=slot.prefix.num_virtual_tokens,
                adapter_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
            )
        encoders[slot.name] = entry
    vae = loaded.vae.config
    return {
        "format_version": FORMAT_VERSION,
        "family": loaded.family.name,
        "pipeline_class": loaded.class_name,
        "prefix_mode": "baked",
        "max_sequence_length": loaded.max_sequence_length,
        "selected": list(loaded.selection),
        "encoders": encoders,
        "negative_prompt_encoders": negative_prompt_encoders(loaded),
        "vae_factor": loaded.vae_factor,
        "image_multiple": loaded.image_multiple,
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_shift_factor": float(getattr(vae, "shift_factor", None) or 0.0),
        "opset": options.opset,
        "exporter": options.exporter,
        "fp16": options.fp16,
        "ranges": {k: list(vars(getattr(ranges, k)).values()) for k in ("batch", "height", "width")},
        "models": exported,
    }


def write_flow_layout(loaded: LoadedFlowPipeline, staging: Path, manifest: dict) -> None:
    """Each encoder's tokenizer (``tokenizer``, ``tokenizer_2``, ``tokenizer_3``, as diffusers names them), the
    scheduler config and a ``model_index.json`` that names no runtime: apl_export has none for these families."""
    tokenizers = {}
    for slot in loaded.encoders:
        index = loaded.family.encoders.index(slot.name)
        folder = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
        slot.tokenizer.save_pretrained(staging / folder)
        tokenizers[folder] = ["transformers", type(slot.tokenizer).__name__]
    loaded.scheduler.save_config(staging / "scheduler")
    index = {
        "_class_name": None,
        "_runtime": None,
        "_source_class_name": loaded.class_name,
        **{name: ["apl_export", "onnx"] for name in manifest["models"]},
        **tokenizers,
        "scheduler": ["diffusers", type(loaded.scheduler).__name__],
    }
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))
