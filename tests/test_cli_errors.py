"""Every command turns bad input into one clear line (problem + fix) and exit code 2, never a traceback, and
keeps nothing half-written - the cases a careless user and an attacker tried (issue 21 item 14)."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import get_peft_model
from PIL import Image

from apl_adapter import APLConfig, save_adapter
from apl_adapter.bench.cli import main as bench_main
from apl_adapter.evaluation.cli import main as eval_main
from apl_adapter.testing import tiny_clip_text_model, tiny_sd_pipeline
from apl_adapter.training.cli import main as train_main
from apl_adapter.training.data import write_data_folder

from .test_training_loop import _one_thread  # noqa: F401 - autouse, one torch thread


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    save_adapter(get_peft_model(tiny_clip_text_model(), APLConfig()), root / "adapter")
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("identity", "preservation"):
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        rows.append((image, {"kind": kind, "c1": "a photo of Ann Lee", "c2": "a photo of a woman", "identity": "A"}))
    write_data_folder(root / "data", rows)
    (root / "a-file").write_text("not a folder")
    (root / "prompts.txt").write_text("a photo of {name}\na red cube\n")
    (root / "refs" / "Ann_Lee").mkdir(parents=True)
    Image.new("RGB", (32, 32), "gray").save(root / "refs" / "Ann_Lee" / "gray.png")
    return root


def _bomb(path: Path) -> None:
    """A few-KB PNG that decodes to 400 million pixels (PIL refuses more than 2 x 89 million)."""
    Image.new("L", (20000, 20000)).save(path)


def _copy_data(root: Path, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(root / "data", root.parent / f"{root.name}-{name}"))


def _expect_clean_error(code: int, err: str, prog: str, *phrases: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error:"), last
    for phrase in phrases:
        assert phrase in last, last


def _train(capsys, root: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = train_main(["--base", str(root / "sd"), "--data", str(data), "--out", str(out), "--steps", "2", *extra])
    return code, capsys.readouterr().err


def test_training_data_that_is_hostile_or_mis_encoded(root, capsys, tmp_path):
    bomb = _copy_data(root, "bomb")
    _bomb(bomb / "images" / "000000.png")
    code, err = _train(capsys, root, bomb, tmp_path / "run1")
    _expect_clean_error(code, err, "apl-train", "000000.png", "decompression bomb")

    latin = _copy_data(root, "latin")
    rows = (latin / "metadata.jsonl").read_text().replace("Ann Lee", "Ren\u00e9 Lee")
    (latin / "metadata.jsonl").write_bytes(rows.encode("latin-1"))
    code, err = _train(capsys, root, latin, tmp_path / "run2")
    _expect_clean_error(code, err, "apl-train", "line 1 is not UTF-8", "iconv")

    outside = _copy_data(root, "outside")
    elsewhere = f"../{root.name}/data/images/000000.png"  # a real image, in another folder
    rows = (outside / "metadata.jsonl").read_text().replace("images/000000.png", elsewhere)
    (outside / "metadata.jsonl").write_text(rows)
    code, err = _train(capsys, root, outside, tmp_path / "run3")
    _expect_clean_error(code, err, "apl-train", "points outside the data folder")
    assert not any((tmp_path / f"run{i}" / "adapter").exists() for i in (1, 2, 3))


def test_training_outputs_and_numbers(root, capsys, tmp_path):
    code, err = _train(capsys, root, root / "data", root / "a-file")
    _expect_clean_error(code, err, "apl-train", "is a file")
    for flags, phrase in [
        (("--steps", "0"), "steps must be >= 1, got 0"),
        (("--steps", "-1"), "steps must be >= 1, got -1"),
        (("--batch-size", "0"), "batch_size must be >= 1"),
        (("--checkpoint-every", "-1"), "checkpoint_every must be >= 0"),
        (("--text-preserve", "-0.1"), "text_preserve must be >= 0, got -0.1"),
        (("--text-name-direction", "-1"), "text_name_direction must be >= 0, got -1"),
    ]:
        code, err = _train(capsys, root, root / "data", tmp_path / "run", *flags)
        _expect_clean_error(code, err, "apl-train", phrase)


def test_corrupt_checkpoints_fail_by_name(root, capsys, tmp_path):
    run = tmp_path / "run"
    code, err = _train(capsys, root, root / "data", run, "--checkpoint-every", "1")
    assert code == 0, err
    checkpoint = run / "checkpoint-2"
    (checkpoint / "optimizer.safetensors").write_bytes(b"junk")
    code, err = _train(capsys, root, root / "data", run, "--resume", "latest")
    _expect_clean_error(code, err, "apl-train", "optimizer.safetensors cannot be used", "earlier checkpoint")
    for state, phrase in [("junk", "trainer_state.json is corrupted"), ('{"step": -5}', "non-negative integer")]:
        (checkpoint / "trainer_state.json").write_text(state)
        code, err = _train(capsys, root, root / "data", run, "--resume", str(checkpoint))
        _expect_clean_error(code, err, "apl-train", phrase)


def test_generate_identity_data_numbers_and_templates(root, capsys, tmp_path):
    (tmp_path / "ids.tsv").write_text("Ann Lee\ta woman\n")
    base = ["generate-identity-data", "--base", str(root / "sd"), "--identities", str(tmp_path / "ids.tsv")]
    for extra, phrase in [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ]:
        code = train_main([*base, "--out", str(tmp_path / "gen"), *extra])
        _expect_clean_error(code, capsys.readouterr().err, "apl-train generate-identity-data", phrase)
    for template in ("a photo of {x}", "a photo of {0}"):
        (tmp_path / "templates.txt").write_text(template + "\n")
        code = train_main([*base, "--out", str(tmp_path / "gen"), "--templates", str(tmp_path / "templates.txt")])
        _expect_clean_error(code, capsys.readouterr().err, "apl-train generate-identity-data", "{name}")
    assert not (tmp_path / "gen").exists()


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--num-scenes", "-1"], "--num-scenes must be >= 0, got -1"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        # the shipped models are world 0's: another seed's names would measure nothing (it used to exit 0)
        (["--world-seed", "3"], "built for world seed 0"),
        (["--templates", "{templates}"], "placeholder apl-bench does not know"),
    ],
)
def test_bench_refuses_before_loading_anything(root, capsys, tmp_path, extra, phrase):
    (tmp_path / "t.txt").write_text("a photo of {0}\n")
    extra = [e.replace("{templates}", str(tmp_path / "t.txt")) for e in extra]
    code = bench_main(["--adapter", str(root / "adapter"), "--out", str(tmp_path / "bench"), *extra])
    _expect_clean_error(code, capsys.readouterr().err, "apl-bench", phrase)
    code = bench_main(["--adapter", str(root / "adapter"), "--out", str(root / "a-file")])
    _expect_clean_error(code, capsys.readouterr().err, "apl-bench", "is a file")
    assert not (tmp_path / "bench").exists()


def test_eval_numbers_outputs_and_bomb_references(root, capsys, tmp_path):
    base = ["--base", str(root / "sd"), "--adapter", str(root / "adapter"), "--prompts", str(root / "prompts.txt"),
            "--identities", str(root / "refs")]  # fmt: skip
    for extra, phrase in [
        (["--out", str(tmp_path / "e"), "--same-person-distance", "-1"], "--same-person-distance must be > 0"),
        (["--out", str(tmp_path / "e"), "--steps", "0"], "--steps must be >= 1, got 0"),
        (["--out", str(root / "a-file")], "is a file"),
    ]:
        code = eval_main([*base, *extra])
        _expect_clean_error(code, capsys.readouterr().err, "apl-eval", phrase)
    # a bomb among the reference photos is skipped and listed, as the docs promise (here it leaves no usable face)
    _bomb(root / "refs" / "Ann_Lee" / "bomb.png")
    try:
        code = eval_main([*base, "--out", str(tmp_path / "e"), "--steps", "1", "--seeds", "0"])
    finally:
        (root / "refs" / "Ann_Lee" / "bomb.png").unlink()
    _expect_clean_error(code, capsys.readouterr().err, "apl-eval", "bomb.png: refused, it decodes to too many pixels")
    assert not (tmp_path / "e").exists()


def test_a_full_disk_is_said_so_and_nothing_half_written_is_kept(root, tmp_path):
    """The file-size limit (EFBIG) stands in for a full disk (ENOSPC): both reach the same handler."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    out = tmp_path / "run"
    command = [sys.executable, "-m", "apl_adapter.training.cli", "--base", str(root / "sd"), "--data",
               str(root / "data"), "--out", str(out), "--steps", "2", "--threads", "1"]  # fmt: skip
    done = subprocess.run(command, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    _expect_clean_error(done.returncode, done.stderr, "apl-train", "the disk is full", "nothing half-written")
    assert sorted(p.name for p in out.iterdir()) == ["train_config.json"]
    assert json.loads((out / "train_config.json").read_text())["steps"] == 2


def test_out_that_is_the_current_directory_is_refused(root, capsys, tmp_path, monkeypatch):
    """Outputs replace their folder when complete; the current directory cannot be replaced under the user."""
    from apl_export.cli import main as export_main

    monkeypatch.chdir(tmp_path)
    code = export_main([str(root / "sd"), "--adapter", str(root / "adapter"), "--out", "."])
    _expect_clean_error(code, capsys.readouterr().err, "apl-export", "current directory")
    code = eval_main(["--base", str(root / "sd"), "--adapter", str(root / "adapter"), "--prompts",
                      str(root / "prompts.txt"), "--identities", str(root / "refs"), "--out", "."])  # fmt: skip
    _expect_clean_error(code, capsys.readouterr().err, "apl-eval", "current directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "module",
    ["apl_adapter.training.cli", "apl_adapter.bench.cli", "apl_adapter.evaluation.cli", "apl_adapter.world.cli",
     "apl_adapter.cli", "apl_adapter.demo.cli", "apl_export.cli"],
)  # fmt: skip
def test_every_command_has_help_that_renders(module, capsys):
    """--help exits 0 with text (a '%' in a help string once broke apl-train --help)."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_command_that_writes_a_folder_keeps_a_full_one_unless_overwrite(root, capsys, tmp_path):
    """One rule, one message: --out must be new or empty, or --overwrite replaces it."""
    from apl_export.cli import main as export_main

    from apl_adapter.world.cli import main as world_main

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("the user's file")
    (tmp_path / "ids.tsv").write_text("Ann Lee\ta woman\n")
    model, adapter, out = str(root / "sd"), str(root / "adapter"), str(full)
    references = ["--prompts", str(root / "prompts.txt"), "--identities", str(root / "refs")]
    identities = ["--identities", str(tmp_path / "ids.tsv")]
    commands = {
        "apl-bench": lambda: bench_main(["--adapter", adapter, "--out", out]),
        "apl-eval": lambda: eval_main(["--base", model, "--adapter", adapter, *references, "--out", out]),
        "apl-export": lambda: export_main([model, "--adapter", adapter, "--out", out]),
        "apl-train generate-identity-data": lambda: train_main(
            ["generate-identity-data", "--base", model, *identities, "--out", out]
        ),
        "apl-world data": lambda: world_main(["data", "--out", out, "--images-per-person", "0"]),
    }
    for prog, command in commands.items():
        code = command()
        _expect_clean_error(code, capsys.readouterr().err, prog, "not empty; choose a new folder or pass --overwrite")
        assert [p.name for p in full.iterdir()] == ["keep.txt"], prog
    # and --overwrite replaces it (the cheapest writer: two scene renders)
    assert world_main(["data", "--out", str(full), "--images-per-person", "0", "--scenes", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in full.iterdir()) == ["images", "metadata.jsonl"]
