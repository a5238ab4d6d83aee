"""The float32 -> activation dtype cast of GEMM2's sums (kernels/cast.py), against torch's."""

import pytest
import torch
from triton_env import DEVICE, DTYPES

from wna16moe.kernels.cast import PREFILL_NUMEL, cast


@pytest.mark.parametrize("shape", [(1, 7), (3, 2048), (5, 1000), (257, 4099)])  # (the last: prefill's tiling)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_matches_torch(shape: tuple[int, int], dtype: torch.dtype) -> None:
    src = torch.randn(shape, device=DEVICE) * 100
    assert (src.numel() >= PREFILL_NUMEL) == (shape[0] > 5)
    out = cast(src, dtype)
    assert out.dtype == dtype and out.shape == src.shape
    assert torch.equal(out, src.to(dtype))


def test_cast_rejects_strided_input() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        cast(torch.randn(4, 6, device=DEVICE).t(), torch.float16)
