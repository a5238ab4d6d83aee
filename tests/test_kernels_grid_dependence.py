"""When kernels launch as programmatic dependents (kernels/grid_dependence.py). Whether they wait in the
right place is checked in the PTX (test_kernels_compile.py) and on the GPU by chained forwards under a CUDA
graph (test_experts_triton.py)."""

import pytest
import torch
from triton_env import HAS_CUDA

from wna16moe.kernels.grid_dependence import chained_launch, launch_options


def test_not_off_cuda() -> None:
    assert not chained_launch(torch.device("cpu"))
    assert launch_options(0) == {} and launch_options(1) == launch_options(2) == {"launch_pdl": True}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_hopper_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    assert chained_launch(device) == (torch.cuda.get_device_capability()[0] >= 9)
    monkeypatch.setenv("WNA16MOE_PDL", "0")
    assert not chained_launch(device)
