"""Folders that appear complete or not at all: write into a temporary sibling, rename when done.

Every writer of a folder in the project (adapters, checkpoints, data sets, exports, reports) goes
through here, so an interrupted run never leaves a half-written folder where a finished one is
expected, and a replaced folder survives until its successor is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished ``staging`` folder to ``target``; an existing ``target`` is kept until the swap."""
    staging, target = Path(staging), Path(target)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it becomes ``target``, on error it is removed.

    With ``replace=True`` an existing ``target`` is replaced; otherwise the caller must check it is new.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    # mkdtemp makes the folder private (0700); the finished folder gets the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if target.exists() and not replace:
            raise FileExistsError(f"{target} appeared while it was being written; not replacing it")
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
