"""The measurement stage of apl-eval on real photos standing in for generated images.

The tiny test pipeline draws no faces, so this feeds the same stage real faces: "base" images are
the astronaut (the identity leaks), "APL" images are a face-free photo and the cameraman (someone
else). No pipeline is involved and nothing is mocked: real dlib, real files.
"""

from __future__ import annotations

import pytest
from PIL import Image, ImageOps

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is part of the eval extra")
pytest.importorskip("dlib", reason="dlib-bin is part of the eval extra")

from apl_adapter.evaluation.report import to_markdown  # noqa: E402
from apl_adapter.evaluation.runner import measure_identity  # noqa: E402
from apl_adapter.metrics import FaceGalleryRecognizer  # noqa: E402
from apl_adapter.metrics.dlib_faces import DlibFaceEmbedder  # noqa: E402


def test_leaking_base_and_anonymous_apl_are_told_apart(tmp_path):
    embedder = DlibFaceEmbedder(upsample=2, min_score=-0.5)
    astronaut = Image.fromarray(skimage_data.astronaut()).crop((90, 0, 346, 256))
    cameraman = Image.fromarray(skimage_data.camera()).convert("RGB").crop((110, 30, 366, 286))
    gallery = {"Eileen": embedder.detect_and_embed(astronaut)[0].embedding[None]}
    recognizer = FaceGalleryRecognizer(embedder, gallery)

    ImageOps.mirror(astronaut).save(tmp_path / "leak.png")
    cameraman.save(tmp_path / "other.png")
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "noface.png")
    records = [
        {"identity": "Eileen", "base": "leak.png", "apl": "other.png"},
        {"identity": "Eileen", "base": "leak.png", "apl": "noface.png"},
        {"identity": None, "base": "noface.png", "apl": "noface.png"},  # prompts without a person are not measured
    ]
    warnings: list[str] = []
    section = measure_identity(recognizer, embedder, records, tmp_path, warnings)

    base, apl = section["base"], section["apl"]
    assert base["num_images"] == apl["num_images"] == 2
    assert base["face_presence_rate"] == 1.0 and base["top1_accuracy"] == 1.0 and base["same_person_rate"] == 1.0
    assert 0 < base["mean_distance"] < 0.6 and base["per_identity"]["Eileen"]["max_score"] > 0.9
    assert apl["face_presence_rate"] == 0.5 and apl["top1_accuracy"] == 0.0 and apl["same_person_rate"] == 0.0
    assert apl["mean_distance"] > 0.6  # over the one face found: the cameraman
    assert apl["mean_identity_score"] < base["mean_identity_score"]
    assert records[0]["apl_face"]["face_present"] and records[0]["apl_face"]["top1"] is None
    assert not records[1]["apl_face"]["face_present"] and records[1]["apl_face"]["score"] == 0.0
    assert "base_face" not in records[2] and warnings == []

    markdown = to_markdown(
        {
            "settings": {"base": "b", "adapter": "a", "seeds": [0], "steps": 20, "guidance_scale": 7.0},
            "created": "now",
            "identity": section,
            "quality": {
                "unchanged": {"skipped": "none"},
                "clip_score": {"skipped": "no --clip-model given"},
                "fid": {"skipped": "no --fid-model given"},
            },
            "skipped": [],
            "warnings": [],
        }
    )
    assert "| face presence | 1.000 | 0.500 |" in markdown
    assert "| top-1 accuracy | 1.000 | 0.000 |" in markdown
    assert "Top-1 accuracy falls to 0 with the prefix" in markdown
