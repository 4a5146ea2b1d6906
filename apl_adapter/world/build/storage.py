"""How the build stores models: float16 weights (half the bytes in the package), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ...atomic import atomic_folder

#: the file inside a base leg's folder that records what produced it (see :func:`.base.leg_stamp`)
LEG_STAMP = "leg.json"


def store_weights_half(weights_file: Path) -> None:
    """Store a safetensors file's floating weights as float16 (half the bytes in the package).

    The model's ``config.json`` keeps its float32 dtype, so diffusers and transformers load the
    weights back as float32.
    """
    from safetensors.torch import load_file, save_file

    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights_file).items()}
    save_file(tensors, weights_file, metadata={"format": "pt"})


def drop_local_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` from every ``config.json`` under ``folder``.

    A model loaded from a folder (a base leg's, the VAE's under ``--work``) records that folder there, and
    ``save_pretrained`` writes it back: the build machine's paths would ship inside the package's configs.
    """
    for config in folder.rglob("config.json"):
        settings = json.loads(config.read_text())
        if settings.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def save_world_pipeline(pipe: StableDiffusionPipeline, folder: Path, stamp: dict | None = None) -> None:
    """Save a world pipeline (UNet and text encoder in float16) atomically, with an optional stamp file inside."""
    with atomic_folder(folder, replace=True) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        drop_local_paths(staging)
        store_weights_half(staging / "unet" / "diffusion_pytorch_model.safetensors")
        # the width-128 encoder's 49,408-token embedding is 25 MB in float32
        store_weights_half(staging / "text_encoder" / "model.safetensors")
        if stamp is not None:
            (staging / LEG_STAMP).write_text(json.dumps(stamp, indent=1))


def save_world_unet(unet: UNet2DConditionModel, folder: Path) -> None:
    """Save only the UNet of a fine-tuned world model (float16) into ``folder/unet``, atomically."""
    with atomic_folder(Path(folder) / "unet", replace=True) as staging:
        unet.save_pretrained(staging, safe_serialization=True)
        drop_local_paths(staging)
        store_weights_half(staging / "diffusion_pytorch_model.safetensors")
