"""The one place that teaches PEFT about APL.

PEFT's :func:`peft.utils.register_peft_method` only accepts names that already exist in the
closed :class:`peft.utils.PeftType` enum. APL is not one of them, so this module adds an ``APL``
member to that enum (the only PEFT internal we touch) and then registers the config and tuner
through the public function. After ``import apl_adapter``:

- ``get_peft_model(text_encoder, APLConfig())`` builds an APL model,
- ``save_pretrained`` writes ``"peft_type": "APL"`` into ``adapter_config.json``,
- ``PeftModel.from_pretrained(base, folder)`` rebuilds APL.

Tested with PEFT ``SUPPORTED_PEFT_RANGE``; anything else fails here, at import, with a message
naming that range rather than somewhere deep inside PEFT.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType

from .errors import APLAdapterError

SUPPORTED_PEFT_RANGE = ">=0.17,<0.22"
_NAME = "APL"


def _peft_hooks_missing(reason: str) -> APLAdapterError:
    return APLAdapterError(
        f"apl-adapter cannot register APL with PEFT {peft.__version__}: {reason}. "
        f"Supported PEFT versions: {SUPPORTED_PEFT_RANGE}; install one, e.g. pip install 'peft{SUPPORTED_PEFT_RANGE}'."
    )


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add ``name`` (value ``name``) to a closed ``str`` enum, the way the enum machinery stores members."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, attr):
            raise _peft_hooks_missing(f"PeftType has no {attr} (enum internals changed)")
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    type.__setattr__(enum_cls, name, member)  # before it is a member: Enum forbids reassigning members
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member


def apl_peft_type() -> PeftType:
    """The ``PeftType.APL`` member (added on first use)."""
    return _add_enum_member(PeftType, _NAME)


def register() -> None:
    """Register APL's config and tuner with PEFT; safe to call more than once."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        from peft.utils import register_peft_method
    except ImportError as err:  # pragma: no cover - depends on the installed PEFT
        raise _peft_hooks_missing("peft.utils.register_peft_method is missing") from err

    from .config import APLConfig
    from .model import APLModel

    peft_type = apl_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is APLConfig:
        return
    register_peft_method(name=_NAME.lower(), config_cls=APLConfig, model_cls=APLModel, prefix=APLModel.prefix)
