"""MoE shapes of popular models, by name, for `explain`, benchmarks and tests.

Values are each model's routed-expert layer: E experts, top-k, H hidden, I per-expert intermediate, and the
group size of its common W4A16 checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wna16moe.config import MoEConfig, RoutingConfig, RoutingMethod
from wna16moe.errors import InvalidInputError


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    group_size: int
    routing: RoutingConfig = field(default_factory=lambda: RoutingConfig(RoutingMethod.SOFTMAX, renormalize=True))

    def moe_config(self) -> MoEConfig:
        return MoEConfig(self.num_experts, self.top_k, self.hidden_size, self.intermediate_size,
                         routing=self.routing)


_DEEPSEEK_ROUTING = RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=8, topk_group=4,
                                  routed_scaling_factor=2.5, has_correction_bias=True)
MODEL_SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("mixtral-8x7b", 8, 2, 4096, 14336, 128),
    ModelShape("qwen3-30b-a3b", 128, 8, 2048, 768, 128),
    ModelShape("qwen3-235b-a22b", 128, 8, 4096, 1536, 128),
    ModelShape("deepseek-v3", 256, 8, 7168, 2048, 128, _DEEPSEEK_ROUTING),
    ModelShape("kimi-k2", 384, 8, 7168, 2048, 32,
               RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=1, topk_group=1,
                             routed_scaling_factor=2.827, has_correction_bias=True)),
    ModelShape("llama-4-scout", 16, 1, 5120, 8192, 128, RoutingConfig(RoutingMethod.SIGMOID)),
    ModelShape("glm-4.5-air", 128, 8, 4096, 1408, 128,
               RoutingConfig(RoutingMethod.DEEPSEEK_V3, renormalize=True, n_group=1, topk_group=1,
                             routed_scaling_factor=1.0, has_correction_bias=True)),
)}
# Short aliases used by the benchmark (`mixtral`).
MODEL_SHAPES["mixtral"] = MODEL_SHAPES["mixtral-8x7b"]


_CUSTOM_FIELDS = {"H": "hidden_size", "I": "intermediate_size", "E": "num_experts", "k": "top_k", "g": "group_size"}


def model_shape(name: str) -> ModelShape:
    """A named shape (`MODEL_SHAPES`), or a custom one written `H=4096,I=1408,E=64,k=6[,g=128]` (softmax
    routing with renormalization; group size 128 unless given), e.g. for `wna16moe bench --shapes`."""
    key = name.lower()
    if key in MODEL_SHAPES:
        return MODEL_SHAPES[key]
    if "=" not in name:
        raise InvalidInputError(f"unknown model shape {name!r}; known: {', '.join(sorted(MODEL_SHAPES))}, or a custom "
                                "shape written H=...,I=...,E=...,k=...[,g=...]")
    values: dict[str, int] = {"group_size": 128}
    given: set[str] = set()
    for part in name.split(","):
        field, _, value = part.partition("=")
        if field.strip() not in _CUSTOM_FIELDS or not value.strip().isdigit() or int(value) < 1:
            raise InvalidInputError(f"custom shape {name!r}: {part!r} is not one of H=, I=, E=, k=, g= with a "
                                    "positive integer")
        if field.strip() in given:
            raise InvalidInputError(f"custom shape {name!r} gives {field.strip()}= twice")
        given.add(field.strip())
        values[_CUSTOM_FIELDS[field.strip()]] = int(value)
    missing = [f for f, attr in _CUSTOM_FIELDS.items() if attr not in values]
    if missing:
        raise InvalidInputError(f"custom shape {name!r} lacks {', '.join(missing)}")
    if values["top_k"] > values["num_experts"]:
        raise InvalidInputError(f"custom shape {name!r}: k={values['top_k']} exceeds E={values['num_experts']}")
    return ModelShape(name, values["num_experts"], values["top_k"], values["hidden_size"], values["intermediate_size"],
                      values["group_size"])
