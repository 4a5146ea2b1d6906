"""Shared fixtures: the real CLIP tokenizer (offline) and tiny real models."""

from __future__ import annotations

import pytest
import torch

from apl_adapter import load_clip_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="session")
def prompt_ids(tokenizer):
    """Padded ids (4, 77) of prompts with and without a person, of different lengths."""
    prompts = ["a photo of Ann Lee", "a red cube on a table", "a close-up portrait of Zorblax Quentaro smiling", "a"]
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
