"""The per-timestep gap diagnostic on the tiny real pipeline: what it measures, checked against the loss itself."""

from __future__ import annotations

import math

import pytest

from apl_adapter.training import TrainConfig, train
from apl_adapter.training.diagnostics import eps_gap_by_timestep, format_rows, main

from .test_training_loop import _one_thread, base_folder, data_folder  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def adapter(base_folder, data_folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("diag") / "run"
    return train(
        TrainConfig(base=str(base_folder), data=str(data_folder), out=str(out), steps=3, batch_size=2, lr=0.5),
        show_progress=False,
    ).adapter_dir


def test_without_adapter_preservation_gap_is_zero_and_identity_gap_is_not(base_folder, data_folder):  # noqa: F811
    rows = eps_gap_by_timestep(base_folder, data_folder, bands=2, samples=4)
    assert [(r.kind, r.t_low, r.t_high) for r in rows] == [
        ("identity", 0, 500), ("identity", 500, 1000), ("preservation", 0, 500), ("preservation", 500, 1000)
    ]  # fmt: skip
    for row in rows:
        assert row.gap_with is None and math.isnan(row.ratio)
        if row.kind == "preservation":
            assert row.gap_without == 0.0  # c1 == c2: the same eps
        else:
            assert row.gap_without > 0.0  # a name prompt and its description condition differently


def test_with_adapter_the_prefix_changes_preservation_eps(base_folder, data_folder, adapter):  # noqa: F811
    rows = eps_gap_by_timestep(base_folder, data_folder, adapter, bands=2, samples=4)
    again = eps_gap_by_timestep(base_folder, data_folder, adapter, bands=2, samples=4)
    assert [(r.gap_without, r.gap_with) for r in rows] == [(r.gap_without, r.gap_with) for r in again]  # seeded
    preservation = [r for r in rows if r.kind == "preservation"]
    # a prefix trained at lr 0.5 moves every caption's eps: the damage the diagnostic exists to show
    assert all(r.gap_with > 1e-8 and r.ratio == float("inf") for r in preservation)
    table = format_rows(rows)
    assert table.count("\n") == len(rows) + 1 and "| preservation | [500, 1000) |" in table


def test_cli_prints_the_table_and_refuses_bad_settings(base_folder, data_folder, capsys):  # noqa: F811
    assert main(["--base", str(base_folder), "--data", str(data_folder), "--bands", "1", "--samples", "2"]) == 0
    assert "| identity | [0, 1000) |" in capsys.readouterr().out
    assert main(["--base", str(base_folder), "--data", str(data_folder), "--bands", "0"]) == 2
    assert "bands and samples must be >= 1" in capsys.readouterr().err
    assert main(["--base", str(base_folder.parent / "missing"), "--data", str(data_folder)]) == 2
    assert "does not exist" in capsys.readouterr().err
