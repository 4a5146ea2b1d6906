"""Measurement: the recognizer interface shared by ``apl-bench`` (world) and ``apl-eval`` (real faces)."""

from .base import FaceObservation, Recognizer, identity_metrics

__all__ = ["FaceObservation", "Recognizer", "identity_metrics"]
