"""Folders and files that appear complete or not at all: write into a temporary sibling, then rename.

Every writer of a folder or file in the project (adapters, checkpoints, data sets, exports, reports) goes
through here, so:

- an interrupted run never leaves a half-written folder where a finished one is expected;
- a replaced folder is swapped with its successor in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``),
  so a reader never finds the target missing, and concurrent writers each publish a complete folder;
- staging folders are named ``.<target>.<kind>-<pid>-<random>``: one left by a killed process (kill -9 leaves
  no chance to clean up, and for SD 1.5 it holds gigabytes) is removed by the next writer of the same target,
  which says so in the log;
- what is written follows the umask like any ``open()`` (``mkdtemp`` / ``mkstemp`` alone would make it private).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("apl_adapter")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ".<target>.<kind>-<pid>-<random>": the names staging_folder / atomic_file / replace_folder give
_STAGING_NAME = re.compile(r"^\..+\.(?:writing|export|partial|old)-(\d+)-[^/]+$")


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders/files in ``parent`` whose writing process is gone; returns what was removed.

    The whole folder is swept, not one target's siblings: a killed run's ``.checkpoint-10.writing-*`` is cleaned
    when the next run writes ``checkpoint-20``.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = _STAGING_NAME.match(entry.name)
            if not match or _process_alive(int(match.group(1))):
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if entry.is_dir() else 0
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            logger.warning("removed %s (%.1f MB): a run that was killed while writing it left it", entry, size / 2**20)
            removed.append(entry)
    return removed


def staging_folder(target: str | os.PathLike, kind: str = "writing") -> Path:
    """A new, empty folder next to ``target`` to build it in, readable as the umask says.

    Stale staging folders next to it (from killed runs) are removed first.
    """
    target = Path(target).absolute()
    if target == Path.cwd() or target in Path.cwd().parents:
        from .errors import APLAdapterError

        raise APLAdapterError(
            f"Cannot write {target} as a whole: it is the current directory (or holds it), and it is replaced when "
            "the output is complete. Choose a new sub-folder, e.g. --out ./out."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the modes the umask allows (0644 / 0755 under 022).

    Some writers create files private whatever the umask (safetensors' ``save_file``: 0600), so an adapter saved by
    a training job could not be read by a server running as another user.
    """
    mask = _umask()
    for path in Path(folder).rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished ``staging`` folder to ``target``; an existing ``target`` is kept until the swap.

    Where the system can, an existing ``target`` is exchanged with ``staging`` atomically: readers see the old
    folder or the new one, never none. Elsewhere it is renamed aside under a unique name first.
    """
    staging, target = Path(staging), Path(target)
    for _ in range(100):  # another writer may publish or swap between our checks
        if not os.path.lexists(target):
            try:
                os.rename(staging, target)
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # another writer got there first: swap with it
        try:
            if _exchange(staging, target):
                shutil.rmtree(staging, ignore_errors=True)  # now holds the previous folder
                return
        except FileNotFoundError:
            continue
        _replace_by_two_renames(staging, target)
        return
    raise OSError(errno.EBUSY, f"{target} kept changing while it was being replaced")


def _replace_by_two_renames(staging: Path, target: Path) -> None:
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    os.replace(target, backup)  # an empty directory is replaced
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False, kind: str = "writing") -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it becomes ``target``, on error it is removed.

    With ``replace=True`` an existing ``target`` is replaced; otherwise the caller must check it is new.
    """
    target = Path(target)
    staging = staging_folder(target, kind)
    try:
        yield staging
        follow_umask(staging)
        if target.exists() and not replace:
            raise FileExistsError(f"{target} appeared while it was being written; not replacing it")
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; on success it replaces ``path`` (mode from the umask)."""
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.writing-{os.getpid()}-", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling: readers see the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
