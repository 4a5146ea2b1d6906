"""The denoising loop shared by the ONNX Runtime and TensorRT pipelines.

It follows diffusers' ``StableDiffusionPipeline.__call__`` step by step (same tokenization, same
latent draw from a ``torch.Generator``, same scheduler calls, same guidance formula, same VAE
post-processing), so with the same seed an exported pipeline reproduces the PyTorch one with
``apply_apl``: prefix on the positive prompt, the plain encoder for the negative prompt.

A backend implements :meth:`APLPipelineBase.infer`: ``(model name, {input: tensor}) -> {output: tensor}``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils import numpy_to_pil

from .errors import ExportError

MANIFEST_NAME = "apl_export.json"


def load_scheduler(folder: Path):
    """The scheduler class named in ``scheduler_config.json`` (PNDM for SD 1.5, DDIM, ...), from diffusers."""
    import diffusers

    name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ExportError(f"{folder}: unknown scheduler {name!r}; install a diffusers version that has it.")
    return cls.from_pretrained(folder)


class APLPipelineBase:
    """Text-to-image with the exported models of one ``apl-export`` folder."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import CLIPTokenizer

        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ExportError(f"{self.folder} has no {MANIFEST_NAME}: pass a folder written by apl-export.")
        self.manifest = json.loads(manifest_path.read_text())
        family = self.manifest.get("family", "sd")
        if family != "sd":
            raise ExportError(
                f"{self.folder} is a {self.manifest.get('pipeline_class', family)} export: the ONNX Runtime and "
                "TensorRT pipelines run Stable Diffusion 1.x / 2.x exports only. Run its graphs (apl_export.json lists "
                "their I/O) in your own SD3 / FLUX loop."
            )
        self.tokenizer = CLIPTokenizer.from_pretrained(self.folder / "tokenizer")
        self.scheduler = load_scheduler(self.folder / "scheduler")
        self.vae_factor = int(self.manifest["vae_factor"])
        self.vae_scaling_factor = float(self.manifest["vae_scaling_factor"])
        self.prefix: np.ndarray | None = None
        if self.manifest["prefix_mode"] == "input":
            self.prefix = np.load(self.folder / "text_encoder" / "prefix.npy")

    def set_prefix(self, prefix: np.ndarray | torch.Tensor | str | Path) -> None:
        """Input-mode folders only: use another prefix ``(m, D)`` (an array or an adapter folder), no rebuild."""
        if self.manifest["prefix_mode"] != "input":
            raise ExportError("This folder has the prefix baked into text_encoder; re-export with --prefix-mode input.")
        if isinstance(prefix, (str, Path)):
            from apl_adapter import check_adapter_folder

            tensors = check_adapter_folder(prefix)
            config = json.loads((Path(prefix) / "adapter_config.json").read_text())
            if config.get("prefix_depth", "shallow") == "deep":
                raise ExportError(
                    f"{prefix} is a deep prefix (keys and values at every layer); an input-mode export takes only the "
                    "(m, D) input vectors. Export it baked: apl-export --adapter with --prefix-mode baked."
                )
            hides, expected_hides = config.get("hide_prefix_rows", False), self.manifest.get("hide_prefix_rows", False)
            if hides != expected_hides:
                raise ExportError(
                    f"{prefix} has hide_prefix_rows={hides} but this export's text encoder was built with "
                    f"hide_prefix_rows={expected_hides} (the graph drops the rows or not); re-export with this adapter."
                )
            prefix = next(v for k, v in tensors.items() if "apl_prefix" in k)
        array = np.asarray(prefix.detach().float() if isinstance(prefix, torch.Tensor) else prefix, np.float32)
        expected = (self.manifest["num_virtual_tokens"], self.manifest["hidden_size"])
        if array.shape != expected:
            raise ExportError(f"prefix shape {array.shape} does not fit this export's {expected} (m, D).")
        self.prefix = array

    def infer(self, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return ids.to(torch.int32)

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positive, negative)`` embeddings ``(B, 77, D)``: the prefix on the positive prompts only."""
        inputs = {"input_ids": self.tokenize(prompts)}
        if self.prefix is not None:
            inputs["prefix"] = torch.from_numpy(self.prefix)
        positive = self.infer("text_encoder", inputs)["last_hidden_state"]
        negative_model = self.manifest["negative_prompt_encoder"]
        negative_inputs = {"input_ids": self.tokenize(negative_prompts)}
        if negative_model == "text_encoder" and self.prefix is not None:
            negative_inputs["prefix"] = inputs["prefix"]
        negative = self.infer(negative_model, negative_inputs)["last_hidden_state"]
        return positive, negative

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np"] = "pil",
    ) -> StableDiffusionPipelineOutput:
        """Generate images, as diffusers' pipelines do: ``.images`` is a list of PIL images (``output_type="pil"``)
        or float32 ``(B, H, W, 3)`` in [0, 1] (``output_type="np"``). No safety checker runs
        (``nsfw_content_detected`` is ``None``)."""
        if output_type not in ("pil", "np"):
            raise ExportError(f"output_type must be 'pil' or 'np', got {output_type!r}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative_prompt = negative_prompt or ""
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ExportError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt.")
        _, default_h, default_w = (self.manifest["ranges"][k][1] for k in ("batch", "height", "width"))
        height, width = height or default_h, width or default_w
        self.check_request(len(prompts), height, width)

        positive, negative = self.encode_prompt(prompts, negatives)
        do_cfg = guidance_scale > 1.0
        text = torch.cat([negative, positive]) if do_cfg else positive

        shape = (len(prompts), 4, height // self.vae_factor, width // self.vae_factor)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        # As diffusers' prepare_extra_step_kwargs: eta and generator only where the scheduler takes them.
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in accepted}
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = torch.tensor([float(t)], dtype=torch.float32)
            noise = self.infer("unet", {"sample": model_input, "timestep": timestep, "encoder_hidden_states": text})
            noise = noise["out_sample"]
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
        image = self.infer("vae_decoder", {"latent_sample": latents / self.vae_scaling_factor})["sample"]
        images = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return StableDiffusionPipelineOutput(
            images=numpy_to_pil(images) if output_type == "pil" else images, nsfw_content_detected=None
        )

    def check_request(self, batch: int, height: int, width: int) -> None:
        """Requests outside the exported ranges fail here with the range, not deep inside a runtime."""
        ranges = self.manifest["ranges"]
        for what, value in (("batch", batch), ("height", height), ("width", width)):
            lo, _, hi = ranges[what]
            if not lo <= value <= hi:
                raise ExportError(
                    f"{what}={value} is outside the exported range {lo}..{hi}; re-export with a wider --{what}."
                )
            multiple = self.manifest["image_multiple"]
            if what != "batch" and value % multiple:
                raise ExportError(f"{what}={value} must be a multiple of {multiple}.")
