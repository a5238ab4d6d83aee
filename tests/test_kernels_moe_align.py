"""moe_align_block_size: the routed pairs grouped by expert, padded to BLOCK_M, checked against its
invariants (every pair exactly once, each block one expert, blocks in expert order; pairs of expert -1, owned
by another EP rank, and of ids past the experts left out) and against a sort in torch (the order of an
expert's pairs within its rows aside); both the one-program and the grid paths; on the GPU also under CUDA-graph
capture."""

import pytest
import torch
from triton_env import DEVICE, HAS_CUDA

from wna16moe.kernels import moe_align
from wna16moe.kernels.moe_align import align_workspace, max_padded_rows, moe_align_block_size

PATHS = ["one_program", "grid", "cooperative"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test through each kernel, whatever the sizes (the cooperative one, whose programs meet at a
    barrier, on a GPU only)."""
    if request.param == "cooperative" and not HAS_CUDA:
        pytest.skip("the cooperative path's programs wait for each other: the interpreter runs them in turn")
    monkeypatch.setattr(moe_align, "one_program", lambda pairs, experts: request.param == "one_program")
    monkeypatch.setattr(moe_align, "cooperative", lambda pairs, device: request.param == "cooperative")
    return request.param


def _expert_blocks(pairs: int, block_m: int, extra_rows: int) -> list[int]:
    """The pairs of each block of an expert of `pairs` pairs: block_m each, or with extra rows block_m - extra_rows
    each but the last, which takes up to extra_rows more."""
    base = block_m - extra_rows
    blocks = max(1, -(-(pairs - extra_rows) // base)) if pairs else 0
    return [base] * (blocks - 1) + [pairs - base * (blocks - 1)] if blocks else []


def _align_sorted(ids: torch.Tensor, num_experts: int, block_m: int, extra_rows: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The reference: a stable sort by expert, padded per block (pairs of expert -1 dropped)."""
    flat = ids.reshape(-1).cpu().long()
    p = flat.numel()
    sorted_ids, expert_ids = [], []
    for expert in range(num_experts):
        pairs = torch.nonzero(flat == expert).squeeze(1).tolist()
        for taken in _expert_blocks(len(pairs), block_m, extra_rows):
            sorted_ids += pairs[:taken] + [p] * (block_m - taken)
            pairs = pairs[taken:]
            expert_ids.append(expert)
    used = len(sorted_ids)
    max_padded = max_padded_rows(p, num_experts, block_m, extra_rows)
    sorted_ids += [p] * (max_padded - used)
    expert_ids += [-1] * (max_padded // block_m - len(expert_ids))
    return torch.tensor(sorted_ids, dtype=torch.int32), torch.tensor(expert_ids, dtype=torch.int32), used


def _matches_sort(ids: torch.Tensor, e: int, block_m: int, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                  num_padded: torch.Tensor, extra_rows: int = 0) -> None:
    """Equal to the reference once each expert's pairs are sorted (pairs take rows in no fixed order, padding
    rows in place)."""
    want_rows, want_experts, used = _align_sorted(ids, e, block_m, extra_rows)
    assert int(num_padded.item()) == used
    assert torch.equal(expert_ids.cpu(), want_experts)
    got = sorted_ids.cpu().clone()
    for start in range(0, used, block_m):
        expert = int(want_experts[start // block_m])
        if start == 0 or int(want_experts[start // block_m - 1]) != expert:
            end = start + block_m * int((want_experts == expert).sum())
            real = want_rows[start:end] < ids.numel()
            assert torch.equal(got[start:end] < ids.numel(), real), "pairs and padding in other rows"
            got[start:end][real] = torch.sort(got[start:end][real]).values
    assert torch.equal(got, want_rows)


def _routing(t: int, e: int, k: int) -> torch.Tensor:
    return torch.rand(t, e).argsort(dim=1)[:, :k].to(torch.int32).to(DEVICE)


def _check(ids: torch.Tensor, e: int, block_m: int, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
           num_padded: torch.Tensor, extra_rows: int = 0) -> None:
    flat = ids.reshape(-1).cpu()
    p = flat.numel()
    sorted_ids, expert_ids, used = sorted_ids.cpu(), expert_ids.cpu(), int(num_padded.item())
    kept = torch.nonzero((flat >= 0) & (flat < e)).squeeze(1).to(torch.int32)  # pairs of this rank's experts
    counts = torch.bincount(flat[kept].long(), minlength=e)
    assert used == block_m * sum(len(_expert_blocks(int(n), block_m, extra_rows)) for n in counts)
    assert sorted_ids.numel() == max_padded_rows(p, e, block_m, extra_rows) and used <= sorted_ids.numel()
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


def _poisoned_align(ids: torch.Tensor, e: int, block_m: int, path: str, extra_rows: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align_block_size with its output buffers filled with garbage first (the kernels must write every
    element): torch.empty is patched to hand out poisoned tensors during the call. The cooperative path runs
    twice on one workspace, which each run must leave zero."""
    real_empty = torch.empty

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        return real_empty(*args, **kwargs).fill_(-7)

    workspace = align_workspace(e, ids.device) if path == "cooperative" else None
    torch.empty = poisoned
    try:
        for _ in range(2 if workspace is not None else 1):
            result = moe_align_block_size(ids, e, block_m, workspace=workspace, extra_rows=extra_rows)
            assert workspace is None or not workspace.any(), "the workspace was not left zero"
        return result
    finally:
        torch.empty = real_empty


@pytest.mark.parametrize(("t", "e", "k", "block_m"), [
    (1, 8, 2, 16),      # M = 1: one block per chosen expert
    (5, 8, 2, 16),      # few tokens, several per expert
    (33, 128, 8, 16),   # many experts, most empty
    (7, 384, 8, 64),    # E not a power of two, large blocks
    (100, 16, 4, 32),   # every expert spans several blocks
    (60, 16, 4, 48),    # MARLIN's 48-row blocks (not a power of two)
    (300, 384, 8, 16),  # the grid's three programs share the experts' blocks and the rows past the used ones
])
def test_align_invariants(t: int, e: int, k: int, block_m: int, path: str) -> None:
    ids = _routing(t, e, k)
    result = _poisoned_align(ids, e, block_m, path)
    _check(ids, e, block_m, *result)
    _matches_sort(ids, e, block_m, *result)


@pytest.mark.parametrize(("t", "e", "k", "block_m", "extra_rows"), [
    (150, 8, 2, 48, 16),   # ~38 pairs per expert in blocks of 32, the last up to 48: one to two blocks each
    (1000, 4, 2, 48, 16),  # ~500 per expert: many 32-pair blocks, a last of 17-48
    (400, 8, 2, 96, 32),   # ~100 per expert: a 64-pair block and a last of 33-96, or one block
    (60, 128, 8, 144, 16), # few pairs per expert: one block each, mostly padding
])
def test_align_extra_rows(t: int, e: int, k: int, block_m: int, extra_rows: int, path: str) -> None:
    """An expert's last block takes up to extra_rows pairs past the others' block_m - extra_rows (the decode
    kernel's 144-row blocks take 16): each block's pairs first, then padding, and no block of only padding."""
    ids = _routing(t, e, k)
    ids[0, 0] = -1  # (a pair left out)
    result = _poisoned_align(ids, e, block_m, path, extra_rows)
    _check(ids, e, block_m, *result, extra_rows=extra_rows)
    _matches_sort(ids, e, block_m, *result, extra_rows=extra_rows)


def test_align_extra_rows_at_each_edge(path: str) -> None:
    """Experts of exactly B - 1, B, B + X, B + X + 1, 2B + X and 2B + X + 1 pairs (B = 32, X = 16): one, one, one,
    two, two and three blocks."""
    sizes = [31, 32, 48, 49, 80, 81]
    ids = torch.cat([torch.full((n,), expert, dtype=torch.int32) for expert, n in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel())].reshape(-1, 1).to(DEVICE)
    result = _poisoned_align(ids, len(sizes), 48, path, 16)
    _check(ids, len(sizes), 48, *result, extra_rows=16)
    _matches_sort(ids, len(sizes), 48, *result, extra_rows=16)
    assert result[1][:10].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 5, 5]


def test_extra_rows_beyond_the_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="extra_rows"):
        moe_align_block_size(torch.zeros(4, 1, dtype=torch.int32, device=DEVICE), 2, 32, extra_rows=16)


@pytest.mark.parametrize(("t", "e", "k", "block_m", "remote"), [
    (6, 8, 2, 16, 0.5),    # half the pairs on other EP ranks
    (1, 4, 2, 16, 1.0),    # M = 1, no local pair at all: nothing to run
    (40, 16, 4, 32, 0.8),  # few local pairs among many
])
def test_remote_pairs_are_left_out(t: int, e: int, k: int, block_m: int, remote: float, path: str) -> None:
    ids = _routing(t, e, k)
    ids[torch.rand(t, k, device=DEVICE) < remote] = -1
    result = _poisoned_align(ids, e, block_m, path)
    _check(ids, e, block_m, *result)
    _matches_sort(ids, e, block_m, *result)


@pytest.mark.parametrize("e", [8, 6])  # (6: ids between E and the counters' power of two)
def test_ids_past_the_experts_are_left_out(e: int, path: str) -> None:
    """A caller's bad ids (E, E_POW2 and far beyond, below -1) cost their pairs only: no write out of bounds, no
    block of a nonexistent expert; the good pairs are aligned as usual."""
    ids = _routing(30, e, 2)
    bad = torch.rand(30, 2, device=DEVICE) < 0.3
    choices = torch.tensor([e, 7, 8, 1 << 20, -5, -(1 << 30)], dtype=torch.int32, device=DEVICE)
    noise = choices[torch.randint(0, choices.numel(), (30, 2), device=DEVICE)]
    ids = torch.where(bad & ((noise >= e) | (noise < 0)), noise, ids)
    assert ((ids >= e) | (ids < -1)).any()
    result = _poisoned_align(ids, e, 16, path)
    _check(ids, e, 16, *result)
    _matches_sort(ids, e, 16, *result)


def test_all_tokens_to_one_expert(path: str) -> None:
    ids = torch.full((20, 1), 3, dtype=torch.int32, device=DEVICE)
    _check(ids, 8, 16, *_poisoned_align(ids, 8, 16, path))


def test_many_pairs_over_several_chunks(path: str) -> None:
    ids = _routing(700, 64, 8)  # 5600 pairs: the grid's several chunks of pairs and blocks; one program's 8 warps
    ids[:, ::3] = -1
    result = _poisoned_align(ids, 64, 32, path)
    _check(ids, 64, 32, *result)
    _matches_sort(ids, 64, 32, *result)


def test_default_choice_of_path() -> None:
    assert moe_align.one_program(64, 512) and moe_align.one_program(1024, 128) and moe_align.one_program(4096, 8)
    assert not moe_align.one_program(2048, 128) and not moe_align.one_program(1024, 512)
    assert not moe_align.one_program(8192, 8)


def test_one_program_refuses_more_pairs_than_it_holds() -> None:
    with pytest.raises(ValueError, match="at most 8192 pairs"):
        moe_align.one_program_warps(moe_align.ONE_PROGRAM_LIMIT + 1)


def test_cooperative_path_only_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its programs wait for each other: never in the interpreter, and never more of them than fit at once."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert moe_align.cooperative(2048, cuda) == (torch.version.cuda is not None)  # (not on ROCm)
    assert not moe_align.cooperative(2048, torch.device("cpu"))
    assert not moe_align.cooperative(moe_align.COOPERATIVE_MAX_PROGRAMS * moe_align.COOPERATIVE_CHUNK + 1, cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not moe_align.cooperative(2048, cuda)


def test_alignment_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """One program for few pairs x experts, the cooperative programs above it only with a workspace on an NVIDIA
    GPU, else (and past their cap) the grid."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nvidia = "cooperative" if torch.version.cuda is not None else "grid"
    assert moe_align.alignment_path(1024, 128, cuda, workspace=True) == "one program"
    assert moe_align.alignment_path(2048, 128, cuda, workspace=True) == nvidia
    assert moe_align.alignment_path(2048, 128, cuda, workspace=False) == "grid"
    assert moe_align.alignment_path(2048, 128, cpu, workspace=True) == "grid"
    assert moe_align.alignment_path(65536, 256, cuda, workspace=True) == "grid"


def test_a_wrong_workspace_is_refused() -> None:
    ids = _routing(4, 16, 2)
    with pytest.raises(ValueError, match=r"align_workspace\(num_experts >= 16\)"):
        moe_align_block_size(ids, 16, 16, workspace=align_workspace(8, ids.device))
    with pytest.raises(ValueError, match="align_workspace"):
        moe_align_block_size(ids, 16, 16, workspace=align_workspace(16, ids.device).float())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cooperative_align_under_cuda_graph() -> None:
    """Replays reuse one workspace: each leaves it zero for the next."""
    static = _routing(300, 128, 8)
    workspace = align_workspace(128, static.device)
    moe_align_block_size(static, 128, 16, workspace=workspace)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_align_block_size(static, 128, 16, workspace=workspace)
    for _ in range(3):
        static.copy_(_routing(300, 128, 8))
        graph.replay()
        _check(static, 128, 16, *out)
        _matches_sort(static, 128, 16, *out)
        assert not workspace.any()


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
