"""apl-adapter: Anonymization Prompt Learning (APL) as a PEFT adapter for CLIP text encoders.

```python
from peft import get_peft_model, PeftModel
from apl_adapter import APLConfig

text_encoder = get_peft_model(pipe.text_encoder, APLConfig())   # 10 learnable vectors after BOS
text_encoder.save_pretrained("apl-prefix")
restored = PeftModel.from_pretrained(other_text_encoder, "apl-prefix")

```

The adapter itself lives in :mod:`apl_adapter.tuners.apl` (importing it registers APL with PEFT).
"""

from .errors import APLAdapterError
from .tokenizer import load_clip_tokenizer
from .tuners.apl import (
    APLConfig,
    APLEmbedding,
    APLModel,
    APLPrefixProjection,
    PrefixWeights,
    PromptTruncationWarning,
    check_adapter_folder,
    insert_prefix_ids,
    prefix_parameters,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "APLAdapterError",
    "APLConfig",
    "APLEmbedding",
    "APLModel",
    "APLPrefixProjection",
    "PrefixWeights",
    "PromptTruncationWarning",
    "check_adapter_folder",
    "insert_prefix_ids",
    "load_clip_tokenizer",
    "prefix_parameters",
    "save_adapter",
]
