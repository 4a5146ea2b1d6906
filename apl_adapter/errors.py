"""Errors raised by apl-adapter, each naming the problem and the fix, and the one way every CLI reports them."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
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


# "the disk is full" in its three forms: no space, quota, file-size limit
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def run_cli(prog: str, body: Callable[[], int], args: object = None, hidden: tuple[type[Warning], ...] = ()) -> int:
    """Run a command's ``body`` and turn what it raises into ``<prog>: error: ...`` on stderr and exit code 2.

    ``args``: the parsed command line; its ``verbose`` and ``threads`` (the options every command shares, see
    :mod:`apl_adapter.console`) apply while ``body`` runs, with ``hidden`` warning categories also hidden.

    - :class:`APLAdapterError`: the message already names the problem and the fix;
    - a full disk (ENOSPC, EDQUOT, EFBIG): said so; every writer stages its output and removes the staging on
      failure, so nothing half-written is kept;
    - any other ``OSError`` (a path that is a file, no permission ...): its reason and path, not a traceback.
    """
    from .console import command_settings

    try:
        with command_settings(bool(getattr(args, "verbose", False)), int(getattr(args, "threads", 0) or 0), hidden):
            return body()
    except APLAdapterError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in _NO_SPACE:
            print(
                f"{prog}: error: the disk is full{where}: {err.strerror}. Free some space (or raise the quota) and "
                "run again; nothing half-written was kept.",
                file=sys.stderr,
            )
        elif err.strerror is None:  # raised with a message of ours (e.g. "X already exists; pass a new --out")
            print(f"{prog}: error: {err}", file=sys.stderr)
        else:
            print(f"{prog}: error: {err.strerror}{where}; check the path and its permissions.", file=sys.stderr)
    return 2
