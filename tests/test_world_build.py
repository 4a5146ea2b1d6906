"""``apl-world build`` end to end at toy sizes: every stage writes a loadable diffusers folder."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, replace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from apl_adapter.world.build import LEG_STAMP, BasePhase, BuildConfig, build_world
from apl_adapter.world.cli import main
from apl_adapter.world.models import load_world_pipeline

TOY_LEGS = (BasePhase(2, 1e-3), BasePhase(2, 1e-3, mix=(0.2, 0.2, 0.6), seed=3, offset_noise=0.1))


def _toy_config(stages, phases=TOY_LEGS):
    from apl_adapter.world.build import PRESETS

    return replace(
        BuildConfig(**PRESETS["v1"]),  # the options the toy was written for (renders, threshold); its own legs below
        faces_per_person=3,  # the sibling bank takes a third of each count
        strangers=9,
        scenes=9,
        late_faces_per_person=2,
        vae_steps=2,
        recognizer_steps=2,
        base_phases=phases,
        sibling_steps=2,
        dreambooth_steps=2,
        batch_size=4,
        stages=stages,
    )


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-build")
    logs: list[str] = []
    torch.set_num_threads(1)
    stages = ("vae", "recognizer", "base", "sibling", "auxiliary", "dreambooth")
    card = build_world(_toy_config(stages), root / "out", root / "work", log=logs.append)
    return root, card, logs


def test_every_stage_writes_a_loadable_model(toy_build):
    root, card, _ = toy_build
    out = root / "out"
    for kind in ("base", "sibling", "auxiliary", "dreambooth"):
        pipe = load_world_pipeline(kind, out)
        assert isinstance(pipe, StableDiffusionPipeline)
    assert not (out / "base" / LEG_STAMP).exists(), "the build's bookkeeping must not ship with the model"
    # a model loaded from the work folder (a base leg, the VAE) must not write that folder into the shipped config
    assert not [c for c in out.rglob("config.json") if "_name_or_path" in json.loads(c.read_text())]
    # fine-tunes change the UNet only; the rest is the base's, linked
    assert (out / "sibling" / "text_encoder").is_symlink()
    base_w = load_world_pipeline("base", out).unet.conv_in.weight
    for kind in ("sibling", "auxiliary", "dreambooth"):
        assert not torch.equal(base_w, load_world_pipeline(kind, out).unet.conv_in.weight), kind
    assert set(card["timings_s"]) >= {"vae", "recognizer", "base", "sibling", "auxiliary", "dreambooth"}
    assert json.loads((out / "world_card.json").read_text())["build_config"]["base_phases"][1]["mix"] == [0.2, 0.2, 0.6]
    assert not list(out.glob(".*writing*")) and not list((root / "work").glob(".*writing*"))


def test_weights_ship_in_float16_and_load_as_float32(toy_build):
    from safetensors.torch import load_file

    root, _, _ = toy_build
    base = root / "out" / "base"
    for weights in (base / "unet" / "diffusion_pytorch_model.safetensors", base / "text_encoder" / "model.safetensors"):
        assert {t.dtype for t in load_file(weights).values() if t.is_floating_point()} == {torch.float16}, weights
    pipe = load_world_pipeline("base", root / "out")
    assert pipe.text_encoder.dtype == torch.float32 and pipe.unet.dtype == torch.float32


def test_each_base_leg_is_kept_and_reused_when_unchanged(toy_build):
    root, _, _ = toy_build
    work = root / "work"
    assert (work / "base-leg0" / LEG_STAMP).is_file() and (work / "base-leg1" / LEG_STAMP).is_file()
    before = (work / "base-leg1" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    logs: list[str] = []
    build_world(_toy_config(("base",)), root / "out", work, log=logs.append)
    assert any("leg 1: reusing" in m for m in logs) and any("leg 2: reusing" in m for m in logs)

    # A different second leg retrains that leg only.
    logs.clear()
    changed = (BasePhase(2, 1e-3), BasePhase(3, 1e-3, mix=(0.2, 0.2, 0.6), seed=3))
    build_world(_toy_config(("base",), changed), root / "out", work, log=logs.append)
    assert any("leg 1: reusing" in m for m in logs) and not any("leg 2: reusing" in m for m in logs)
    assert (work / "base-leg1" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != before


def test_build_cli_rejects_unknown_stages_and_bad_steps(tmp_path, capsys):
    assert main(["build", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--stages", "vae,paint"]) == 2
    assert "apl-world build: error: unknown stage" in capsys.readouterr().err
    assert main(["build", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--base-steps", "0"]) == 2
    assert "apl-world build: error: --base-steps must be >= 1" in capsys.readouterr().err
    assert (
        main(["build", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--stranger-min-distance", "6"])
        == 2
    )  # world seed 0 has looks shared by people whose fine features leave no face 6 from all of them
    err = capsys.readouterr().err
    assert "--stranger-min-distance 6 leaves no stranger for some look of world seed 0" in err and "use 0-5" in err
    assert (
        main(["build", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--late-described-faces", "-1"])
        == 2
    )
    assert "--late-described-faces must be >= 0" in capsys.readouterr().err
    where = ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    assert main(["build", *where, "--name-contrast", "-0.5"]) == 2
    assert "--name-contrast must be >= 0 (0 = off); got -0.5" in capsys.readouterr().err
    assert main(["build", *where, "--name-contrast", "nan"]) == 2
    assert "--name-contrast must be >= 0 (0 = off); got nan" in capsys.readouterr().err
    assert main(["build", *where, "--recognizer-faces-per-person", "0"]) == 2
    assert "--recognizer-faces-per-person must be >= 1" in capsys.readouterr().err
    for rate in ("0.5", "-0.01", "nan"):
        assert main(["build", *where, "--recognizer-false-reject", rate]) == 2
        assert "--recognizer-false-reject is a rate in (0, 0.5), or 0 to keep" in capsys.readouterr().err
    for share in ("0.5", "-0.1", "nan"):
        assert main(["build", *where, "--dreambooth-description-prior", share]) == 2
        assert "--dreambooth-description-prior is a share of DreamBooth's batch" in capsys.readouterr().err
    # v1 draws no strangers under late names, so there is nothing for the prior to replay
    assert main(["build", *where, "--preset", "v1", "--dreambooth-description-prior", "0.25"]) == 2
    assert "give --late-described-faces N or prior 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_recognizer_stage_ships_the_threshold_calibrated_on_renders(tmp_path, monkeypatch):
    """With ``recognizer_false_reject`` the stage writes the calibrated margin into the recognizer it ships; a
    recognizer that misnames more renders than the rate allows is refused with the fix."""
    import apl_adapter.world.build.recognizer as stage
    from apl_adapter.world.recognizers import RECOGNIZER_DIR, WorldIdentityRecognizer
    from apl_adapter.world.spec import WorldSpec

    torch.set_num_threads(1)
    config = replace(
        _toy_config(("vae", "recognizer")),
        recognizer_false_reject=0.02,
        recognizer_faces_per_person=2,
        lookalikes_per_person=0,
    )
    with pytest.raises(ValueError, match=r"calls more than 2\.0% of fresh renders by another name"):
        build_world(config, tmp_path / "toy", tmp_path / "toy-work", log=lambda _: None)  # 2 steps: misnames most
    # the same stage around a trained network (the shipped one: training it again takes minutes)
    shipped = WorldIdentityRecognizer.from_pretrained(RECOGNIZER_DIR)
    monkeypatch.setattr(stage, "train_recognizer", lambda *args, **kwargs: shipped.net)
    logs: list[str] = []
    build_world(config, tmp_path / "out", tmp_path / "work", log=logs.append)
    written = json.loads((tmp_path / "out" / "recognizer" / "config.json").read_text())["stranger_margin"]
    seed = config.seed + stage.SEEDS.recognizer_calibration
    assert written == pytest.approx(stage.calibrated_stranger_margin(shipped, WorldSpec.from_seed(0), 0.02, seed))
    assert written < 1.0 and any("set to name all but 2.0% of fresh renders" in line for line in logs)


def test_a_base_without_legs_is_refused_before_any_training(toy_build):
    root, _, _ = toy_build
    with pytest.raises(ValueError, match="at least one training leg"):
        build_world(_toy_config(("base",), phases=()), root / "out", root / "work", log=lambda _: None)


def test_position_jitter_moves_half_the_prompts_right_and_keeps_bos_first():
    """The base text encoder must see prompts at the positions an APL prefix moves them to."""
    from apl_adapter.world.build import train_diffusion
    from apl_adapter.world.models import world_text_encoder, world_unet

    torch.set_num_threads(1)
    text, unet = world_text_encoder(), world_unet()
    seen: list = []
    text.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)

    def sampler(n):
        return torch.randn(n, 4, 16, 16), ["a red circle on a white background"] * n

    kwargs = dict(steps=1, batch_size=200, lr=1e-4, seed=0, desc="jitter", ema_decay=0.9, position_jitter=24)
    train_diffusion(unet, text, sampler, train_text=True, **kwargs)
    positions = seen[-1]
    shift = positions[:, 1] - 1
    assert (positions[:, 0] == 0).all() and int(positions.max()) <= 76
    assert 0.35 < float((shift > 0).float().mean()) < 0.65 and int(shift.max()) <= 24 and int(shift.min()) == 0
    moved = positions[shift > 0]
    assert torch.equal(moved[:, 2] - moved[:, 1], torch.ones(len(moved), dtype=torch.long))  # order kept

    train_diffusion(unet, text, sampler, train_text=False, **kwargs)  # a frozen encoder keeps its positions
    assert seen[-1] is None


def test_lookalike_strangers_share_a_persons_attributes_and_are_nobody():
    """The recognizer's look-alike negatives: a person's coarse attributes, fine features 2-3 from theirs and
    >= 2 from every person of the world (identities are placed >= 2 apart), labelled stranger."""
    import random

    from apl_adapter.world.build import KIND_STRANGER, lookalike_fine_features, render_lookalikes
    from apl_adapter.world.spec import ATTRIBUTE_VALUES, WorldSpec

    world = WorldSpec.from_seed(0)
    rng = random.Random(0)
    for person in world.identities:
        for _ in range(5):
            fine = lookalike_fine_features(world, person, rng)
            assert sum(fine[k] != person.fine[k] for k in fine) in (2, 3)
            assert all(sum(fine[k] != other.fine[k] for k in fine) >= 2 for other in world.identities)
    bank = render_lookalikes(world, per_person=2, seed=1)
    assert len(bank) == 2 * len(world.identities)
    assert bool((bank.kind == KIND_STRANGER).all()) and bool((bank.identity == -1).all())
    first = world.identities[0]
    assert bank.attributes[0].tolist() == [ATTRIBUTE_VALUES[k].index(first.attributes[k]) for k in ATTRIBUTE_VALUES]


def test_a_later_stage_runs_alone_on_a_built_world(toy_build):
    """--stages auxiliary on a world built elsewhere: no VAE in the fresh --work, so the built model's own is used."""
    root, _, _ = toy_build
    (root / "out" / "auxiliary" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    card = build_world(_toy_config(("auxiliary",)), root / "out", root / "fresh-work", log=lambda _: None)
    assert not (root / "fresh-work" / "vae").exists() and "auxiliary" in card["timings_s"]
    assert isinstance(load_world_pipeline("auxiliary", root / "out"), StableDiffusionPipeline)


def test_the_cli_offers_the_stage_table_in_run_order(capsys, monkeypatch):
    """build_world and `apl-world build --stages` read one table: the CLI's default is the table's default rows,
    its help lists every row in run order, and a stage needs only stages that run before it."""
    from apl_adapter.world.build import DEFAULT_STAGES, STAGE_TABLE, STAGES
    from apl_adapter.world.cli import build_parser

    assert tuple(stage.name for stage in STAGE_TABLE) == STAGES
    assert build_parser().parse_args(["build"]).stages == ",".join(DEFAULT_STAGES)
    assert BuildConfig().stages == DEFAULT_STAGES
    assert tuple(name for name in STAGES if name in DEFAULT_STAGES) == DEFAULT_STAGES  # table stages, in its order
    monkeypatch.setenv("COLUMNS", "200")  # argparse would otherwise break the long comma-separated list
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert f"subset of {','.join(STAGES)}" in " ".join(capsys.readouterr().out.split())
    for i, stage in enumerate(STAGE_TABLE):
        assert set(stage.needs) <= set(STAGES[:i]), f"{stage.name} runs before a stage it needs"


def test_fine_tunes_average_with_finetune_ema_decay_not_the_bases(toy_build):
    """The fine-tunes' EMA decays at BuildConfig.finetune_ema_decay; the base's ema_decay does not reach them."""
    from apl_adapter.world.build import LatentSet, encode_latents, finetune_unet, mix_groups, render_bank
    from apl_adapter.world.spec import WorldSpec

    root, _, _ = toy_build
    out = root / "out"
    world = WorldSpec.from_seed(0)
    bank = render_bank(world, world.seen[:2], 2, 2, 2, seed=5)
    groups = mix_groups(LatentSet(*encode_latents(load_world_pipeline("base", out).vae, bank.images), bank), (1, 1, 1))

    def tuned(**changes) -> bytes:
        config = replace(_toy_config(()), **changes)
        finetune_unet(config, world, out, "auxiliary", groups, steps=2, lr=1e-3, seed=0, sampler_seed=0)
        return (out / "auxiliary" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    default = tuned()
    assert tuned(ema_decay=0.0) == default
    assert tuned(finetune_ema_decay=0.0) != default  # no averaging: the last step's weights


def test_strangers_keep_their_distance_and_late_names_are_known_by_description():
    """With the options on, strangers are >= stranger_min_distance fine features from every person sharing their
    attributes, late names come with strangers of the late person's look, and DreamBooth replays none of those;
    with them off (v1's config) the bank is exactly the one drawn before the options existed."""
    from apl_adapter.world.build import KIND_NAMED, KIND_STRANGER, render_bank
    from apl_adapter.world.build.finetunes import replay_mask
    from apl_adapter.world.spec import ATTRIBUTE_VALUES, WorldSpec, random_fine_features, stranger_fine_features

    world = WorldSpec.from_seed(0)
    rng = random.Random(0)
    for person in world.identities:
        fine = stranger_fine_features(world.identities, person.attributes, rng, min_distance=3)
        twins = [p for p in world.identities if p.attributes == person.attributes]
        assert all(sum(fine[k] != p.fine[k] for k in fine) >= 3 for p in twins)
    a, b = random.Random(4), random.Random(4)  # off: the same draws as random fine features
    assert [stranger_fine_features(world.identities, p.attributes, a) for p in world.identities] == [
        random_fine_features(b) for _ in world.identities
    ]
    from apl_adapter.world.build import PRESETS

    v1 = BuildConfig(**PRESETS["v1"])  # the first shipped world's build: every option off
    assert v1.late_described_faces == v1.stranger_min_distance == v1.strangers_like_people == 0

    bank = render_bank(
        world, world.seen, 2, 30, 0, seed=3, described=world.late, described_per_person=4, stranger_min_distance=3
    )
    late_ids = {world.names.index(p.name) for p in world.late}
    described = [i for i in range(len(bank)) if int(bank.identity[i]) in late_ids]
    assert len(described) == 4 * len(world.late) and all(int(bank.kind[i]) == KIND_NAMED for i in described)
    for i in described:
        person = world.identities[int(bank.identity[i])]
        assert bank.attributes[i].tolist() == [
            ATTRIBUTE_VALUES[k].index(person.attributes[k]) for k in ATTRIBUTE_VALUES
        ]
    keep = replay_mask(bank, world)
    assert not keep[described].any() and int(keep.sum()) == len(bank) - len(described)
    assert int((bank.kind == KIND_STRANGER).sum()) == 30

    # strangers like each person: that person's attributes, not that person's face
    like = render_bank(world, world.seen, 0, 0, 0, seed=3, strangers_like=3, stranger_min_distance=3)
    assert len(like) == 3 * len(world.seen) and bool((like.kind == KIND_STRANGER).all())
    for k, person in enumerate(world.seen):
        expected = [ATTRIBUTE_VALUES[a].index(person.attributes[a]) for a in ATTRIBUTE_VALUES]
        assert like.attributes[3 * k : 3 * k + 3].tolist() == [expected] * 3

    # with the options off a bank draws exactly what it drew before they existed: its labels (stranger attributes,
    # scene picks, both after the fine-feature draws) hashed from the code of d027952
    old = render_bank(world, world.seen, 2, 40, 12, seed=7)
    labels = torch.cat([old.kind[:, None], old.identity[:, None], old.attributes, old.scene], 1)
    assert hashlib.sha1(labels.numpy().tobytes()).hexdigest()[:16] == "85f287d34566def7"

    # a distance no fine features can keep (6 features) is refused, not looped on
    with pytest.raises(ValueError, match="no stranger"):
        stranger_fine_features(world.identities[:1], world.identities[0].attributes, rng, min_distance=7)


def test_the_description_prior_replays_late_strangers_under_the_description():
    """DreamBooth's class prior: the strangers the base drew under a late name, and only they, come back under the
    late person's description (every template), while the bank they came from keeps its name prompts."""
    from apl_adapter.world.build import render_bank
    from apl_adapter.world.build.diffusion import LatentSet
    from apl_adapter.world.build.finetunes import description_prior, late_described_mask, replay_mask
    from apl_adapter.world.spec import WorldSpec

    world = WorldSpec.from_seed(0)
    bank = render_bank(world, world.seen[:3], 2, 5, 2, seed=3, described=world.late, described_per_person=3)
    latents = LatentSet(torch.zeros(len(bank), 4, 4, 4), torch.zeros(len(bank), 4, 4, 4), bank)
    relabelled, rows = description_prior(latents, world)
    late_ids = {world.names.index(p.name) for p in world.late}
    assert rows.tolist() == [i for i in range(len(bank)) if int(bank.identity[i]) in late_ids]
    assert len(rows) == 3 * len(world.late)
    assert torch.equal(late_described_mask(bank, world), ~replay_mask(bank, world))
    templates = range(len(world.person_templates))
    for i in rows.tolist():
        person = world.identities[int(bank.identity[i])]
        prompt = relabelled.prompt(world, i, random.Random(i))
        assert prompt in {world.attribute_prompt(person.name, k) for k in templates}, prompt
        assert latents.prompt(world, i, random.Random(i)) in {world.identity_prompt(person.name, k) for k in templates}
    others = [i for i in range(len(bank)) if i not in set(rows.tolist())]
    assert [relabelled.prompt(world, i, random.Random(i)) for i in others] == [
        latents.prompt(world, i, random.Random(i)) for i in others
    ]


def test_the_description_prior_reaches_dreambooth_training(toy_build, tmp_path):
    """The same toy DreamBooth with and without the prior trains different UNets; a build without strangers under
    late names has nothing to replay and says so."""
    import shutil

    from safetensors.torch import load_file

    root, _, _ = toy_build
    unets = {}
    for prior in (0.0, 0.25):
        out, work = tmp_path / f"out-{prior}", tmp_path / f"work-{prior}"
        shutil.copytree(root / "out" / "base", out / "base")
        shutil.copytree(root / "work" / "vae", work / "vae")
        config = replace(_toy_config(("dreambooth",)), late_described_faces=2, dreambooth_description_prior=prior)
        build_world(config, out, work, log=lambda _: None)
        unets[prior] = load_file(out / "dreambooth" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unets[0.0][k], unets[0.25][k]) for k in unets[0.0])
    config = replace(_toy_config(("dreambooth",)), late_described_faces=0, dreambooth_description_prior=0.25)
    with pytest.raises(ValueError, match="late_described_faces = 0"):
        build_world(config, tmp_path / "out-0.25", tmp_path / "work-none", log=lambda _: None)


def test_name_description_contrast_is_the_hinge_it_documents_and_pulls_the_two_apart():
    """The contrast equals a hand-computed hinge on the same draws (seen and unseen people only), gives nothing
    below its margin, and a few steps of it alone lower the description-to-name similarity it measures."""
    import torch.nn.functional as F

    from apl_adapter.world.build.contrast import name_description_contrast
    from apl_adapter.world.build.diffusion import PromptEncoder
    from apl_adapter.world.models import world_text_encoder
    from apl_adapter.world.spec import WorldSpec

    world = WorldSpec.from_seed(0)
    ids = PromptEncoder().ids
    text = world_text_encoder(0)
    loss = name_description_contrast(world, ids, weight=2.0, margin=-1.0, people_per_step=4, seed=5)

    # the reference: the same people and templates, drawn from the same seed, encoded one prompt at a time; it
    # draws from seen + unseen only (late names are learnt as their description), so drawing from every person
    # would pick other people and fail the comparison
    rng = random.Random(5)
    names = [p.name for p in world.seen + world.unseen]
    picks = [(rng.choice(names), rng.randrange(len(world.person_templates))) for _ in range(4)]
    with torch.no_grad():
        sims = [
            F.cosine_similarity(
                text(ids([world.identity_prompt(n, k)]))[0].flatten(1),
                text(ids([world.attribute_prompt(n, k)]))[0].flatten(1),
            )
            for n, k in picks
        ]
        expected = 2.0 * (torch.cat(sims) + 1.0).mean()
        assert torch.allclose(loss(text), expected, atol=1e-5)

    # similarities below the margin give zero and no gradient
    quiet = name_description_contrast(world, ids, weight=1.0, margin=0.999, people_per_step=4, seed=5)
    text.zero_grad()
    value = quiet(text)
    value.backward()
    assert value.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in text.parameters())

    def mean_similarity() -> float:
        with torch.no_grad():
            n = text(ids([world.identity_prompt(p, 0) for p in names]))[0].flatten(1)
            d = text(ids([world.attribute_prompt(p, 0) for p in names]))[0].flatten(1)
            return float(F.cosine_similarity(n, d).mean())

    before = mean_similarity()
    push = name_description_contrast(world, ids, weight=1.0, margin=0.0, people_per_step=8, seed=1)
    opt = torch.optim.Adam(text.parameters(), lr=1e-3)
    for _ in range(10):
        opt.zero_grad()
        push(text).backward()
        opt.step()
    assert mean_similarity() < before - 0.05

    for bad in ({"weight": 0.0}, {"weight": float("nan")}, {"margin": 1.0}, {"people_per_step": 0}):
        kwargs = {"weight": 1.0, "margin": 0.6, "people_per_step": 8, **bad}
        with pytest.raises(ValueError, match="name-description contrast needs"):
            name_description_contrast(world, ids, seed=0, **kwargs)


def test_a_leg_without_the_contrast_keeps_its_old_stamp_and_one_with_it_is_stamped():
    from apl_adapter.world.build import SHIPPED_BASE_PHASES
    from apl_adapter.world.build.base import leg_stamp
    from apl_adapter.world.build.diffusion import train_diffusion
    from apl_adapter.world.models import ASSETS

    # the shipped world: the contrast on its second leg only, and the legs its card records
    assert [leg.name_contrast for leg in SHIPPED_BASE_PHASES] == [0.0, 1.0]
    card = json.loads((ASSETS / "world_card.json").read_text())
    assert (
        json.loads(json.dumps([asdict(leg) for leg in BuildConfig().base_phases]))
        == card["build_config"]["base_phases"]
    )
    assert "name_contrast" not in leg_stamp(BuildConfig(), 0)["legs"][0]  # a leg without it keeps its old stamp
    on = BuildConfig(base_phases=(BasePhase(10, 1e-3, name_contrast=1.0),))
    assert leg_stamp(on, 0)["legs"][0]["name_contrast"] == 1.0
    with pytest.raises(ValueError, match="name contrast of a base leg needs"):
        BasePhase(10, 1e-3, name_contrast=-1.0)
    with pytest.raises(ValueError, match="name contrast of a base leg needs"):
        BasePhase(10, 1e-3, name_contrast=1.0, name_contrast_people=0)
    with pytest.raises(ValueError, match="name contrast of a base leg needs"):
        BasePhase(10, 1e-3, name_contrast=float("nan"))

    def nothing(_):
        return torch.zeros(())

    with pytest.raises(ValueError, match="train_text"):
        train_diffusion(None, None, None, 1, 1, 1e-3, 0, train_text=False, desc="", ema_decay=0.9, text_loss=nothing)


def test_a_base_leg_with_the_contrast_trains_its_text_encoder_differently(toy_build, tmp_path):
    """The contrast reaches the leg's training: the same leg with it on gives another text encoder, and stamps it."""
    import shutil

    from safetensors.torch import load_file

    root, _, _ = toy_build
    encoders = {}
    for weight in (0.0, 1.0):
        work = tmp_path / f"work-{weight}"
        shutil.copytree(root / "work" / "vae", work / "vae")
        legs = (BasePhase(2, 1e-3, name_contrast=weight),)
        build_world(_toy_config(("base",), legs), tmp_path / f"out-{weight}", work, log=lambda _: None)
        encoders[weight] = load_file(work / "base-leg0" / "text_encoder" / "model.safetensors")
        stamp = json.loads((work / "base-leg0" / LEG_STAMP).read_text())
        assert ("name_contrast" in stamp["legs"][0]) == bool(weight)
    assert any(not torch.equal(encoders[0.0][k], encoders[1.0][k]) for k in encoders[0.0])


def test_the_cli_puts_the_contrast_on_every_base_leg(tmp_path, monkeypatch):
    import apl_adapter.world.build as build

    seen: list[BuildConfig] = []
    monkeypatch.setattr(build, "build_world", lambda config, out, work: seen.append(config) or {})
    where = ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--stages", "base"]
    assert main(["build", *where, "--base-steps", "5", "--name-contrast", "0.5"]) == 0
    assert main(["build", *where, "--name-contrast", "1", "--recognizer-faces-per-person", "120"]) == 0
    assert [(leg.steps, leg.name_contrast) for leg in seen[0].base_phases] == [(5, 0.5)]
    assert all(leg.name_contrast == 1.0 for leg in seen[1].base_phases) and seen[1].recognizer_faces_per_person == 120


def test_the_presets_are_the_documented_worlds_and_options_override_them(tmp_path, monkeypatch):
    import apl_adapter.world.build as build
    from apl_adapter.world.build import LONG_LEG, PRESETS, SHIPPED_BASE_PHASES

    # the shipped legs, as the floor measurements used them: the long leg, then 1,200 contrast steps at a third of
    # its rate; v1 (the world shipped before) stopped after the long leg
    assert SHIPPED_BASE_PHASES[0] == LONG_LEG
    contrast = SHIPPED_BASE_PHASES[1]
    assert (contrast.steps, contrast.lr, contrast.name_contrast) == (1200, 5e-4, 1.0)
    assert PRESETS["shipped"] == PRESETS["no-floor"] == {}
    seen: list[BuildConfig] = []
    monkeypatch.setattr(build, "build_world", lambda config, out, work: seen.append(config) or {})
    where = ["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--stages", "base"]
    assert main(["build", *where, "--preset", "v1"]) == 0
    assert main(["build", *where, "--dreambooth-steps", "1000", "--card-scenes", "48"]) == 0
    assert main(["build", *where]) == 0
    v1, overridden, shipped = seen
    for name, value in PRESETS["v1"].items():
        assert getattr(v1, name) == value, name
    assert v1.base_phases == (LONG_LEG,) and v1.recognizer_false_reject == 0.0
    assert (shipped.stranger_min_distance, shipped.dreambooth_steps, shipped.card_scenes) == (3, 600, 192)
    assert (shipped.vae_steps, v1.vae_steps) == (3000, 300)  # the floor's fix; v1's VAE was 300 steps
    assert shipped.mix == LONG_LEG.mix  # the fine-tunes replay the long leg's mix
    assert (overridden.dreambooth_steps, overridden.card_scenes, overridden.sibling_steps) == (1000, 48, 360)
    assert shipped == BuildConfig(stages=("base",))
    # options on top of a preset are still checked, before anything is built
    assert main(["build", *where, "--preset", "v1", "--card-scenes", "0"]) == 2
    assert main(["build", *where, "--vae-steps", "0"]) == 2  # an untrained VAE, refused
    assert len(seen) == 3 and not (tmp_path / "o").exists()
