"""Shared set-up of the export tests: saved tiny sources and whether a TensorRT builder is installed."""

from __future__ import annotations

from pathlib import Path

from apl_export import tensorrt_loader
from apl_export.errors import TensorRTUnavailableError
from peft import get_peft_model

from apl_adapter import APLConfig, save_adapter
from apl_adapter.testing import tiny_sd_pipeline


def has_trt_builder() -> bool:
    try:
        tensorrt_loader.load_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


def save_tiny_sources(root: Path) -> Path:
    """``root/sd``: a saved tiny SD pipeline; ``root/adapter``: an adapter for its text encoder (width 32, m = 10)."""
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "sd")
    save_adapter(get_peft_model(pipe.text_encoder, APLConfig()), root / "adapter")
    return root
