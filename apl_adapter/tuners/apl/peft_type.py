"""``PeftType.APL``: the one PEFT internal apl-adapter touches.

PEFT's :func:`peft.utils.register_peft_method` only accepts names that already exist in the closed
:class:`peft.utils.PeftType` enum. APL is not one of them, so this module adds an ``APL`` member to that enum;
:mod:`apl_adapter.tuners.apl` then registers the config and tuner through the public function.

A leaf (it imports only PEFT and :mod:`apl_adapter.errors`, which imports nothing of ours): the config sets its
``peft_type`` from here and the registration reads it, so neither needs the other.

Tested with PEFT ``SUPPORTED_PEFT_RANGE``; anything else fails here, at import, with a message naming that range
rather than somewhere deep inside PEFT.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar, cast

import peft
from peft.utils import PeftType

from ...errors import APLAdapterError

SUPPORTED_PEFT_RANGE = ">=0.17,<0.22"
#: the member's name and value, as ``adapter_config.json`` stores it (``"peft_type": "APL"``)
PEFT_TYPE_NAME = "APL"

_Member = TypeVar("_Member", bound=enum.Enum)


def peft_hooks_missing(reason: str) -> APLAdapterError:
    """The error for a PEFT whose extension points are not the ones APL was built against."""
    return APLAdapterError(
        f"apl-adapter cannot register APL with PEFT {peft.__version__}: {reason}. "
        f"Supported PEFT versions: {SUPPORTED_PEFT_RANGE}; install one, e.g. pip install 'peft{SUPPORTED_PEFT_RANGE}'."
    )


def add_enum_member(enum_cls: type[_Member], name: str) -> _Member:
    """Add ``name`` (value ``name``) to a closed ``str`` enum, the way the enum machinery stores members."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, attr):
            raise peft_hooks_missing(f"PeftType has no {attr} (enum internals changed)")
    # A str enum's members are str instances built without Enum.__new__ (which only looks members up).
    member: Any = str.__new__(cast("type[str]", enum_cls), name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    type.__setattr__(enum_cls, name, member)  # before it is a member: Enum forbids reassigning members
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    added: _Member = member
    return added


#: ``PeftType.APL``, added when this module is first imported
APL_PEFT_TYPE: PeftType = add_enum_member(PeftType, PEFT_TYPE_NAME)
