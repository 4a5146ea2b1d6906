"""A disk cache of the bench's images *without* the prefix, so prefixes compared on the same seeds share them.

Half of every bench run is the base half: the same prompts and seeds on the same models, whatever the adapter.
Comparing three prefixes side by side generates it once with a cache (``apl-bench --base-cache DIR``).

An image is keyed by the model (its folder and a fingerprint of its weights, so a rebuilt model misses the
cache), the prompt, the seed and the sampler settings; it is stored as a lossless PNG written through a temporary
file, so readers and concurrent bench runs see a whole image or none.

>>> import tempfile
>>> from PIL import Image
>>> cache = BaseImageCache(tempfile.mkdtemp())
>>> key = cache.key("model-fingerprint", "a red cube", seed=0, steps=20, guidance_scale=7.0)
>>> cache.get(key) is None
True
>>> cache.put(key, Image.new("RGB", (8, 8), "red"))
>>> cache.get(key).getpixel((0, 0))
(255, 0, 0)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image

from ..atomic import atomic_file


def model_fingerprint(pipe) -> str:
    """The pipeline's folder plus a digest of its UNet and text-encoder weights (cheap: sums, not bytes)."""
    digest = hashlib.sha256(str(getattr(pipe, "name_or_path", "") or "").encode())
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(f"{tensor.double().sum().item():.10e},{tensor.double().abs().sum().item():.10e}".encode())
    return digest.hexdigest()[:24]


class BaseImageCache:
    """Images without the prefix under ``folder/<key[:2]>/<key>.png``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._fingerprints: dict[int, tuple[object, str]] = {}

    def fingerprint(self, pipe) -> str:
        """:func:`model_fingerprint` of ``pipe``, computed once per pipeline (a bench asks for it every section)."""
        known = self._fingerprints.get(id(pipe))
        if known is None or known[0] is not pipe:
            known = (pipe, model_fingerprint(pipe))
            self._fingerprints[id(pipe)] = known
        return known[1]

    @staticmethod
    def key(model: str, prompt: str, seed: int, steps: int, guidance_scale: float) -> str:
        fields = {"model": model, "prompt": prompt, "seed": int(seed), "steps": steps, "cfg": float(guidance_scale)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.png"

    def get(self, key: str) -> Image.Image | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        with Image.open(path) as image:
            return image.convert("RGB")

    def put(self, key: str, image: Image.Image) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG")
