"""experiments/eps_gap_diagnostics.py, the per-timestep gap diagnostic, on the tiny real pipeline: what it measures,
checked against the loss itself."""

from __future__ import annotations

import math

import pytest

from apl_adapter.training import TrainConfig, train
from experiments.eps_gap_diagnostics import eps_gap_by_timestep, format_rows, main

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
    # identity rows say how much of the name's direction the prefix keeps; preservation rows have none to keep
    assert all(r.name_share is None for r in preservation)
    assert all(math.isfinite(r.name_share) for r in rows if r.kind == "identity")


def test_cli_prints_the_table_and_refuses_bad_settings(base_folder, data_folder, capsys):  # noqa: F811
    assert main(["--base", str(base_folder), "--data", str(data_folder), "--bands", "1", "--samples", "2"]) == 0
    assert "| identity | [0, 1000) |" in capsys.readouterr().out
    assert main(["--base", str(base_folder), "--data", str(data_folder), "--bands", "0"]) == 2
    assert "bands and samples must be >= 1" in capsys.readouterr().err
    assert main(["--base", str(base_folder.parent / "missing"), "--data", str(data_folder)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_takes_each_position_from_the_right_encoding():
    import torch

    from apl_adapter.errors import APLAdapterError
    from experiments.eps_gap_diagnostics import split_prefixed_states

    prefixed, plain = torch.randn(2, 12, 3), torch.randn(2, 12, 3)
    halves = split_prefixed_states(prefixed, plain, 4)
    prefix_states, prompt_states = halves["prefix_states"], halves["prompt_states"]
    assert prefix_states.shape == prompt_states.shape == (2, 12, 3)
    # prefix states only: BOS and P1..P4 as prefixed, then the plain prompt from its position 1
    assert torch.equal(prefix_states[:, :5], prefixed[:, :5]) and torch.equal(prefix_states[:, 5:], plain[:, 1:8])
    # prompt states only: plain BOS, the prefixed prompt states moved back to position 1, plain tail
    assert torch.equal(prompt_states[:, :1], plain[:, :1])
    assert torch.equal(prompt_states[:, 1:8], prefixed[:, 5:]) and torch.equal(prompt_states[:, 8:], plain[:, 8:])
    with pytest.raises(APLAdapterError, match="differ in shape"):
        split_prefixed_states(prefixed, plain[:, :11], 4)
    with pytest.raises(APLAdapterError, match="num_virtual_tokens must be in"):
        split_prefixed_states(prefixed, plain, 11)


def test_split_run_measures_both_halves_without_moving_the_rest(base_folder, data_folder, adapter, capsys):  # noqa: F811
    whole = eps_gap_by_timestep(base_folder, data_folder, adapter, bands=2, samples=4)
    split = eps_gap_by_timestep(base_folder, data_folder, adapter, bands=2, samples=4, split=True)
    # the halves draw no random numbers: the same examples, timesteps and noise as the plain run
    assert [(r.gap_without, r.gap_with) for r in split] == [(r.gap_without, r.gap_with) for r in whole]
    for row in split:
        assert row.gap_prefix_states is not None and row.gap_prompt_states is not None
        if row.kind == "preservation":  # each half alone already moves a caption's eps
            assert row.gap_prefix_states > 1e-8 and row.gap_prompt_states > 1e-8
    assert all(r.gap_prefix_states is None for r in whole)
    args = ["--base", str(base_folder), "--data", str(data_folder), "--bands", "1", "--samples", "2"]
    assert main([*args, "--adapter", str(adapter), "--split"]) == 0
    table = capsys.readouterr().out
    assert "prefix states only | prompt states only |" in table and table.splitlines()[2].count("|") == 9
    assert main([*args, "--split"]) == 2
    assert "needs an adapter" in capsys.readouterr().err
