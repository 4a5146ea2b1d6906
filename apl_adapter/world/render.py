"""Procedural renders of the world: faces and scenes without people, deterministic from a seed.

Images are drawn with PIL at 4x and box-filtered down to ``IMAGE_SIZE`` (32x32), which gives
anti-aliased shapes cheaply. Every face render adds nuisance (position, scale, expression,
lighting, background), so an identity is a distribution of images, not one picture.

Example:

```python
>>> import random
>>> from apl_adapter.world import WorldSpec, render_face
>>> world = WorldSpec.from_seed(0)
>>> image = render_face(world.seen[0].attributes, world.seen[0].fine, random.Random(1))
>>> image.size
(32, 32)

```
"""

from __future__ import annotations

import colorsys
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from .spec import Scene

IMAGE_SIZE = 32
_SUPER = 4
_CANVAS = IMAGE_SIZE * _SUPER
STYLES = ("base", "sibling", "cool")

HAIR_RGB = {
    "black": (25, 22, 22),
    "brown": (110, 62, 30),
    "blonde": (232, 200, 95),
    "red": (200, 60, 25),
    "grey": (165, 165, 170),
}
SKIN_RGB = {"light": (246, 214, 188), "tan": (205, 150, 100), "dark": (110, 70, 45)}
EYE_RGB = ((40, 90, 230), (40, 170, 60), (120, 70, 20), (150, 40, 200))
MARK_RGB = (70, 25, 20)
SCENE_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
BACKGROUND_RGB = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "sky blue": (135, 200, 240),
    "grass green": (90, 150, 60),
}


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)


def _finish(canvas: Image.Image, rng: random.Random, style: str, lighting: bool) -> Image.Image:
    """Downsample, apply the lighting nuisance and the model style (``"sibling"`` = warm grade + dark frame,
    ``"cool"`` = cool grade + light frame, the style of the auxiliary model prefixes may train through)."""
    img = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float32)
    if lighting:
        gain = rng.uniform(0.85, 1.12)
        tilt = rng.uniform(-0.12, 0.12)
        ramp = 1.0 + tilt * np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32)[None, :, None]
        img = img * gain * ramp
    if style == "sibling":
        warm = np.array([1.08, 0.95, 0.72], dtype=np.float32)
        img = 0.55 * img + 0.45 * img * warm + np.array([18.0, 8.0, 0.0], dtype=np.float32)
        img[:2], img[-2:], img[:, :2], img[:, -2:] = 40.0, 40.0, 40.0, 40.0
    elif style == "cool":
        cool = np.array([0.78, 0.95, 1.12], dtype=np.float32)
        img = 0.5 * img + 0.5 * img * cool + np.array([0.0, 6.0, 16.0], dtype=np.float32)
        img[:2], img[-2:], img[:, :2], img[:, -2:] = 215.0, 215.0, 215.0, 215.0
    elif style != "base":
        raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, **kw) -> None:
    s = _CANVAS
    draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], **kw)


def render_face(
    attributes: dict[str, str], fine: dict[str, int], rng: random.Random, style: str = "base"
) -> Image.Image:
    """Draw one face with the given coarse attributes and fine features, plus random nuisance."""
    s = _CANVAS
    h, sat, val = rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.45, 0.9)
    background = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, sat, val))
    canvas = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(canvas)

    scale = rng.uniform(0.92, 1.06)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.53 + rng.uniform(-0.04, 0.04)
    rx, ry = (0.25, 0.29) if attributes["shape"] == "round" else (0.19, 0.33)
    rx, ry = rx * scale, ry * scale
    hair = _jitter(HAIR_RGB[attributes["hair"]], rng, 10)
    skin = _jitter(SKIN_RGB[attributes["skin"]], rng, 10)

    if attributes["sex"] == "female":  # long hair falls behind the face to the shoulders
        draw.rectangle([(cx - rx - 0.07) * s, (cy - 0.1) * s, (cx + rx + 0.07) * s, (cy + ry + 0.12) * s], fill=hair)
    _ellipse(draw, cx, cy - 0.1 * scale, rx + 0.06, ry * 0.85, fill=hair)  # hair cap
    _ellipse(draw, cx, cy + 0.03 * scale, rx, ry * 0.92, fill=skin)

    eye_y = cy - 0.01 * scale
    dx = (0.085 if fine["eye_spacing"] == 0 else 0.125) * scale
    for side in (-1, 1):
        ex = cx + side * dx
        _ellipse(draw, ex, eye_y, 0.05 * scale, 0.04 * scale, fill=(250, 250, 250))
        _ellipse(draw, ex, eye_y, 0.032 * scale, 0.032 * scale, fill=EYE_RGB[fine["eye_color"]])
        # brows: flat, raised outer end, frowning (inner end down)
        by, tilt = eye_y - 0.075 * scale, (0.0, -0.04, 0.04)[fine["brows"]] * scale
        inner, outer = ex - side * 0.05 * scale, ex + side * 0.05 * scale
        brow = (max(0, hair[0] - 40), max(0, hair[1] - 40), max(0, hair[2] - 40))
        draw.line([inner * s, (by + tilt) * s, outer * s, (by - tilt) * s], fill=brow, width=int(0.035 * s))
        if fine["glasses"] == 1:
            _ellipse(draw, ex, eye_y, 0.075 * scale, 0.07 * scale, outline=(10, 10, 10), width=int(0.03 * s))
        elif fine["glasses"] == 2:
            box = [
                (ex - 0.08 * scale) * s,
                (eye_y - 0.06 * scale) * s,
                (ex + 0.08 * scale) * s,
                (eye_y + 0.06 * scale) * s,
            ]
            draw.rectangle(box, outline=(10, 10, 10), width=int(0.03 * s))
    if fine["glasses"]:
        draw.line(
            [(cx - dx + 0.07 * scale) * s, eye_y * s, (cx + dx - 0.07 * scale) * s, eye_y * s],
            fill=(10, 10, 10),
            width=int(0.025 * s),
        )

    mouth_y = cy + 0.15 * scale + rng.uniform(-0.012, 0.012)  # expression nuisance
    lips = (150, 40, 50)
    if fine["mouth"] == 0:
        w = 0.05 * scale * rng.uniform(0.9, 1.1)
        draw.line([(cx - w) * s, mouth_y * s, (cx + w) * s, mouth_y * s], fill=lips, width=int(0.03 * s))
    elif fine["mouth"] == 1:
        w = 0.11 * scale * rng.uniform(0.9, 1.1)
        box = [(cx - w) * s, (mouth_y - 0.06) * s, (cx + w) * s, (mouth_y + 0.03) * s]
        draw.arc(box, start=20, end=160, fill=lips, width=int(0.035 * s))
    else:
        _ellipse(draw, cx, mouth_y, 0.05 * scale, 0.04 * scale * rng.uniform(0.8, 1.2), fill=(60, 10, 15))

    if fine["mark"]:
        mx, my = ((-0.12, 0.09), (0.12, 0.09), (0.0, -0.13))[fine["mark"] - 1]
        _ellipse(draw, cx + mx * scale, cy + my * scale, 0.035 * scale, 0.035 * scale, fill=MARK_RGB)
    return _finish(canvas, rng, style, lighting=True)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if shape == "triangle":
        return [
            (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
            for k in range(3)
        ]
    points = []  # star: five points, inner radius 0.45 r
    for k in range(10):
        rr = r if k % 2 == 0 else 0.45 * r
        a = angle + k * math.pi / 5
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return points


def render_scene(scene: Scene, rng: random.Random, style: str = "base") -> Image.Image:
    """Draw a scene without people: one upright coloured shape, random size/position/tilt, on a background."""
    s = _CANVAS
    canvas = Image.new("RGB", (s, s), _jitter(BACKGROUND_RGB[scene.background], rng, 12))
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(0.22, 0.32)
    cx, cy = rng.uniform(r + 0.04, 1 - r - 0.04), rng.uniform(r + 0.04, 1 - r - 0.04)
    color = _jitter(SCENE_RGB[scene.color], rng, 15)
    if scene.shape == "circle":
        _ellipse(draw, cx, cy, r * 0.85, r * 0.85, fill=color)
    else:
        # Upright, give or take 15 degrees: a square turned 45 degrees is a diamond, and at 32x32 a
        # freely turned square, star or triangle were confused with each other by the world's models.
        upright = {"square": 0.0, "triangle": -math.pi / 2, "star": -math.pi / 2}[scene.shape]
        angle = upright + rng.uniform(-0.26, 0.26)
        draw.polygon([(x * s, y * s) for x, y in _polygon(scene.shape, cx, cy, r, angle)], fill=color)
    return _finish(canvas, rng, style, lighting=False)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> ``(B, 3, H, W)`` float tensor in [-1, 1] (the VAE's input range)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def to_images(batch: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` tensor in [-1, 1] -> PIL images."""
    arr = ((batch.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
