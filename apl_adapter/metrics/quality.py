"""Image quality and text fidelity with weights the user supplies by path (nothing is downloaded).

- :class:`CLIPScorer`: CLIP score, ``100 * max(cos(image, text), 0)`` (the torchmetrics
  definition), from a local ``transformers`` CLIP folder (``CLIPModel`` + processor files).
- :class:`FeatureExtractor` + :func:`frechet_distance`: FID from a local Inception-style feature
  network, TorchScript (``.pt``, e.g. the ``inception-2015-12-05.pt`` of StyleGAN/clean-fid) or
  ONNX (``.onnx``). Input convention: float32 ``(N, 3, S, S)`` RGB in [0, 255] at ``input_size``
  (299); a TorchScript ``forward`` that takes ``return_features`` is called with it set.
- :func:`pair_similarity`: SSIM and PSNR of two images (no weights): how much the prefix changes
  an image that should not change.

Example:

```python
>>> scorer = CLIPScorer.from_pretrained("path/to/clip-vit-large-patch14")  # doctest: +SKIP
>>> scorer.score(images, ["a red car on a street"] * len(images))     # one score per image  # doctest: +SKIP
>>> extractor = FeatureExtractor.from_path("path/to/inception-2015-12-05.pt")  # doctest: +SKIP
>>> frechet_distance(extractor(real_images), extractor(generated_images))  # doctest: +SKIP
```
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class CLIPScorer:
    """CLIP score of (image, text) pairs with a local ``transformers`` CLIP model.

    Args:
        model: a ``transformers.CLIPModel``.
        processor: the matching ``CLIPProcessor`` (tokenizer + image processor).
        device: where to run the model.
    """

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> CLIPScorer:
        """Load ``CLIPModel`` and ``CLIPProcessor`` from a local folder only (``local_files_only``)."""
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a transformers CLIP folder (no config.json). Fix: pass a folder saved with "
                "CLIPModel.save_pretrained + CLIPProcessor.save_pretrained, e.g. a local copy of "
                "openai/clip-vit-large-patch14."
            )
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, device)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 16) -> list[float]:
        """One CLIP score per (image, text) pair, in [0, 100]."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts: one text per image")
        scores: list[float] = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(
                text=list(texts[start : start + batch_size]),
                images=[im.convert("RGB") for im in images[start : start + batch_size]],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            image_embeds = _as_tensor(self.model.get_image_features(pixel_values=batch["pixel_values"]))
            text_embeds = _as_tensor(
                self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            )
            cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
            scores.extend((100 * cosine.clamp(min=0)).tolist())
        return scores


def _as_tensor(features) -> torch.Tensor:
    # transformers 5 may return a model output whose pooled projection is the feature
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class FeatureExtractor:
    """Images -> ``(N, D)`` features for FID, from a TorchScript or ONNX file.

    Args:
        run: a function from a float32 ``(N, 3, S, S)`` array in [0, 255] to features.
        input_size: S, the side images are resized to (299 for Inception).
    """

    def __init__(self, run, input_size: int = 299):
        self._run = run
        self.input_size = input_size

    @classmethod
    def from_path(cls, path: str | os.PathLike, input_size: int = 299, device: str = "cpu") -> FeatureExtractor:
        """Load ``path``: ``.onnx`` through onnxruntime, anything else as TorchScript (``torch.jit.load``)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"FID feature network {path} does not exist. Fix: pass a local TorchScript (.pt, e.g. "
                "inception-2015-12-05.pt) or ONNX file; nothing is downloaded."
            )
        if path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return cls(lambda x: session.run(None, {name: x})[0], input_size)
        module = torch.jit.load(str(path), map_location=device).eval()
        try:
            takes_flag = "return_features" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            takes_flag = "return_features" in str(module.forward.schema) if hasattr(module.forward, "schema") else False
        kwargs = {"return_features": True} if takes_flag else {}

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x).to(device), **kwargs).float().cpu().numpy()

        return cls(run, input_size)

    def __call__(self, images: Sequence[Image.Image], batch_size: int = 16) -> np.ndarray:
        features = []
        for start in range(0, len(images), batch_size):
            batch = np.stack(
                [
                    np.asarray(im.convert("RGB").resize((self.input_size,) * 2, Image.Resampling.BICUBIC), np.float32)
                    for im in images[start : start + batch_size]
                ]
            ).transpose(0, 3, 1, 2)
            features.append(np.asarray(self._run(np.ascontiguousarray(batch))).reshape(len(batch), -1))
        return np.concatenate(features).astype(np.float64)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to ``(N, D)`` feature sets (the FID formula).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. Needs at least 2 samples per set;
    with fewer samples than dimensions the covariances are singular and the value is biased high
    (report N beside it).
    """
    from scipy import linalg

    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("FID needs at least 2 images per set")
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    with warnings.catch_warnings():  # few samples make the product singular; the caller reports N beside FID
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
        if not np.isfinite(root).all():  # regularise as pytorch-fid does
            offset = np.eye(len(cov_a)) * 1e-6
            root, _ = linalg.sqrtm((cov_a + offset) @ (cov_b + offset), disp=False)
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def pair_similarity(a: Image.Image, b: Image.Image) -> dict[str, float]:
    """SSIM (1 = identical) and PSNR in dB (inf = identical) of two same-size RGB images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x, y = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    side = min(x.shape[:2])
    window = max(1, min(7, side if side % 2 else side - 1))  # skimage needs an odd window inside the image
    ssim = structural_similarity(x, y, channel_axis=2, data_range=255, win_size=window)
    psnr = float("inf") if np.array_equal(x, y) else float(peak_signal_noise_ratio(x, y, data_range=255))
    return {"ssim": float(ssim), "psnr": psnr}
