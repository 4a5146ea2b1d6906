"""The APL tuner: installs an APL prefix into a CLIP or T5 text encoder, as PEFT's tuners do.

:class:`APLModel` wraps the text encoder's embeddings (and, for a deep prefix, every layer's ``k_proj`` /
``v_proj``) with the layers of :mod:`apl_adapter.tuners.apl.layer`, and puts a forward pre-hook on the
``CLIPTextModel`` that rewrites ``input_ids`` / ``attention_mask``
(:func:`~apl_adapter.tuners.apl.prefix.insert_prefix_ids`), so everything downstream sees consistent positions.
Pooling finds EOS in the *prefixed* ids, so ``pooler_output`` / ``text_embeds`` are taken at the shifted EOS.

A deep prefix (``APLConfig(prefix_depth="deep")``, prefix-tuning / P-tuning v2 style) starts from the keys and
values the shallow prefix itself produces (:func:`~apl_adapter.tuners.apl.prefixed_encoder.prefix_layer_kv`), so a
deep adapter's first forward equals the shallow one's; training then moves each layer's rows freely.

A T5 encoder (SD3's ``text_encoder_3``, FLUX's ``text_encoder_2``) gets an :class:`~.layer.APLT5Embedding` on
``encoder.embed_tokens`` and the same kind of pre-hook on its encoder stack, which shifts ids and mask for the
T5 layout (:func:`~apl_adapter.tuners.apl.prefix.insert_t5_prefix_ids`: prefix at ``0..m-1``, the window's length
kept). T5 takes shallow prefixes only.

Because the change is made in place (as LoRA does), a diffusers pipeline holding the text encoder applies the
prefix without any change to the pipeline.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import CLIPTextModel, T5Config, T5EncoderModel
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
from transformers.models.t5.modeling_t5 import T5Stack

from ...errors import APLAdapterError
from ...tokenizer import load_clip_tokenizer
from .config import T5_DEEP_UNSUPPORTED, T5_HIDDEN_ROWS_UNSUPPORTED, APLConfig, apl_target_modules
from .constants import max_virtual_tokens
from .layer import APLEmbedding, APLPrefixProjection, APLT5Embedding
from .prefix import (
    PrefixWeights,
    base_model_of,
    clip_eos_token_id,
    clip_text_model_of,
    hide_prefix_rows,
    insert_prefix_ids,
    insert_prefix_mask,
    insert_t5_prefix_ids,
    insert_t5_prefix_mask,
    prefix_embedding_name,
    prefix_host_of,
    t5_eos_token_id,
    t5_eos_was_cut,
    text_encoder_type_of,
    warn_if_prompt_truncated,
    warn_if_t5_prompt_truncated,
)
from .prefixed_encoder import prefix_layer_kv

# ----------------------------------------------------------------------------------------------
# The starting weights of a new adapter
# ----------------------------------------------------------------------------------------------


def initial_weights(config: APLConfig, token_embedding: torch.Tensor, text_model: nn.Module) -> PrefixWeights:
    """The tensors a new adapter starts from, in float32 on the embedding's device.

    The prefix follows ``config.prefix_init``; a deep prefix's keys and values are what that prefix itself gives at
    every layer (so its first forward equals the shallow one's).
    """
    if config.weights_follow:  # a saved adapter: its tensors overwrite these at once
        prefix = torch.zeros(config.num_virtual_tokens, token_embedding.shape[1], device=token_embedding.device)
    else:
        prefix = initial_prefix(config, token_embedding)
    hide_rows = config.hide_prefix_rows
    if config.prefix_depth != "deep":
        return PrefixWeights(prefix, hide_rows=hide_rows)
    keys, values = prefix_layer_kv(text_model, prefix)
    device = token_embedding.device
    return PrefixWeights(prefix, keys.to(device), values.to(device), hide_rows=hide_rows)


def initial_prefix(config: APLConfig, token_embedding: torch.Tensor) -> torch.Tensor:
    """The starting prefix ``(m, D)`` for ``config.prefix_init``, in float32 on the embedding's device."""
    m, width = config.num_virtual_tokens, token_embedding.shape[1]
    generator = torch.Generator().manual_seed(config.init_seed)
    if config.prefix_init == "random_uniform":  # U[0, 1), as the authors' code
        prefix = torch.rand(m, width, generator=generator)
    elif config.prefix_init == "vocab":
        rows = torch.randint(0, token_embedding.shape[0], (m,), generator=generator)
        prefix = token_embedding.detach().float().cpu()[rows]
    else:
        ids = _init_text_ids(config)
        reps = -(-m // len(ids))
        prefix = token_embedding.detach().float().cpu()[torch.tensor((ids * reps)[:m])]
    return prefix.to(device=token_embedding.device, dtype=torch.float32).clone()


def _init_text_ids(config: APLConfig) -> list[int]:
    if config.text_encoder_type == "t5":
        if not config.tokenizer_name_or_path:
            raise APLAdapterError(
                "prefix_init='text' for a T5 encoder needs tokenizer_name_or_path: a local T5 tokenizer folder (the "
                "pipeline's tokenizer_3 for SD3, tokenizer_2 for FLUX); the built-in tokenizer is CLIP's."
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    elif config.tokenizer_name_or_path:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(config.tokenizer_name_or_path)
    else:
        tokenizer = load_clip_tokenizer()
    ids: list[int] = tokenizer(config.prefix_init_text, add_special_tokens=False).input_ids
    if not ids:
        raise APLAdapterError(f"prefix_init_text {config.prefix_init_text!r} gives no tokens; use a real phrase")
    return ids


# ----------------------------------------------------------------------------------------------
# The pre-hooks that shift ids and mask on the CLIPTextModel / the T5 encoder stack
# ----------------------------------------------------------------------------------------------


#: where the text model keeps the handles of the two hooks (in its __dict__: they are not submodules)
_HOOKS = "_apl_hook_handle"


def _as_keywords(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A forward's leading positional arguments moved to their keyword ``names``, so a hook can rewrite them."""
    kwargs = dict(kwargs)
    for name, value in zip(names, args):
        kwargs[name] = value
    return tuple(args[len(names) :]), kwargs


def _prefix_inputs_hook(
    text_model: CLIPTextModel, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    layer = text_model.embeddings
    if not isinstance(layer, APLEmbedding):
        return None
    weights = layer.active_prefix_weights
    # The prefix of this forward only (cleared by _end_prefix_scope): a deep prefix's rows reach the layers'
    # projections, and the end hook reads whether to hide its rows without building the weights again.
    layer._forward_scope = weights
    if weights is None:
        return None
    prefix = weights.embeds
    args, kwargs = _as_keywords(args, kwargs, ("input_ids", "attention_mask", "position_ids"))
    if kwargs.get("position_ids") is not None:
        raise APLAdapterError("position_ids cannot be combined with an APL prefix (positions shift by m); omit them")
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        return None  # the model raises its own "You have to specify input_ids"
    m = prefix.shape[0]
    max_positions = text_model.config.max_position_embeddings
    eos = clip_eos_token_id(text_model.config)
    shifted = insert_prefix_ids(input_ids.view(-1, input_ids.shape[-1]), m, eos, max_positions=max_positions)
    warn_if_prompt_truncated(input_ids, m, eos, max_positions)
    kwargs["input_ids"] = shifted
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = insert_prefix_mask(kwargs["attention_mask"], m, max_positions)
    return tuple(args), kwargs


def _prefix_t5_inputs_hook(
    stack: T5Stack, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Pre-hook on ``T5EncoderModel.encoder``: ids and mask to the T5 layout, before ``embed_tokens`` runs."""
    layer = stack.embed_tokens
    if not isinstance(layer, APLT5Embedding):
        return None
    prefix = layer.active_prefix
    if prefix is None:
        return None
    args, kwargs = _as_keywords(args, kwargs, ("input_ids", "attention_mask"))
    if kwargs.get("inputs_embeds") is not None:
        raise APLAdapterError(
            "inputs_embeds cannot be combined with an APL prefix on a T5 encoder (the prefix goes in by id position); "
            "pass input_ids, or call disable_adapter() to run without the prefix"
        )
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        return None  # the model raises its own "You must specify exactly one of input_ids or inputs_embeds"
    m = prefix.shape[0]
    config: T5Config = stack.config
    eos = t5_eos_token_id(config)
    ids = input_ids.view(-1, input_ids.shape[-1])
    kwargs["input_ids"] = insert_t5_prefix_ids(ids, m, eos, placeholder_id=int(config.pad_token_id or 0))
    cut = t5_eos_was_cut(ids, m, eos)  # after the layout, which refuses a window with no room at all
    warn_if_t5_prompt_truncated(cut, m, ids.shape[-1])
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = insert_t5_prefix_mask(kwargs["attention_mask"], m, cut)
    return tuple(args), kwargs


def _end_prefix_scope(text_model: CLIPTextModel, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook (run even when the forward raises): the deep rows act inside the prefixed forward only; an
    adapter with ``hide_prefix_rows`` has the prefix's rows dropped from the states it returns (the pooled output,
    read at EOS, stays)."""
    layer = text_model.embeddings
    if not isinstance(layer, APLEmbedding):
        return None
    weights, layer._forward_scope = layer._forward_scope, None
    if output is None or weights is None or not weights.hide_rows:  # output None: the forward raised
        return None
    m = weights.num_virtual_tokens
    if isinstance(output, tuple):  # return_dict=False: (last_hidden_state, pooler_output, [hidden_states], [attn])
        rest = [_hidden_rows_of(item, m) if _are_hidden_states(item) else item for item in output[2:]]
        return (hide_prefix_rows(output[0], m), output[1], *rest)
    output.last_hidden_state = hide_prefix_rows(output.last_hidden_state, m)
    if output.hidden_states is not None:
        output.hidden_states = _hidden_rows_of(output.hidden_states, m)
    return output


def _hidden_rows_of(hidden_states: tuple[torch.Tensor, ...], m: int) -> tuple[torch.Tensor, ...]:
    return tuple(hide_prefix_rows(states, m) for states in hidden_states)


def _are_hidden_states(item: Any) -> bool:
    """Per-layer ``(B, L', D)`` states, not attention maps ``(B, H, L', L')`` (a tuple output has no names)."""
    return isinstance(item, tuple) and bool(item) and all(torch.is_tensor(t) and t.dim() == 3 for t in item)


# ----------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------


def has_apl_layers(encoder: nn.Module) -> bool:
    """Whether an APL prefix is injected into this CLIP or T5 text encoder."""
    return isinstance(getattr(prefix_host_of(encoder), prefix_embedding_name(encoder)), APLEmbedding)


def prefix_embedding_of(encoder: nn.Module) -> APLEmbedding | None:
    """The :class:`~.layer.APLEmbedding` that holds this encoder's prefixes (``None`` when none is injected)."""
    layer = getattr(prefix_host_of(encoder), prefix_embedding_name(encoder))
    return layer if isinstance(layer, APLEmbedding) else None


def strip_apl_layers(encoder: nn.Module) -> bool:
    """Put back the plain CLIP modules wherever APL injected its layers, and drop its hooks.

    The rollback of a failed injection or load (PEFT leaves the layers in place when loading the weights fails).
    Returns True when anything was removed.
    """
    text_model = prefix_host_of(encoder)
    removed = False
    for name, module in list(text_model.named_modules()):
        if isinstance(module, (APLEmbedding, APLPrefixProjection)):
            parent_name, _, child = name.rpartition(".")
            setattr(text_model.get_submodule(parent_name) if parent_name else text_model, child, module.base_layer)
            removed = True
    for handle in text_model.__dict__.pop(_HOOKS, ()):
        handle.remove()
        removed = True
    return removed


def prefix_parameters(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The trainable tensors of one APL adapter, by attribute name: ``apl_prefix`` ``(m, D)`` and, for a deep
    prefix, ``apl_deep_keys`` / ``apl_deep_values`` ``(num_layers, m, D)``. Give them to the optimizer."""
    embedding = prefix_embedding_of(base_model_of(peft_model))
    if embedding is None or adapter_name not in embedding.apl_prefix:
        raise APLAdapterError(f"No APL adapter named {adapter_name!r} in this text encoder.")
    return {
        name: getattr(embedding, name)[adapter_name]
        for name in APLEmbedding.adapter_layer_names
        if adapter_name in getattr(embedding, name)
    }


def _projection_of(key: str) -> tuple[int, Literal["keys", "values"]] | None:
    """``"encoder.layers.3.self_attn.k_proj"`` -> ``(3, "keys")``; ``None`` for any other module name."""
    parts = key.split(".")
    if len(parts) < 5 or parts[-1] not in ("k_proj", "v_proj") or parts[-2] != "self_attn":
        return None
    if parts[-5:-3] != ["encoder", "layers"] or not parts[-3].isdigit():
        return None
    return int(parts[-3]), "keys" if parts[-1] == "k_proj" else "values"


def _apl_config(config: PeftConfig) -> APLConfig:
    """``config`` as the APLConfig it is: PEFT hands each tuner the config registered with it."""
    if not isinstance(config, APLConfig):
        raise APLAdapterError(f"The APL tuner got a {type(config).__name__}; it builds APL adapters only.")
    return config


class APLModel(BaseTuner):
    """PEFT tuner that installs an APL prefix into a CLIP text encoder (or a T5 encoder: shallow prefixes only).

    Built by ``peft.get_peft_model(text_encoder, APLConfig())`` after ``import apl_adapter``.

    Example:

    ```python
    >>> import torch
    >>> from peft import get_peft_model
    >>> from apl_adapter import APLConfig
    >>> from apl_adapter.testing import tiny_clip_text_model
    >>> model = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=4))
    >>> ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    >>> model(input_ids=ids).last_hidden_state.shape
    torch.Size([1, 77, 32])
    >>> with model.disable_adapter():
    ...     plain = model(input_ids=ids).last_hidden_state

    ```
    """

    prefix: str = "apl_"
    tuner_layer_cls = APLEmbedding
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - BaseTuner declares it per instance; APL maps none

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Put the saved prefix keys where this encoder keeps its prefix, then let PEFT add the adapter name.

        ``CLIPTextModel`` keeps its embeddings at ``embeddings``, ``CLIPTextModelWithProjection`` (SDXL's second
        encoder) at ``text_model.embeddings``: a prefix saved from one loads into the other when the widths match.
        A prefix key in neither layout is an error (PEFT itself would only warn and keep a random prefix).
        """
        own = next((n for n, m in model.named_modules() if isinstance(m, APLEmbedding)), None)
        if own is not None and own.endswith("embed_tokens"):  # T5: one layout
            for key in state_dict:
                path, dot, _ = key.partition(".apl_")
                if dot and path != own:
                    raise APLAdapterError(
                        f"The adapter's tensor {key!r} is not where a T5 encoder keeps its prefix "
                        f"({own.removeprefix('base_model.model.')!r}); the adapter was renamed or saved from another "
                        "kind of model. Re-save it from a T5EncoderModel."
                    )
        elif own is not None:
            root = own[: -len("embeddings")].removesuffix("text_model.")
            mapped = {}
            for key, value in state_dict.items():
                path, dot, tail = key.partition(".apl_")
                if dot and path != own:
                    if path not in (root + "embeddings", root + "text_model.embeddings"):
                        raise APLAdapterError(
                            f"The adapter's tensor {key!r} belongs to no CLIP text-encoder layout (this encoder keeps "
                            f"its prefix at {own.removeprefix('base_model.model.')!r}); the adapter was renamed or "
                            "saved from another kind of model. Re-save it from a CLIP text encoder."
                        )
                    key = f"{own}.apl_{tail}"
                mapped[key] = value
            state_dict = mapped
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict[str, Any]) -> APLConfig:
        peft_config = _apl_config(peft_config)
        peft_config.target_modules = apl_target_modules(peft_config.prefix_depth, peft_config.text_encoder_type)
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        config = _apl_config(config)
        kind = text_encoder_type_of(model)
        if config.text_encoder_type is None:
            config.text_encoder_type = kind
        elif config.text_encoder_type != kind:
            raise APLAdapterError(
                f"This APL adapter is a prefix for a {config.text_encoder_type.upper()} text encoder, but the model "
                f"is a {type(model).__name__} ({kind.upper()}); a prefix lives in its encoder's embedding space. "
                f"Load it into a {config.text_encoder_type.upper()} encoder (SD3: text_encoder / text_encoder_2 are "
                "CLIP, text_encoder_3 is T5; FLUX: text_encoder is CLIP, text_encoder_2 is T5)."
            )
        config.target_modules = apl_target_modules(config.prefix_depth, kind)
        if kind == "t5":
            self._check_t5(config, model)
            return
        text_model = clip_text_model_of(model)
        width = text_model.config.hidden_size
        if config.token_dim is None:
            config.token_dim = width
        elif config.token_dim != width:
            raise APLAdapterError(
                f"This APL adapter has token width {config.token_dim} but the text encoder has width {width}; "
                "a prefix only transfers between encoders of the same width (e.g. SD 1.x = 768, SD 2.x = 1024)."
            )
        max_positions = text_model.config.max_position_embeddings
        if config.num_virtual_tokens > max_positions - 2:
            raise APLAdapterError(
                f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for BOS and EOS in this encoder's "
                f"{max_positions} positions; use at most {max_positions - 2}."
            )

    @staticmethod
    def _check_t5(config: APLConfig, model: nn.Module) -> None:
        """What a T5 prefix must satisfy: a shallow prefix, as wide as ``d_model``, within T5's bound."""
        if config.prefix_depth == "deep":
            raise APLAdapterError(T5_DEEP_UNSUPPORTED)
        if config.hide_prefix_rows:
            raise APLAdapterError(T5_HIDDEN_ROWS_UNSUPPORTED)
        if not isinstance(model, T5EncoderModel):
            raise APLAdapterError(f"A T5 prefix goes into a T5EncoderModel, got {type(model).__name__}")
        width = int(model.config.d_model)
        if config.token_dim is None:
            config.token_dim = width
        elif config.token_dim != width:
            raise APLAdapterError(
                f"This APL adapter has token width {config.token_dim} but the T5 encoder has width {width} (d_model); "
                "a prefix only transfers between encoders of the same width (T5 v1.1 XXL of SD3 / FLUX = 4096)."
            )
        if config.num_virtual_tokens > max_virtual_tokens("t5"):
            raise APLAdapterError(
                f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for EOS in T5's 256-token window; "
                f"use at most {max_virtual_tokens('t5')}."
            )

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        if _apl_config(peft_config).text_encoder_type == "t5":
            return key == "encoder.embed_tokens"
        if key in ("embeddings", "text_model.embeddings"):
            return True
        return _apl_config(peft_config).prefix_depth == "deep" and _projection_of(key) is not None

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        peft_config = _apl_config(peft_config)
        if peft_config.text_encoder_type == "t5":
            self._create_t5_prefix(peft_config, adapter_name, target, target_name, parent)
            return
        text_model = clip_text_model_of(self.model)
        projection = _projection_of(current_key)
        if projection is not None:
            if isinstance(target, APLPrefixProjection):
                return  # already wrapped by an earlier deep adapter; the rows come from the active one
            embedding = text_model.embeddings
            if not isinstance(target, nn.Linear) or not isinstance(embedding, APLEmbedding):
                raise APLAdapterError(f"{current_key} is a {type(target).__name__}; a deep prefix wraps nn.Linear")
            wrapper = APLPrefixProjection(target, embedding, *projection)
            self._replace_module(parent, target_name, wrapper, target)
            return
        if isinstance(target, APLEmbedding):
            weights = initial_weights(peft_config, target.token_embedding.weight, text_model)
            target.update_layer(adapter_name, weights)
            return
        if not isinstance(target, CLIPTextEmbeddings):
            raise APLAdapterError(f"{current_key} is a {type(target).__name__}, not CLIPTextEmbeddings")
        weights = initial_weights(peft_config, target.token_embedding.weight, text_model)
        self._replace_module(parent, target_name, APLEmbedding(target, adapter_name, weights), target)
        if _HOOKS not in parent.__dict__:
            parent.__dict__[_HOOKS] = (
                parent.register_forward_pre_hook(_prefix_inputs_hook, with_kwargs=True),
                parent.register_forward_hook(_end_prefix_scope, with_kwargs=True, always_call=True),
            )

    def _create_t5_prefix(
        self, config: APLConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module
    ) -> None:
        """Wrap T5's ``encoder.embed_tokens`` (or add an adapter to the wrapper) and hook the encoder stack."""
        if isinstance(target, APLT5Embedding):
            target.update_layer(adapter_name, initial_weights(config, target.token_embedding.weight, self.model))
            return
        if not isinstance(target, nn.Embedding):
            raise APLAdapterError(f"encoder.embed_tokens is a {type(target).__name__}, not nn.Embedding")
        weights = initial_weights(config, target.weight, self.model)
        self._replace_module(parent, target_name, APLT5Embedding(target, adapter_name, weights), target)
        if _HOOKS not in parent.__dict__:
            parent.__dict__[_HOOKS] = (parent.register_forward_pre_hook(_prefix_t5_inputs_hook, with_kwargs=True),)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies `.weight` from the child, which CLIPTextEmbeddings lacks; nothing else is needed.
        setattr(parent, child_name, new_module)
        if isinstance(new_module, APLEmbedding):
            device = new_module.token_embedding.weight.device  # the wrapped child's
            for params in (new_module.apl_prefix, new_module.apl_deep_keys, new_module.apl_deep_values):
                params.to(device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.requires_grad = any(f".{n}." in f".{name}" for n in APLEmbedding.adapter_layer_names)

    def _check_tied_modules(self, model: nn.Module, peft_config: PeftConfig) -> None:
        # T5's embed_tokens shares its weight with `shared`; a prefix adds rows in front of the lookup and never
        # changes that weight, so there is nothing to tie (PEFT would warn that it cannot tie adapters).
        return

    def _check_merge_allowed(self) -> None:
        raise APLAdapterError(
            "An APL prefix cannot be merged into the encoder's weights (it adds positions, not weight deltas). "
            "Keep the adapter, export it with apl-export (the prefix is baked into the engine), or use unload()."
        )

    def _unload_and_optionally_merge(  # type: ignore[override]  # peft 0.21 says -> None; it returns self.model
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        host = prefix_host_of(self.model)
        for handle in host.__dict__.pop(_HOOKS, ()):
            handle.remove()
        super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)
        model: nn.Module = self.model
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.active_adapter = [name for name in self.peft_config if name != adapter_name][:1] or []
