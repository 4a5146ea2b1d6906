"""Generate images from an ``apl-export`` folder with ONNX Runtime.

```python
>>> from apl_export.runtime_ort import ORTAPLPipeline
>>> pipe = ORTAPLPipeline.from_pretrained("sd15-apl-onnx")  # doctest: +SKIP
>>> images = pipe("a photo of Ann Lee").images  # PIL images, as diffusers  # doctest: +SKIP
```
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ExportError
from .runtime_base import APLPipelineBase


class ORTAPLPipeline(APLPipelineBase):
    """One ``onnxruntime.InferenceSession`` per exported model; the loop of :class:`APLPipelineBase`."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(folder)
        if self.manifest.get("text_encoder_variant") == "fast":
            raise ExportError(
                f"{self.folder} has the fast text encoder (apl::PrefixAttention nodes, a TensorRT plugin) that ONNX "
                "Runtime cannot run: use TRTAPLPipeline on a GPU, or re-export with --text-encoder standard."
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(self.folder / model["path"]), options, providers=providers)
            for name, model in self.manifest["models"].items()
        }

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> ORTAPLPipeline:
        return cls(folder, **kwargs)

    def infer(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.sessions[name]
        feed = {k: np.ascontiguousarray(v.cpu().numpy()) for k, v in inputs.items()}
        outputs = session.run(None, feed)
        return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outputs)}
