"""What every ``apl-*`` command shares: ``--version``, ``-v/--verbose``, ``--threads``, a quiet stderr, and
one way to report errors (:func:`run_cli`).

The libraries under the commands print notices a user cannot act on (transformers' "requires torchvision"
fallbacks, its weight-loading bars, deprecation warnings raised inside transformers and PEFT, the ONNX exporter's
"torchvision is not installed" lines). The commands hide them unless ``-v`` is given; the library itself leaves
Python's warning and logging settings alone, so a program importing ``apl_adapter`` sees everything.

Some notices are printed while modules are imported, before a command's ``main`` runs, so the console scripts
start here (``apl_world``, ``apl_train`` ...): they quiet the libraries, then import the command.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import __version__
from .errors import APLAdapterError

#: ``(category, message regex)`` of the warnings the commands hide unless ``-v``
HIDDEN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r".*is_gradient_checkpointing"),  # transformers' own call, fixed upstream in v6
    (UserWarning, r"Could not find a config file in"),  # PEFT saving an adapter of a local (non-hub) base model
)
#: loggers whose warnings are about optional packages the commands never use
HIDDEN_LOGGERS = ("torch.onnx._internal.exporter._registration",)  # "torchvision is not installed. Skipping ..."


def wants_verbose(argv: list[str]) -> bool:
    """``-v`` / ``--verbose`` anywhere on the command line (read before argparse, for import-time notices)."""
    return any(arg in ("-v", "--verbose") for arg in argv)


def quiet_libraries() -> Callable[[], None]:
    """Hide transformers' and diffusers' notices and loading bars and the exporter's optional-package lines; returns
    the undo."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    libraries = (hf_logging, diffusers_logging)  # the same logging API: verbosity and loading bars
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    levels = {name: logging.getLogger(name).level for name in HIDDEN_LOGGERS}
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    for name in HIDDEN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

    def undo() -> None:
        for lib, (verbosity, bars) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    return undo


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (apl-adapter)")


def add_common_options(parser: argparse.ArgumentParser, threads: bool = True, version: bool = True) -> None:
    """``--version``, ``-v/--verbose`` and (for commands that run models) ``--threads`` on ``parser``.

    A command with subcommands puts ``--version`` on its top parser and the rest on each subcommand's
    (``version=False``): argparse lets a subcommand's defaults overwrite options its parent already parsed.
    """
    if version:
        add_version_option(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show the libraries' notices and warnings (hidden by default)"
    )
    if threads:
        parser.add_argument(
            "--threads",
            type=int,
            default=0,
            help="torch CPU threads (default 0: torch's choice; 1 is often fastest when other jobs share the CPU)",
        )


#: the ``argparse`` destinations :func:`add_common_options` adds (applied by ``run_cli``, not passed on)
COMMON_DESTS = ("verbose", "threads")


def command_settings_of(args: argparse.Namespace) -> dict:
    """``args`` without the options every command shares: the keyword arguments of the command's own config.

    >>> command_settings_of(argparse.Namespace(steps=2, verbose=False, threads=0))
    {'steps': 2}
    """
    return {k: v for k, v in vars(args).items() if k not in COMMON_DESTS}


def seed_list(text: str) -> list[int]:
    """The one form ``--seeds`` takes in every command: a comma list (an argparse ``type``).

    >>> seed_list("0,1, 2")
    [0, 1, 2]
    """
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, e.g. 0,1,2; got {text!r}") from err
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed, e.g. 0")
    return seeds


@contextmanager
def command_settings(verbose: bool = False, threads: int = 0, hidden: tuple[type[Warning], ...] = ()) -> Iterator[None]:
    """The settings of one command's run, undone afterwards (so a test calling ``main`` twice sees no leftovers).

    ``hidden``: warning categories this command also hides (``apl-export`` hides
    :class:`~apl_adapter.PromptTruncationWarning`, raised by tracing a full-length prompt).
    """
    import torch

    if threads < 0:
        raise APLAdapterError(f"--threads must be >= 0 (0: torch's choice), got {threads}.")
    before = torch.get_num_threads()
    with warnings.catch_warnings():
        undo = lambda: None  # noqa: E731
        if not verbose:
            for category, message in HIDDEN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            for category in hidden:
                warnings.filterwarnings("ignore", category=category)
            undo = quiet_libraries()
        if threads:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
            undo()


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


def _launch(module: str) -> Callable[[], int]:
    def run() -> int:
        if not wants_verbose(sys.argv[1:]):
            quiet_libraries()
        return importlib.import_module(module).main()

    run.__doc__ = f"Console script: quiet the libraries, then run ``{module}.main``."
    return run


apl_adapter = _launch("apl_adapter.cli")
apl_train = _launch("apl_adapter.training.cli")
apl_bench = _launch("apl_adapter.bench.cli")
apl_eval = _launch("apl_adapter.evaluation.cli")
apl_world = _launch("apl_adapter.world.cli")
apl_demo = _launch("apl_adapter.demo.cli")
apl_export = _launch("apl_export.cli")
