"""WeightScheme: validation, stable names and their inverse, group arithmetic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from wna16moe import InvalidInputError, UnsupportedError, WeightScheme


@pytest.mark.parametrize(
    ("scheme", "name"),
    [
        (WeightScheme(4, 32), "int4_g32_sym"),  # the common int4 group-wise symmetric scheme
        (WeightScheme(8, None), "int8_ch_sym"),  # channel-wise is spelled "ch"
        (WeightScheme(4, 128, zero_point=True), "int4_g128_zp"),  # asymmetric: "zp"
        (WeightScheme(4, 32, act_order=True), "int4_g32_sym_actorder"),  # GPTQ desc_act suffix
        (WeightScheme(8, 64, zero_point=True, act_order=True), "int8_g64_zp_actorder"),  # every option at once
    ],
)
def test_name(scheme: WeightScheme, name: str) -> None:
    assert scheme.name == name
    assert str(scheme) == name


@given(bits=st.sampled_from([4, 8]), group=st.one_of(st.none(), st.integers(1, 4096)), zp=st.booleans(),
       act=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_from_name_round_trip(bits: int, group: int | None, zp: bool, act: bool, dtype: torch.dtype) -> None:
    scheme = WeightScheme(bits, group, zp, act, dtype)
    again = WeightScheme.from_name(scheme.name, scale_dtype=dtype)
    assert again == scheme
    assert again.name == scheme.name


def test_from_name_default_scale_dtype_is_bf16() -> None:
    assert WeightScheme.from_name("int4_g128_sym").scale_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name",
    [
        "int4_g128",  # no sym/zp
        "int4_128_sym",  # group without its "g"
        "int4_g128_asym",  # "asym" is spelled "zp"
        "int4_g128_sym_desc_act",  # unknown suffix
        "INT4_G128_SYM",  # names are lower case
        "uint4_g128_sym",  # no such prefix
        "int4_gch_sym",  # "g" needs a number
        " int4_g128_sym",  # stray leading whitespace
        "int4_g128_sym\n",  # stray trailing newline ("$" alone would accept it)
        "",  # empty
    ],
)
def test_from_name_rejects_malformed(name: str) -> None:
    with pytest.raises(UnsupportedError, match="not valid"):
        WeightScheme.from_name(name)


@pytest.mark.parametrize(
    ("name", "setting"),
    [
        ("int3_g128_sym", "bits=3"),  # well-formed but unsupported bit width
        ("int16_ch_sym", "bits=16"),  # same, wide
        ("int4_g0_sym", "group_size=0"),  # a group of no elements
    ],
)
def test_from_name_rejects_unsupported_settings(name: str, setting: str) -> None:
    with pytest.raises(UnsupportedError, match=setting):
        WeightScheme.from_name(name)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"bits": 2, "group_size": 32}, "bits=2"),  # unsupported bits
        ({"bits": 4, "group_size": -1}, "group_size=-1"),  # -1 is the quant-config spelling, not the scheme's
        ({"bits": 4, "group_size": 0}, "group_size=0"),  # empty groups
        ({"bits": 4, "group_size": 32.0}, "group_size=32.0"),  # not an int
        ({"bits": 4, "group_size": 32, "scale_dtype": torch.int32}, "scale_dtype"),  # integer scales
        ({"bits": 4, "group_size": 32, "scale_dtype": torch.float64}, "scale_dtype"),  # float64 scales
    ],
)
def test_rejects_invalid(kwargs: dict, setting: str) -> None:
    with pytest.raises(UnsupportedError, match=setting.replace(".", r"\.")):
        WeightScheme(**kwargs)


def test_frozen_and_hashable() -> None:
    scheme = WeightScheme(4, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.bits = 8  # type: ignore[misc]
    assert {scheme, WeightScheme(4, 32)} == {scheme}
    assert scheme != scheme.with_scale_dtype(torch.float16)  # scale dtype is part of the scheme


def test_of_takes_a_scheme_or_its_name() -> None:
    scheme = WeightScheme(4, 128)
    assert WeightScheme.of(scheme) is scheme and WeightScheme.of("int4_g128_sym") == scheme
    with pytest.raises(InvalidInputError, match=r"quantize_to must be a WeightScheme or a scheme name .* got 4"):
        WeightScheme.of(4, "quantize_to")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scheme", "max_code", "zero"),
    [
        (WeightScheme(4, 32), 15, 8),  # uint4b8
        (WeightScheme(8, 128), 255, 128),  # uint8b128
    ],
)
def test_code_range(scheme: WeightScheme, max_code: int, zero: int) -> None:
    assert scheme.max_code == max_code
    assert scheme.symmetric_zero == zero
    assert scheme.symmetric and not WeightScheme(scheme.bits, 32, zero_point=True).symmetric


@given(k=st.integers(1, 700), group=st.one_of(st.none(), st.sampled_from([1, 7, 32, 64, 128])))
def test_groups(k: int, group: int | None) -> None:
    scheme = WeightScheme(4, group)
    expected_groups = 1 if group is None else math.ceil(k / group)
    assert scheme.num_groups(k) == expected_groups
    index = scheme.group_of(k)
    assert index.dtype == torch.int64 and index.shape == (k,)
    assert index.tolist() == [0 if group is None else i // group for i in range(k)]
    assert int(index.max()) == expected_groups - 1  # the last (possibly partial) group is used


def test_with_scale_dtype_keeps_everything_else() -> None:
    scheme = WeightScheme(8, 64, zero_point=True, act_order=True)
    other = scheme.with_scale_dtype(torch.float16)
    assert other.scale_dtype == torch.float16
    assert dataclasses.replace(other, scale_dtype=torch.bfloat16) == scheme


def test_bool_is_not_a_group_size() -> None:
    with pytest.raises(UnsupportedError, match="group_size=True"):
        WeightScheme(4, True)


@pytest.mark.parametrize("name", ["int4_g0128_sym", "int04_g128_sym"])
def test_names_are_canonical(name: str) -> None:
    with pytest.raises(UnsupportedError, match="not valid"):
        WeightScheme.from_name(name)
