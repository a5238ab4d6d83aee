"""Plain bf16/fp16/fp32 checkpoints: `weight` [N, K] per expert projection, quantized on load by
round-to-nearest into a requested `WeightScheme`."""

from __future__ import annotations

import torch

from wna16moe.errors import CheckpointError
from wna16moe.formats.common import Projection, TensorSource, read_checked
from wna16moe.quantized import QuantizedWeight, quantize_rtn
from wna16moe.scheme import WeightScheme

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def read_projection(source: TensorSource, prefix: str, scheme: WeightScheme, shape: tuple[int, int]) -> Projection:
    key = prefix + "weight"
    weight = read_checked(source, key, shape, _FLOAT_DTYPES)
    if not torch.isfinite(weight).all():
        raise CheckpointError(source.name, key, "holds NaN or infinite values")
    q = quantize_rtn(weight.unsqueeze(0), scheme)
    return Projection(q.codes[0], q.scales[0], None if q.zeros is None else q.zeros[0], None)


def write_projection(projection: Projection, scheme: WeightScheme, dtype: torch.dtype = torch.bfloat16
                     ) -> dict[str, torch.Tensor]:
    """The dequantized weight as a dense `weight` tensor (lossy only through `dtype`)."""
    def unsqueeze(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.unsqueeze(0)

    weight = QuantizedWeight(scheme, projection.codes.unsqueeze(0), projection.scales.unsqueeze(0),
                             unsqueeze(projection.zeros), unsqueeze(projection.g_idx)).dequantize(0)
    return {"weight": weight.to(dtype)}
