"""The world's recognizers: one small CNN with heads for face presence, identity, attributes and scenes.

One shared trunk is trained once on renders (clean, VAE round-tripped, blurred and noisy, both
styles) and exposed through three typed views:

- :class:`WorldIdentityRecognizer` implements :class:`apl_adapter.metrics.Recognizer`: a face
  presence score, ``scores`` = class probabilities of every world name, and ``top1`` = the most
  likely name. The identity head also has a *stranger* class, trained on faces of random people
  who are not in the world: when it wins, ``top1`` is ``None`` although a face is present (an
  anonymous face is "someone else", as a real face recognizer's similarity threshold would say).
- :class:`WorldAttributeRecognizer`: sex, hair colour, skin tone and face shape of a face.
- :class:`WorldSceneRecognizer`: shape, colour and background of a scene without people.

Example:

```python
>>> import random
>>> from apl_adapter.world import WorldSpec, render_face, WorldIdentityRecognizer
>>> world = WorldSpec.from_seed(0)
>>> person = world.seen[0]
>>> rec = WorldIdentityRecognizer.from_pretrained()
>>> rec.observe([render_face(person.attributes, person.fine, random.Random(5))])[0].top1 == person.name
True

```
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_folder
from ..metrics.base import FaceObservation, Recognizer
from .render import to_tensor
from .spec import ATTRIBUTE_VALUES, SCENE_BACKGROUNDS, SCENE_COLORS, SCENE_SHAPES, Scene

RECOGNIZER_DIR = Path(__file__).parent / "assets" / "recognizer"
SCENE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SCENE_SHAPES,
    "color": SCENE_COLORS,
    "background": SCENE_BACKGROUNDS,
}


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU())


class WorldRecognizerNet(nn.Module):
    """Trunk 32x32 -> 2x2x128 features; heads: presence (1 logit), identity (names + stranger), attributes, scene."""

    def __init__(self, num_names: int, width: int = 32):
        super().__init__()
        self.num_names = num_names
        self.trunk = nn.Sequential(
            _conv(3, width, 1),
            _conv(width, 2 * width, 2),  # 16x16
            _conv(2 * width, 2 * width, 1),
            _conv(2 * width, 4 * width, 2),  # 8x8
            _conv(4 * width, 4 * width, 2),  # 4x4
            nn.AdaptiveAvgPool2d(2),  # keep a coarse layout: a mark on the left cheek is not one on the right
            nn.Flatten(),
        )
        features = 4 * width * 4
        self.presence = nn.Linear(features, 1)
        self.identity = nn.Linear(features, num_names + 1)  # last class: stranger
        self.attributes = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in ATTRIBUTE_VALUES.items()})
        self.scene = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in SCENE_VALUES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: ``(B, 3, 32, 32)`` in [-1, 1] -> logits per head, each ``(B, classes)``."""
        h = self.trunk(x)
        out = {"presence": self.presence(h).squeeze(-1), "identity": self.identity(h)}
        out.update({f"attr_{k}": head(h) for k, head in self.attributes.items()})
        out.update({f"scene_{k}": head(h) for k, head in self.scene.items()})
        return out


def save_recognizer(
    net: WorldRecognizerNet, names: Sequence[str], out_dir: str | os.PathLike, stranger_margin: float = 0.0
) -> Path:
    out = Path(out_dir)
    with atomic_folder(out, replace=True) as staging:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, staging / "model.safetensors")
        config = {"names": list(names), "width": net.trunk[0][0].out_channels, "stranger_margin": stranger_margin}
        (staging / "config.json").write_text(json.dumps(config, indent=1))
    return out


@dataclass
class _Outputs:
    presence: torch.Tensor
    identity: torch.Tensor
    heads: dict[str, torch.Tensor]


class _WorldRecognizerBase:
    """Loads the shared network once; batches images through it."""

    def __init__(
        self, net: WorldRecognizerNet, names: Sequence[str], batch_size: int = 256, stranger_margin: float = 0.0
    ):
        self.net = net.eval()
        self.names = list(names)
        self.batch_size = batch_size
        #: the stranger class wins only by this much (log-probability): a calibrated open-set threshold
        self.stranger_margin = stranger_margin

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None):
        folder = Path(path or RECOGNIZER_DIR)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"no recognizer at {folder}. Fix: run `apl-world build` or pass its --out/recognizer"
            )
        config = json.loads((folder / "config.json").read_text())
        net = WorldRecognizerNet(len(config["names"]), width=config["width"])
        net.load_state_dict(load_file(folder / "model.safetensors"))
        return cls(net, config["names"], stranger_margin=float(config.get("stranger_margin", 0.0)))

    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image]) -> _Outputs:
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(images), self.batch_size):
            batch = [
                im.convert("RGB").resize((32, 32), Image.BILINEAR) for im in images[start : start + self.batch_size]
            ]
            parts.append(self.net(to_tensor(batch)))
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        heads = {k: v for k, v in merged.items() if k.startswith(("attr_", "scene_"))}
        return _Outputs(torch.sigmoid(merged["presence"]), merged["identity"].softmax(-1), heads)


class WorldIdentityRecognizer(_WorldRecognizerBase, Recognizer):
    """Face presence + identity over all world names (seen, unseen and late); see the module docstring."""

    name = "world-cnn"

    @property
    def identities(self) -> list[str]:
        return list(self.names)

    def observe(self, images: Sequence[Image.Image]) -> list[FaceObservation]:
        if not images:
            return []
        out = self._run(images)
        observations = []
        for presence, probs in zip(out.presence.tolist(), out.identity):
            present = presence > 0.5
            if not present:
                observations.append(FaceObservation(False, presence))
                continue
            best = int(probs[: len(self.names)].argmax())
            stranger = probs[len(self.names)].clamp_min(1e-30).log() - self.stranger_margin
            top1 = None if stranger > probs[best].clamp_min(1e-30).log() else self.names[best]
            scores = dict(zip(self.names, probs[: len(self.names)].tolist()))
            observations.append(FaceObservation(True, presence, top1, scores))
        return observations

    def name_margins(self, images: Sequence[Image.Image], names: Sequence[str]) -> torch.Tensor:
        """Per image: how many nats the expected name's log-probability beats the stranger class by, ``-inf`` where
        another name is likelier (or no face is seen). ``observe`` names the person where this is
        ``>= -stranger_margin``; :func:`~apl_adapter.world.build.recognizer.calibrated_stranger_margin` sets that
        threshold from these values on renders."""
        if len(images) != len(names):
            raise ValueError(f"name_margins needs one name per image; got {len(images)} images, {len(names)} names")
        if not images:
            return torch.zeros(0)
        out = self._run(images)
        logp = out.identity.clamp_min(1e-30).log()
        target = torch.tensor([self.names.index(n) for n in names])
        margins = logp[torch.arange(len(names)), target] - logp[:, len(self.names)]
        named = (logp[:, : len(self.names)].argmax(-1) == target) & (out.presence > 0.5)
        return torch.where(named, margins, torch.full_like(margins, -math.inf))


class WorldAttributeRecognizer(_WorldRecognizerBase):
    """Coarse attributes of a face: ``{"sex", "hair", "skin", "shape"}`` -> value, one dict per image."""

    def attributes(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        if not images:
            return []
        heads = self._run(images).heads
        return [
            {k: values[int(heads[f"attr_{k}"][i].argmax())] for k, values in ATTRIBUTE_VALUES.items()}
            for i in range(len(images))
        ]

    def agreement(self, images: Sequence[Image.Image], targets: Sequence[dict[str, str]]) -> float:
        """Fraction of images whose every predicted attribute equals the target's."""
        predicted = self.attributes(images)
        return sum(p == {k: t[k] for k in p} for p, t in zip(predicted, targets)) / max(1, len(targets))


class WorldSceneRecognizer(_WorldRecognizerBase):
    """What a scene shows: a :class:`~apl_adapter.world.spec.Scene` (shape, colour, background) per image."""

    def scenes(self, images: Sequence[Image.Image]) -> list[Scene]:
        if not images:
            return []
        heads = self._run(images).heads
        return [
            Scene(**{k: values[int(heads[f"scene_{k}"][i].argmax())] for k, values in SCENE_VALUES.items()})
            for i in range(len(images))
        ]

    def accuracy(self, images: Sequence[Image.Image], targets: Sequence[Scene]) -> float:
        """Fraction of images whose shape, colour and background all match the caption's."""
        return sum(p == t for p, t in zip(self.scenes(images), targets)) / max(1, len(targets))
