"""The APL training loop under Hugging Face Accelerate (CPU, one GPU, or many through ``accelerate launch``).

Each step draws, per batch element, an identity triplet with probability ``identity_fraction``
(else a preservation pair), a timestep ``t ~ U{0..T-1}`` and noise, and minimises
:func:`~apl_adapter.training.objective.apl_loss`. Images are encoded by the VAE once at the start
(posterior mean and std are cached; a posterior sample is drawn per step), so the VAE is not
run during the loop.

Every step's randomness comes from a generator seeded by ``(seed, step, process)``: a resumed run
draws exactly what the uninterrupted run would have, so the two end with the same prefix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from tqdm.auto import tqdm

from ..errors import APLAdapterError
from ..hub import check_hub_upload, push_adapter
from ..progress import batches
from ..tuners.apl.config import APLConfig
from ..tuners.apl.model import prefix_parameters
from ..tuners.apl.serialization import save_adapter
from .base_model import FrozenParts, base_family, check_base_folder, load_frozen_parts, load_frozen_unet, unet_subfolder
from .checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import TrainConfig, refuse_options
from .data import DataFormatError, Example, load_images, name_and_description, read_metadata
from .flow_loop import train_flow
from .objective import apl_loss, noisy_latents
from .run import (
    ADAPTER_DIR,
    LOSS_LOG_NAME,
    TrainResult,
    check_mixture,
    check_run_folder,
    draw_rows,
    lr_scheduler,
    new_accelerator,
    read_loss_log,
    record_loss,
    tracker_config,
    trackers,
    write_loss_log,
)
from .validation import save_validation, validation_grid


@dataclass
class EncodedData:
    """Cached latents ``(N, 4, h, w)`` (mean and std, already times the VAE scaling factor) and ids ``(N, 77)``."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    c1_ids: torch.Tensor
    c2_ids: torch.Tensor
    #: what the identity push moves away from: ``c1_ids``, or the name followed by its description
    push_ids: torch.Tensor
    identity_rows: torch.Tensor
    preservation_rows: torch.Tensor
    #: ``(N, J, 77)`` ids of each row's ``c2_contrasts`` and ``(N, J)`` their attribute's index (-1 = padding, whose
    #: ids are zeros); ``J = 0`` when the data has none
    contrast_ids: torch.Tensor
    contrast_groups: torch.Tensor


def contrast_tensors(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, J, 77)`` ids and ``(N, J)`` attribute indices of the rows' ``c2_contrasts`` (see :class:`EncodedData`).

    Each distinct contrast is tokenized once (rows of one person share theirs).
    """
    keys = sorted({key for e in examples for key in (e.c2_contrasts or {})})
    per_row = [
        [(keys.index(k), text) for k, texts in (e.c2_contrasts or {}).items() for text in texts] for e in examples
    ]
    width, length = max((len(row) for row in per_row), default=0), tokenizer.model_max_length
    groups = torch.full((len(examples), width), -1, dtype=torch.long)
    ids = torch.zeros((len(examples), width, length), dtype=torch.long)
    distinct = sorted({text for row in per_row for _, text in row})
    if distinct:
        tokens = dict(zip(distinct, tokenize(tokenizer, distinct), strict=True))
        for n, row in enumerate(per_row):
            for j, (group, text) in enumerate(row):
                groups[n, j], ids[n, j] = group, tokens[text]
    return ids, groups


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """``(N, 77)`` padded ids, as diffusers' ``encode_prompt`` makes them."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_data(
    parts: FrozenParts,
    examples: list[Example],
    resolution: int | None,
    device: torch.device,
    chunk: int = 16,
    push_from: str = "name",
) -> EncodedData:
    """Run the VAE over every image once and tokenize every prompt."""
    images = load_images(examples, resolution=resolution, expected_size=parts.image_size)
    if images.shape[-1] % parts.vae_scale_factor:
        raise DataFormatError(f"Image size {images.shape[-1]} is not a multiple of {parts.vae_scale_factor}.")
    vae = parts.vae.to(device)
    scale = vae.config.scaling_factor
    means, stds = [], []
    for part in batches(len(images), chunk, "encode images", leave=False):
        posterior = vae.encode(images[part].to(device, vae.dtype)).latent_dist
        means.append(posterior.mean.float().cpu() * scale)
        stds.append(posterior.std.float().cpu() * scale)
    kinds = torch.tensor([example.kind == "identity" for example in examples])
    c1_ids = tokenize(parts.tokenizer, [example.c1 for example in examples])
    if push_from == "name_and_description":
        push_ids = tokenize(
            parts.tokenizer, [name_and_description(e.c1, e.c2) if e.kind == "identity" else e.c1 for e in examples]
        )
    else:
        push_ids = c1_ids
    contrast_ids, contrast_groups = contrast_tensors(parts.tokenizer, examples)
    return EncodedData(
        latent_mean=torch.cat(means),
        latent_std=torch.cat(stds),
        c1_ids=c1_ids,
        c2_ids=tokenize(parts.tokenizer, [example.c2 for example in examples]),
        push_ids=push_ids,
        identity_rows=kinds.nonzero().flatten(),
        preservation_rows=(~kinds).nonzero().flatten(),
        contrast_ids=contrast_ids,
        contrast_groups=contrast_groups,
    )


def draw_batch(
    data: EncodedData, config: TrainConfig, step: int, process: int, num_train_timesteps: int
) -> tuple[torch.Tensor, ...]:
    """The batch of one step: ``(z0, noise, t, c1_ids, c2_ids, push_ids, contrast_ids, contrast_groups)``, a pure
    function of ``(seed, step, process)``."""
    generator, drawn = draw_rows(config, step, process, data.identity_rows, data.preservation_rows)
    rows = torch.tensor(drawn)
    timesteps = torch.randint(0, num_train_timesteps, (config.batch_size,), generator=generator)
    latents = data.latent_mean[rows]
    noise = torch.randn(latents.shape, generator=generator)
    if config.latent_mode == "sample":
        latents = latents + data.latent_std[rows] * torch.randn(latents.shape, generator=generator)
    return (latents, noise, timesteps, data.c1_ids[rows], data.c2_ids[rows], data.push_ids[rows],
            data.contrast_ids[rows], data.contrast_groups[rows])  # fmt: skip


def _check_contrasts(examples: list[Example], config: TrainConfig) -> None:
    option = (
        f"attribute_hold={config.attribute_hold}" if config.attribute_hold > 0
        else "push_without_attributes" if config.push_without_attributes
        else f"text_attribute_hold={config.text_attribute_hold}" if config.text_attribute_hold > 0 else None
    )  # fmt: skip
    if option and any(e.kind == "identity" and not e.c2_contrasts for e in examples):
        raise DataFormatError(
            f"{option} needs c2_contrasts on every identity row of {config.data} (the description with one attribute "
            "changed at a time; `apl-world data` writes them); add them or leave the option out."
        )


def train(config: TrainConfig, accelerator: Accelerator | None = None, show_progress: bool = True) -> TrainResult:
    """Train an APL prefix on ``config.data`` against the frozen ``config.base``; return where it was saved.

    The final adapter lands in ``<out>/adapter`` (``apply_apl(pipe, "<out>/adapter")`` uses it).

    Example:

    ```python
    >>> from apl_adapter.training import TrainConfig, train
    >>> config = TrainConfig(base="world-base", data="apl-data", out="runs/apl", steps=300, batch_size=8)
    >>> result = train(config)  # doctest: +SKIP
    >>> result.adapter_dir  # doctest: +SKIP
    PosixPath('runs/apl/adapter')

    ```
    """
    started = time.perf_counter()
    out = Path(config.out)
    log_with = trackers(config.report_to)  # a missing tracker package is an error before any loading
    accelerator = accelerator or new_accelerator(config.mixed_precision, log_with, out / "trackers")
    check_hub_upload(config.push_to_hub)  # offline mode is refused now, not after the training
    family = base_family(config.base)
    if family is not None:  # SD3 / FLUX folders train with flow matching, in their own loop
        return train_flow(config, family, accelerator, show_progress)
    refuse_options(config, None)
    check_base_folder(config.base)
    for folder in config.also_through:
        unet_subfolder(folder)
    check_run_folder(config, out)
    examples = read_metadata(config.data, c2_mode=config.c2)  # cheap checks before loading any weights
    _check_contrasts(examples, config)
    parts = load_frozen_parts(config.base)
    data = encode_data(parts, examples, config.resolution, accelerator.device, push_from=config.push_from)
    check_mixture(data, config)

    text_encoder = get_peft_model(
        parts.text_encoder,
        APLConfig(
            num_virtual_tokens=config.prefix_len,
            prefix_init=config.prefix_init,
            prefix_init_text=config.prefix_init_text,
            # the phrase is read with the base model's own vocabulary, not a default CLIP tokenizer
            tokenizer_name_or_path=str(Path(config.base) / "tokenizer") if config.prefix_init == "text" else None,
            init_seed=config.seed,
            prefix_depth=config.prefix_depth,
            hide_prefix_rows=config.hide_prefix_rows,
        ),
    )
    text_encoder.eval()  # CLIP has no dropout by default; eval keeps it deterministic if a config adds some
    prefix = prefix_parameters(text_encoder)
    unets = [parts.unet] + [load_frozen_unet(folder, parts.unet) for folder in config.also_through]
    unets = [unet.to(accelerator.device) for unet in unets]
    if config.gradient_checkpointing:
        for unet in unets:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers checkpoints only in training mode; the SD UNet has no dropout
        text_encoder.base_model.model.gradient_checkpointing_enable()
        text_encoder.base_model.model.train()
    optimizer = torch.optim.Adam(list(prefix.values()), lr=config.lr)
    start_step = 0
    if config.resume:
        start_step = load_checkpoint(find_checkpoint(config.resume, out), prefix, optimizer)
        if start_step > config.steps:
            raise APLAdapterError(f"Checkpoint is at step {start_step}, past --steps {config.steps}; raise --steps.")
    # built on the plain optimizer and not prepared: Accelerate would step a prepared one once per process
    schedule = lr_scheduler(config, optimizer, start_step)
    encode, optimizer = accelerator.prepare(text_encoder, optimizer)

    losses = read_loss_log(out / LOSS_LOG_NAME, start_step) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "train_config.json")
    accelerator.init_trackers("apl-train", config=tracker_config(config))
    num_train_timesteps = parts.noise_scheduler.config.num_train_timesteps
    empty_ids = tokenize(parts.tokenizer, [""]).to(accelerator.device)
    progress = tqdm(
        range(start_step, config.steps),
        initial=start_step,
        total=config.steps,
        desc="apl-train",
        disable=not (show_progress and accelerator.is_main_process),
    )
    loss_value = math.nan
    for step in progress:
        latents, noise, timesteps, c1_ids, c2_ids, push_ids, contrast_ids, contrast_groups = (
            tensor.to(accelerator.device)
            for tensor in draw_batch(data, config, step, accelerator.process_index, num_train_timesteps)
        )
        with accelerator.autocast():
            noisy = noisy_latents(parts.noise_scheduler, latents, noise, timesteps)
            loss = sum(
                apl_loss(
                    unet, text_encoder, noisy, timesteps, c1_ids, c2_ids, encode=encode,
                    loss_space=config.loss_space, alphas_cumprod=parts.noise_scheduler.alphas_cumprod,
                    push=config.identity_push, push_ids=push_ids, boost=config.attribute_boost, empty_ids=empty_ids,
                    text_match=config.text_match, direction=config.name_direction,
                    guidance_relative=config.guidance_relative, attribute_hold=config.attribute_hold,
                    push_without_attributes=config.push_without_attributes,
                    contrast_ids=contrast_ids, contrast_groups=contrast_groups,
                    text_attribute_hold=config.text_attribute_hold, text_preserve=config.text_preserve,
                    text_direction=config.text_name_direction,
                )
                for unet in unets
            ) / len(unets)  # fmt: skip
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learning_rate = schedule.get_last_lr()[0]  # this step's rate, before the schedule moves on
        schedule.step()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            loss_value = record_loss(accelerator, loss, done, losses, progress)
            accelerator.log({"loss": loss_value, "lr": learning_rate}, step=done)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(accelerator, text_encoder, optimizer, done, out, losses, config.checkpoints_total_limit)
        if config.validation_every and done % config.validation_every == 0 and done < config.steps:
            _validate(accelerator, parts, text_encoder, config, done)
    progress.close()
    accelerator.wait_for_everyone()
    adapter_dir = out / ADAPTER_DIR
    if config.validation_prompts:
        _validate(accelerator, parts, text_encoder, config, config.steps)
    _save_checkpoint(accelerator, text_encoder, optimizer, config.steps, out, losses, config.checkpoints_total_limit)
    if accelerator.is_main_process:
        save_adapter(text_encoder, adapter_dir, recipe=config.recipe())
    accelerator.end_training()
    accelerator.wait_for_everyone()
    if config.gradient_checkpointing:
        for unet in unets:
            unet.eval()
    if config.push_to_hub and accelerator.is_main_process:
        push_adapter(adapter_dir, config.push_to_hub, config.steps)
    return TrainResult(adapter_dir, config.steps, loss_value, time.perf_counter() - started, losses)


def _save_checkpoint(accelerator, text_encoder, optimizer, step: int, out: Path, losses, keep: int | None) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(text_encoder, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, step, out)
        if keep is not None:
            prune_checkpoints(out, keep)
        write_loss_log(out / LOSS_LOG_NAME, losses)
    accelerator.wait_for_everyone()


def _validate(accelerator, parts: FrozenParts, text_encoder, config: TrainConfig, step: int) -> None:
    """Draw the validation prompts without and with the prefix (main process) into <out>/validation/step-N.png."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        grid = validation_grid(parts, text_encoder, config.validation_prompts, seed=config.seed)
        save_validation(grid, config.out, step)
    accelerator.wait_for_everyone()
