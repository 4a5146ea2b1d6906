"""Command-line options built from a config dataclass, so a default, a type and a help text live in one place.

Each field becomes ``--field-name`` with the field's type, its ``Literal`` values as choices, its default
(shown in ``--help``) and its ``metadata["help"]``. ``metadata["metavar"]`` names a list field's items.

>>> import argparse
>>> from dataclasses import dataclass, field
>>> from typing import Literal
>>> @dataclass
... class Config:
...     out: str = field(metadata={"help": "Output folder."})
...     steps: int = field(default=10, metadata={"help": "Optimizer steps."})
...     schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"help": "Schedule."})
...     resume: bool = field(default=False, metadata={"help": "Resume."})
>>> parser = argparse.ArgumentParser()
>>> add_dataclass_arguments(parser, Config)
>>> Config(**vars(parser.parse_args(["--out", "run", "--schedule", "cosine", "--resume"])))
Config(out='run', steps=10, schedule='cosine', resume=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one option per field of ``config_class`` to ``parser`` (see the module docstring)."""
    hints = typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        flag = "--" + item.name.replace("_", "-")
        kind, optional = _unwrap_optional(hints[item.name])
        help_text = item.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        options: dict[str, Any] = {"dest": item.name}
        if item.default is not dataclasses.MISSING:
            options["default"] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            options["default"] = item.default_factory()
        else:
            options["required"] = True
        if options.get("default") not in (None, [], False, ""):
            help_text = f"{help_text} Default: {options['default']}.".strip()
        if kind is bool:
            if options.get("default") is not False:
                raise TypeError(f"{config_class.__name__}.{item.name}: a flag must default to False")
            parser.add_argument(flag, action="store_true", help=help_text, dest=item.name)
            continue
        if typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
            options["type"] = type(options["choices"][0])
        elif typing.get_origin(kind) is list:
            (options["type"],) = typing.get_args(kind)
            options["nargs"] = "+"
            options["metavar"] = item.metadata.get("metavar", item.name.upper())
        elif kind in (int, float, str):
            options["type"] = kind
        else:
            raise TypeError(f"{config_class.__name__}.{item.name}: no command-line form for {kind!r}")
        if optional and options.get("default") is not None:
            raise TypeError(f"{config_class.__name__}.{item.name}: an optional field must default to None")
        parser.add_argument(flag, help=help_text, **options)


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(kind, False)``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(kind) if member is not type(None)]
        if len(members) == 1:
            return members[0], True
    return kind, False
