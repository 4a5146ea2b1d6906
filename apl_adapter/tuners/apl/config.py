"""APLConfig: the configuration of an Anonymization Prompt Learning adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import PeftConfig

from ...errors import APLAdapterError
from .constants import (
    INIT_METHODS,
    PREFIX_DEPTHS,
    TEXT_ENCODER_TYPES,
    InitMethod,
    PrefixDepth,
    TextEncoderType,
    max_virtual_tokens,
)
from .peft_type import APL_PEFT_TYPE
from .serialization import check_adapter_folder


def apl_target_modules(prefix_depth: str, text_encoder_type: str | None = None) -> list[str]:
    """The module names an APL prefix wraps: CLIP's embeddings (plus each layer's key/value projections when deep),
    or T5's ``encoder.embed_tokens`` (the full name: PEFT would take a bare ``embed_tokens`` for a vocabulary it must
    save whole)."""
    if text_encoder_type == "t5":
        return ["encoder.embed_tokens"]
    return ["embeddings", "k_proj", "v_proj"] if prefix_depth == "deep" else ["embeddings"]


T5_HIDDEN_ROWS_UNSUPPORTED = (
    "hide_prefix_rows=True is not supported for T5 encoders yet: T5 attends both ways, so its prompt rows are not "
    "the plain encoder's rows behind a prefix the way CLIP's are. Use hide_prefix_rows=False for T5."
)

T5_DEEP_UNSUPPORTED = (
    "A deep prefix (prefix_depth='deep') is not supported for T5 encoders yet: T5 attends both ways, so the keys and "
    "values a prefix gives at deeper layers depend on the prompt and the deep prefix has no shallow-equal start. "
    "Use prefix_depth='shallow' for T5 (docs/sd3_flux.md)."
)


@dataclass
class APLConfig(PeftConfig):
    """Configuration of an APL prefix: ``m`` learnable vectors in front of the prompt in a text encoder.

    CLIP (SD 1.x / 2.x / XL, SD3's and FLUX's CLIP encoders): the prefix ``[AP]`` sits at positions ``1..m``
    (``[BOS][P1..Pm][prompt][EOS][pad]``); the prompt shifts right by ``m`` and the sequence is cut back to 77
    positions, keeping EOS. T5 (SD3, FLUX): T5 has no BOS, so the prefix takes positions ``0..m-1``
    (``[P1..Pm][prompt][</s>][pad]``) and the sequence keeps the pipeline's window (docs/sd3_flux.md). Only the
    prefix is trained; the text encoder and the denoiser stay frozen.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from apl_adapter import APLConfig
    >>> from apl_adapter.testing import tiny_clip_text_model
    >>> text_encoder = get_peft_model(tiny_clip_text_model(), APLConfig(num_virtual_tokens=10))
    >>> text_encoder.get_nb_trainable_parameters()[0]   # 10 x hidden size (32 here, 768 for SD 1.x)
    320

    ```
    """

    num_virtual_tokens: int = field(
        default=10,
        metadata={"help": "Number of learnable prefix vectors m (the paper uses 10). Must leave room for BOS, EOS."},
    )
    token_dim: int | None = field(
        default=None,
        metadata={"help": "Width of each prefix vector; filled from the text encoder (768 SD 1.x, 1024 SD 2.x)."},
    )
    prefix_init: InitMethod = field(
        default="random_uniform",
        metadata={
            "help": "How the prefix starts: 'random_uniform' = U[0,1) as the authors' code; 'text' = token "
            "embeddings of `prefix_init_text` (repeated to m); 'vocab' = m random rows of the vocabulary."
        },
    )
    prefix_init_text: str | None = field(
        default=None, metadata={"help": "Phrase whose token embeddings initialise the prefix when prefix_init='text'."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local tokenizer folder for prefix_init='text'; when unset the real CLIP tokenizer is built "
            "offline from the open_clip_torch wheel."
        },
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the random initialisations (random_uniform, vocab)."})
    prefix_position: Literal["after_bos"] = field(
        default="after_bos",
        metadata={
            "help": "Where the prefix goes. 'after_bos' is the paper's layout: positions 1..m after CLIP's BOS; T5 "
            "has no BOS, so there the prefix takes positions 0..m-1, in front of the prompt."
        },
    )
    prefix_depth: PrefixDepth = field(
        default="shallow",
        metadata={
            "help": "'shallow' = the paper: m vectors at the encoder's input only. 'deep' = also learned keys and "
            "values at positions 1..m of every encoder layer (prefix-tuning / P-tuning v2), initialised to the ones "
            "the shallow prefix produces, so training starts from the paper's prefix and can only add leverage."
        },
    )
    hide_prefix_rows: bool = field(
        default=False,
        metadata={
            "help": "Drop the prefix's own output rows (positions 1..m) from what the encoder returns: the denoiser "
            "sees [BOS][prompt][EOS][pad], each prompt row computed behind the prefix at the position the plain "
            "encoder gives it, the last row repeated m times to keep the length. CLIP is causal, so those m rows are "
            "the same for every prompt and move the images of prompts the prefix leaves alone (scenes); hidden, "
            "the prefix acts only through the prompt's rows. False = the paper's layout. CLIP encoders only."
        },
    )
    apply_to_negative_prompt: bool = field(
        default=False,
        metadata={
            "help": "Whether pipelines also prefix the negative / unconditional prompt. The paper prefixes the "
            "positive prompt only."
        },
    )
    text_encoder_type: TextEncoderType | None = field(
        default=None,
        metadata={
            "help": "Which text encoder the prefix is for: 'clip' (CLIPTextModel / CLIPTextModelWithProjection) or "
            "'t5' (T5EncoderModel, SD3's text_encoder_3 and FLUX's text_encoder_2). Filled from the model class when "
            "unset; a prefix only loads into an encoder of its type."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Set automatically: APL wraps CLIP's `embeddings` module (and, for a deep prefix, every "
            "layer's `k_proj` and `v_proj`), or T5's `encoder.embed_tokens`."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]  # PeftConfig's has no annotations (peft 0.21)
        self.peft_type = APL_PEFT_TYPE
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool):
            raise APLAdapterError(f"num_virtual_tokens must be an int, got {self.num_virtual_tokens!r}")
        if self.num_virtual_tokens <= 0:
            raise APLAdapterError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}. The paper uses 10.")
        if self.text_encoder_type is not None and self.text_encoder_type not in TEXT_ENCODER_TYPES:
            raise APLAdapterError(f"text_encoder_type must be 'clip', 't5' or None, got {self.text_encoder_type!r}")
        limit = max_virtual_tokens(self.text_encoder_type)
        if self.num_virtual_tokens > limit:
            where = (
                "T5's smallest pipeline window (256) for EOS"
                if self.text_encoder_type == "t5"
                else "CLIP's 77 positions for BOS and EOS (a prefix for a T5 encoder: set text_encoder_type='t5')"
            )
            raise APLAdapterError(
                f"num_virtual_tokens={self.num_virtual_tokens} leaves no room in {where}; use at most {limit} "
                "(the paper uses 10)."
            )
        if self.text_encoder_type == "t5" and self.prefix_depth == "deep":
            raise APLAdapterError(T5_DEEP_UNSUPPORTED)
        if not isinstance(self.hide_prefix_rows, bool):
            raise APLAdapterError(f"hide_prefix_rows must be True or False, got {self.hide_prefix_rows!r}")
        if self.text_encoder_type == "t5" and self.hide_prefix_rows:
            raise APLAdapterError(T5_HIDDEN_ROWS_UNSUPPORTED)
        if self.prefix_init not in INIT_METHODS:
            raise APLAdapterError(f"prefix_init must be 'random_uniform', 'text' or 'vocab', got {self.prefix_init!r}")
        if self.prefix_init == "text" and not self.prefix_init_text:
            raise APLAdapterError("prefix_init='text' needs prefix_init_text, e.g. 'a photo of an anonymous person'")
        if self.prefix_depth not in PREFIX_DEPTHS:
            raise APLAdapterError(f"prefix_depth must be 'shallow' or 'deep', got {self.prefix_depth!r}")
        if self.prefix_position != "after_bos":
            raise APLAdapterError(f"prefix_position {self.prefix_position!r} is not supported; use 'after_bos'")
        self.target_modules = apl_target_modules(self.prefix_depth, self.text_encoder_type)

    @property
    def is_deep(self) -> bool:
        return self.prefix_depth == "deep"

    @property
    def is_prompt_learning(self) -> bool:
        # APL injects into the encoder like a tuner (BaseTuner path): PEFT's prompt-learning path
        # concatenates virtual tokens in front of BOS and would exceed CLIP's 77 positions.
        return False

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> APLConfig:
        """Load the config of a saved adapter, after checking the folder holds a loadable APL adapter."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            check_adapter_folder(folder)
        config: APLConfig = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # The saved tensors replace the initial prefix right after injection: building it must not need the
        # tokenizer (a relative `tokenizer_name_or_path` read elsewhere would be taken for a Hub id).
        config.weights_follow = True
        return config

    #: True on a config read from a saved adapter: its prefix starts as zeros, to be overwritten by the file.
    #: Left unannotated so the dataclass does not make it a field (adapter_config.json must not hold it).
    weights_follow = False
