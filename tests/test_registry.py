"""The one PEFT extension point: adding APL to PeftType and registering it."""

from __future__ import annotations

import enum
import types

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import apl_adapter
from apl_adapter import APLAdapterError, APLConfig, APLModel
from apl_adapter.tuners.apl import register
from apl_adapter.tuners.apl.peft_type import SUPPORTED_PEFT_RANGE, add_enum_member


def test_apl_is_a_peft_type_after_import():
    assert PeftType("APL") is PeftType.APL
    assert "APL" in [t.value for t in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.APL] is APLConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.APL] is APLModel


def test_register_is_idempotent():
    register()
    register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.APL] is apl_adapter.APLConfig


def test_enum_member_added_like_a_native_one():
    class Colour(str, enum.Enum):
        RED = "RED"

    green = add_enum_member(Colour, "GREEN")
    assert Colour("GREEN") is green is Colour.GREEN is Colour["GREEN"]
    assert list(Colour) == [Colour.RED, Colour.GREEN]
    assert isinstance(green, str) and green == "GREEN"
    assert add_enum_member(Colour, "GREEN") is green


def test_missing_enum_internals_fail_naming_the_supported_range():
    class NotAnEnum:
        __members__ = types.MappingProxyType({})

    with pytest.raises(APLAdapterError, match=SUPPORTED_PEFT_RANGE.replace("<", ".").replace(">", ".")):
        add_enum_member(NotAnEnum, "APL")
