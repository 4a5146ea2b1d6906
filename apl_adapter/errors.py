"""Errors raised by apl-adapter, each naming the problem and the fix.

A leaf: it imports nothing of ours, so every module may raise these. The commands report them through
:func:`apl_adapter.console.run_cli`.
"""

from __future__ import annotations

import os
from pathlib import Path


class APLAdapterError(ValueError):
    """Bad input to an APL adapter: a wrong model, a bad config, an unusable adapter file.

    The base of every error the project raises on purpose (training data, evaluation inputs, export), so a
    caller catches one type.
    """


def check_at_least(*checks: tuple[str, float, float], error: type[APLAdapterError] = APLAdapterError) -> None:
    """``(flag, value, least)`` triples: the first value under its least is an error naming the flag."""
    for flag, value, least in checks:
        if value < least:
            raise error(f"{flag} must be >= {least}, got {value}.")


def check_output_folder(
    out: str | os.PathLike, overwrite: bool, error: type[APLAdapterError] = APLAdapterError, flag: str = "--out"
) -> None:
    """The one rule of every command that writes a folder: it must be new or empty, or ``--overwrite`` replaces it
    (each writer stages its output and swaps it in at the end, so what was there survives a failed run).

    >>> check_output_folder("/", overwrite=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    apl_adapter.errors.APLAdapterError: --out / already exists and is not empty; ... pass --overwrite to replace it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{flag} {out} is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(
            f"{flag} {out} already exists and is not empty; choose a new folder or pass --overwrite to replace it."
        )
