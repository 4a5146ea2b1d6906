"""Real-face identity: a face embedder backend plus a reference gallery make a :class:`Recognizer`.

A :class:`FaceEmbedder` finds faces in an image and turns each into an identity embedding (dlib's
128-d ResNet, or an InsightFace ArcFace pack). :class:`FaceGalleryRecognizer` compares the most
confident face of each generated image with the reference photos of every identity and hands
:func:`~apl_adapter.metrics.base.identity_metrics` the same :class:`FaceObservation` records the
synthetic-world recognizers of ``apl-bench`` produce.

Scores and matches:

- ``scores[identity]`` is the mean cosine similarity of the face to that identity's reference
  embeddings (the authors' measure; higher = more similar);
- ``distances[identity]`` is the smallest Euclidean distance to one of its references; a face is
  the *same person* when it is below the backend's ``same_person_distance`` (0.6 for dlib);
- ``top1`` is open-set by default: the closest identity, but only when that face is within the
  same-person distance, else ``None`` ("a face, but nobody we know"). Closed-set top-1 (always
  name the closest identity, as a celebrity classifier does) is available with ``open_set=False``.

Example:

```python
>>> import skimage.data
>>> from PIL import Image, ImageOps
>>> from apl_adapter.metrics.dlib_faces import DlibFaceEmbedder
>>> from apl_adapter.metrics.faces import FaceGalleryRecognizer
>>> embedder = DlibFaceEmbedder()
>>> photo = Image.fromarray(skimage.data.astronaut())
>>> gallery = {"Eileen Collins": embedder.detect_and_embed(photo)[0].embedding[None]}  # (1, 128)
>>> recognizer = FaceGalleryRecognizer(embedder, gallery)
>>> recognizer.observe([ImageOps.mirror(photo)])[0].top1
'Eileen Collins'
>>> recognizer.observe([Image.fromarray(skimage.data.chelsea())])[0].face_present   # a cat
False

```

From folders of photos, :func:`build_gallery` embeds each identity's references and lists what it
could not use.
```
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import FaceObservation, Recognizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class FaceDetection:
    """One detected face.

    Attributes:
        box: ``(left, top, right, bottom)`` in pixels of the input image.
        score: the detector's raw confidence (backend-specific scale; larger = more certain).
        embedding: identity embedding, shape ``(D,)`` float32 (D = 128 for dlib, 512 for ArcFace).
    """

    box: tuple[int, int, int, int]
    score: float
    embedding: np.ndarray


class FaceEmbedder(ABC):
    """Detects faces and embeds each one; the backend half of a real-face recognizer."""

    #: short name used in reports
    name: str = "faces"
    #: Euclidean distance between two embeddings below which they show the same person
    same_person_distance: float = 0.6

    @abstractmethod
    def detect_and_embed(self, image: Image.Image) -> list[FaceDetection]:
        """All faces in ``image``, most confident first; an empty list when there is none."""

    def presence_probability(self, score: float) -> float:
        """Map a raw detector score to [0, 1] for :attr:`FaceObservation.presence_score` (logistic by default)."""
        return 1.0 / (1.0 + math.exp(-score))


@dataclass
class FaceMatch(FaceObservation):
    """A :class:`FaceObservation` with what a real-face recognizer knows besides the scores.

    Attributes:
        distances: smallest Euclidean distance to each identity's references (empty: no face).
        box: the matched face's ``(left, top, right, bottom)``; ``None`` when no face was found.
    """

    distances: dict[str, float] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None

    def is_same_person(self, identity: str, threshold: float) -> bool:
        """Whether the face lies within ``threshold`` of one of ``identity``'s references."""
        return self.face_present and self.distances.get(identity, math.inf) < threshold


@dataclass
class Gallery:
    """Reference embeddings per identity, and what could not be used.

    Attributes:
        embeddings: identity -> ``(k, D)`` array of reference embeddings (k >= 1).
        skipped: one human-readable line per reference image or identity left out, and why.
        used_images: identity -> the reference files that gave an embedding.
    """

    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    used_images: dict[str, list[str]] = field(default_factory=dict)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (other files are ignored)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, with a clear error for a file that is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # a tiny file that decodes to gigabytes
        raise ValueError(f"{path}: refused, it decodes to too many pixels ({error}); use a normal photo") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable image ({error}); replace or remove the file") from error


def build_gallery(
    embedder: FaceEmbedder,
    references: Mapping[str, Sequence[str | os.PathLike]],
    progress: bool = False,
) -> Gallery:
    """Embed each identity's reference photos (the most confident face of each).

    Unreadable files, photos without a face and identities left with no usable photo are skipped
    and listed in :attr:`Gallery.skipped`; nothing raises for them, so one bad photo does not stop
    an evaluation. An identity without any usable reference is absent from ``embeddings``.
    """
    from tqdm.auto import tqdm

    gallery = Gallery()
    total = sum(len(paths) for paths in references.values())
    with tqdm(total=total, desc="reference faces", unit="img", disable=not progress) as bar:
        for identity, paths in references.items():
            vectors, used = [], []
            for path in paths:
                bar.update(1)
                try:
                    faces = embedder.detect_and_embed(load_rgb(path))
                except ValueError as error:
                    gallery.skipped.append(f"reference {identity!r}: {error}")
                    continue
                if not faces:
                    gallery.skipped.append(f"reference {identity!r}: {path}: no face found, image not used")
                    continue
                vectors.append(faces[0].embedding)
                used.append(str(path))
            if not vectors:
                gallery.skipped.append(
                    f"identity {identity!r}: no usable reference photo (of {len(paths)}); identity skipped. "
                    "Fix: add clear, frontal photos of this person to its reference folder."
                )
                continue
            gallery.embeddings[identity] = np.stack(vectors).astype(np.float32)
            gallery.used_images[identity] = used
    return gallery


def gallery_consistency(gallery: Mapping[str, np.ndarray], threshold: float) -> tuple[dict[str, dict], list[str]]:
    """Check the references before trusting numbers measured against them.

    Returns per identity ``num_references``, ``max_within_distance`` (largest distance between two
    of its references; ``None`` with one reference) and the ``nearest_other`` identity with its
    ``nearest_other_distance`` (closest pair of references across the two), plus warnings for
    references that look like two people or two identities that look like one.
    """
    rows, warnings = {}, []
    for name, refs in gallery.items():
        within = np.linalg.norm(refs[:, None] - refs[None], axis=-1)
        row = {"num_references": len(refs), "max_within_distance": float(within.max()) if len(refs) > 1 else None}
        others = {
            o: float(np.linalg.norm(refs[:, None] - r[None], axis=-1).min()) for o, r in gallery.items() if o != name
        }
        if others:
            nearest = min(others, key=others.__getitem__)
            row.update(nearest_other=nearest, nearest_other_distance=others[nearest])
            if others[nearest] < threshold:
                warnings.append(
                    f"identity {name!r}: a reference lies within {threshold} of one of {nearest!r} "
                    f"({others[nearest]:.3f}); the recognizer may confuse them"
                )
        if row["max_within_distance"] is not None and row["max_within_distance"] >= threshold:
            warnings.append(
                f"identity {name!r}: two references are {row['max_within_distance']:.3f} apart (>= {threshold}); "
                "check that every photo in its folder shows this person"
            )
        rows[name] = row
    return rows, warnings


def cosine_similarities(vector: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``vector`` (D,) with each row of ``matrix`` (k, D) -> (k,)."""
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    return (matrix @ vector) / np.maximum(norms, 1e-12)


class FaceGalleryRecognizer(Recognizer):
    """A :class:`Recognizer` over real photos: a :class:`FaceEmbedder` plus reference embeddings.

    Args:
        embedder: the face backend (dlib, InsightFace).
        gallery: identity -> ``(k, D)`` reference embeddings, e.g. :attr:`Gallery.embeddings`.
        open_set: name an identity only when the face is within ``embedder.same_person_distance``
            of it (default); ``False`` always names the closest identity.
    """

    def __init__(self, embedder: FaceEmbedder, gallery: Mapping[str, np.ndarray], open_set: bool = True):
        if not gallery:
            raise ValueError(
                "The reference gallery is empty: no identity has a usable reference face. "
                "Fix: give each identity a folder with at least one clear photo of the person."
            )
        self.embedder = embedder
        self.gallery = {name: np.atleast_2d(np.asarray(v, dtype=np.float32)) for name, v in gallery.items()}
        self.open_set = open_set
        self.name = embedder.name

    @property
    def identities(self) -> list[str]:
        return list(self.gallery)

    def observe(self, images: Sequence[Image.Image]) -> list[FaceMatch]:
        return [self._observe_one(image) for image in images]

    def _observe_one(self, image: Image.Image) -> FaceMatch:
        faces = self.embedder.detect_and_embed(image.convert("RGB"))
        if not faces:
            return FaceMatch(face_present=False, presence_score=0.0)
        face = faces[0]
        scores, distances = {}, {}
        for identity, references in self.gallery.items():
            scores[identity] = float(cosine_similarities(face.embedding, references).mean())
            distances[identity] = float(np.linalg.norm(references - face.embedding, axis=1).min())
        closest = min(distances, key=distances.__getitem__)
        if self.open_set and distances[closest] >= self.embedder.same_person_distance:
            closest = None
        return FaceMatch(
            face_present=True,
            presence_score=self.embedder.presence_probability(face.score),
            top1=closest,
            scores=scores,
            distances=distances,
            box=face.box,
        )
