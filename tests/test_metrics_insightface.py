"""InsightFace backend without a real pack (none can be obtained offline).

The geometry (SCRFD decoding, 5-point alignment) is checked on constructed inputs with known
answers, and the whole backend runs through real onnxruntime on two small ONNX graphs that have
the real pack's input/output signature: a detector that always reports one face at a known place,
and a "recognizer" that returns the channel means of the aligned crop.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apl_adapter.metrics.insightface_faces import (
    ARCFACE_TEMPLATE,
    SCRFD_STRIDES,
    InsightFaceEmbedder,
    align_face,
    decode_scrfd,
    find_insightface_models,
    similarity_transform,
)

onnx = pytest.importorskip("onnx", reason="onnx is part of the export extra")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DET_SIZE = 64


def _scrfd_outputs(face_anchor: int, box_units, keypoint_units, stride_index: int = 0, score: float = 0.9):
    """SCRFD-shaped outputs (scores, boxes, key points per stride) with one confident anchor."""
    scores, boxes, points = [], [], []
    for level, stride in enumerate(SCRFD_STRIDES):
        anchors = (DET_SIZE // stride) ** 2 * 2
        s, b, k = (
            np.zeros((anchors, 1), np.float32),
            np.ones((anchors, 4), np.float32),
            np.zeros((anchors, 10), np.float32),
        )
        if level == stride_index:
            s[face_anchor, 0], b[face_anchor], k[face_anchor] = score, box_units, np.ravel(keypoint_units)
            s[face_anchor + 1, 0], b[face_anchor + 1] = score - 0.1, box_units  # same box again: NMS drops it
        scores.append(s), boxes.append(b), points.append(k)
    return scores + boxes + points


def test_decode_scrfd_finds_the_anchor_box_and_points():
    # stride 8, grid 8x8, anchor 2*(row 3 * 8 + col 5) -> centre (40, 24)
    anchor = 2 * (3 * 8 + 5)
    keypoints = np.array([[-1, -1], [1, -1], [0, 0], [-1, 1], [1, 1]], np.float32)
    boxes, scores, points = decode_scrfd(_scrfd_outputs(anchor, [2, 1, 2, 3], keypoints), DET_SIZE)
    assert scores.tolist() == pytest.approx([0.9])  # the duplicate was suppressed, the 0-score anchors dropped
    np.testing.assert_allclose(boxes[0], [40 - 16, 24 - 8, 40 + 16, 24 + 24])
    np.testing.assert_allclose(points[0], np.array([40, 24]) + keypoints * 8)


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    matrix = similarity_transform(ARCFACE_TEMPLATE, target)
    np.testing.assert_allclose(matrix, np.hstack([scale * rotation, shift[:, None]]), atol=1e-4)


def test_align_face_moves_the_key_points_onto_the_template():
    # a white dot at each of 5 key points of a face twice the template size, shifted by (30, 20)
    points = ARCFACE_TEMPLATE * 2 + [30, 20]
    pixels = np.zeros((300, 300, 3), np.uint8)
    for x, y in points.round().astype(int):
        pixels[y - 2 : y + 3, x - 2 : x + 3] = 255
    crop = np.asarray(align_face(Image.fromarray(pixels), points))
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE.round().astype(int):
        assert crop[y, x].min() > 200, (x, y)
    assert crop.mean() < 30  # and nothing else is bright


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))


def _fake_pack(folder, outputs):
    """Two ONNX graphs with the signature of an InsightFace pack (see module docstring)."""
    folder.mkdir()
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in SCRFD_STRIDES]
    nodes = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))
        for name, value in zip(names, outputs)
    ]
    det_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])
    det_outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in zip(names, outputs)]
    _save(helper.make_graph(nodes, "scrfd", [det_input], det_outputs), folder / "det_test.onnx")
    rec = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["embedding"])]
    rec_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])
    rec_output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 3])
    _save(helper.make_graph(rec, "arcface", [rec_input], [rec_output]), folder / "rec_test.onnx")


def test_the_backend_runs_end_to_end_in_onnxruntime(tmp_path):
    anchor = 2 * (3 * 8 + 4)  # centre (32, 24) in the 64 px detector input
    keypoints = (ARCFACE_TEMPLATE / 112 * 16 - 8) / 8  # a 16 px face around the centre, in stride units
    _fake_pack(tmp_path / "pack", _scrfd_outputs(anchor, [1, 1, 1, 1], keypoints))
    detector, recognizer = find_insightface_models(tmp_path / "pack")
    assert (detector.name, recognizer.name) == ("det_test.onnx", "rec_test.onnx")

    embedder = InsightFaceEmbedder(tmp_path / "pack", det_size=DET_SIZE, providers=["CPUExecutionProvider"])
    image = Image.new("RGB", (128, 96), (200, 100, 50))  # letterboxed at scale 0.5
    faces = embedder.detect_and_embed(image)
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.9)
    assert faces[0].box == (48, 32, 80, 64)  # (32 +- 8, 24 +- 8) / 0.5
    expected = (np.array([200, 100, 50]) - 127.5) / 127.5
    np.testing.assert_allclose(faces[0].embedding, expected / np.linalg.norm(expected), atol=1e-3)
    assert embedder.presence_probability(0.9) == pytest.approx(0.9)


def test_a_missing_or_incomplete_pack_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        InsightFaceEmbedder(tmp_path / "buffalo_l")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks an SCRFD detector .* and an ArcFace recognizer"):
        find_insightface_models(tmp_path / "empty")
