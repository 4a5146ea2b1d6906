"""APL training: the objective, the on-disk data format, the loop (Accelerate) and ``apl-train``.

```python
from apl_adapter.training import TrainConfig, train
result = train(TrainConfig(base="path/to/sd15", data="apl-data", out="runs/apl", steps=2000))
# result.adapter_dir -> runs/apl/adapter, usable with apl_adapter.pipelines.apply_apl(pipe, ...)

```
"""

from .config import TrainConfig
from .data import DataFormatError, Example, read_metadata
from .loop import TrainResult, train
from .objective import apl_loss

__all__ = ["DataFormatError", "Example", "TrainConfig", "TrainResult", "apl_loss", "read_metadata", "train"]
