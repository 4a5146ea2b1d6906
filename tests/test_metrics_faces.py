"""The dlib face backend on real photos, and the gallery recognizer built on it (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is part of the eval extra")
pytest.importorskip("dlib", reason="dlib-bin is part of the eval extra")

from apl_adapter.metrics import FaceGalleryRecognizer, build_gallery, identity_metrics  # noqa: E402
from apl_adapter.metrics.dlib_faces import DlibFaceEmbedder  # noqa: E402
from apl_adapter.metrics.faces import gallery_consistency  # noqa: E402

THRESHOLD = DlibFaceEmbedder.same_person_distance


@pytest.fixture(scope="module")
def embedder():
    return DlibFaceEmbedder()


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def cameraman():
    """A different real person (skimage's cameraman, a man in near profile): HOG needs 2x upsampling to find him."""
    return Image.fromarray(skimage_data.camera()).convert("RGB")


@pytest.fixture(scope="module")
def astronaut_embedding(embedder, astronaut):
    return embedder.detect_and_embed(astronaut)[0].embedding


def _transforms(image: Image.Image) -> dict[str, Image.Image]:
    return {
        "flip": ImageOps.mirror(image),
        "crop+resize": image.crop((60, 0, 400, 340)).resize((300, 300)),
        "brighter": ImageEnhance.Brightness(image).enhance(1.4),
        "darker": ImageEnhance.Brightness(image).enhance(0.7),
        "rotated": image.rotate(8),
    }


def test_the_astronaut_face_is_found_and_embedded(embedder, astronaut):
    faces = embedder.detect_and_embed(astronaut)
    assert faces, "dlib must find Eileen Collins' face"
    left, top, right, _ = faces[0].box
    assert 150 < left < 200 and 50 < top < 110 and right - left > 60, faces[0].box  # her face, not the suit patch
    assert faces[0].embedding.shape == (128,) and faces[0].embedding.dtype == np.float32
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


@pytest.mark.parametrize("name", ["flip", "crop+resize", "brighter", "darker", "rotated"])
def test_transformed_copies_stay_the_same_person(embedder, astronaut, astronaut_embedding, name):
    face = embedder.detect_and_embed(_transforms(astronaut)[name])[0]
    distance = float(np.linalg.norm(face.embedding - astronaut_embedding))
    assert 0 < distance < THRESHOLD, f"{name}: distance {distance:.3f}"


def test_a_different_person_is_over_the_threshold(astronaut_embedding, cameraman):
    faces = DlibFaceEmbedder(upsample=2, min_score=-0.5).detect_and_embed(cameraman)
    assert faces, "the cameraman's face must be detected with 2x upsampling"
    distance = float(np.linalg.norm(faces[0].embedding - astronaut_embedding))
    assert distance > THRESHOLD, f"cameraman vs astronaut: {distance:.3f}"


def test_an_image_without_a_face_is_no_face_not_a_match(embedder, astronaut_embedding):
    recognizer = FaceGalleryRecognizer(embedder, {"astronaut": astronaut_embedding[None]})
    cat, plain = Image.fromarray(skimage_data.chelsea()), Image.new("RGB", (64, 64), "gray")
    for obs in recognizer.observe([cat, plain]):
        assert not obs.face_present and obs.top1 is None and obs.presence_score == 0.0
        assert obs.score_for("astronaut") == 0.0 and not obs.is_same_person("astronaut", THRESHOLD)


def test_gallery_skips_bad_references_and_says_why(embedder, astronaut, tmp_path):
    astronaut.save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "cat.png")
    gallery = build_gallery(
        embedder,
        {
            "astronaut": [tmp_path / "good.png", tmp_path / "broken.jpg", tmp_path / "cat.png"],
            "cat": [tmp_path / "cat.png"],
        },
    )
    assert list(gallery.embeddings) == ["astronaut"] and gallery.embeddings["astronaut"].shape == (1, 128)
    assert gallery.used_images["astronaut"] == [str(tmp_path / "good.png")]
    text = "\n".join(gallery.skipped)
    assert "broken.jpg: not a readable image" in text
    assert "cat.png: no face found" in text
    assert "identity 'cat': no usable reference photo" in text
    empty = build_gallery(embedder, {"nobody": []})
    assert not empty.embeddings and "identity 'nobody': no usable reference photo (of 0)" in empty.skipped[0]


def test_empty_gallery_is_a_clear_error(embedder):
    with pytest.raises(ValueError, match="reference gallery is empty"):
        FaceGalleryRecognizer(embedder, {})


def test_recognizer_names_the_right_person_open_and_closed_set(astronaut, cameraman):
    """Gallery: the astronaut and the cameraman. Open set: a face far from both is nobody."""
    wide = DlibFaceEmbedder(upsample=2, min_score=-0.5)
    # 256 px crops around each head keep 2x upsampling fast
    astronaut, cameraman = astronaut.crop((90, 0, 346, 256)), cameraman.crop((110, 30, 366, 286))
    gallery = {
        "astronaut": wide.detect_and_embed(astronaut)[0].embedding[None],
        "cameraman": wide.detect_and_embed(cameraman)[0].embedding[None],
    }
    recognizer = FaceGalleryRecognizer(wide, gallery)
    flipped_astronaut, flipped_cameraman = ImageOps.mirror(astronaut), ImageOps.mirror(cameraman)
    observations = recognizer.observe([flipped_astronaut, flipped_cameraman, Image.new("RGB", (64, 64))])
    assert [o.top1 for o in observations] == ["astronaut", "cameraman", None]
    a = observations[0]
    assert a.scores["astronaut"] > a.scores["cameraman"] and a.distances["astronaut"] < THRESHOLD
    assert 0.5 < a.presence_score <= 1.0

    # Only the astronaut known: the cameraman's face is a face, but open-set top-1 names nobody.
    only = FaceGalleryRecognizer(wide, {"astronaut": gallery["astronaut"]})
    stranger = only.observe([flipped_cameraman])[0]
    assert stranger.face_present and stranger.top1 is None
    closed = FaceGalleryRecognizer(wide, {"astronaut": gallery["astronaut"]}, open_set=False)
    assert closed.observe([flipped_cameraman])[0].top1 == "astronaut"

    metrics = identity_metrics(observations, ["astronaut", "astronaut", "astronaut"])
    assert metrics["face_presence_rate"] == pytest.approx(2 / 3)
    assert metrics["top1_accuracy"] == pytest.approx(1 / 3)
    assert metrics["per_identity"]["astronaut"]["max_score"] == pytest.approx(a.scores["astronaut"])


def test_gallery_consistency_flags_mixed_or_confusable_references():
    gallery = {
        "ann": np.array([[0.0, 0.0], [0.3, 0.4]]),  # 0.5 apart: one person
        "bo": np.array([[0.0, 0.55], [2.0, 0.0]]),  # 2.07 apart: two people in one folder; 0.335 from ann's 2nd
        "cy": np.array([[5.0, 5.0]]),
    }
    rows, warnings = gallery_consistency(gallery, threshold=0.6)
    assert rows["ann"]["max_within_distance"] == pytest.approx(0.5)
    assert rows["ann"]["nearest_other"] == "bo"
    assert rows["ann"]["nearest_other_distance"] == pytest.approx(0.3354, abs=1e-4)  # (0.3, 0.4) to (0, 0.55)
    assert rows["cy"]["num_references"] == 1 and rows["cy"]["max_within_distance"] is None
    text = "\n".join(warnings)
    assert "identity 'bo': two references are 2.074 apart" in text
    assert "identity 'ann': a reference lies within 0.6 of one of 'bo'" in text
    assert "'cy'" not in text
