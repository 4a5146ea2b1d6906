"""One recognizer interface for every identity benchmark.

``apl-bench`` plugs in the synthetic world's CNN recognizers, ``apl-eval`` plugs in real face
recognizers (dlib, InsightFace). Both hand the same :class:`FaceObservation` records to
:func:`identity_metrics`, so the numbers in both reports mean the same thing.

Conventions (as the APL authors report, and as MACE-style accuracy is computed):

- an image without a detected face scores 0 similarity and counts as a *miss* for top-1
  accuracy; the face-presence rate is always reported beside it, so a method that stops drawing
  faces cannot look good;
- ``scores`` are "higher is more similar" (cosine similarity, or a classifier probability).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class FaceObservation:
    """What a recognizer saw in one image.

    Attributes:
        face_present: whether a face was detected.
        presence_score: detector confidence / face probability in [0, 1].
        top1: best-matching known identity, ``None`` when no face was found.
        scores: similarity of the face to each known identity (higher = more similar);
            empty when no face was found.
    """

    face_present: bool
    presence_score: float
    top1: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def score_for(self, identity: str) -> float:
        """Similarity to ``identity``; 0 when no face was found (the authors' "no face scores 0")."""
        return float(self.scores.get(identity, 0.0)) if self.face_present else 0.0


class Recognizer(ABC):
    """Detects a face in an image and says whose it is among a known set of identities."""

    #: short name used in reports, e.g. ``"world-cnn"`` or ``"dlib"``
    name: str = "recognizer"

    @property
    @abstractmethod
    def identities(self) -> list[str]:
        """The identities this recognizer can name."""

    @abstractmethod
    def observe(self, images: Sequence[Image.Image]) -> list[FaceObservation]:
        """One observation per image, in order."""


def identity_metrics(observations: Sequence[FaceObservation], targets: Sequence[str]) -> dict:
    """Aggregate identity leakage over images generated for ``targets`` (one target per image).

    Returns a dict with ``top1_accuracy`` (no face = miss), ``mean_identity_score`` (no face = 0),
    ``face_presence_rate``, ``num_images`` and ``per_identity`` rows holding the mean and max
    score and the accuracy of each identity (the authors report mean and max per identity).
    """
    if len(observations) != len(targets):
        raise ValueError(f"{len(observations)} observations for {len(targets)} targets: one target per image")
    if not observations:
        raise ValueError("no images to measure")
    per: dict[str, list[tuple[bool, float, bool]]] = defaultdict(list)
    for obs, target in zip(observations, targets):
        per[target].append((obs.face_present and obs.top1 == target, obs.score_for(target), obs.face_present))
    rows = {}
    for target, items in per.items():
        hits, scores, present = zip(*items)
        rows[target] = {
            "n": len(items),
            "top1_accuracy": sum(hits) / len(items),
            "mean_score": sum(scores) / len(items),
            "max_score": max(scores),
            "face_presence_rate": sum(present) / len(items),
        }
    n = len(observations)
    return {
        "num_images": n,
        "top1_accuracy": sum(o.face_present and o.top1 == t for o, t in zip(observations, targets)) / n,
        "mean_identity_score": sum(o.score_for(t) for o, t in zip(observations, targets)) / n,
        "face_presence_rate": sum(o.face_present for o in observations) / n,
        "per_identity": rows,
    }
