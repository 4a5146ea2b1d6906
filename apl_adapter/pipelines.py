"""diffusers integration: one call to put an APL prefix into a pipeline, one to take it out.

Works for the pipelines of three families (:mod:`apl_adapter.families`), img2img / inpaint siblings included:

- Stable Diffusion 1.x / 2.x / XL (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ...);
- Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``: CLIP ``text_encoder``, CLIP ``text_encoder_2``,
  T5 ``text_encoder_3``);
- FLUX.1 (``FluxPipeline``: CLIP ``text_encoder``, pooled output only, T5 ``text_encoder_2``).

One adapter per encoder: ``adapter``, ``adapter_2``, ``adapter_3`` go to ``text_encoder``, ``text_encoder_2``,
``text_encoder_3``; or pass ``adapter`` as a mapping ``{"text_encoder_3": folder, ...}``, or as one folder holding
a subfolder per encoder (``text_encoder/``, ``text_encoder_3/``: the pipeline's own layout). Encoders without an
adapter stay plain. ``pipe(prompt).images`` and ``prompt_embeds`` passthrough keep working unchanged.

Example:

```python
>>> from diffusers import StableDiffusionPipeline
>>> from apl_adapter.pipelines import apply_apl, remove_apl
>>> pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")          # a local folder  # doctest: +SKIP
>>> apply_apl(pipe, "apl-prefix")                 # prefix on the positive prompt only (the paper)  # doctest: +SKIP
>>> image = pipe("a photo of Ann Lee", num_inference_steps=20, guidance_scale=7).images[0]  # doctest: +SKIP
>>> remove_apl(pipe)                              # the untouched pipeline again  # doctest: +SKIP
```
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from .errors import APLAdapterError
from .families import PipelineFamily, family_of
from .hub import looks_like_repo_id
from .tuners.apl.config import APLConfig
from .tuners.apl.model import has_apl_layers, strip_apl_layers
from .tuners.apl.prefix import text_encoder_type_of
from .tuners.apl.serialization import CONFIG_NAME, check_adapter_folder

_STATE = "_apl_state"
AdapterLike = str | os.PathLike | PeftModel
T = TypeVar("T")


def apply_apl(
    pipe,
    adapter: AdapterLike | Mapping[str, AdapterLike] | None = None,
    adapter_2: AdapterLike | None = None,
    adapter_3: AdapterLike | None = None,
    *,
    apply_to_negative_prompt: bool | None = None,
    use_prefix_cache: bool | None = None,
):
    """Apply APL prefixes to ``pipe``'s text encoder(s), in place, and return ``pipe``.

    Args:
        pipe: a diffusers Stable Diffusion 1.x / 2.x / XL, SD3 / 3.5 or FLUX.1 pipeline.
        adapter: a saved adapter folder, or a ``PeftModel`` holding an APL adapter, for ``pipe.text_encoder``;
            or a mapping from encoder attribute (``"text_encoder"``, ``"text_encoder_2"``, ``"text_encoder_3"``)
            to such an adapter; or a folder holding one adapter subfolder per encoder, named like the attributes.
        adapter_2: the adapter for ``text_encoder_2`` (SDXL's and SD3's second CLIP, FLUX's T5).
        adapter_3: the adapter for ``text_encoder_3`` (SD3's T5).
        apply_to_negative_prompt: also prefix the negative / unconditional prompt. Default: the
            adapter configs' ``apply_to_negative_prompt`` (False, as the paper). FLUX has no negative branch in
            ``encode_prompt``: its only branch is prefixed (docs/sd3_flux.md).
        use_prefix_cache: encode prefixed prompts of CLIP encoders with
            :class:`~apl_adapter.tuners.apl.prefix_cache.CachedPrefixEncoder` (BOS + prefix keys/values computed
            once per prefix, the fused ``torch.ops.apl.prefix_attention`` kernel for the prompt positions). Same
            outputs as the full encoder within 1e-5 (fp32). Default (None): while the pipeline executes on the CPU
            (judged per call), the cache is faster there; on a GPU the full encoder measured faster (docs/kernels.md).
            True / False: always / never. T5 encoders always run in full (they attend both ways, so the prefix's
            states depend on the prompt).
    """
    if getattr(pipe, _STATE, None) is not None:
        raise APLAdapterError("This pipeline already has an APL prefix; call remove_apl(pipe) first.")
    family = family_of(pipe)
    pairs = list(_adapter_sources(family, adapter, adapter_2, adapter_3).items())
    if not pairs:
        raise APLAdapterError(
            "No adapter given: pass a saved adapter folder or a PeftModel (adapter, adapter_2, adapter_3), a "
            "mapping {encoder attribute: adapter}, or a folder with one subfolder per encoder "
            f"({', '.join(family.encoders)})."
        )
    for attr, _ in pairs:
        if attr not in family.encoders or getattr(pipe, attr, None) is None:
            raise APLAdapterError(
                f"{type(pipe).__name__} has no {attr} to apply the adapter to; a {family.title} pipeline's text "
                f"encoders are {', '.join(a for a in family.encoders if getattr(pipe, a, None) is not None)}."
            )
    # encoders the caller had already wrapped (a PeftModel built on pipe.text_encoder) keep their layers on failure
    untouched = [attr for attr, _ in pairs if not has_apl_layers(getattr(pipe, attr))]
    models: dict[str, PeftModel] = {}
    try:  # all or nothing: a failure leaves the pipeline's encoders exactly as they were
        for attr, source in pairs:
            models[attr] = _attach(getattr(pipe, attr), source, f"{type(pipe).__name__}.{attr}")
        cached = {}
        if use_prefix_cache is not False:
            from .tuners.apl.prefix_cache import CachedPrefixEncoder

            cached = {
                attr: CachedPrefixEncoder.from_adapter(model)
                for attr, model in models.items()
                if text_encoder_type_of(model.get_base_model()) == "clip"  # causal: the prefix's states are fixed
            }
    except BaseException:
        for attr in untouched:
            strip_apl_layers(getattr(pipe, attr))
        raise
    if apply_to_negative_prompt is None:
        apply_to_negative_prompt = any(m.peft_config["default"].apply_to_negative_prompt for m in models.values())
    original = pipe.encode_prompt
    patched = {"encode_prompt": _with_encoders(pipe, original, cached, only_on_cpu=use_prefix_cache is None)}
    if not apply_to_negative_prompt and family.negative_in_encode_prompt:
        patched["encode_prompt"] = _positive_prompt_only(patched["encode_prompt"], original, models, family)
    elif not apply_to_negative_prompt and hasattr(pipe, "check_inputs"):
        # FLUX's true-CFG negative prompt goes through the same encode_prompt as the positive one: it would be
        # prefixed too, so refuse it rather than prefix it silently.
        patched["check_inputs"] = _refuse_negative_prompt(pipe, pipe.check_inputs)
    pipe.__dict__.update(patched)
    setattr(pipe, _STATE, {"models": models, "cached": cached, "encode_prompt": original, "patched": list(patched)})
    return pipe


def _adapter_sources(
    family: PipelineFamily,
    adapter: AdapterLike | Mapping[str, AdapterLike] | None,
    adapter_2: AdapterLike | None,
    adapter_3: AdapterLike | None,
) -> dict[str, AdapterLike]:
    """``{encoder attribute: adapter}`` from apply_apl's three ways of naming them."""
    if isinstance(adapter, Mapping):
        sources = dict(adapter)
    elif adapter is not None and _is_per_encoder_folder(adapter):
        folder = Path(adapter)
        sources = {attr: folder / attr for attr in family.encoders if (folder / attr / CONFIG_NAME).is_file()}
    else:
        sources = {"text_encoder": adapter} if adapter is not None else {}
    for attr, source in (("text_encoder_2", adapter_2), ("text_encoder_3", adapter_3)):
        if source is None:
            continue
        if attr in sources:
            raise APLAdapterError(f"Two adapters given for {attr} (in adapter and as the argument); pass one.")
        sources[attr] = source
    unknown = [attr for attr in sources if attr not in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    if unknown:
        raise APLAdapterError(
            f"Unknown encoder name(s) {unknown} in the adapter mapping; use the pipeline's attributes "
            f"({', '.join(family.encoders)})."
        )
    return {attr: source for attr, source in sources.items() if source is not None}


def _is_per_encoder_folder(adapter: object) -> bool:
    """A local folder with no adapter of its own but ``text_encoder*/adapter_config.json`` subfolders."""
    if not isinstance(adapter, (str, os.PathLike)):
        return False
    folder = Path(adapter).expanduser()
    if not folder.is_dir() or (folder / CONFIG_NAME).is_file():
        return False
    return any((folder / attr / CONFIG_NAME).is_file() for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"))


def load_apl(
    pipe,
    pretrained_model_name_or_path: str | os.PathLike | PeftModel | None = None,
    *,
    subfolder: str | None = None,
    adapter_2: str | os.PathLike | PeftModel | None = None,
    adapter_3: str | os.PathLike | PeftModel | None = None,
    **kwargs,
):
    """Load an APL prefix into ``pipe``, the way ``pipe.load_lora_weights`` loads a LoRA; returns ``pipe``.

    ``pretrained_model_name_or_path`` is a local adapter folder, a ``PeftModel``, or a Hugging Face Hub repo id
    (``"org/name"``: only the adapter's two files are fetched, into the Hub cache; offline, a clear error says
    what to download). ``subfolder`` picks a folder inside it; a folder with one subfolder per encoder
    (``text_encoder/``, ``text_encoder_3/`` ...) applies each to its encoder. Other keyword arguments go to
    :func:`apply_apl`.

    Example:

    ```python
    >>> from apl_adapter.pipelines import load_apl, unload_apl
    >>> from apl_adapter.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> load_apl(pipe, "org/apl-prefix")        # a Hub id, or a local folder  # doctest: +SKIP
    >>> unload_apl(pipe)                          # doctest: +SKIP

    ```
    """
    first = pretrained_model_name_or_path
    source = resolve_adapter(first, subfolder) if first is not None else None
    second = resolve_adapter(adapter_2, subfolder) if adapter_2 is not None else None
    third = resolve_adapter(adapter_3, subfolder) if adapter_3 is not None else None
    return apply_apl(pipe, source, second, third, **kwargs)


def unload_apl(pipe):
    """Take the prefix out again (``pipe.unload_lora_weights`` for APL): the same as :func:`remove_apl`."""
    return remove_apl(pipe)


def resolve_adapter(source: str | os.PathLike | PeftModel, subfolder: str | None = None):
    """A ``PeftModel`` or local folder as is; a Hub repo id -> the local snapshot of its adapter files."""
    if isinstance(source, PeftModel):
        return source
    local = Path(source).expanduser() / (subfolder or "")
    if local.is_dir() or not looks_like_repo_id(str(source)) or Path(str(source)).exists():
        return local
    from huggingface_hub import snapshot_download

    inside = f"{subfolder.strip('/')}/" if subfolder else ""
    # the adapter's two files, at the top or in per-encoder subfolders (text_encoder/, text_encoder_3/ ...)
    patterns = [f"{inside}{deeper}{name}" for deeper in ("", "text_encoder*/")
                for name in ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
    try:
        root = snapshot_download(str(source), allow_patterns=patterns)
    except Exception as err:  # offline mode, no such repo, no network: all mean "not available here"
        raise APLAdapterError(
            f"{source} is not a local folder, and the Hugging Face Hub could not provide it ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Pass a local adapter folder, or download it where the network "
            f"allows (huggingface-cli download {source}) and pass that folder."
        ) from err
    return Path(root) / (subfolder or "")


def remove_apl(pipe):
    """Remove the prefix: the text encoders and ``encode_prompt`` are the untouched originals again."""
    state = getattr(pipe, _STATE, None)
    if state is None:
        raise APLAdapterError("This pipeline has no APL prefix to remove.")
    for name in state.get("patched", ("encode_prompt",)):
        pipe.__dict__.pop(name, None)
    for model in state["models"].values():
        model.unload()
    setattr(pipe, _STATE, None)
    return pipe


def with_and_without_apl(
    pipe, adapter: AdapterLike, draw: Callable[[bool], T], adapter_2: AdapterLike | None = None
) -> tuple[T, T]:
    """``(draw(False), draw(True))``: ``draw`` run on ``pipe`` as it is, then with the APL prefix applied.

    The paired images of apl-bench and apl-eval: ``draw`` makes the same prompts from the same seeds both times (its
    argument says whether the prefix is on, e.g. for a progress label or a folder), so a difference is the prefix's.
    ``pipe`` is left without the prefix, also when ``draw`` raises.
    """
    plain = draw(False)  # first, so the plain images come from the pipeline untouched by any apply/remove
    apply_apl(pipe, adapter, adapter_2)
    try:
        prefixed = draw(True)
    finally:
        remove_apl(pipe)
    return plain, prefixed


def apl_cached_encoders(pipe) -> dict:
    """The :class:`~apl_adapter.tuners.apl.prefix_cache.CachedPrefixEncoder` stand-ins ``apply_apl`` built (empty
    when the cache is off); with the default ``use_prefix_cache=None`` they run only while the pipeline executes on
    the CPU."""
    state = getattr(pipe, _STATE, None)
    return dict(state["cached"]) if state else {}


def apl_models(pipe) -> dict[str, PeftModel]:
    """The ``PeftModel`` wrappers installed by :func:`apply_apl` (empty if none)."""
    state = getattr(pipe, _STATE, None)
    return dict(state["models"]) if state else {}


@contextlib.contextmanager
def apl_disabled(pipe) -> Iterator[None]:
    """Inside the block, ``pipe`` encodes without its APL prefixes (its original ``encode_prompt``, every adapter
    disabled); they are back after it. For what the prefixed pipeline refuses, e.g. FLUX's true-CFG negative
    prompt, encoded plainly and passed as ``negative_prompt_embeds``.

    Example:

    ```python
    >>> with apl_disabled(pipe):  # doctest: +SKIP
    ...     negative, negative_pooled, _ = pipe.encode_prompt("blurry", prompt_2=None)
    >>> image = pipe("a photo of Ann Lee", negative_prompt_embeds=negative,  # doctest: +SKIP
    ...              negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=4.0).images[0]
    ```
    """
    state = getattr(pipe, _STATE, None)
    if state is None:
        yield
        return
    patched = {name: pipe.__dict__.pop(name) for name in state["patched"] if name in pipe.__dict__}
    try:
        with _adapters_disabled(list(state["models"].values())):
            yield
    finally:
        pipe.__dict__.update(patched)


def _attach(encoder, source: AdapterLike, where: str = "the text encoder") -> PeftModel:
    text_encoder_type_of(encoder)  # a clear error for anything that is neither a CLIP nor a T5 text encoder
    if isinstance(source, PeftModel):
        if source.get_base_model() is encoder:
            return source
        config = source.peft_config[source.active_adapter]
        if not isinstance(config, APLConfig):
            raise APLAdapterError(f"The PeftModel holds a {type(config).__name__} adapter, not APL.")
        model = get_peft_model(encoder, APLConfig(**{**config.to_dict(), "peft_type": None}))
        set_peft_model_state_dict(model, get_peft_model_state_dict(source))
        model.eval()
        return model
    if isinstance(source, (str, os.PathLike)):
        source = resolve_adapter(source)  # a Hub repo id becomes its local snapshot
        check_adapter_folder(source)  # refuses other PEFT types (a LoRA folder) before anything is injected
        try:
            model = PeftModel.from_pretrained(encoder, str(source))
        except APLAdapterError as err:
            raise APLAdapterError(f"{source} does not fit {where}: {err}") from err
        model.eval()
        return model
    raise APLAdapterError(f"adapter must be a folder path or a PeftModel, got {type(source).__name__}")


@contextlib.contextmanager
def _adapters_disabled(models: list[PeftModel]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(model.disable_adapter())
        yield


def prefix_cache_pays_off(device: torch.device) -> bool:
    """Whether the prefix K/V cache beats the full prefixed encoder on ``device`` by default.

    Measured (``benchmarks/bench_prefix_attention.py``, SD 1.5 encoder config): on the CPU the cache takes 0.90-0.96x
    the full encoder's time; on an H100 it took 1.04-1.57x (batch 64 to 1) - there the encoder is bound by kernel
    launches, and the cache path launches more, smaller kernels.
    """
    return device.type == "cpu"


def _with_encoders(pipe, encode_prompt: Callable, encoders: dict, only_on_cpu: bool = False) -> Callable:
    """``encode_prompt`` with ``pipe.<attr>`` temporarily replaced by ``encoders[attr]``.

    Swapped in the instance ``__dict__`` (not through the pipeline's ``__setattr__``) so the
    pipeline's registered config - what ``save_pretrained`` writes - never sees the stand-in.
    With ``only_on_cpu`` the encoders are swapped in only while the pipeline executes where the cache pays off
    (judged per call: the pipeline may be moved after ``apply_apl``). The execution device, not the weights'
    device, decides: under ``enable_model_cpu_offload`` weights wait on the CPU while the encoder runs on the GPU.
    """
    if not encoders:
        return encode_prompt

    @functools.wraps(encode_prompt)
    def wrapper(*args, **kwargs):
        # diffusers' _execution_device knows about offload hooks
        swap = encoders if not only_on_cpu or prefix_cache_pays_off(pipe._execution_device) else {}
        originals = {attr: pipe.__dict__[attr] for attr in swap}
        pipe.__dict__.update(swap)
        try:
            return encode_prompt(*args, **kwargs)
        finally:
            pipe.__dict__.update(originals)

    return wrapper


def _positive_prompt_only(
    encode_positive: Callable, encode_plain: Callable, models: dict[str, PeftModel], family: PipelineFamily
) -> Callable:
    """Wrap ``encode_prompt`` so the prefix reaches the positive prompt and not the negative one.

    Call 1 (adapter on) encodes the positive prompt only. Call 2 (adapter off) receives it as ``prompt_embeds`` -
    so it is not encoded again - and does the rest exactly as diffusers does: the negative prompt, dtype and
    device, and (SD / SDXL, which repeat given embeddings) the repetition per image; SD3 takes given embeddings as
    already repeated, so its positive call makes every image's row itself.
    """
    signature = inspect.signature(encode_plain)

    @functools.wraps(encode_plain)
    def wrapper(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        call = dict(arguments.arguments)
        per_image = 1 if family.repeats_given_embeds else call["num_images_per_prompt"]
        positive = encode_positive(**{**call, "do_classifier_free_guidance": False, "num_images_per_prompt": per_image})
        call["prompt_embeds"] = positive[0]
        if "pooled_prompt_embeds" in call:  # SDXL and SD3 also pool the positive prompt
            call["pooled_prompt_embeds"] = positive[2]
        with _adapters_disabled(list(models.values())):
            return encode_plain(**call)

    return wrapper


def _refuse_negative_prompt(pipe, check_inputs: Callable) -> Callable:
    """FLUX's ``check_inputs`` that refuses a negative prompt: its true-CFG branch would run through the prefixed
    ``encode_prompt`` (diffusers encodes it with the same call as the positive prompt)."""
    signature = inspect.signature(check_inputs)

    @functools.wraps(check_inputs)
    def wrapper(*args, **kwargs):
        call = signature.bind_partial(*args, **kwargs).arguments
        given = [name for name in ("negative_prompt", "negative_prompt_2") if call.get(name) is not None]
        if given:
            raise APLAdapterError(
                f"{type(pipe).__name__} with an APL prefix got {' and '.join(given)}: its true-CFG negative prompt "
                "goes through the same encode_prompt as the prompt, so it would be prefixed too. Encode it without "
                "the prefix and pass the embeddings: `with apl_disabled(pipe): neg, neg_pooled, _ = "
                "pipe.encode_prompt(negative_prompt, prompt_2=None)`, then pipe(..., negative_prompt_embeds=neg, "
                "negative_pooled_prompt_embeds=neg_pooled); or apply the prefix with apply_to_negative_prompt=True."
            )
        return check_inputs(*args, **kwargs)

    return wrapper
