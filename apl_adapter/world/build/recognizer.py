"""Stage ``recognizer``: the CNN of :mod:`..recognizers` on renders, half of them VAE round trips."""

from __future__ import annotations

import math
import random
import shutil
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...atomic import atomic_folder
from ..evaluate import fresh_renders
from ..recognizers import SCENE_VALUES, WorldIdentityRecognizer, WorldRecognizerNet, save_recognizer
from ..spec import ATTRIBUTE_VALUES, WorldSpec
from .banks import KIND_NAMED, KIND_SCENE, KIND_STRANGER, Bank, concat_banks, render_bank, render_lookalikes
from .latents import roundtrip
from .schedule import _cosine_lr
from .seeds import SEEDS

if TYPE_CHECKING:
    from .context import BuildContext


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur a random half a little and add a little noise: generated images are softer than renders."""
    blur_mask = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = blur_mask * (0.5 * x + 0.5 * blurred) + (1 - blur_mask) * x
    return (x + 0.04 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def recognizer_loss(net: WorldRecognizerNet, x: torch.Tensor, bank: Bank, idx: torch.Tensor) -> torch.Tensor:
    out = net(x)
    kind = bank.kind[idx]
    is_face = (kind == KIND_NAMED) | (kind == KIND_STRANGER)
    loss = F.binary_cross_entropy_with_logits(out["presence"], is_face.float())
    target_id = torch.where(kind == KIND_NAMED, bank.identity[idx], torch.full_like(kind, net.num_names))
    if is_face.any():
        loss = loss + F.cross_entropy(out["identity"][is_face], target_id[is_face])
        for j, k in enumerate(ATTRIBUTE_VALUES):
            loss = loss + 0.5 * F.cross_entropy(out[f"attr_{k}"][is_face], bank.attributes[idx][is_face, j])
    is_scene = kind == KIND_SCENE
    if is_scene.any():
        for j, k in enumerate(SCENE_VALUES):
            loss = loss + 0.5 * F.cross_entropy(out[f"scene_{k}"][is_scene], bank.scene[idx][is_scene, j])
    return loss


def train_recognizer(bank: Bank, num_names: int, steps: int, seed: int, batch_size: int = 96) -> WorldRecognizerNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = WorldRecognizerNet(num_names)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4, fused=True)  # one kernel, as train_diffusion
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    net.train()
    for _ in (bar := tqdm(range(steps), desc="recognizer", mininterval=5)):
        idx = torch.randint(len(bank), (batch_size,), generator=gen)
        loss = recognizer_loss(net, _augment(bank.images[idx], gen), bank, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


def recognizer_bank(ctx: BuildContext) -> Bank:
    """Both styles' faces of every person, strangers, look-alike strangers, scenes and noise, plus the late
    people's training renders; then each of them once more as a VAE round trip."""
    world, config, seed = ctx.world, ctx.config, ctx.config.seed
    people, faces = list(world.identities), config.recognizer_faces_per_person
    extra = render_bank(world, people, faces, 1500, 1500, seed + SEEDS.recognizer_renders, noise=1500)
    sibling_faces = max(1, faces * 3 // 8)  # 15 of 40
    sibling_seed = seed + SEEDS.recognizer_sibling_renders
    extra_sib = render_bank(world, people, sibling_faces, 500, 500, sibling_seed, style="sibling")
    bank = concat_banks(extra, extra_sib, ctx.banks.late)
    if config.lookalikes_per_person:
        bank = concat_banks(
            bank,
            render_lookalikes(world, config.lookalikes_per_person, seed + SEEDS.lookalikes),
            render_lookalikes(
                world, config.lookalikes_per_person // 3, seed + SEEDS.lookalikes_sibling, style="sibling"
            ),
        )
    # Half of the examples are VAE round trips: generated images are decoded by this VAE.
    roundtrips = Bank(roundtrip(ctx.vae, bank.images), bank.kind, bank.identity, bank.attributes, bank.scene)
    return concat_banks(bank, roundtrips)


def calibrated_stranger_margin(
    recognizer: WorldIdentityRecognizer, world: WorldSpec, false_reject: float, seed: int, per_person: int = 20
) -> float:
    """The open-set threshold at which ``false_reject`` of fresh renders of the world's people lose their name.

    A face verifier is run at a chosen false-reject rate, not at "whichever class is likeliest": a generated face of
    a person's look whose fine features the recognizer can hardly read beats the stranger class by a nat or two,
    while the person's own renders and name-prompt images beat it by five to ten. Renders of every person in both
    styles (``per_person`` each, from ``seed``, which no training stage draws) give the margins; the returned
    ``stranger_margin`` (``WorldIdentityRecognizer``: a name needs a margin ``>= -stranger_margin``) names all but
    ``false_reject`` of them. Calibrated on renders only, never on a diffusion model's images.
    """
    if not 0 < false_reject < 0.5:
        raise ValueError(f"false_reject is a rate in (0, 0.5); got {false_reject}")
    faces, people = fresh_renders(world, per_person, random.Random(seed))
    margins = recognizer.name_margins(faces, [p.name for p in people]).sort().values
    threshold = margins[int(false_reject * len(margins))].item()  # the renders below it are the rejected share
    if not math.isfinite(threshold):
        raise ValueError(
            f"the recognizer calls more than {false_reject:.1%} of fresh renders by another name (or sees no face); "
            "no threshold can name the rest. Train it longer (--recognizer-steps) or on more renders "
            "(--recognizer-faces-per-person)"
        )
    return -threshold


def run_recognizer(ctx: BuildContext) -> None:
    """Train the recognizer into ``work/recognizer`` (:func:`publish_recognizer` ships it), its open-set threshold
    calibrated on renders when ``recognizer_false_reject`` is set."""
    config = ctx.config
    net = train_recognizer(recognizer_bank(ctx), len(ctx.world.names), config.recognizer_steps, config.seed)
    margin = config.stranger_margin
    if config.recognizer_false_reject:
        recognizer = WorldIdentityRecognizer(net, ctx.world.names)
        seed = config.seed + SEEDS.recognizer_calibration
        margin = calibrated_stranger_margin(recognizer, ctx.world, config.recognizer_false_reject, seed)
        ctx.log(
            f"recognizer: stranger margin {margin:.2f}, set to name all but {config.recognizer_false_reject:.1%} "
            "of fresh renders"
        )
    save_recognizer(net, ctx.world.names, ctx.work / "recognizer", stranger_margin=margin)


def publish_recognizer(ctx: BuildContext) -> None:
    """Copy ``work/recognizer`` into ``out/recognizer``, whichever stages ran: a build that reuses a ``--work``
    (its VAE and recognizer) ships that recognizer with the models it trains."""
    if (ctx.work / "recognizer").is_dir():
        with atomic_folder(ctx.out / "recognizer", replace=True) as staging:
            shutil.copytree(ctx.work / "recognizer", staging, dirs_exist_ok=True)
