"""moe_align_block_size: the routed pairs grouped by expert, padded to BLOCK_M, checked against its
invariants (every pair exactly once, each block one expert, blocks in expert order; pairs of expert -1, owned
by another EP rank, left out) and against the torch path; on the GPU also under CUDA-graph capture."""

import pytest
import torch
from triton_env import DEVICE, HAS_CUDA

from wna16moe.kernels.moe_align import _align_torch, max_padded_rows, moe_align_block_size


def _routing(t: int, e: int, k: int) -> torch.Tensor:
    return torch.rand(t, e).argsort(dim=1)[:, :k].to(torch.int32).to(DEVICE)


def _check(ids: torch.Tensor, e: int, block_m: int, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
           num_padded: torch.Tensor) -> None:
    flat = ids.reshape(-1).cpu()
    p = flat.numel()
    sorted_ids, expert_ids, used = sorted_ids.cpu(), expert_ids.cpu(), int(num_padded.item())
    kept = torch.nonzero(flat >= 0).squeeze(1).to(torch.int32)  # pairs of this rank's experts
    counts = torch.bincount(flat[kept].long(), minlength=e)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.numel() == max_padded_rows(p, e, block_m) and used <= sorted_ids.numel()
    real = sorted_ids[sorted_ids < p]
    assert torch.equal(torch.sort(real).values, kept)  # each kept pair once, no -1 pair
    assert (sorted_ids[used:] == p).all()
    blocks = used // block_m
    assert (expert_ids[blocks:] == -1).all()
    assert torch.all(expert_ids[:blocks][1:] >= expert_ids[:blocks][:-1])  # expert order
    for b in range(blocks):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < p]
        assert rows.numel() > 0, "a block with no pair"
        assert (flat[rows.long()] == expert_ids[b]).all()


@pytest.mark.parametrize(("t", "e", "k", "block_m"), [
    (1, 8, 2, 16),      # M = 1: one block per chosen expert
    (5, 8, 2, 16),      # few tokens, several per expert
    (33, 128, 8, 16),   # many experts, most empty
    (7, 384, 8, 64),    # E not a power of two, large blocks
    (100, 16, 4, 32),   # every expert spans several blocks
])
def test_align_invariants(t: int, e: int, k: int, block_m: int) -> None:
    ids = _routing(t, e, k)
    result = moe_align_block_size(ids, e, block_m)
    _check(ids, e, block_m, *result)
    torch_path = _align_torch(ids.reshape(-1), e, block_m, max_padded_rows(t * k, e, block_m))
    for a, b in zip(result, torch_path, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize(("t", "e", "k", "block_m", "remote"), [
    (6, 8, 2, 16, 0.5),    # half the pairs on other EP ranks
    (1, 4, 2, 16, 1.0),    # M = 1, no local pair at all: nothing to run
    (40, 16, 4, 32, 0.8),  # few local pairs among many
])
def test_remote_pairs_are_left_out(t: int, e: int, k: int, block_m: int, remote: float) -> None:
    ids = _routing(t, e, k)
    ids[torch.rand(t, k, device=DEVICE) < remote] = -1
    result = moe_align_block_size(ids, e, block_m)
    _check(ids, e, block_m, *result)
    torch_path = _align_torch(ids.reshape(-1), e, block_m, max_padded_rows(t * k, e, block_m))
    for a, b in zip(result, torch_path, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


def test_torch_path_leaves_out_remote_pairs() -> None:
    ids = _routing(700, 64, 8)  # 5600 pairs: the torch path
    ids[:, ::3] = -1
    _check(ids, 64, 32, *moe_align_block_size(ids, 64, 32))


def test_all_tokens_to_one_expert() -> None:
    ids = torch.full((20, 1), 3, dtype=torch.int32, device=DEVICE)
    _check(ids, 8, 16, *moe_align_block_size(ids, 8, 16))


def test_torch_path_for_many_pairs() -> None:
    ids = _routing(700, 64, 8)  # 5600 pairs: above the one-program threshold
    _check(ids, 64, 64, *moe_align_block_size(ids, 64, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_align_under_cuda_graph() -> None:
    ids = _routing(16, 64, 8)
    static = ids.clone()
    moe_align_block_size(static, 64, 16)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_align_block_size(static, 64, 16)
    for _ in range(3):
        static.copy_(_routing(16, 64, 8))
        graph.replay()
        _check(static, 64, 16, *out)
