"""`kernels/launch.py`: launches that reuse a compiled kernel must stay exactly as correct as Triton's own, whatever
the arguments' specialization (alignment, sizes equal to 1 or divisible by 16) does between two launches."""

import threading

import pytest
import torch
from triton_env import DEVICE, HAS_CUDA

import wna16moe.kernels.cast as cast_module
import wna16moe.kernels.launch as launcher
from wna16moe.kernels.cast import cast


def _sources() -> list[torch.Tensor]:
    """Float32 sources whose pointers and sizes specialize differently: 16-byte aligned or not (a view one
    element in), one element, 16, 17, each drawn fresh."""
    flat = torch.randn(4097, device=DEVICE) * 100
    return [flat[:4096], flat[1:], flat[:1], flat[1:2], flat[:16], flat[1:18]]


def test_launch_is_correct_as_specializations_alternate() -> None:
    # every source twice, interleaved: on a GPU the second round reuses the first round's compiled kernels
    sources = _sources()
    for src in sources + sources:
        out = cast(src, torch.float16)
        assert torch.equal(out, src.to(torch.float16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_keeps_a_compiled_kernel_per_specialization() -> None:
    def cast_entries() -> int:
        return sum(key[0] is cast_module._cast_kernel for key in launcher._COMPILED)

    aligned, misaligned = (torch.randn(4097, device=DEVICE)[s] for s in (slice(0, 4096), slice(1, 4097)))
    cast(aligned, torch.bfloat16)
    before = cast_entries()
    cast(aligned + 1, torch.bfloat16)  # (same specialization, another buffer)
    assert cast_entries() == before
    cast(misaligned, torch.bfloat16)  # a pointer off 16 bytes: another compiled kernel
    assert cast_entries() == before + 1
    out = cast(misaligned, torch.bfloat16)
    assert torch.equal(out, misaligned.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_captured_in_a_graph_replays_on_new_data() -> None:
    src = torch.randn(3000, device=DEVICE)
    cast(src, torch.bfloat16)  # (compiled and kept before the capture: the capture takes the direct path)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cast(src, torch.bfloat16)
    fresh = torch.randn(3000, device=DEVICE) * 7
    src.copy_(fresh)
    graph.replay()
    assert torch.equal(out, fresh.to(torch.bfloat16))


# ----- launch plans (LaunchPlan: one recorded forward replayed on new tensors) -----


class _FakeCompiled:
    """Stands in for a compiled kernel: keeps the arguments of every `run`."""

    name = "fake_kernel"
    function = 11
    packed_metadata = ("packed",)

    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def run(self, *args: object) -> None:
        self.runs.append(args)


def test_plan_replays_launches_on_new_sources_and_fresh_temporaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "_current_stream", lambda device: 99)
    fake = _FakeCompiled()
    a, b = torch.randn(5), torch.randn(2, 3)
    with launcher.recording() as rec:
        counts = launcher.scratch((4,), torch.int32, a.device, zeroed=True)
        first = launcher.scratch((1000,), torch.float32, a.device)
        second = launcher.scratch((7,), torch.int32, a.device)
        out = launcher.scratch((2, 3), torch.float16, a.device)
        rec.add(fake, (3, 2, 1), [a, 7, counts, b, 2.5, a, out, first, second])
    plan = rec.plan([a, b], [out])
    assert plan is not None, rec.refused
    assert plan.temporaries == (((4,), torch.int32, True), ((1000,), torch.float32, False),
                                ((7,), torch.int32, False), ((2, 3), torch.float16, False))
    new_a, new_b = torch.randn(5), torch.randn(2, 3)
    (result,) = plan.run([new_a, new_b])
    assert result.shape == (2, 3) and result.dtype == torch.float16 and result.data_ptr() != out.data_ptr()
    (args,) = fake.runs
    grid_and_handles, values = args[:9], args[9:]
    assert grid_and_handles == (3, 2, 1, 99, 11, ("packed",), None, None, None)
    assert values[:2] == (new_a.data_ptr(), 7) and values[3:6] == (new_b.data_ptr(), 2.5, new_a.data_ptr())
    assert values[6] == result.data_ptr()
    # the zeroed counts and the output are allocations of their own; the other two share one, 512-byte aligned
    pointers = {values[2], values[6], values[7], values[8], new_a.data_ptr(), new_b.data_ptr()}
    assert len(pointers) == 6 and values[8] - values[7] == 4096  # (4000 bytes, rounded up to 512)


def test_plan_returns_every_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "_current_stream", lambda device: 0)
    fake = _FakeCompiled()
    a = torch.randn(3)
    with launcher.recording() as rec:
        weights, ids = (launcher.scratch((3, 2), dtype, a.device) for dtype in (torch.float32, torch.int32))
        rec.add(fake, (1, 1, 1), [a, weights, ids])
    plan = rec.plan([a], [weights, ids])
    assert plan is not None, rec.refused
    new_weights, new_ids = plan.run([torch.randn(3)])
    assert (new_weights.dtype, new_ids.dtype) == (torch.float32, torch.int32)
    assert fake.runs[-1][10:] == (new_weights.data_ptr(), new_ids.data_ptr())


def test_plan_cache_records_once_then_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "_current_stream", lambda device: 0)
    fake, calls = _FakeCompiled(), []

    def forward(a: torch.Tensor) -> torch.Tensor:
        calls.append(a)
        out = launcher.scratch(a.shape, a.dtype, a.device)
        launcher._RECORDINGS.stack[-1].add(fake, (1, 1, 1), [a, out])  # (as `launch` does for a compiled kernel)
        return out

    cache = launcher.PlanCache(capacity=2)
    a = torch.randn(4)
    assert cache.run("k", [a], lambda: forward(a)).shape == (4,)
    replayed = cache.run("k", [torch.randn(4)], lambda: forward(a))
    assert len(calls) == 1 and len(fake.runs) == 1 and fake.runs[0][10] == replayed.data_ptr()
    cache.run("j", [a], lambda: forward(a))
    cache.run("i", [a], lambda: forward(a))  # (full: cleared, then this key recorded)
    assert list(cache.plans) == ["i"] and len(calls) == 3


def test_recording_sees_only_its_own_thread() -> None:
    # (another thread's forward, say another layer's, must not end up in this one's plan)
    a = torch.randn(4)
    with launcher.recording() as rec:
        other = threading.Thread(target=lambda: launcher.scratch((4,), torch.float32, a.device))
        other.start()
        other.join()
        own = launcher.scratch((4,), torch.float32, a.device)
    assert [t for t, _ in rec.scratch] == [own]


@pytest.mark.parametrize("case", ["foreign tensor", "output is a source", "torch op", "aliased sources", "nothing"])
def test_recording_without_a_plan_says_why(case: str) -> None:
    fake = _FakeCompiled()
    a, foreign = torch.randn(4), torch.randn(4)
    sources = [a, a[:2]] if case == "aliased sources" else [a]
    with launcher.recording() as rec:
        out = launcher.scratch((4,), torch.float32, a.device)
        if case == "torch op":
            out.add_(1.0)
        if case != "nothing":
            rec.add(fake, (1, 1, 1), [a, foreign if case == "foreign tensor" else out])
    assert rec.plan(sources, [a if case == "output is a source" else out]) is None
    expected = {"foreign tensor": "argument 1 of fake_kernel is not a source", "output is a source": "an output",
                "torch op": "aten.add_", "aliased sources": "shares its storage", "nothing": "nothing launched"}
    assert expected[case] in rec.refused


def test_interpreted_launches_record_no_plan() -> None:
    if HAS_CUDA:
        pytest.skip("kernels are compiled here (test_gpu_recorded_launch_replays_on_new_data)")
    src = torch.randn(3000, device=DEVICE)
    with launcher.recording() as rec:
        out = cast(src, torch.float16)
    assert torch.equal(out, src.to(torch.float16))
    assert rec.plan([src], [out]) is None and "not a compiled Triton kernel" in rec.refused


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_recorded_launch_replays_on_new_data() -> None:
    src = torch.randn(3000, device=DEVICE)
    with launcher.recording() as rec:
        out = cast(src, torch.float16)
    plan = rec.plan([src], [out])
    assert plan is not None, rec.refused
    fresh = torch.randn(3000, device=DEVICE) * 3
    (replayed,) = plan.run([fresh])
    assert torch.equal(replayed, fresh.to(torch.float16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_is_correct_as_specializations_alternate() -> None:
    test_launch_is_correct_as_specializations_alternate()
