"""Bad inputs to apl-train give one clear message (problem + fix), exit code 2 and no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apl_adapter import APLAdapterError
from apl_adapter.testing import tiny_sd_pipeline, tiny_unet
from apl_adapter.training.cli import main
from apl_adapter.training.data import write_data_folder

from .test_training_loop import _one_thread, _prefix  # noqa: F401 - _one_thread: autouse, one torch thread


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def rows(size: int = 16, kinds=("identity", "preservation")) -> list[tuple[Image.Image, dict]]:
    rng = np.random.default_rng(0)
    out = []
    for kind in kinds:
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        out.append((image, {"kind": kind, "c1": "a photo of Ann Lee", "c2": "a photo of a woman", "identity": "A"}))
    return out


def run(capsys, base, data, out, *extra) -> tuple[int, str]:
    code = main(["--base", str(base), "--data", str(data), "--out", str(out), "--steps", "2", *extra])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out: Path, *phrases: str) -> None:
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("apl-train: error:")
    for phrase in phrases:
        assert phrase in err, err
    assert not (out / "adapter").exists()


def test_unknown_base_folder(capsys, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, tmp_path / "no-such-model", data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "does not exist", "diffusers folder")


def test_base_folder_without_model_index(capsys, tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, tmp_path / "not-a-pipeline", data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "model_index.json is missing")


def test_empty_metadata(capsys, base_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text("\n")
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "is empty")


def test_missing_metadata_file(capsys, base_folder, tmp_path):
    (tmp_path / "data").mkdir()
    code, err = run(capsys, base_folder, tmp_path / "data", tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "metadata.jsonl is missing")


def test_missing_image(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    (data / "images" / "000001.png").unlink()
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "000001.png does not exist", "line 2")


def test_bad_json_line_and_unknown_kind(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    metadata = data / "metadata.jsonl"
    metadata.write_text(metadata.read_text() + "{not json\n")
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "line 3 is not valid JSON")
    lines = metadata.read_text().splitlines()[:2]
    lines[0] = json.dumps({**json.loads(lines[0]), "kind": "celebrity"})
    metadata.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "kind 'celebrity' is unknown")


def test_image_size_mismatch_with_model(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows(size=24))  # the tiny model makes 16 x 16 images
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "24x24", "16x16", "--resolution 16")
    # the suggested fix works
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--resolution", "16")
    assert code == 0, err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_mixture_needs_both_kinds(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows(kinds=("identity",)))
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert_clean_failure(code, err, tmp_path / "run", "no kind='preservation' rows")


def test_resume_with_another_prefix_length(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--prefix-len", "4")
    assert code == 0, err
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--prefix-len", "5", "--resume", "latest")
    assert code == 2 and "prefix_len (4 -> 5)" in err and "--resume-with-new-settings" in err
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--prefix-len", "5", "--resume", "latest",
                    "--resume-with-new-settings")  # fmt: skip
    assert code == 2
    assert "shape (4, 32)" in err and "--prefix-len" in err


def test_prefix_width_mismatch_on_resume(capsys, tmp_path):
    """A checkpoint of a 32-wide encoder cannot resume on a 48-wide one (the 'width mismatch' case)."""
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    tiny_sd_pipeline(hidden_size=32).save_pretrained(narrow)
    tiny_sd_pipeline(hidden_size=48).save_pretrained(wide)
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, narrow, data, tmp_path / "run", "--prefix-len", "4")
    assert code == 0, err
    code, err = run(capsys, wide, data, tmp_path / "run", "--prefix-len", "4", "--resume", "latest",
                    "--resume-with-new-settings")  # fmt: skip
    assert code == 2
    assert "(4, 32)" in err and "(4, 48)" in err and "width" in err


def test_generate_refuses_existing_out_and_bad_template(capsys, base_folder, tmp_path):
    names = tmp_path / "names.tsv"
    names.write_text("Ann Lee\ta photo of a woman\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of someone\n")
    code = main(
        ["generate-identity-data", "--base", str(base_folder), "--identities", str(names), "--out",
         str(tmp_path / "gen"), "--templates", str(templates)]
    )  # fmt: skip
    assert code == 2 and "no '{name}' placeholder" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()


def test_generate_identity_data_writes_a_trainable_folder(capsys, base_folder, tmp_path):
    names = tmp_path / "names.tsv"
    names.write_text("# name<TAB>description\nAnn Lee\ta photo of a woman\nBo Kim\n")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red cube on a table\n")
    out = tmp_path / "gen"
    common = ["--base", str(base_folder), "--identities", str(names), "--out", str(out), "--steps", "2"]
    code = main(["generate-identity-data", *common, "--per-name", "3", "--captions", str(captions)])
    assert code == 0, capsys.readouterr().err
    rows_written = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [row["kind"] for row in rows_written] == ["identity"] * 6 + ["preservation"] * 10
    assert rows_written[0]["c1"] == "a photo of Ann Lee" and rows_written[0]["c2"] == "a photo of a woman"
    assert rows_written[3]["c2"] == ""  # no description = the authors' empty c2
    assert Image.open(out / rows_written[0]["file_name"]).size == (16, 16)
    code, err = run(capsys, base_folder, out, tmp_path / "run")
    assert code == 0, err


def test_fresh_run_refuses_a_folder_with_checkpoints(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert code == 0, err
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert code == 2 and "already holds a training run" in err and "--resume latest" in err


def test_generate_can_draw_identity_images_from_the_description(capsys, base_folder, tmp_path):
    from apl_adapter.training.generate import IdentitySpec, generate_identity_data

    def first_image(spec: IdentitySpec, images_from: str, out: str) -> tuple[dict, np.ndarray]:
        folder = generate_identity_data(
            base_folder, [spec], tmp_path / out, per_name=1, templates=("{name}",), num_inference_steps=2,
            show_progress=False, images_from=images_from,
        )  # fmt: skip
        row = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        return row, np.asarray(Image.open(folder / row["file_name"]))

    row, from_description = first_image(IdentitySpec("Ann Lee", "a photo of a woman"), "description", "d")
    assert (row["c1"], row["c2"]) == ("Ann Lee", "a photo of a woman")  # the triplet's prompts are unchanged
    _, drawn_by_that_prompt = first_image(IdentitySpec("a photo of a woman", "x"), "name", "same-prompt")
    _, from_name = first_image(IdentitySpec("Ann Lee", "a photo of a woman"), "name", "n")
    assert np.array_equal(from_description, drawn_by_that_prompt)  # same prompt, same seed
    assert not np.array_equal(from_description, from_name)

    names = tmp_path / "names.tsv"
    names.write_text("Ann Lee\ta photo of a woman\nBo Kim\n")
    code = main(
        ["generate-identity-data", "--base", str(base_folder), "--identities", str(names), "--out",
         str(tmp_path / "gen"), "--images-from", "description"]
    )  # fmt: skip
    assert code == 2 and "Bo Kim has none" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()


def test_text_init_needs_its_phrase(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--prefix-init", "text")
    assert_clean_failure(code, err, tmp_path / "run", "--prefix-init-text")
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--prefix-init-text", "a photo of")
    assert_clean_failure(code, err, tmp_path / "run", "--prefix-init text")  # a phrase that would be ignored


def test_text_init_starts_from_the_phrase_in_the_base_vocabulary(capsys, base_folder, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    data = write_data_folder(tmp_path / "data", rows())
    # Adam moves each coordinate by about lr per step, so lr = 1e-9 leaves the initial prefix in the adapter
    extra = ("--prefix-init", "text", "--prefix-init-text", "a photo of", "--prefix-len", "4", "--lr", "1e-9")
    code, err = run(capsys, base_folder, data, tmp_path / "run", *extra)
    assert code == 0, err
    prefix = _prefix(tmp_path / "run" / "adapter")
    ids = CLIPTokenizer.from_pretrained(base_folder / "tokenizer")("a photo of", add_special_tokens=False).input_ids
    table = CLIPTextModel.from_pretrained(base_folder / "text_encoder").get_input_embeddings().weight.detach()
    expected = table[torch.tensor((ids * 4)[:4])]
    torch.testing.assert_close(prefix.float(), expected.float(), atol=1e-6, rtol=0)


def test_resume_refuses_other_settings_unless_asked(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    other = write_data_folder(tmp_path / "other", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--checkpoint-every", "1")
    assert code == 0, err
    saved = (tmp_path / "run" / "train_config.json").read_text()
    for flags, field in [
        (("--seed", "3"), "seed (0 -> 3)"),
        (("--lr", "0.01"), "lr (0.001 -> 0.01)"),
        (("--c2", "empty"), "c2 ('attribute' -> 'empty')"),
        (("--identity-fraction", "0.2"), "identity_fraction (0.5 -> 0.2)"),
    ]:
        code, err = run(capsys, base_folder, data, tmp_path / "run", "--resume", "latest", *flags)
        assert code == 2 and field in err, err
    code, err = run(capsys, base_folder, other, tmp_path / "run", "--resume", "latest")
    assert code == 2 and "data (" in err
    assert (tmp_path / "run" / "train_config.json").read_text() == saved, "a refused resume rewrote the config"
    # more steps and the same settings written another way: allowed
    code, err = run(capsys, base_folder, tmp_path / "data" / ".." / "data", tmp_path / "run", "--resume", "latest",
                    "--steps", "3")  # fmt: skip
    assert code == 0, err
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--resume", "latest", "--steps", "4", "--seed", "3",
                    "--resume-with-new-settings")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["seed"] == 3


def test_a_finished_run_holding_only_its_adapter_is_not_overwritten(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "keep.txt").write_text("mine")
    code, err = run(capsys, base_folder, data, tmp_path / "run")
    assert code == 2 and "already holds a training run (adapter)" in err
    assert (tmp_path / "run" / "adapter" / "keep.txt").read_text() == "mine"


def test_push_from_name_and_description_needs_a_push_and_then_trains(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--push-from", "name_and_description")
    assert_clean_failure(code, err, tmp_path / "run", "--identity-push > 0")
    extra = ("--push-from", "name_and_description", "--identity-push", "0.3", "--identity-fraction", "1")
    code, err = run(capsys, base_folder, data, tmp_path / "run", *extra)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["push_from"] == "name_and_description"


def test_also_through_needs_a_unet_of_the_same_family(capsys, base_folder, tmp_path):
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "missing", "--also-through", str(tmp_path / "nowhere"))
    assert_clean_failure(code, err, tmp_path / "missing", "no UNet there", "shares the base text encoder")
    assert not (tmp_path / "missing").exists()  # refused before anything was loaded or written
    wide = tmp_path / "wide-unet"
    tiny_unet(cross_attention_dim=48).save_pretrained(wide)
    code, err = run(capsys, base_folder, data, tmp_path / "wide", "--also-through", str(wide))
    assert_clean_failure(code, err, tmp_path / "wide", "cross_attention_dim 48 != 32", "same family")


def test_report_to_names_a_missing_tracker_before_loading_anything(capsys, base_folder, tmp_path):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = next(t.value for t in LoggerType if t.value != "all" and t.value not in installed)
    data = write_data_folder(tmp_path / "data", rows())
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--report-to", missing)
    assert_clean_failure(code, err, tmp_path / "run", f"the {missing} package is not installed", "--report-to none")
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--report-to", "tensorbored")
    assert_clean_failure(code, err, tmp_path / "run", "not an Accelerate tracker", "tensorboard")
    assert not (tmp_path / "run").exists()
    code, err = run(capsys, base_folder, data, tmp_path / "run", "--checkpoints-total-limit", "0")
    assert_clean_failure(code, err, tmp_path / "run", "checkpoints_total_limit must be >= 1, got 0")


def test_a_loss_that_is_not_finite_stops_the_run_naming_the_step():
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from apl_adapter.training.run import record_loss

    accelerator, losses = Accelerator(cpu=True), []
    with tqdm(disable=True) as progress:
        assert record_loss(accelerator, torch.tensor(0.5), 3, losses, progress) == 0.5
        with pytest.raises(APLAdapterError, match="loss became nan at step 4; lower --lr"):
            record_loss(accelerator, torch.tensor(float("nan")), 4, losses, progress)
    assert losses == [(3, 0.5)]  # the bad value is not logged
