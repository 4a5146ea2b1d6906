"""APL as a PEFT tuner: importing this package registers it with PEFT.

The folder follows ``peft/tuners/<method>/``:

- :mod:`.peft_type`: the ``PeftType.APL`` member (a leaf: the one PEFT internal we touch);
- :mod:`.constants`: the values an APL config may hold (a leaf);
- :mod:`.config`: :class:`APLConfig`;
- :mod:`.prefix`: where the prefix goes in the ids, the mask and the embeddings, for CLIP and for T5 (plain tensor
  functions);
- :mod:`.layer`: the tuner layers PEFT wraps into CLIP's text encoder or T5's encoder;
- :mod:`.prefix_cache`: the encoder that computes the prefix once and then runs only the prompt positions;
- :mod:`.model`: :class:`APLModel`, the tuner that installs the layers;
- :mod:`.serialization`: safe reading and atomic writing of adapter folders.

After ``import apl_adapter``:

- ``get_peft_model(text_encoder, APLConfig())`` builds an APL model,
- ``save_pretrained`` writes ``"peft_type": "APL"`` into ``adapter_config.json``,
- ``PeftModel.from_pretrained(base, folder)`` rebuilds APL.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from .config import APLConfig
from .layer import APLEmbedding, APLPrefixProjection, APLT5Embedding
from .model import APLModel, prefix_parameters
from .peft_type import APL_PEFT_TYPE, PEFT_TYPE_NAME, peft_hooks_missing
from .prefix import PrefixWeights, PromptTruncationWarning, insert_prefix_ids
from .prefix_cache import CachedPrefixEncoder
from .serialization import check_adapter_folder, save_adapter

try:
    from peft.utils import register_peft_method
except ImportError as err:  # pragma: no cover - depends on the installed PEFT
    raise peft_hooks_missing("peft.utils.register_peft_method is missing") from err

__all__ = [
    "APLConfig",
    "APLEmbedding",
    "APLModel",
    "APLPrefixProjection",
    "APLT5Embedding",
    "CachedPrefixEncoder",
    "PrefixWeights",
    "PromptTruncationWarning",
    "check_adapter_folder",
    "insert_prefix_ids",
    "prefix_parameters",
    "register",
    "save_adapter",
]


def register() -> None:
    """Register APL's config and tuner with PEFT; safe to call more than once."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(APL_PEFT_TYPE) is APLConfig:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=APLConfig, model_cls=APLModel, prefix=APLModel.prefix)


register()
