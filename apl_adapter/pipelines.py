"""diffusers integration: one call to put an APL prefix into a pipeline, one to take it out.

Works for any pipeline whose ``encode_prompt`` follows diffusers' Stable Diffusion signature:
``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionXLPipeline``
(and their img2img/inpaint siblings). ``pipe(prompt).images`` and ``prompt_embeds`` passthrough
keep working unchanged.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from .errors import APLAdapterError
from .hub import looks_like_repo_id
from .tuners.apl.config import APLConfig
from .tuners.apl.model import has_apl_layers, strip_apl_layers
from .tuners.apl.prefix import clip_text_model_of
from .tuners.apl.serialization import check_adapter_folder

_STATE = "_apl_state"
AdapterLike = str | os.PathLike | PeftModel
T = TypeVar("T")


def apply_apl(
    pipe,
    adapter: AdapterLike,
    adapter_2: AdapterLike | None = None,
    *,
    apply_to_negative_prompt: bool | None = None,
    use_prefix_cache: bool = True,
):
    """Apply an APL prefix to ``pipe``'s text encoder(s), in place, and return ``pipe``.

    Args:
        pipe: a diffusers Stable Diffusion (1.x/2.x/XL) pipeline.
        adapter: a saved adapter folder, or a ``PeftModel`` holding an APL adapter, for
            ``pipe.text_encoder``.
        adapter_2: the same for SDXL's ``text_encoder_2`` (optional; a prefix has one width, and
            SDXL's second encoder is wider).
        apply_to_negative_prompt: also prefix the negative / unconditional prompt. Default: the
            adapter config's ``apply_to_negative_prompt`` (False, as the paper).
        use_prefix_cache: encode prefixed prompts with :class:`~apl_adapter.tuners.apl.prefix_cache.CachedPrefixEncoder`
            (BOS + prefix keys/values computed once per prefix, the fused ``torch.ops.apl.prefix_attention``
            kernel for the prompt positions). Same outputs as the full encoder within 1e-5 (fp32); turn off
            to run the full prefixed encoder.
    """
    if getattr(pipe, _STATE, None) is not None:
        raise APLAdapterError("This pipeline already has an APL prefix; call remove_apl(pipe) first.")
    if not hasattr(pipe, "encode_prompt"):
        raise APLAdapterError(f"{type(pipe).__name__} has no encode_prompt(); APL supports Stable Diffusion pipelines.")
    pairs = [(attr, source) for attr, source in (("text_encoder", adapter), ("text_encoder_2", adapter_2)) if source]
    if not pairs:
        raise APLAdapterError("No adapter given: pass a saved adapter folder or a PeftModel.")
    for attr, _ in pairs:
        if getattr(pipe, attr, None) is None:
            raise APLAdapterError(f"{type(pipe).__name__} has no {attr} to apply the adapter to.")
    # encoders the caller had already wrapped (a PeftModel built on pipe.text_encoder) keep their layers on failure
    untouched = [attr for attr, _ in pairs if not has_apl_layers(getattr(pipe, attr))]
    models: dict[str, PeftModel] = {}
    try:  # all or nothing: a failure leaves the pipeline's encoders exactly as they were
        for attr, source in pairs:
            models[attr] = _attach(getattr(pipe, attr), source)
        cached = {}
        if use_prefix_cache:
            from .tuners.apl.prefix_cache import CachedPrefixEncoder

            cached = {attr: CachedPrefixEncoder.from_adapter(model) for attr, model in models.items()}
    except BaseException:
        for attr in untouched:
            strip_apl_layers(getattr(pipe, attr))
        raise
    if apply_to_negative_prompt is None:
        apply_to_negative_prompt = any(m.peft_config["default"].apply_to_negative_prompt for m in models.values())
    original = pipe.encode_prompt
    if apply_to_negative_prompt:
        pipe.encode_prompt = _with_encoders(pipe, original, cached)
    else:
        pipe.encode_prompt = _positive_prompt_only(_with_encoders(pipe, original, cached), original, models)
    setattr(pipe, _STATE, {"models": models, "cached": cached, "encode_prompt": original})
    return pipe


def load_apl(
    pipe,
    pretrained_model_name_or_path: str | os.PathLike | PeftModel,
    *,
    subfolder: str | None = None,
    adapter_2: str | os.PathLike | PeftModel | None = None,
    **kwargs,
):
    """Load an APL prefix into ``pipe``, the way ``pipe.load_lora_weights`` loads a LoRA; returns ``pipe``.

    ``pretrained_model_name_or_path`` is a local adapter folder, a ``PeftModel``, or a Hugging Face Hub repo id
    (``"org/name"``: only the adapter's two files are fetched, into the Hub cache; offline, a clear error says
    what to download). ``subfolder`` picks a folder inside it. Other keyword arguments go to :func:`apply_apl`.

    Example:

    ```python
    >>> from apl_adapter.pipelines import load_apl, unload_apl
    >>> from apl_adapter.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> load_apl(pipe, "org/apl-prefix")        # a Hub id, or a local folder  # doctest: +SKIP
    >>> unload_apl(pipe)                          # doctest: +SKIP

    ```
    """
    source = resolve_adapter(pretrained_model_name_or_path, subfolder)
    second = resolve_adapter(adapter_2, subfolder) if adapter_2 is not None else None
    return apply_apl(pipe, source, second, **kwargs)


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
    try:
        root = snapshot_download(str(source), allow_patterns=[f"{inside}adapter_config.json",
                                                              f"{inside}adapter_model.safetensors"])  # fmt: skip
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
    pipe.__dict__.pop("encode_prompt", None)
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
    """The :class:`~apl_adapter.tuners.apl.prefix_cache.CachedPrefixEncoder` stand-ins in use (empty when the cache
    is off)."""
    state = getattr(pipe, _STATE, None)
    return dict(state["cached"]) if state else {}


def apl_models(pipe) -> dict[str, PeftModel]:
    """The ``PeftModel`` wrappers installed by :func:`apply_apl` (empty if none)."""
    state = getattr(pipe, _STATE, None)
    return dict(state["models"]) if state else {}


def _attach(encoder, source: AdapterLike) -> PeftModel:
    clip_text_model_of(encoder)  # a clear error for anything that is not a CLIP text encoder
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
        model = PeftModel.from_pretrained(encoder, str(source))
        model.eval()
        return model
    raise APLAdapterError(f"adapter must be a folder path or a PeftModel, got {type(source).__name__}")


@contextlib.contextmanager
def _adapters_disabled(models: list[PeftModel]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(model.disable_adapter())
        yield


def _with_encoders(pipe, encode_prompt: Callable, encoders: dict) -> Callable:
    """``encode_prompt`` with ``pipe.<attr>`` temporarily replaced by ``encoders[attr]``.

    Swapped in the instance ``__dict__`` (not through the pipeline's ``__setattr__``) so the
    pipeline's registered config - what ``save_pretrained`` writes - never sees the stand-in.
    """
    if not encoders:
        return encode_prompt

    @functools.wraps(encode_prompt)
    def wrapper(*args, **kwargs):
        originals = {attr: pipe.__dict__[attr] for attr in encoders}
        pipe.__dict__.update(encoders)
        try:
            return encode_prompt(*args, **kwargs)
        finally:
            pipe.__dict__.update(originals)

    return wrapper


def _positive_prompt_only(encode_positive: Callable, encode_plain: Callable, models: dict[str, PeftModel]) -> Callable:
    """Wrap ``encode_prompt`` so the prefix reaches the positive prompt and not the negative one.

    Call 1 (adapter on) encodes the positive prompt only, once per prompt. Call 2 (adapter off)
    receives it as ``prompt_embeds`` - so it is not encoded again - and does the rest exactly as
    diffusers does: the negative prompt, repetition per image, dtype and device.
    """
    signature = inspect.signature(encode_plain)

    @functools.wraps(encode_plain)
    def wrapper(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        call = dict(arguments.arguments)
        positive = encode_positive(**{**call, "do_classifier_free_guidance": False, "num_images_per_prompt": 1})
        call["prompt_embeds"] = positive[0]
        if "pooled_prompt_embeds" in call:  # SDXL also pools the positive prompt
            call["pooled_prompt_embeds"] = positive[2]
        with _adapters_disabled(list(models.values())):
            return encode_plain(**call)

    return wrapper
