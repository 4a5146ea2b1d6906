"""Measurement: the recognizer interface shared by ``apl-bench`` (world) and ``apl-eval`` (real faces).

Real-face backends live in :mod:`.dlib_faces` (bundled, default) and :mod:`.insightface_faces`
(a pack you supply); quality metrics with user-supplied weights in :mod:`.quality`.
"""

from .base import FaceObservation, Recognizer, identity_metrics
from .faces import FaceDetection, FaceEmbedder, FaceGalleryRecognizer, FaceMatch, Gallery, build_gallery

__all__ = [
    "FaceDetection",
    "FaceEmbedder",
    "FaceGalleryRecognizer",
    "FaceMatch",
    "FaceObservation",
    "Gallery",
    "Recognizer",
    "build_gallery",
    "identity_metrics",
]
