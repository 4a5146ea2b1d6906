"""InsightFace backend: an ONNX model pack the user supplies (SCRFD detector + ArcFace recognizer).

The APL authors measure identity with InsightFace embeddings. InsightFace's packs (e.g.
``buffalo_l``: ``det_10g.onnx`` + ``w600k_r50.onnx``) download at run time and carry their own
licence, so this project never fetches them: pass the unpacked folder with
``--insightface-pack <dir>``. Only ``onnxruntime`` is needed (the ``insightface`` package is not).

The two models are recognised by their shapes, not their file names: the detector has 9 outputs
(scores, boxes and 5 key points at strides 8/16/32); the recognizer takes ``(N, 3, 112, 112)``
and returns one embedding per face. Faces are aligned to ArcFace's 112x112 five-point template.

Not tested here against a real pack (none can be obtained offline); the decoding and alignment
are tested on constructed inputs, see ``tests/test_metrics_insightface.py``.

Example:

```python
>>> from apl_adapter.metrics.insightface_faces import InsightFaceEmbedder
>>> embedder = InsightFaceEmbedder("~/.insightface/models/buffalo_l")   # a folder you already have  # doctest: +SKIP
>>> faces = embedder.detect_and_embed(image)                            # 512-d, L2-normalised  # doctest: +SKIP
```
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .faces import FaceDetection, FaceEmbedder

# ArcFace's reference positions of the eyes, nose tip and mouth corners in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
SCRFD_STRIDES = (8, 16, 32)


def find_insightface_models(pack: str | os.PathLike) -> tuple[Path, Path]:
    """``(detector, recognizer)`` ONNX files of an InsightFace pack folder, recognised by their shapes."""
    import onnx

    folder = Path(pack).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"InsightFace pack folder {folder} does not exist. Fix: pass the unpacked folder of a pack "
            "(e.g. buffalo_l with det_10g.onnx and w600k_r50.onnx) that you already have; nothing is downloaded."
        )
    detector = recognizer = None
    for path in sorted(folder.glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if len(graph.output) == 9 and detector is None:
            detector = path
        elif len(graph.output) == 1 and dims[-2:] == [112, 112] and recognizer is None:
            recognizer = path
    if detector is None or recognizer is None:
        wanted = (("an SCRFD detector (9 outputs)", detector), ("an ArcFace recognizer (112x112 input)", recognizer))
        missing = " and ".join(what for what, found in wanted if found is None)
        present = [p.name for p in folder.glob("*.onnx")]
        raise FileNotFoundError(f"{folder} lacks {missing} ONNX model (ONNX files there: {present})")
    return detector, recognizer


def decode_scrfd(
    outputs: list[np.ndarray], input_size: int, threshold: float = 0.5, nms_iou: float = 0.4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes ``(n, 4)`` x1y1x2y2, scores ``(n,)`` and key points ``(n, 5, 2)`` from SCRFD's 9 outputs.

    ``outputs`` are ordered scores, boxes, key points, each for strides 8, 16, 32, with 2 anchors
    per grid cell; distances are in stride units from the anchor centre, in input pixels.
    """
    boxes, scores, points = [], [], []
    for level, stride in enumerate(SCRFD_STRIDES):
        cells = input_size // stride
        level_scores = outputs[level].reshape(-1)
        anchors_per_cell = level_scores.size // (cells * cells)
        ys, xs = np.mgrid[:cells, :cells]
        centers = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, anchors_per_cell, axis=0).astype(np.float32)
        distances = outputs[level + 3].reshape(-1, 4) * stride
        keypoints = outputs[level + 6].reshape(-1, 5, 2) * stride
        keep = level_scores >= threshold
        boxes.append(np.concatenate([centers - distances[:, :2], centers + distances[:, 2:]], axis=1)[keep])
        points.append((centers[:, None, :] + keypoints)[keep])
        scores.append(level_scores[keep])
    boxes, scores, points = np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)
    order = _nms(boxes, scores, nms_iou)
    return boxes[order], scores[order], points[order]


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    order, keep = np.argsort(-scores), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        order = rest[overlap / (area[best] + area[rest] - overlap + 1e-9) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2x3 matrix of the rotation + uniform scale + shift mapping ``source`` points onto ``target`` (Umeyama)."""
    src_mean, dst_mean = source.mean(0), target.mean(0)
    src, dst = source - src_mean, target - dst_mean
    u, singular, vt = np.linalg.svd(dst.T @ src / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / src.var(0).sum()
    return np.hstack([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]])


def align_face(image: Image.Image, keypoints: np.ndarray, size: int = 112) -> Image.Image:
    """The ``size`` x ``size`` ArcFace crop whose eyes, nose and mouth land on the template."""
    matrix = np.vstack([similarity_transform(keypoints, ARCFACE_TEMPLATE * (size / 112)), [0, 0, 1]])
    inverse = np.linalg.inv(matrix)[:2].reshape(-1)  # PIL maps output pixels back to input pixels
    return image.transform((size, size), Image.Transform.AFFINE, tuple(inverse), resample=Image.Resampling.BILINEAR)


class InsightFaceEmbedder(FaceEmbedder):
    """SCRFD detection + ArcFace embedding from a user-supplied InsightFace ONNX pack.

    Args:
        pack: folder holding the pack's ONNX files.
        det_size: detector input side (images are letterboxed to a square of this size).
        det_threshold: minimum face score.
        same_person_distance: Euclidean distance between L2-normalised embeddings below which two
            faces are one person; 1.14 is cosine similarity 0.35 (a common ArcFace operating point;
            tune it on your own references).
        providers: onnxruntime execution providers (default: CUDA when available, else CPU).
    """

    name = "insightface"

    def __init__(
        self,
        pack: str | os.PathLike,
        det_size: int = 640,
        det_threshold: float = 0.5,
        same_person_distance: float = 1.14,
        providers: list[str] | None = None,
    ):
        import onnxruntime as ort

        detector, recognizer = find_insightface_models(pack)
        providers = providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
        ]
        self._detector = ort.InferenceSession(str(detector), providers=providers)
        self._recognizer = ort.InferenceSession(str(recognizer), providers=providers)
        self.det_size, self.det_threshold = det_size, det_threshold
        self.same_person_distance = same_person_distance

    def presence_probability(self, score: float) -> float:
        return float(score)  # SCRFD's score already is a probability

    def detect_and_embed(self, image: Image.Image) -> list[FaceDetection]:
        image = image.convert("RGB")
        scale = self.det_size / max(image.size)
        resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        canvas = np.zeros((self.det_size, self.det_size, 3), dtype=np.float32)
        canvas[: resized.height, : resized.width] = np.asarray(resized, dtype=np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self._detector.run(None, {self._detector.get_inputs()[0].name: blob})
        boxes, scores, keypoints = decode_scrfd(outputs, self.det_size, self.det_threshold)
        faces = []
        for box, score, points in zip(boxes / scale, scores, keypoints / scale):
            crop = np.asarray(align_face(image, points), dtype=np.float32)
            face_blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
            vector = self._recognizer.run(None, {self._recognizer.get_inputs()[0].name: face_blob})[0].reshape(-1)
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            faces.append(FaceDetection(tuple(round(float(v)) for v in box), float(score), vector.astype(np.float32)))
        return faces
