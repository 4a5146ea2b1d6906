"""The APL prefix inside CLIP's text encoder, as a PEFT tuner.

Layout (the paper's, and the authors' code): the ``m`` prefix vectors replace the token
embeddings at positions ``1..m``, right after BOS; the prompt shifts right by ``m`` and the
sequence is cut back to the encoder's 77 positions, keeping EOS::

    input_ids        [BOS] a  photo of  Ann  Lee [EOS] [pad] ...            (B, 77)
    prefixed ids     [BOS] .  .  ...  . a  photo of Ann Lee [EOS] ...      (B, 77), "." = placeholder
    token embeddings [BOS][P1 .. Pm] a photo of Ann Lee [EOS] ...          (B, 77, D)

Position embeddings, the causal encoder, the final layer norm and pooling then run unchanged:
pooling finds EOS in the *prefixed* ids, so ``pooler_output`` / ``text_embeds`` are taken at the
shifted EOS. Two pieces do this, both installed by :class:`APLModel`:

- :class:`APLEmbedding` wraps ``CLIPTextEmbeddings`` and splices the prefix in;
- a forward pre-hook on the ``CLIPTextModel`` rewrites ``input_ids`` / ``attention_mask``
  (:func:`insert_prefix_ids`), so everything downstream sees consistent positions.

A *deep* prefix (``APLConfig(prefix_depth="deep")``, prefix-tuning / P-tuning v2 style) also
owns, for every encoder layer, the keys and values at positions ``1..m``: each layer's ``k_proj`` /
``v_proj`` is wrapped by :class:`APLPrefixProjection`, which replaces those rows of its output. They
start as the keys and values the shallow prefix itself produces (:func:`prefix_layer_kv`), so a deep
adapter's first forward equals the shallow one's; training then moves each layer's rows freely.

Because the change is made in place (as LoRA does), a diffusers pipeline holding the text
encoder applies the prefix without any change to the pipeline.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from .config import APLConfig, apl_target_modules
from .errors import APLAdapterError


class PromptTruncationWarning(UserWarning):
    """Prompt tokens were dropped to make room for the prefix within CLIP's 77 positions."""


# ----------------------------------------------------------------------------------------------
# Pure tensor functions (also used by the exporter and the prefix K/V cache)
# ----------------------------------------------------------------------------------------------


def clip_eos_token_id(config) -> int:
    """The EOS id pooling looks for. Configs older than transformers PR #24773 say ``eos_token_id=2``;
    CLIP's real EOS is then the highest id (``vocab_size - 1``), which is what those configs pool on."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None or eos == 2:
        return int(config.vocab_size) - 1
    return int(eos)


def prefixed_length(seq_len: int, num_virtual_tokens: int, max_positions: int = 77) -> int:
    """Sequence length after inserting ``num_virtual_tokens`` after BOS, capped at ``max_positions``."""
    return min(seq_len + num_virtual_tokens, max_positions)


def insert_prefix_ids(
    input_ids: torch.Tensor,
    num_virtual_tokens: int,
    eos_token_id: int,
    placeholder_id: int = 0,
    max_positions: int = 77,
) -> torch.Tensor:
    """Make room for the prefix: ``[BOS] + m placeholders + prompt``, cut to ``max_positions``.

    If the cut removed EOS, the last position becomes EOS (the prompt is truncated, EOS kept).
    Traceable (no data-dependent Python control flow), so exported graphs use it too.

    Args:
        input_ids: ``(B, L)`` token ids starting with BOS.
        num_virtual_tokens: ``m``.
        eos_token_id: id pooling looks for (see :func:`clip_eos_token_id`).
        placeholder_id: id written at the prefix positions; must not be EOS (0 = ``"!"``).

    Returns:
        ``(B, min(L + m, max_positions))`` ids.
    """
    batch, seq_len = input_ids.shape
    out_len = prefixed_length(seq_len, num_virtual_tokens, max_positions)
    kept = out_len - 1 - num_virtual_tokens
    placeholders = torch.full(
        (batch, num_virtual_tokens), placeholder_id, dtype=input_ids.dtype, device=input_ids.device
    )
    ids = torch.cat([input_ids[:, :1], placeholders, input_ids[:, 1 : 1 + kept]], dim=1)
    has_eos = (ids[:, 1 + num_virtual_tokens :] == eos_token_id).any(dim=1)
    last = torch.where(has_eos, ids[:, -1], torch.full_like(ids[:, -1], eos_token_id))
    return torch.cat([ids[:, :-1], last[:, None]], dim=1)


def insert_prefix_mask(attention_mask: torch.Tensor, num_virtual_tokens: int, max_positions: int = 77) -> torch.Tensor:
    """The attention mask matching :func:`insert_prefix_ids`: prefix positions and a kept EOS attend."""
    batch, seq_len = attention_mask.shape
    out_len = prefixed_length(seq_len, num_virtual_tokens, max_positions)
    kept = out_len - 1 - num_virtual_tokens
    ones = torch.ones((batch, num_virtual_tokens), dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1 : 1 + kept]], dim=1)
    if kept < seq_len - 1:  # the cut may have moved EOS to the last position
        mask = torch.cat([mask[:, :-1], torch.ones_like(mask[:, -1:])], dim=1)
    return mask


def splice_prefix(token_embeds: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Put ``prefix`` ``(m, D)`` at positions ``1..m`` of ``token_embeds`` ``(B, L, D)``.

    The prefix is broadcast with ``expand`` (no per-batch copy before the concatenation)."""
    batch = token_embeds.shape[0]
    m = prefix.shape[0]
    prefix = prefix.to(token_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    return torch.cat([token_embeds[:, :1], prefix, token_embeds[:, 1 + m :]], dim=1)


def warn_if_prompt_truncated(
    input_ids: torch.Tensor, num_virtual_tokens: int, eos_token_id: int, max_positions: int = 77
) -> None:
    """Warn (as diffusers does for over-long prompts) when the prefix pushes prompt tokens out of the window.

    Skipped while tracing/exporting: the check reads tensor values.
    """
    if _is_tracing():
        return
    ids = input_ids.view(-1, input_ids.shape[-1])
    room = prefixed_length(ids.shape[1], num_virtual_tokens, max_positions) - num_virtual_tokens
    if bool((~(ids[:, 1:room] == eos_token_id).any(dim=1)).any()):
        warnings.warn(
            f"The APL prefix takes {num_virtual_tokens} of CLIP's {max_positions} positions: prompt tokens past "
            f"position {max_positions - num_virtual_tokens - 1} were truncated (EOS kept). Shorten the prompt "
            "to keep them.",
            PromptTruncationWarning,
            stacklevel=3,
        )


def _is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


@dataclass(frozen=True)
class PrefixWeights:
    """The tensors of one APL prefix.

    Attributes:
        embeds: ``(m, D)``, the vectors at positions ``1..m`` of the encoder's input (the paper's prefix).
        keys, values: ``(num_layers, m, D)`` for a deep prefix - what each layer's key / value projection gives
            at positions ``1..m`` is replaced by these rows (before the split into heads); ``None`` when shallow.
    """

    embeds: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.keys is None) != (self.values is None):
            raise APLAdapterError("A deep prefix needs both keys and values (or neither, for a shallow prefix).")
        if self.embeds.ndim != 2:
            raise APLAdapterError(f"The prefix must be (m, D), got shape {tuple(self.embeds.shape)}")
        m, width = self.embeds.shape
        for name, rows in (("keys", self.keys), ("values", self.values)):
            if rows is not None and (rows.ndim != 3 or tuple(rows.shape[1:]) != (m, width)):
                raise APLAdapterError(
                    f"Deep prefix {name} must be (num_layers, {m}, {width}) to match the (m, D) prefix, "
                    f"got {tuple(rows.shape)}"
                )

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def is_deep(self) -> bool:
        return self.keys is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the prefix (one when shallow, three when deep)."""
        return (self.embeds,) if self.keys is None else (self.embeds, self.keys, self.values)

    def detached(self) -> PrefixWeights:
        """A float32 copy that shares nothing with the adapter (for graph constants and caches)."""
        copy = [t.detach().float().clone() for t in self.tensors()]
        return PrefixWeights(*copy)


def as_prefix_weights(prefix: torch.Tensor | PrefixWeights) -> PrefixWeights:
    """A ``(m, D)`` tensor (a shallow prefix) or :class:`PrefixWeights` -> :class:`PrefixWeights`."""
    return prefix if isinstance(prefix, PrefixWeights) else PrefixWeights(prefix)


def prefix_layer_kv(text_model: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a shallow prefix ``embeds`` ``(m, D)`` produces at positions ``1..m`` of every layer.

    Returns ``(keys, values)``, each ``(num_layers, m, D)``: the start of a deep prefix that computes exactly
    what the shallow one does.
    """
    from .prefix_cache import CachedPrefixEncoder  # the one re-implementation of CLIP's layers

    with torch.no_grad():
        state = CachedPrefixEncoder(text_model, embeds.detach(), use_kernel=False).prefix_state(embeds.detach())

    def merged(per_layer: list[torch.Tensor]) -> torch.Tensor:  # (1, H, P, Dh) per layer -> (layers, m, D)
        return torch.stack([t[0, :, 1:].transpose(0, 1).reshape(t.shape[2] - 1, -1) for t in per_layer])

    return merged(state.keys).float(), merged(state.values).float()


# ----------------------------------------------------------------------------------------------
# The tuner layer
# ----------------------------------------------------------------------------------------------


class APLEmbedding(nn.Module, BaseTunerLayer):
    """``CLIPTextEmbeddings`` with learnable prefixes (one per adapter name) spliced in after BOS.

    Expects ids already shifted by :func:`insert_prefix_ids` (the text model's pre-hook does it).
    """

    adapter_layer_names = ("apl_prefix", "apl_deep_keys", "apl_deep_values")
    other_param_names = ("num_virtual_tokens",)

    def __init__(
        self, base_layer: CLIPTextEmbeddings, adapter_name: str, config: APLConfig, text_model: nn.Module
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.apl_prefix = nn.ParameterDict()
        self.apl_deep_keys = nn.ParameterDict()
        self.apl_deep_values = nn.ParameterDict()
        self.num_virtual_tokens: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        #: the deep rows of the prefixed forward now running (set and cleared by the text model's hooks)
        self._deep_scope: PrefixWeights | None = None
        self.update_layer(adapter_name, config, text_model)

    def update_layer(self, adapter_name: str, config: APLConfig, text_model: nn.Module) -> None:
        weight = self.base_layer.token_embedding.weight
        if config.weights_follow:  # a saved adapter: its tensors overwrite these at once
            prefix = torch.zeros(config.num_virtual_tokens, weight.shape[1], device=weight.device)
        else:
            prefix = initial_prefix(config, weight)
        self.apl_prefix[adapter_name] = nn.Parameter(prefix)
        if config.prefix_depth == "deep":
            keys, values = prefix_layer_kv(text_model, prefix)
            self.apl_deep_keys[adapter_name] = nn.Parameter(keys.to(weight.device))
            self.apl_deep_values[adapter_name] = nn.Parameter(values.to(weight.device))
        self.num_virtual_tokens[adapter_name] = config.num_virtual_tokens
        self.set_adapter(self.active_adapters)

    # The wrapped module's embeddings stay reachable where callers expect them
    # (``CLIPTextModel.get_input_embeddings()`` returns ``embeddings.token_embedding``).
    @property
    def token_embedding(self) -> nn.Embedding:
        return self.base_layer.token_embedding

    @property
    def position_embedding(self) -> nn.Embedding:
        return self.base_layer.position_embedding

    @property
    def active_prefix(self) -> torch.Tensor | None:
        """The prefix of the active adapter, ``None`` when adapters are disabled."""
        if self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.apl_prefix]
        if len(active) > 1:
            raise APLAdapterError(
                f"APL applies one prefix at a time, but adapters {active} are active; call set_adapter(name)."
            )
        return self.apl_prefix[active[0]] if active else None

    @property
    def active_prefix_weights(self) -> PrefixWeights | None:
        """Every tensor of the active adapter's prefix (deep rows included), ``None`` when adapters are disabled."""
        prefix = self.active_prefix
        if prefix is None:
            return None
        name = next(n for n in self.active_adapters if n in self.apl_prefix)
        if name not in self.apl_deep_keys:
            return PrefixWeights(prefix)
        return PrefixWeights(prefix, self.apl_deep_keys[name], self.apl_deep_values[name])

    def deep_rows(self, kind: Literal["keys", "values"], layer_index: int) -> torch.Tensor | None:
        """The ``(m, D)`` rows layer ``layer_index``'s projection must give, inside a deep prefixed forward."""
        scope = self._deep_scope
        if scope is None or scope.keys is None:
            return None
        return (scope.keys if kind == "keys" else scope.values)[layer_index]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        prefix = self.active_prefix
        if prefix is None:
            return self.base_layer(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.base_layer.token_embedding(input_ids)
        return self.base_layer(position_ids=position_ids, inputs_embeds=splice_prefix(inputs_embeds, prefix))

    def __repr__(self) -> str:
        return "apl." + super().__repr__()


class APLPrefixProjection(nn.Module, BaseTunerLayer):
    """A layer's ``k_proj`` or ``v_proj`` whose output rows at positions ``1..m`` come from a deep prefix.

    It holds no weights of its own: the rows live in the :class:`APLEmbedding` (one place for every prefix
    tensor, so PEFT saves them side by side). Inside the text model's prefixed forward the embedding exposes the
    active deep rows (:meth:`APLEmbedding.deep_rows`); anywhere else - the prefix K/V cache and the export graphs
    call the projections on other segments - this is the plain projection.
    """

    adapter_layer_names = ()
    other_param_names = ()

    def __init__(self, base_layer: nn.Linear, embedding: APLEmbedding, layer_index: int, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: the text model owns it
        self.layer_index = layer_index
        self.kind = kind
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = embedding._active_adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden)
        rows = self._embedding.deep_rows(self.kind, self.layer_index)
        if rows is None or out.shape[-2] <= rows.shape[0]:
            return out
        return splice_prefix(out, rows)

    def __repr__(self) -> str:
        return f"apl.prefix_{self.kind}[{self.layer_index}](" + repr(self.base_layer) + ")"


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
    if config.tokenizer_name_or_path:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(config.tokenizer_name_or_path)
    else:
        from .tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    ids = tokenizer(config.prefix_init_text, add_special_tokens=False).input_ids
    if not ids:
        raise APLAdapterError(f"prefix_init_text {config.prefix_init_text!r} gives no tokens; use a real phrase")
    return ids


# ----------------------------------------------------------------------------------------------
# The pre-hook that shifts ids and mask on the CLIPTextModel
# ----------------------------------------------------------------------------------------------


def _prefix_inputs_hook(text_model: CLIPTextModel, args: tuple, kwargs: dict[str, Any]):
    layer = text_model.embeddings
    if not isinstance(layer, APLEmbedding):
        return None
    weights = layer.active_prefix_weights
    # A deep prefix's rows reach the layers' projections for this forward only (cleared by _end_prefix_scope).
    layer._deep_scope = weights if weights is not None and weights.is_deep else None
    if weights is None:
        return None
    prefix = weights.embeds
    args, kwargs = list(args), dict(kwargs)
    names = ("input_ids", "attention_mask", "position_ids")
    for i, name in enumerate(names[: len(args)]):
        kwargs[name] = args[i]
    args = args[len(names) :]
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


def _end_prefix_scope(text_model: CLIPTextModel, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    """Forward hook (run even when the forward raises): the deep rows act inside the prefixed forward only."""
    layer = text_model.embeddings
    if isinstance(layer, APLEmbedding):
        layer._deep_scope = None


# ----------------------------------------------------------------------------------------------
# The tuner
# ----------------------------------------------------------------------------------------------


def clip_text_model_of(model: nn.Module) -> CLIPTextModel:
    """The ``CLIPTextModel`` inside ``model`` (itself, or ``.text_model`` of the projection variant)."""
    if isinstance(model, CLIPTextModelWithProjection):
        return model.text_model
    if isinstance(model, CLIPTextModel):
        return model
    raise APLAdapterError(
        f"APL adapts CLIP text encoders (transformers CLIPTextModel or CLIPTextModelWithProjection), "
        f"got {type(model).__name__}. Pass the pipeline's text_encoder (or text_encoder_2 for SDXL)."
    )


def has_apl_layers(encoder: nn.Module) -> bool:
    """Whether an APL prefix is injected into this CLIP text encoder."""
    return isinstance(clip_text_model_of(encoder).embeddings, APLEmbedding)


def strip_apl_layers(encoder: nn.Module) -> bool:
    """Put back the plain CLIP modules wherever APL injected its layers, and drop its hooks.

    The rollback of a failed injection or load (PEFT leaves the layers in place when loading the weights fails).
    Returns True when anything was removed.
    """
    text_model = clip_text_model_of(encoder)
    removed = False
    for name, module in list(text_model.named_modules()):
        if isinstance(module, (APLEmbedding, APLPrefixProjection)):
            parent_name, _, child = name.rpartition(".")
            setattr(text_model.get_submodule(parent_name) if parent_name else text_model, child, module.base_layer)
            removed = True
    for handle in text_model.__dict__.pop("_apl_hook_handle", ()):
        handle.remove()
        removed = True
    return removed


def prefix_parameters(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The trainable tensors of one APL adapter, by attribute name: ``apl_prefix`` ``(m, D)`` and, for a deep
    prefix, ``apl_deep_keys`` / ``apl_deep_values`` ``(num_layers, m, D)``. Give them to the optimizer."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    embedding = clip_text_model_of(base).embeddings
    if not isinstance(embedding, APLEmbedding) or adapter_name not in embedding.apl_prefix:
        raise APLAdapterError(f"No APL adapter named {adapter_name!r} in this text encoder.")
    return {
        name: getattr(embedding, name)[adapter_name]
        for name in APLEmbedding.adapter_layer_names
        if adapter_name in getattr(embedding, name)
    }


def _projection_of(key: str) -> tuple[int, str] | None:
    """``"encoder.layers.3.self_attn.k_proj"`` -> ``(3, "keys")``; ``None`` for any other module name."""
    parts = key.split(".")
    if len(parts) < 5 or parts[-1] not in ("k_proj", "v_proj") or parts[-2] != "self_attn":
        return None
    if parts[-5:-3] != ["encoder", "layers"] or not parts[-3].isdigit():
        return None
    return int(parts[-3]), "keys" if parts[-1] == "k_proj" else "values"


class APLModel(BaseTuner):
    """PEFT tuner that installs an APL prefix into a CLIP text encoder.

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
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> dict:
        """Put the saved prefix keys where this encoder keeps its prefix, then let PEFT add the adapter name.

        ``CLIPTextModel`` keeps its embeddings at ``embeddings``, ``CLIPTextModelWithProjection`` (SDXL's second
        encoder) at ``text_model.embeddings``: a prefix saved from one loads into the other when the widths match.
        A prefix key in neither layout is an error (PEFT itself would only warn and keep a random prefix).
        """
        own = next((n for n, m in model.named_modules() if isinstance(m, APLEmbedding)), None)
        if own is not None:
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

    def _prepare_adapter_config(self, peft_config: APLConfig, model_config: dict) -> APLConfig:
        peft_config.target_modules = apl_target_modules(peft_config.prefix_depth)
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: APLConfig, adapter_name: str) -> None:
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
    def _check_target_module_exists(peft_config: APLConfig, key: str) -> bool:
        if key in ("embeddings", "text_model.embeddings"):
            return True
        return peft_config.prefix_depth == "deep" and _projection_of(key) is not None

    def _create_and_replace(
        self,
        peft_config: APLConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
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
            target.update_layer(adapter_name, peft_config, text_model)
            return
        if not isinstance(target, CLIPTextEmbeddings):
            raise APLAdapterError(f"{current_key} is a {type(target).__name__}, not CLIPTextEmbeddings")
        self._replace_module(parent, target_name, APLEmbedding(target, adapter_name, peft_config, text_model), target)
        if not hasattr(parent, "_apl_hook_handle"):
            parent._apl_hook_handle = (
                parent.register_forward_pre_hook(_prefix_inputs_hook, with_kwargs=True),
                parent.register_forward_hook(_end_prefix_scope, with_kwargs=True, always_call=True),
            )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies `.weight` from the child, which CLIPTextEmbeddings lacks; nothing else is needed.
        setattr(parent, child_name, new_module)
        if isinstance(new_module, APLEmbedding):
            device = child.token_embedding.weight.device
            for params in (new_module.apl_prefix, new_module.apl_deep_keys, new_module.apl_deep_values):
                params.to(device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.requires_grad = any(f".{n}." in f".{name}" for n in APLEmbedding.adapter_layer_names)

    def _check_merge_allowed(self) -> None:
        raise APLAdapterError(
            "An APL prefix cannot be merged into the encoder's weights (it adds positions, not weight deltas). "
            "Keep the adapter, export it with apl-export (the prefix is baked into the engine), or use unload()."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        text_model = clip_text_model_of(self.model)
        for handle in text_model.__dict__.pop("_apl_hook_handle", ()):
            handle.remove()
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.active_adapter = [name for name in self.peft_config if name != adapter_name][:1] or []
