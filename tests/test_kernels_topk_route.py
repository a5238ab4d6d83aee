"""Routing in one launch (kernels/topk_route.py) against the float64 references of tests/reference.py, and
`route` on a GPU (which runs it) against `route` on the CPU (torch)."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from reference import Routing, assert_routing, grouped_topk_ref, sigmoid_topk_ref, softmax_topk_ref, unambiguous_logits
from triton_env import DEVICE, HAS_CUDA

import wna16moe.kernels.topk_route as topk_route_module
from wna16moe.kernels.topk_route import topk_route
from wna16moe.routing import route
from wna16moe.shapes import model_shape


@dataclass(frozen=True)
class Case:
    e: int
    k: int
    softmax: bool
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    bias: bool = False

    def reference(self, correction: torch.Tensor | None) -> Callable[[torch.Tensor], Routing]:
        if self.softmax:
            return lambda x: softmax_topk_ref(x, self.k, self.renormalize, self.scale)
        if self.bias or self.n_group > 1:
            return lambda x: grouped_topk_ref(x, self.k, self.n_group, self.topk_group, correction,
                                              self.renormalize, self.scale)
        return lambda x: sigmoid_topk_ref(x, self.k, self.renormalize, self.scale)

    def run(self, logits: torch.Tensor, correction: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = topk_route(logits.to(DEVICE), self.k, self.softmax, self.renormalize, self.n_group,
                                  self.topk_group, self.scale, None if correction is None else correction.to(DEVICE))
        return weights.cpu(), ids.cpu()


CASES = {
    "qwen3": Case(128, 8, softmax=True, renormalize=True),
    "mixtral": Case(8, 2, softmax=True, renormalize=True),
    "softmax-60-experts": Case(60, 4, softmax=True),  # E not a power of two: padded lanes never chosen
    "llama4-top1": Case(16, 1, softmax=False),
    "sigmoid-renormalized-scaled": Case(32, 4, softmax=False, renormalize=True, scale=0.5),
    "deepseek-mini": Case(64, 8, softmax=False, renormalize=True, n_group=8, topk_group=4, scale=2.5, bias=True),
    "groups-of-one": Case(8, 2, softmax=False, renormalize=True, n_group=8, topk_group=2, bias=True),
    "groups-no-bias": Case(32, 6, softmax=False, n_group=8, topk_group=3, scale=1.5),
    # groups that are not the rows of a power-of-two tile: one pair of reductions per group
    "groups-of-twelve": Case(48, 4, softmax=False, renormalize=True, n_group=4, topk_group=2, bias=True),
    "three-groups": Case(24, 3, softmax=False, n_group=3, topk_group=2, scale=2.0),
    "kimi-k2": Case(384, 8, softmax=False, renormalize=True, scale=2.827, bias=True),
}


@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("name", list(CASES))
def test_topk_route_matches_reference(name: str, t: int) -> None:
    case = CASES[name]
    correction = torch.randn(case.e) * 0.3 if case.bias else None
    reference = case.reference(correction)
    logits = unambiguous_logits(t, case.e, reference)
    assert_routing(case.run(logits, correction), reference(logits))


@pytest.mark.parametrize("name", ["qwen3", "deepseek-mini"])
def test_topk_route_reads_half_precision_logits(name: str) -> None:
    case = CASES[name]
    correction = torch.randn(case.e) * 0.3 if case.bias else None
    reference = case.reference(correction)
    logits = unambiguous_logits(9, case.e, lambda x: reference(x.half().double())).half()
    assert_routing(case.run(logits, correction), reference(logits.double()))


def test_topk_route_ties_go_to_the_lower_id() -> None:
    logits = torch.zeros(3, 16)
    logits[1, [9, 3, 12]] = 1.0  # a three-way tie for two places
    _, ids = Case(16, 2, softmax=True).run(logits, None)
    assert ids.tolist() == [[0, 1], [3, 9], [0, 1]]


def test_topk_route_nan_logits_give_valid_ids_and_nan_weights() -> None:
    """A row with a NaN still names k distinct experts in range (the GEMMs index weights with them), and its
    weights are NaN, so the bad input shows in the output; the other rows are routed as usual."""
    case = CASES["qwen3"]
    logits = unambiguous_logits(4, case.e, case.reference(None))
    logits[2, 5] = float("nan")
    weights, ids = case.run(logits, None)
    assert ids.min() >= 0 and ids.max() < case.e
    assert all(len(set(row)) == case.k for row in ids.tolist())
    assert weights[2].isnan().all()
    keep = [0, 1, 3]
    assert_routing((weights[keep], ids[keep]), case.reference(None)(logits[keep]))


def test_topk_route_no_tokens() -> None:
    weights, ids = topk_route(torch.randn(0, 16, device=DEVICE), 4, softmax=True)
    assert weights.shape == ids.shape == (0, 4)


@pytest.mark.parametrize("name", ["qwen3", "deepseek-mini"])
def test_topk_route_runs_only_a_launch_and_allocations(name: str) -> None:
    # (what a launch plan replays, kernels/launch.py: any other torch op would turn its plans off on the GPU)
    from wna16moe.kernels.launch import recording

    case = CASES[name]
    logits = torch.randn(5, case.e, device=DEVICE)
    bias = torch.randn(case.e, device=DEVICE) if case.bias else None
    with recording() as rec:
        topk_route_module._topk_route(logits, case.k, case.softmax, case.renormalize, case.n_group, case.topk_group,
                                      case.scale, bias, 0)
    assert all("not a compiled Triton kernel" in why for why in rec.refusals), rec.refusals


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 8, 4096])
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "mixtral", "deepseek-v3", "kimi-k2", "llama-4-scout"])
def test_gpu_route_matches_torch(model: str, t: int) -> None:
    """The models' own routing configs at their expert counts, bf16 logits: the kernel (on the GPU) against
    torch's routing of the same logits (on the CPU). Rows whose k-th and (k+1)-th keys are closer than float32
    can order are rare at random logits; at most one in a thousand may differ. Three draws: the first call
    records a launch plan, the next two replay it (kernels/launch.py)."""
    cfg = model_shape(model).moe_config()
    for _ in range(3):
        correction = torch.randn(cfg.num_experts) * 0.2
        logits = (torch.randn(t, cfg.num_experts) * 2).to(torch.bfloat16)
        weights, ids = route(logits.cuda(), cfg.routing, cfg.top_k, correction.cuda())
        want_weights, want_ids = route(logits, cfg.routing, cfg.top_k, correction)
        same = (ids.cpu() == want_ids).all(-1)
        assert same.float().mean() >= 0.999
        torch.testing.assert_close(weights.cpu()[same], want_weights[same], rtol=1e-5, atol=1e-6)
    logits_layouts = [(key[-1][0], plan) for key, plan in topk_route_module._PLANS.plans.items()]
    assert any(shape == (t, cfg.num_experts) and plan is not None for (shape, *_), plan in logits_layouts)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_route_under_a_cuda_graph() -> None:
    cfg = model_shape("deepseek-v3").moe_config()
    correction = torch.randn(cfg.num_experts, device="cuda") * 0.2
    static = torch.randn(8, cfg.num_experts, device="cuda")
    route(static, cfg.routing, cfg.top_k, correction)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(static, cfg.routing, cfg.top_k, correction)
    for _ in range(3):
        static.copy_(torch.randn_like(static))
        graph.replay()
        want_weights, want_ids = route(static.cpu(), cfg.routing, cfg.top_k, correction.cpu())
        assert torch.equal(ids.cpu(), want_ids)
        torch.testing.assert_close(weights.cpu(), want_weights, rtol=1e-5, atol=1e-6)
