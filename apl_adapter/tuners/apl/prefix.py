"""The APL prefix as plain tensor functions: where it goes in the ids, the mask and the embeddings, and where EOS is.

CLIP layout (the paper's, and the authors' code): the ``m`` prefix vectors replace the token embeddings at positions
``1..m``, right after BOS; the prompt shifts right by ``m`` and the sequence is cut back to the encoder's 77
positions, keeping EOS. Pooling reads the EOS of those shifted ids (:func:`pool_index`).

T5 layout (SD3, FLUX; :func:`insert_t5_prefix_ids`): T5 has no BOS, so the prefix takes positions ``0..m-1`` and the
prompt shifts right by ``m``; the sequence keeps the caller's length (the pipeline's 256 / 512 window, whose
padding gives the room), cut at the end with EOS kept, so a prefixed prompt and an un-prefixed negative prompt stay
the same length. T5's relative position bias then simply sees ``m`` more leading positions.

No modules here: the tuner layers, the prefix K/V cache and the exported graphs all call these, so each of them lays
the prefix out the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ...errors import APLAdapterError
from .constants import MAX_CLIP_POSITIONS, TextEncoderType


class PromptTruncationWarning(UserWarning):
    """Prompt tokens were dropped to make room for the prefix within CLIP's 77 positions."""


def clip_eos_token_id(config: CLIPTextConfig) -> int:
    """The EOS id pooling looks for. Configs older than transformers PR #24773 say ``eos_token_id=2``;
    CLIP's real EOS is then the highest id (``vocab_size - 1``), which is what those configs pool on."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None or eos == 2:
        return int(config.vocab_size) - 1
    return int(eos)


def clip_bos_token_id(config: CLIPTextConfig) -> int:
    """The BOS id the prefix state starts from. The same legacy configs (``eos_token_id=2``) also say
    ``bos_token_id=0``, which is ``!`` in CLIP's vocabulary; their real BOS is ``vocab_size - 2`` (49406), the
    id the tokenizer writes first."""
    eos, bos = getattr(config, "eos_token_id", None), getattr(config, "bos_token_id", None)
    if bos is None or eos is None or eos == 2:
        return int(config.vocab_size) - 2
    return int(bos)


def prefixed_length(seq_len: int, num_virtual_tokens: int, max_positions: int = MAX_CLIP_POSITIONS) -> int:
    """Sequence length after inserting ``num_virtual_tokens`` after BOS, capped at ``max_positions``."""
    return min(seq_len + num_virtual_tokens, max_positions)


def insert_prefix_ids(
    input_ids: torch.Tensor,
    num_virtual_tokens: int,
    eos_token_id: int,
    placeholder_id: int = 0,
    max_positions: int = MAX_CLIP_POSITIONS,
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


def shifted_position_ids(input_ids: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """Position ids ``(B, L)`` of prompts moved right by ``shift`` (an int, or ``(B, 1)`` per row), BOS kept at 0
    and the tail clamped to the last position: with ``shift = m``, where a prompt sits behind the prefix. The plain
    encoder given these positions states a prompt where the prefixed one places it (``apl-train --text-preserve``),
    and an encoder trained with random shifts has seen words there (the world's ``position_jitter``)."""
    seq_len = input_ids.shape[1]
    positions = torch.arange(seq_len, device=input_ids.device).expand_as(input_ids) + shift
    positions = positions.clamp(max=seq_len - 1)  # past the prompt: the encoder is causal, so never read back
    positions[:, 0] = 0  # BOS stays first
    return positions


def insert_prefix_mask(
    attention_mask: torch.Tensor, num_virtual_tokens: int, max_positions: int = MAX_CLIP_POSITIONS
) -> torch.Tensor:
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


def hide_prefix_rows(states: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """``[BOS][P1..Pm][prompt][EOS][pad]`` rows ``(B, L', D)`` -> ``[BOS][prompt][EOS][pad]`` plus the last row
    ``m`` times, the same shape: the prefix's own rows dropped, each prompt row (computed behind the prefix) at the
    position the plain encoder gives it (``APLConfig(hide_prefix_rows=True)``).

    CLIP is causal, so rows ``1..m`` are the same for every prompt; a denoiser that reads them is moved by the prefix
    on prompts the prefix leaves alone. Slices and a concatenation with a fixed ``m``: traceable.

    >>> states = torch.arange(7.0).view(1, 7, 1)  # BOS, P1, P2, three prompt rows, one pad
    >>> hide_prefix_rows(states, 2).flatten().tolist()
    [0.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0]
    """
    m = num_virtual_tokens
    tail = states[:, -1:].expand(-1, m, -1)
    return torch.cat([states[:, :1], states[:, m + 1 :], tail], dim=1)


def insert_t5_prefix_ids(
    input_ids: torch.Tensor, num_virtual_tokens: int, eos_token_id: int, placeholder_id: int = 0
) -> torch.Tensor:
    """Make room for the prefix in T5 ids: ``m`` placeholders + the prompt, cut back to the input's length.

    If the cut removed EOS, the last position becomes EOS (the prompt is truncated, EOS kept), as for CLIP.
    Traceable (no data-dependent Python control flow).

    Args:
        input_ids: ``(B, L)`` T5 token ids (no BOS; EOS ends the prompt, padding follows).
        num_virtual_tokens: ``m`` (must be below ``L``, so EOS keeps a position).
        eos_token_id: T5's ``</s>`` (1 in T5's vocabulary).
        placeholder_id: id written at the prefix positions (its embedding is replaced; 0 = T5's ``<pad>``).

    Returns:
        ``(B, L)`` ids: ``[placeholder x m][input_ids[:, :L - m]]``, EOS kept.
    """
    batch, seq_len = input_ids.shape
    if num_virtual_tokens >= seq_len:
        raise APLAdapterError(
            f"A {num_virtual_tokens}-vector T5 prefix leaves no room in a {seq_len}-token window; pass a longer "
            f"max_sequence_length (SD3 uses 256, FLUX 512) or a shorter prefix."
        )
    placeholders = torch.full(
        (batch, num_virtual_tokens), placeholder_id, dtype=input_ids.dtype, device=input_ids.device
    )
    ids = torch.cat([placeholders, input_ids[:, : seq_len - num_virtual_tokens]], dim=1)
    cut = t5_eos_was_cut(input_ids, num_virtual_tokens, eos_token_id)
    last = torch.where(cut, torch.full_like(ids[:, -1], eos_token_id), ids[:, -1])
    return torch.cat([ids[:, :-1], last[:, None]], dim=1)


def insert_t5_prefix_mask(
    attention_mask: torch.Tensor, num_virtual_tokens: int, cut_keeps_eos: torch.Tensor
) -> torch.Tensor:
    """The attention mask matching :func:`insert_t5_prefix_ids`: ones at the prefix positions, the mask shifted
    right and cut to ``L``; where the cut moved EOS to the last position (``cut_keeps_eos`` ``(B,)`` True), it
    attends.

    Args:
        attention_mask: ``(B, L)``.
        cut_keeps_eos: ``(B,)`` bool, True for rows whose EOS was written at the last position.

    Returns:
        ``(B, L)`` mask.
    """
    batch, seq_len = attention_mask.shape
    ones = torch.ones((batch, num_virtual_tokens), dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask[:, : seq_len - num_virtual_tokens]], dim=1)
    last = torch.where(cut_keeps_eos, torch.ones_like(mask[:, -1]), mask[:, -1])
    return torch.cat([mask[:, :-1], last[:, None]], dim=1)


def t5_eos_was_cut(input_ids: torch.Tensor, num_virtual_tokens: int, eos_token_id: int) -> torch.Tensor:
    """``(B,)`` bool: rows whose EOS falls outside the first ``L - m`` positions (so the cut writes it last)."""
    kept = input_ids[:, : input_ids.shape[1] - num_virtual_tokens]
    return ~(kept == eos_token_id).any(dim=1)


def prepend_prefix(token_embeds: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Put ``prefix`` ``(m, D)`` at positions ``0..m-1`` of ``token_embeds`` ``(B, L, D)`` (T5's layout)."""
    batch = token_embeds.shape[0]
    m = prefix.shape[0]
    prefix = prefix.to(token_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    return torch.cat([prefix, token_embeds[:, m:]], dim=1)


def warn_if_t5_prompt_truncated(cut: torch.Tensor, num_virtual_tokens: int, seq_len: int) -> None:
    """Warn when the prefix pushed T5 prompt tokens out of the window (``cut``: :func:`t5_eos_was_cut`'s ``(B,)``
    rows; skipped while tracing)."""
    if _is_tracing():
        return
    if bool(cut.any()):
        warnings.warn(
            f"The APL prefix takes {num_virtual_tokens} of the T5 window's {seq_len} positions: prompt tokens past "
            f"position {seq_len - num_virtual_tokens - 1} were truncated (EOS kept). Pad to a longer window "
            "(max_sequence_length) or shorten the prompt to keep them.",
            PromptTruncationWarning,
            stacklevel=3,
        )


def t5_eos_token_id(config: T5Config) -> int:
    """T5's ``</s>`` id (1 in every released T5 vocabulary, and the config's default)."""
    eos = getattr(config, "eos_token_id", None)
    return 1 if eos is None else int(eos)


def pool_index(input_ids: torch.Tensor, config: CLIPTextConfig) -> torch.Tensor:
    """The position CLIP pools at, per row of ``input_ids`` ``(B, L)`` -> ``(B,)``.

    Give it the ids the encoder runs (after :func:`insert_prefix_ids`): EOS is then already shifted by ``m``.
    transformers' ``CLIPTextModel`` rule, so every re-implementation pools where the adapter's forward does: configs
    older than PR #24773 (``eos_token_id=2``) take the highest id (CLIP's EOS, unless tokens were added to the
    vocabulary); newer ones the first EOS (the padding may be EOS too).
    """
    ids = input_ids.to(torch.int)  # ONNX ArgMax (opset 14) takes no int64
    if config.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == clip_eos_token_id(config)).int().argmax(dim=-1)


def warn_if_prompt_truncated(
    input_ids: torch.Tensor, num_virtual_tokens: int, eos_token_id: int, max_positions: int = MAX_CLIP_POSITIONS
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
    tracing: bool = torch.jit.is_tracing()  # type: ignore[no-untyped-call]  # torch 2.13 leaves it unannotated
    return tracing or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


@dataclass(frozen=True)
class PrefixWeights:
    """The tensors of one APL prefix.

    Attributes:
        embeds: ``(m, D)``, the vectors at positions ``1..m`` of the encoder's input (the paper's prefix).
        keys, values: ``(num_layers, m, D)`` for a deep prefix - what each layer's key / value projection gives
            at positions ``1..m`` is replaced by these rows (before the split into heads); ``None`` when shallow.
        hide_rows: the encoder's outputs drop the prefix's own rows (:func:`hide_prefix_rows`); not a tensor, the
            adapter's ``hide_prefix_rows`` setting, carried with its tensors to every path that runs them.
    """

    embeds: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hide_rows: bool = False

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
        if self.keys is None or self.values is None:  # both or neither (checked in __post_init__)
            return (self.embeds,)
        return (self.embeds, self.keys, self.values)

    def detached(self) -> PrefixWeights:
        """A float32 copy that shares nothing with the adapter (for graph constants and caches)."""

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().float().clone()

        embeds = self.embeds.detach().float().clone()
        return PrefixWeights(embeds, copy(self.keys), copy(self.values), hide_rows=self.hide_rows)


def as_prefix_weights(prefix: torch.Tensor | PrefixWeights) -> PrefixWeights:
    """A ``(m, D)`` tensor (a shallow prefix) or :class:`PrefixWeights` -> :class:`PrefixWeights`."""
    return prefix if isinstance(prefix, PrefixWeights) else PrefixWeights(prefix)


def clip_text_model_of(model: nn.Module) -> CLIPTextModel:
    """The ``CLIPTextModel`` inside ``model`` (itself, or ``.text_model`` of the projection variant)."""
    if isinstance(model, CLIPTextModelWithProjection):
        text_model: CLIPTextModel = model.text_model
        return text_model
    if isinstance(model, CLIPTextModel):
        return model
    raise APLAdapterError(
        f"This needs a CLIP text encoder (transformers CLIPTextModel or CLIPTextModelWithProjection), got "
        f"{type(model).__name__}. Pass the pipeline's text_encoder (or text_encoder_2 for SDXL)."
    )


def text_encoder_type_of(model: nn.Module) -> TextEncoderType:
    """``"clip"`` or ``"t5"`` by the model's class; a clear error for any other model."""
    if isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        return "clip"
    if isinstance(model, T5EncoderModel):
        return "t5"
    raise APLAdapterError(
        f"APL adapts CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection) and T5 encoders "
        f"(T5EncoderModel), got {type(model).__name__}. Pass one of the pipeline's text_encoder* components."
    )


def prefix_host_of(model: nn.Module) -> nn.Module:
    """The module whose forward the prefix hooks rewrite and which holds the prefixed embedding: the
    ``CLIPTextModel`` (also inside the projection variant; its ``embeddings``) or T5's encoder stack
    (``T5EncoderModel.encoder``; its ``embed_tokens`` - T5's ``shared`` table is a separate module with the same
    weight, which the prefix leaves alone)."""
    text_encoder_type_of(model)  # one error naming both kinds for anything else
    if isinstance(model, T5EncoderModel):
        stack: nn.Module = model.encoder
        return stack
    return clip_text_model_of(model)


def prefix_embedding_name(model: nn.Module) -> str:
    """The attribute of :func:`prefix_host_of` that an APL prefix wraps: ``embeddings`` or ``embed_tokens``."""
    return "embed_tokens" if text_encoder_type_of(model) == "t5" else "embeddings"


def base_model_of(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (its ``get_base_model()``), or ``model`` itself."""
    get_base_model: Any = getattr(model, "get_base_model", None)
    if get_base_model is None:
        return model
    base: nn.Module = get_base_model()
    return base
