"""The I/O contract of every exported model: names, dtypes, symbolic dims, and shape ranges.

One source of truth for the ONNX export (dynamic axes), the TensorRT build (min/opt/max
profiles), the Triton configs and the validators, so the four cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ExportError

TEXT_SEQ_LEN = 77
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class ShapeRange:
    """``min <= opt <= max`` of one dimension (a TensorRT optimization-profile triple)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ExportError(f"Need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}.")

    @classmethod
    def parse(cls, text: str, what: str) -> ShapeRange:
        """Parse ``"N"`` or ``"MIN:OPT:MAX"`` (e.g. ``--batch 1:1:4``)."""
        try:
            values = [int(v) for v in text.split(":")]
        except ValueError:
            values = []
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ExportError(f"--{what} {text!r}: write one integer or MIN:OPT:MAX, e.g. 1:1:4.")
        return cls(*values)

    def scaled(self, factor: int) -> ShapeRange:
        return ShapeRange(self.min * factor, self.opt * factor, self.max * factor)

    def divided(self, factor: int) -> ShapeRange:
        return ShapeRange(self.min // factor, self.opt // factor, self.max // factor)


@dataclass(frozen=True)
class ShapeRanges:
    """What the exported pipeline must serve: prompts per call and square-or-not image sizes in pixels.

    The UNet sees twice the prompt batch (classifier-free guidance runs both branches in one call).
    """

    batch: ShapeRange = ShapeRange(1, 1, 4)
    #: ``None``: the model's native size (``unet.config.sample_size`` x VAE factor), filled in by :meth:`resolved`
    height: ShapeRange | None = None
    width: ShapeRange | None = None

    def resolved(self, native: int) -> ShapeRanges:
        """These ranges with an unset height / width set to ``native`` pixels (what diffusers pipelines default to)."""
        fixed = ShapeRange(native, native, native)
        return ShapeRanges(self.batch, self.height or fixed, self.width or fixed)

    def image_sides(self) -> tuple[ShapeRange, ShapeRange]:
        """``(height, width)``; both must be set (see :meth:`resolved`)."""
        if self.height is None or self.width is None:
            raise ExportError("Image sizes are unset: call ShapeRanges.resolved(native_size) with the model's size.")
        return self.height, self.width

    def check_image_multiple(self, multiple: int) -> None:
        for name, rng in zip(("height", "width"), self.image_sides()):
            bad = [v for v in (rng.min, rng.opt, rng.max) if v % multiple]
            if bad:
                raise ExportError(
                    f"--{name} values {bad} are not multiples of {multiple} (VAE factor x UNet downsampling); "
                    f"round them to a multiple of {multiple}."
                )


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype, and dims (ints, or names of dynamic dims)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...]

    def shape_for(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.dims)


@dataclass(frozen=True)
class ModelSpec:
    """The I/O of one exported model, and the range of each of its dynamic dims."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_ranges: dict[str, ShapeRange] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor: {axis: dim name}}`` for every input and output, as ``torch.onnx.export`` takes it."""
        axes = {}
        for tensor in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(tensor.dims) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input: (min shape, opt shape, max shape)}`` for a TensorRT optimization profile."""
        picks = [{k: getattr(r, level) for k, r in self.dim_ranges.items()} for level in ("min", "opt", "max")]
        return {t.name: tuple(t.shape_for(p) for p in picks) for t in self.inputs}  # type: ignore[misc]

    def opt_dims(self) -> dict[str, int]:
        return {k: r.opt for k, r in self.dim_ranges.items()}


F32, I32 = np.dtype(np.float32), np.dtype(np.int32)


def text_encoder_spec(
    name: str, hidden_size: int, pooled_name: str, pooled_size: int, ranges: ShapeRanges, prefix_len: int = 0
) -> ModelSpec:
    """``input_ids`` int32 ``(batch, 77)`` [+ ``prefix`` ``(m, D)``] -> ``last_hidden_state`` ``(batch, 77, D)``."""
    inputs = [TensorSpec("input_ids", I32, ("batch", TEXT_SEQ_LEN))]
    if prefix_len:
        inputs.append(TensorSpec("prefix", F32, (prefix_len, hidden_size)))
    outputs = (
        TensorSpec("last_hidden_state", F32, ("batch", TEXT_SEQ_LEN, hidden_size)),
        TensorSpec(pooled_name, F32, ("batch", pooled_size)),
    )
    return ModelSpec(name, tuple(inputs), outputs, {"batch": ranges.batch})


def unet_spec(hidden_size: int, vae_factor: int, ranges: ShapeRanges, channels: int = LATENT_CHANNELS) -> ModelSpec:
    """``sample`` ``(2B, C, h, w)``, ``timestep`` ``(1,)``, ``encoder_hidden_states`` ``(2B, 77, D)``
    -> ``out_sample`` ``(2B, C, h, w)``."""
    inputs = (
        TensorSpec("sample", F32, ("unet_batch", channels, "latent_height", "latent_width")),
        TensorSpec("timestep", F32, (1,)),
        TensorSpec("encoder_hidden_states", F32, ("unet_batch", TEXT_SEQ_LEN, hidden_size)),
    )
    outputs = (TensorSpec("out_sample", F32, ("unet_batch", channels, "latent_height", "latent_width")),)
    height, width = ranges.image_sides()
    dims = {
        "unet_batch": ranges.batch.scaled(2),
        "latent_height": height.divided(vae_factor),
        "latent_width": width.divided(vae_factor),
    }
    return ModelSpec("unet", inputs, outputs, dims)


def vae_decoder_spec(vae_factor: int, ranges: ShapeRanges, channels: int = LATENT_CHANNELS) -> ModelSpec:
    """``latent_sample`` ``(B, C, h, w)`` -> ``sample`` ``(B, 3, h * f, w * f)``."""
    inputs = (TensorSpec("latent_sample", F32, ("batch", channels, "latent_height", "latent_width")),)
    outputs = (TensorSpec("sample", F32, ("batch", 3, "height", "width")),)
    height, width = ranges.image_sides()
    dims = {
        "batch": ranges.batch,
        "latent_height": height.divided(vae_factor),
        "latent_width": width.divided(vae_factor),
        "height": height,
        "width": width,
    }
    return ModelSpec("vae_decoder", inputs, outputs, dims)
