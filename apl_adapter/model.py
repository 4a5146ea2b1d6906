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

Because the change is made in place (as LoRA does), a diffusers pipeline holding the text
encoder applies the prefix without any change to the pipeline.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

from .config import APLConfig
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


# ----------------------------------------------------------------------------------------------
# The tuner layer
# ----------------------------------------------------------------------------------------------


class APLEmbedding(nn.Module, BaseTunerLayer):
    """``CLIPTextEmbeddings`` with learnable prefixes (one per adapter name) spliced in after BOS.

    Expects ids already shifted by :func:`insert_prefix_ids` (the text model's pre-hook does it).
    """

    adapter_layer_names = ("apl_prefix",)
    other_param_names = ("num_virtual_tokens",)

    def __init__(self, base_layer: CLIPTextEmbeddings, adapter_name: str, config: APLConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.apl_prefix = nn.ParameterDict()
        self.num_virtual_tokens: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: APLConfig) -> None:
        weight = self.base_layer.token_embedding.weight
        self.apl_prefix[adapter_name] = nn.Parameter(initial_prefix(config, weight))
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
    prefix = layer.active_prefix
    if prefix is None:
        return None
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

    def _prepare_adapter_config(self, peft_config: APLConfig, model_config: dict) -> APLConfig:
        peft_config.target_modules = ["embeddings"]
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
        return key in ("embeddings", "text_model.embeddings")

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
        if isinstance(target, APLEmbedding):
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, CLIPTextEmbeddings):
            raise APLAdapterError(f"{current_key} is a {type(target).__name__}, not CLIPTextEmbeddings")
        self._replace_module(parent, target_name, APLEmbedding(target, adapter_name, peft_config), target)
        if not hasattr(parent, "_apl_hook_handle"):
            parent._apl_hook_handle = parent.register_forward_pre_hook(_prefix_inputs_hook, with_kwargs=True)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies `.weight` from the child, which CLIPTextEmbeddings lacks; nothing else is needed.
        setattr(parent, child_name, new_module)
        if isinstance(new_module, APLEmbedding):
            new_module.apl_prefix.to(child.token_embedding.weight.device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.requires_grad = ".apl_prefix." in f".{name}"

    def _check_merge_allowed(self) -> None:
        raise APLAdapterError(
            "An APL prefix cannot be merged into the encoder's weights (it adds positions, not weight deltas). "
            "Keep the adapter, export it with apl-export (the prefix is baked into the engine), or use unload()."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        text_model = clip_text_model_of(self.model)
        handle = text_model.__dict__.pop("_apl_hook_handle", None)
        if handle is not None:
            handle.remove()
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.active_adapter = [name for name in self.peft_config if name != adapter_name][:1] or []
