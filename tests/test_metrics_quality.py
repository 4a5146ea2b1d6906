"""Quality metrics with weights given by path: FID formula, feature networks (TorchScript, ONNX), CLIP score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from apl_adapter.metrics.quality import CLIPScorer, FeatureExtractor, frechet_distance, pair_similarity


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) * np.array([1, 2, 3, 0.5, 1, 1])
    shift = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])
    # same covariance: only the means differ
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # b = 2a: S_b = 4 S_a, (S_a S_b)^(1/2) = 2 S_a, so the trace term is Tr(S_a)(1 + 4 - 4)
    centered = a - a.mean(0)
    assert frechet_distance(centered, 2 * centered) == pytest.approx(np.trace(np.cov(centered, rowvar=False)), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(a[:1], a)


def test_pair_similarity_identical_and_different():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    same = pair_similarity(image, image.copy())
    assert same == {"ssim": pytest.approx(1.0), "psnr": float("inf")}
    noisy = Image.fromarray(
        np.clip(np.asarray(image, int) + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)
    )
    changed = pair_similarity(image, noisy)
    assert 0 < changed["ssim"] < 0.99 and 20 < changed["psnr"] < 40
    assert pair_similarity(image.resize((5, 5)), image.resize((5, 5)))["ssim"] == pytest.approx(1.0)  # tiny images
    with pytest.raises(ValueError, match="differ in size"):
        pair_similarity(image, image.resize((16, 16)))


class _ChannelMeans(torch.nn.Module):
    """A stand-in Inception with StyleGAN's calling convention: features only when asked."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if return_features:
            return x.mean(dim=(2, 3))
        return torch.zeros(x.shape[0], 1008)


def _solid(rgb):
    return Image.new("RGB", (40, 30), rgb)


def test_torchscript_feature_network_gets_0_255_inputs_and_return_features(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.script(_ChannelMeans()).save(str(path))
    extractor = FeatureExtractor.from_path(path, input_size=16)
    features = extractor([_solid((10, 20, 30)), _solid((200, 100, 0))], batch_size=1)
    np.testing.assert_allclose(features, [[10, 20, 30], [200, 100, 0]], atol=1e-3)


def test_onnx_feature_network_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is part of the export extra")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["y"])],
        "channel_means",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    path = tmp_path / "features.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # readable by any ORT
    onnx.save(model, str(path))
    features = FeatureExtractor.from_path(path, input_size=16)([_solid((1, 2, 3))] * 3)
    np.testing.assert_allclose(features, [[1, 2, 3]] * 3, atol=1e-4)


def test_missing_weights_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        FeatureExtractor.from_path(tmp_path / "inception.pt")
    with pytest.raises(FileNotFoundError, match="not a transformers CLIP folder"):
        CLIPScorer.from_pretrained(tmp_path)


def save_tiny_clip(folder):
    """Save a random tiny CLIPModel + a real-tokenizer CLIPProcessor: the on-disk layout of a real CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from apl_adapter import load_clip_tokenizer
    from apl_adapter.testing import tiny_clip_text_config

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=tiny_clip_text_config().to_dict(),
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=load_clip_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_from_a_local_folder(tiny_clip_folder):
    scorer = CLIPScorer.from_pretrained(tiny_clip_folder)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a red car", "a photo of Ann Lee", "a very long prompt " * 20]
    scores = scorer.score(images, texts, batch_size=2)
    # independent path: the model's own normalised projections from one forward pass
    inputs = scorer.processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    expected = (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(0 <= s <= 100 for s in scores)
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(images, texts[:2])
