"""Model shapes by name, and custom shapes written H=...,I=...,E=...,k=...[,g=...]."""

import pytest

from wna16moe import cli
from wna16moe.errors import InvalidInputError
from wna16moe.shapes import MODEL_SHAPES, model_shape


def test_named_shapes_ignore_case() -> None:
    assert model_shape("DeepSeek-V3") is MODEL_SHAPES["deepseek-v3"]


def test_custom_shape() -> None:
    shape = model_shape("H=4096,I=1408,E=64,k=6")
    assert (shape.hidden_size, shape.intermediate_size, shape.num_experts, shape.top_k, shape.group_size) == (
        4096, 1408, 64, 6, 128)
    assert model_shape("k=2, E=8, I=512, H=1024, g=32").group_size == 32
    assert model_shape("H=4096,I=1408,E=64,k=6").moe_config().num_experts == 64


@pytest.mark.parametrize(("name", "message"), [
    ("mixtrall", "unknown model shape 'mixtrall'"),
    ("H=4096,I=1408,E=64", "lacks k"),
    ("H=4096,I=1408,E=64,k=6,x=1", "'x=1' is not one of H=, I=, E=, k=, g="),
    ("H=4096,I=-8,E=64,k=6", "'I=-8' is not one of"),
    ("H=4096,I=1408,E=4,k=6", "k=6 exceeds E=4"),
    ("H=256,I=128,E=8,k=2,H=512", "gives H= twice"),  # which H was meant?
    ("H=256,I=128,E=8,k=2,g=32,g=64", "gives g= twice"),
])
def test_bad_shapes_are_named(name: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        model_shape(name)


def test_explain_takes_a_custom_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "--shape", "H=1024,I=512,E=16,k=4", "--scheme", "int4_g128_sym",
                     "--device", "h100"]) == 0
    assert "E=16 top_k=4 H=1024 I=512" in capsys.readouterr().out
