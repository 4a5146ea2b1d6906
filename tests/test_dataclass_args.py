"""Command-line options built from config dataclasses: the CLI's defaults are the config's own."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from apl_adapter.console import command_settings_of
from apl_adapter.dataclass_args import add_dataclass_arguments
from apl_adapter.training import TrainConfig
from apl_adapter.training.cli import build_parser


def test_apl_train_defaults_are_train_config_defaults():
    args = build_parser().parse_args(["--base", "b", "--data", "d", "--out", "o"])
    assert TrainConfig(**command_settings_of(args)) == TrainConfig(base="b", data="d", out="o")


def test_apl_train_options_reach_the_config_typed():
    argv = ["--base", "b", "--data", "d", "--out", "o", "--steps", "7", "--lr", "0.5", "--prefix-depth", "deep",
            "--also-through", "u1", "u2", "--checkpoints-total-limit", "2", "--gradient-checkpointing"]  # fmt: skip
    config = TrainConfig(**command_settings_of(build_parser().parse_args(argv)))
    assert (config.steps, config.lr, config.prefix_depth) == (7, 0.5, "deep")
    assert (config.also_through, config.checkpoints_total_limit, config.gradient_checkpointing) == (
        ["u1", "u2"],
        2,
        True,
    )


def test_help_shows_each_default_and_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: 1000." in text and "{shallow,deep}" in text and "--also-through FOLDER [FOLDER ...]" in text
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--base", "b", "--data", "d", "--out", "o", "--prefix-depth", "wide"])
    assert exit_info.value.code == 2 and "invalid choice: 'wide'" in capsys.readouterr().err


def test_fields_without_a_command_line_form_are_refused():
    @dataclass
    class Mapping:
        table: dict = field(default_factory=dict)

    @dataclass
    class OnByDefault:
        fast: bool = True

    for config_class in (Mapping, OnByDefault):
        with pytest.raises(TypeError, match=config_class.__name__):
            add_dataclass_arguments(argparse.ArgumentParser(), config_class)
