"""dlib face backend: HOG (or CNN) detection, 5-point alignment, 128-d ResNet identity embedding.

The model files come from the ``face_recognition_models`` package (CC0 data, no download). The
package's own ``__init__`` imports ``pkg_resources`` (gone from recent setuptools), so the files are
located with :mod:`importlib` without importing it; ``face_recognition`` itself is not used.

dlib's ResNet puts two photos of one person within Euclidean distance 0.6 of each other
(99.38% on LFW); that is :attr:`DlibFaceEmbedder.same_person_distance`.

Example:

```python
>>> import numpy as np, skimage.data
>>> from PIL import Image
>>> from apl_adapter.metrics.dlib_faces import DlibFaceEmbedder
>>> faces = DlibFaceEmbedder().detect_and_embed(Image.fromarray(skimage.data.astronaut()))
>>> faces[0].embedding.shape
(128,)

```
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from .faces import FaceDetection, FaceEmbedder

MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


def find_dlib_models(models_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the dlib model files, from ``models_dir`` or the installed ``face_recognition_models``."""
    if models_dir is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "dlib's model files come from the face_recognition_models package, which is not installed. "
                "Fix: pip install dlib-bin face_recognition_models (or pass --dlib-models <folder>)."
            )
        models_dir = Path(spec.origin).parent / "models"
    paths = {key: Path(models_dir) / name for key, name in MODEL_FILES.items()}
    missing = [str(p) for key, p in paths.items() if key != "cnn_detector" and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"dlib model files missing: {', '.join(missing)}; reinstall face_recognition_models")
    return paths


@cache
def _load_models(models_dir: str | None, detector: str):
    import dlib

    paths = find_dlib_models(models_dir)
    if detector == "cnn":
        if not paths["cnn_detector"].is_file():
            raise FileNotFoundError(f"{paths['cnn_detector']} is missing: the CNN detector needs it")
        face_detector = dlib.cnn_face_detection_model_v1(str(paths["cnn_detector"]))
    else:
        face_detector = dlib.get_frontal_face_detector()
    return (
        face_detector,
        dlib.shape_predictor(str(paths["landmarks"])),
        dlib.face_recognition_model_v1(str(paths["recognition"])),
    )


class DlibFaceEmbedder(FaceEmbedder):
    """dlib face detection + 128-d embedding, all offline.

    Args:
        detector: ``"hog"`` (fast, frontal faces; default) or ``"cnn"`` (MMOD: finds turned and
            small faces too, ~50x slower on a CPU).
        upsample: how many times the image is upsampled before detection (finds smaller faces).
        min_score: detections below this raw score are ignored (dlib's default is 0).
        jitter: embeddings averaged over this many jittered crops (dlib's ``num_jitters``).
        models_dir: a folder with dlib's ``.dat`` files; default: the ``face_recognition_models`` package.
    """

    name = "dlib"
    same_person_distance = 0.6

    def __init__(
        self,
        detector: str = "hog",
        upsample: int = 1,
        min_score: float = 0.0,
        jitter: int = 1,
        models_dir: str | os.PathLike | None = None,
    ):
        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        self.detector, self.upsample, self.min_score, self.jitter = detector, upsample, min_score, jitter
        self._detect, self._landmarks, self._embed = _load_models(
            None if models_dir is None else str(models_dir), detector
        )

    def detect_and_embed(self, image: Image.Image) -> list[FaceDetection]:
        import dlib

        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        if self.detector == "cnn":
            found = [(d.rect, d.confidence) for d in self._detect(pixels, self.upsample)]
        else:
            rects, scores, _ = self._detect.run(pixels, self.upsample, self.min_score)
            found = list(zip(rects, scores))
        found = [(rect, float(score)) for rect, score in found if score >= self.min_score]
        found.sort(key=lambda item: -item[1])
        faces = []
        for rect, score in found:
            rect = dlib.rectangle(rect.left(), rect.top(), rect.right(), rect.bottom())
            shape = self._landmarks(pixels, rect)
            vector = np.asarray(self._embed.compute_face_descriptor(pixels, shape, self.jitter), dtype=np.float32)
            faces.append(FaceDetection((rect.left(), rect.top(), rect.right(), rect.bottom()), score, vector))
        return faces
