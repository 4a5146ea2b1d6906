"""``apl-train`` on Stable Diffusion 3 / 3.5 and FLUX.1 folders: one prefix per chosen text encoder, trained jointly
with the flow-matching APL loss (:mod:`apl_adapter.training.flow_objective`).

Each step draws, per batch element, an identity triplet with probability ``identity_fraction`` (else a preservation
pair), a noise level ``sigma`` from the scheduler's training grid (logit-normal or uniform, as diffusers' SD3 / FLUX
scripts draw it) and noise, all from a generator seeded by ``(seed, step, process)``. Images are VAE-encoded once at
the start (posterior mean and std cached; a sample is drawn per step unless ``latent_mode="mean"``).

Only the prefixes train: the transformer, the VAE and every encoder stay frozen, and the target (every adapter off,
``no_grad``) stores nothing for backward. The result is ``<out>/adapter/<encoder attribute>/``, one PEFT adapter
folder per trained encoder in the pipeline's own layout, so ``load_apl(pipe, "<out>/adapter")`` applies them all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

from ..atomic import atomic_folder
from ..errors import APLAdapterError
from ..families import PipelineFamily
from ..tuners.apl.config import APLConfig
from ..tuners.apl.model import prefix_parameters
from ..tuners.apl.serialization import save_adapter
from .config import TrainConfig, refuse_options
from .data import DataFormatError, Example, load_images, read_metadata
from .flow_models import FlowModel
from .flow_objective import flow_apl_loss, flow_noisy_latents, sample_noise_levels
from .run import (
    ADAPTER_DIR,
    LOSS_LOG_NAME,
    TrainResult,
    check_mixture,
    check_run_folder,
    draw_rows,
    lr_scheduler,
    new_accelerator,
    record_loss,
    tracker_config,
    trackers,
    write_loss_log,
)


def chosen_encoders(config: TrainConfig, family: PipelineFamily, pipe) -> list[str]:
    """The encoder attributes to prefix: ``config.encoders``, or every text encoder the pipeline has."""
    present = [attr for attr in family.encoders if getattr(pipe, attr, None) is not None]
    chosen = list(config.encoders) or present
    unknown = [attr for attr in chosen if attr not in present]
    if unknown or len(set(chosen)) != len(chosen):
        raise APLAdapterError(
            f"--encoders {' '.join(config.encoders)}: {family.title}'s text encoders are {', '.join(present)} "
            f"({'unknown: ' + ', '.join(unknown) if unknown else 'each at most once'})."
        )
    return chosen


def load_flow_pipeline(base: str | Path, mixed_precision: str = "no"):
    """The base folder's pipeline (its own class, from ``model_index.json``), every weight frozen, eval mode; in
    bf16 / fp16 under that mixed precision (fp32 copies of 2-12 B frozen parameters are what a GPU cannot hold; the
    prefixes stay fp32 and are cast where they join the token embeddings)."""
    from diffusers import DiffusionPipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    # fp32 is the default; naming it would only trigger diffusers' torch_dtype deprecation note
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return freeze(DiffusionPipeline.from_pretrained(str(base), **kwargs))


def freeze(pipe):
    """Every model of ``pipe`` frozen (``requires_grad=False``, eval mode): only the prefixes added later train."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class FlowData:
    """Cached latents ``(N, C, h, w)`` (posterior mean and std, shifted and scaled) and the prompts of each row."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    c1: list[str]
    c2: list[str]
    identity_rows: torch.Tensor
    preservation_rows: torch.Tensor


def encode_flow_data(model: FlowModel, examples: list[Example], resolution: int | None) -> FlowData:
    """Load and VAE-encode every image once; keep the prompts as text (``encode_prompt`` tokenizes them per step, as
    inference does)."""
    images = load_images(examples, resolution=resolution)
    multiple = model.vae_scale_factor * model.latent_multiple
    if images.shape[-1] % multiple or images.shape[-2] % multiple:
        raise DataFormatError(
            f"Images are {images.shape[-1]}x{images.shape[-2]}; {model.family.title} needs sides that are a multiple "
            f"of {multiple} (VAE factor {model.vae_scale_factor} x {model.latent_multiple}); pass --resolution N."
        )
    mean, std = model.encode_images(images)
    kinds = torch.tensor([example.kind == "identity" for example in examples])
    return FlowData(
        latent_mean=mean,
        latent_std=std,
        c1=[example.c1 for example in examples],
        c2=[example.c2 for example in examples],
        identity_rows=kinds.nonzero().flatten(),
        preservation_rows=(~kinds).nonzero().flatten(),
    )


def draw_flow_batch(data: FlowData, config: TrainConfig, step: int, process: int, scheduler):
    """The batch of one step, a pure function of ``(seed, step, process)``: ``(z0, noise, sigmas, timesteps, c1,
    c2)``, tensors ``(B, C, h, w)`` / ``(B,)`` and ``B`` prompts each."""
    generator, rows = draw_rows(config, step, process, data.identity_rows, data.preservation_rows)
    density = config.timestep_density or "logit_normal"
    sigmas, timesteps = sample_noise_levels(scheduler, config.batch_size, generator, density)
    latents = data.latent_mean[rows]
    noise = torch.randn(latents.shape, generator=generator)
    if config.latent_mode == "sample":
        latents = latents + data.latent_std[rows] * torch.randn(latents.shape, generator=generator)
    return latents, noise, sigmas, timesteps, [data.c1[r] for r in rows], [data.c2[r] for r in rows]


def train_flow(
    config: TrainConfig, family: PipelineFamily, accelerator: Accelerator | None = None, show_progress: bool = True
) -> TrainResult:
    """Train one APL prefix per chosen text encoder of an SD3 / FLUX folder (see the module docstring); the result's
    ``adapter_dir`` holds one adapter subfolder per encoder. :func:`apl_adapter.training.train` calls it for such
    folders."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    started = time.perf_counter()
    refuse_options(config, family)
    out = Path(config.out)
    log_with = trackers(config.report_to)
    accelerator = accelerator or new_accelerator(config.mixed_precision, log_with, out / "trackers")
    check_run_folder(config, out, can_resume=False)  # no SD3 / FLUX checkpoints yet
    examples = read_metadata(config.data, c2_mode=config.c2)  # cheap checks before loading any weights
    pipe = load_flow_pipeline(config.base, config.mixed_precision)
    model = FlowModel.of(pipe, family, config.max_sequence_length, config.guidance)
    encoders = chosen_encoders(config, family, pipe)
    pipe.to(accelerator.device)
    data = encode_flow_data(model, examples, config.resolution)
    check_mixture(data, config)

    adapters: dict[str, PeftModel] = {}
    for index, attr in enumerate(encoders):
        tokenizer = "tokenizer" + attr.removeprefix("text_encoder")  # text_encoder_3 <-> tokenizer_3
        adapters[attr] = get_peft_model(
            getattr(pipe, attr),  # injected in place: pipe.encode_prompt now takes the prefixed path
            APLConfig(
                num_virtual_tokens=config.prefix_len,
                prefix_init=config.prefix_init,
                prefix_init_text=config.prefix_init_text,
                tokenizer_name_or_path=str(Path(config.base) / tokenizer) if config.prefix_init == "text" else None,
                init_seed=config.seed + index,  # the encoders' random prefixes differ
            ),
        )
        adapters[attr].eval()
    parameters = [p for adapter in adapters.values() for p in prefix_parameters(adapter).values()]
    if config.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
        pipe.transformer.train()  # diffusers checkpoints only in training mode; neither transformer has dropout
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = lr_scheduler(config, optimizer)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the training grid, untouched

    losses: list[tuple[int, float]] = []
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "train_config.json")
    accelerator.init_trackers("apl-train", config=tracker_config(config))
    progress = tqdm(range(config.steps), desc="apl-train", disable=not (show_progress and accelerator.is_main_process))
    loss_value = math.nan
    for step in progress:
        latents, noise, sigmas, timesteps, c1, c2 = draw_flow_batch(
            data, config, step, accelerator.process_index, scheduler
        )
        latents, noise = latents.to(accelerator.device), noise.to(accelerator.device)
        sigmas, timesteps = sigmas.to(accelerator.device), timesteps.to(accelerator.device)
        with accelerator.autocast():
            noisy = flow_noisy_latents(latents, noise, sigmas)
            loss = flow_apl_loss(
                model.encode, model.denoise, adapters.values(), noisy, sigmas, timesteps, c1, c2, config.loss_space
            )
        accelerator.backward(loss)
        if accelerator.num_processes > 1:  # the prefixes are not DDP-wrapped (encode_prompt calls the encoders)
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learning_rate = schedule.get_last_lr()[0]
        schedule.step()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            loss_value = record_loss(accelerator, loss, done, losses, progress)
            accelerator.log({"loss": loss_value, "lr": learning_rate}, step=done)
    progress.close()
    if config.gradient_checkpointing:
        pipe.transformer.eval()
    accelerator.wait_for_everyone()
    adapter_dir = out / ADAPTER_DIR
    if accelerator.is_main_process:
        write_loss_log(out / LOSS_LOG_NAME, losses)
        with atomic_folder(adapter_dir, replace=True) as staging:
            for attr, adapter in adapters.items():
                save_adapter(adapter, staging / attr, recipe={**config.recipe(), "encoder": attr})
    accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(adapter_dir, config.steps, loss_value, time.perf_counter() - started, losses)
