"""CPU: W4A16 / W8A16 experts on PyTorch's own packed CPU matmuls, expert by expert over its routed tokens.

Modular: the layer routes with `wna16moe.routing`, so every routing method works; the gated activation runs
in torch between the two GEMMs (`wna16moe.activations`), so every activation, the SwiGLU clamp and expert
biases work too. Pairs whose expert id is -1 (an expert another EP rank owns) are skipped. bfloat16
activations only: PyTorch's float16 (and float32) paths of these kernels are scalar fallbacks, slower than
EMULATION.

Forward: the routed (token, expert) pairs sorted by expert and their inputs gathered once; for each expert
with tokens, its rows [m, H] (act-order: columns in group order), GEMM1 -> [m, 2I] bf16, bias and activation
in float32, round to bf16, GEMM2 -> [m, H] bf16, bias, times the router weights into a float32 buffer; one
index_add sums the buffer per token (in expert order), cast to the activation dtype.

Threads: PyTorch's int4 kernel opens an OpenMP parallel region at every call, and an expert's GEMM at decode
sizes takes 0.1-1 ms, less than one region can cost on cores other processes share (a spinning join waiting
for a descheduled thread: ~22 ms measured here). So the calling thread's OpenMP team is sized per expert by
its work, one thread per GEMM_GRAIN multiply-adds (per GLUE_GRAIN elements for the gather and sum), at most
torch.get_num_threads(), and restored afterwards: on qwen3-30b-a3b an expert gets a second thread from 28
routed tokens, so decode-sized batches run single-threaded and large ones use the caller's threads.
GEMM_GRAIN = 0 gives every GEMM all of them (PyTorch's own behaviour), for machines whose cores nothing else
uses. Without OpenMP the team is left as it is.

GEMMs by scheme:
    int4 (groups 32, 64, 128, 256, or channel-wise): `aten._weight_int4pack_mm_for_cpu(x [m, K] bf16,
        packed [N, K/2] uint8, group, sz [G, N, 2] bf16)`. It computes x @ W.T in float32 from bf16 operands
        (one bf16 rounding of the output) with W[n, k] = (p - 8) * sz[g, n, 0] + sz[g, n, 1], p the packed
        nibble, g = k // group (measured here on torch 2.13: exact to float32 rounding). We store p = q and
        the offset (8 - z) * s, so W = (q - z) * s. Channel-wise weights use the largest of these groups that
        divides K, every group carrying the row's scale (exact).
    int8, symmetric, channel-wise: `aten._weight_int8pack_mm(x [m, K] bf16, q - 128 [N, K] int8, s [N] bf16)`,
        (x . (q - 128)) * s, exact weights.
    int8 otherwise: each expert's rows are dequantized to bf16 in chunks of at most DEQUANT_CHUNK elements
        ((q - z) is exact in bf16, |q - z| <= 255; times s, one bf16 rounding) and multiplied in bf16.

Prepared layout (`prepare_weights`), per projection `w13` ([E, 2I, H]) and `w2` ([E, H, I]), N rows x K inputs:
    int4: w13 [E, N, K/2] uint8    `aten._convert_weight_to_int4pack_for_cpu` of the codes (it needs N % 16 == 0,
                                    which whole groups of 32 along both GEMMs' K imply). The blocked layout is
                                    the one this torch build chooses: made and read on the same machine.
          w13_sz [E, G, N, 2] bf16 scale and offset (8 - z) * s (0 for symmetric weights) of each group
    int8: w13 [E, N, K] int8       q - 128
          w13_scales [E, N] bf16 (channel-wise symmetric) or [E, N, G] bf16
          w13_zeros [E, N, G] int16 z - 128 (zero-point schemes)
    act-order: w13_perm [E, K] int64, columns in group order (codes stored in that order); the GEMM's input
          columns are gathered by it.

Numerics against the float32 reference (EMULATION): symmetric int4 and all int8 weights with bfloat16
scales are used exactly; float16/float32 scales are rounded to bfloat16 (relative 2**-8, bf16's unit
roundoff). The int4 zero-point offset (8 - z) * s is stored in bfloat16: |dW| <= 2**-8 * |8 - z| * s
<= 2**-8 * max |W| of the group, the size of the bfloat16 rounding of the weights that GPU W4A16 kernels
apply before their MMAs; offsets with |8 - z| in {0, 1, 2, 4, 8} are exact. Against EMULATION's float32
forward the bf16 GEMM outputs and intermediate add about 4e-3 relative (Frobenius) error.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from wna16moe.activations import apply_activation
from wna16moe.config import Activation, MoEQuantConfig
from wna16moe.device import DeviceInfo, Platform
from wna16moe.errors import InvalidInputError, UnsupportedError
from wna16moe.experts.base import (
    OK,
    Check,
    Experts,
    LayerSpec,
    check_clamp,
    check_member,
    check_tp_groups,
    check_whole_groups,
    fail,
    labels,
)
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme

NAME = "cpu"

# PyTorch ops this backend runs on (present in torch 2.13's CPU build).
INT4_PACK_OP = "_convert_weight_to_int4pack_for_cpu"
INT4_MM_OP = "_weight_int4pack_mm_for_cpu"
INT8_MM_OP = "_weight_int8pack_mm"
OPS = (INT4_PACK_OP, INT4_MM_OP, INT8_MM_OP)
# The only dtype the int4 kernel runs fast (AVX512/AVX2/NEON); weights and scales are fed to it in bf16.
ACT_DTYPES = (torch.bfloat16,)
COMPUTE_DTYPE = torch.bfloat16
# Group sizes aten._weight_int4pack_mm_for_cpu accepts (it also needs K % group == 0).
INT4_GROUPS = (32, 64, 128, 256)
# Its innerKTiles argument shapes the CUDA layout; the CPU packing ignores it (same bytes for 1, 2, 4, 8).
INNER_K_TILES = 2
# The clamp limit reaches `apply_activation` for these activations only.
CLAMP_ACTIVATIONS = (Activation.SILU, Activation.SWIGLU_OAI)
# Most elements one int8 dequantization chunk holds (bf16: 8 MiB).
DEQUANT_CHUNK = 1 << 22


def int4_kernel_group(k: int, group_size: int | None) -> int | None:
    """The group size the int4 kernel runs with for K inputs: the scheme's, or for channel-wise weights the
    largest of INT4_GROUPS dividing K; None when there is none (K not a multiple of 32)."""
    if group_size is not None:
        return group_size if group_size in INT4_GROUPS and k % group_size == 0 else None
    return next((g for g in reversed(INT4_GROUPS) if k % g == 0), None)


def uses_int8pack(scheme: WeightScheme) -> bool:
    """int8 weights that `aten._weight_int8pack_mm` runs as they are: symmetric, channel-wise."""
    return scheme.bits == 8 and scheme.group_size is None and scheme.symmetric


def _expert_codes(weight: QuantizedWeight, expert: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes [N, K] of one expert with columns in group order, and that order (None without act-order)."""
    codes = weight.codes[expert]
    if weight.g_idx is None:
        return codes, None
    order = weight.group_order(expert, name, "the CPU backend").to(codes.device)
    return codes[:, order], order


def _prepare_int4(weight: QuantizedWeight, name: str, group: int, device: torch.device) -> dict[str, torch.Tensor]:
    s = weight.scheme
    e, n, k = weight.shape
    g = k // group
    out = {
        name: torch.empty(e, n, k // 2, dtype=torch.uint8, device=device),
        f"{name}_sz": torch.empty(e, g, n, 2, dtype=COMPUTE_DTYPE, device=device),
    }
    if s.act_order:
        out[f"{name}_perm"] = torch.empty(e, k, dtype=torch.int64, device=device)
    for expert in range(e):
        codes, order = _expert_codes(weight, expert, name)
        out[name][expert] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(device, torch.int32),
                                                                                INNER_K_TILES)
        scale = weight.scales[expert].to(device).float()  # [N, G_scheme]
        if s.group_size is None:
            scale = scale.expand(n, g)
        zero = (torch.full_like(scale, float(s.symmetric_zero)) if weight.zeros is None
                else weight.zeros[expert].to(device).float().expand(n, g))
        out[f"{name}_sz"][expert, :, :, 0] = scale.t()
        # (8 - z) * s is exact in float32; the bf16 store is the one rounding (see the module docstring).
        out[f"{name}_sz"][expert, :, :, 1] = ((s.symmetric_zero - zero) * scale).t()
        if order is not None:
            out[f"{name}_perm"][expert] = order
    return out


def _prepare_int8(weight: QuantizedWeight, name: str, device: torch.device) -> dict[str, torch.Tensor]:
    s = weight.scheme
    e, n, k = weight.shape
    g = s.num_groups(k)
    packed = uses_int8pack(s)
    out = {
        name: torch.empty(e, n, k, dtype=torch.int8, device=device),
        f"{name}_scales": torch.empty((e, n) if packed else (e, n, g), dtype=COMPUTE_DTYPE, device=device),
    }
    if s.zero_point:
        out[f"{name}_zeros"] = torch.empty(e, n, g, dtype=torch.int16, device=device)
    if s.act_order:
        out[f"{name}_perm"] = torch.empty(e, k, dtype=torch.int64, device=device)
    for expert in range(e):
        codes, order = _expert_codes(weight, expert, name)
        out[name][expert] = (codes.to(device, torch.int16) - s.symmetric_zero).to(torch.int8)
        scales = weight.scales[expert].to(device)
        out[f"{name}_scales"][expert] = scales[:, 0] if packed else scales
        if weight.zeros is not None:
            out[f"{name}_zeros"][expert] = weight.zeros[expert].to(device, torch.int16) - s.symmetric_zero
        if order is not None:
            out[f"{name}_perm"][expert] = order
    return out


def prepare_cpu_weights(experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
    """Pure converter from canonical experts to the CPU layout (module docstring), expert by expert into
    preallocated tensors: extra memory is one expert's temporaries.

    Raises `InvalidInputError` for a non-CPU `device`, `UnsupportedError` for act-order groups that are not
    whole runs of group_size columns or int4 inputs no kernel group divides.
    """
    device = torch.device(device)
    if device.type != "cpu":
        raise InvalidInputError(f"the CPU backend prepares its weights on the CPU, got device {device}")
    s = experts.scheme
    if s.bits == 8:
        out = _prepare_int8(experts.w13, "w13", device)
        out.update(_prepare_int8(experts.w2, "w2", device))
        return out
    h, i = experts.hidden_size, experts.intermediate_size
    g13, g2 = int4_kernel_group(h, s.group_size), int4_kernel_group(i, s.group_size)
    if g13 is None or g2 is None:
        # Whole groups of >= 32 along both K (H and I) also give both N (2I and H) the 16 the packing needs.
        raise UnsupportedError(f"{s.name} with H={h}, I={i} has no int4 CPU kernel group: H and I must be "
                               f"multiples of group_size (channel-wise: of {INT4_GROUPS[0]}), one of {INT4_GROUPS}")
    out = _prepare_int4(experts.w13, "w13", g13, device)
    out.update(_prepare_int4(experts.w2, "w2", g2, device))
    return out


def _expand(per_group: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """[R, G] per-group values -> [R, K], each repeated over its group's columns (the last group may be short)."""
    return per_group.repeat_interleave(group, dim=1)[:, :k]


def dequant_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group: int) -> torch.Tensor:
    """x [M, K] bf16 @ W.T -> [M, N] bf16 for int8 weights W = (codes - zeros) * scales, dequantized to bf16 in
    row chunks of at most DEQUANT_CHUNK elements.

    codes [N, K] int8 (q - 128); scales [N, G] bf16; zeros [N, G] int16 (z - 128) or None (symmetric);
    group: inputs per group (K for channel-wise).
    """
    n, k = codes.shape
    out = torch.empty(x.shape[0], n, dtype=COMPUTE_DTYPE, device=x.device)
    rows = max(1, DEQUANT_CHUNK // k)
    for start in range(0, n, rows):
        chunk = slice(start, start + rows)
        w = codes[chunk].to(torch.int16)
        if zeros is not None:
            w = w - _expand(zeros[chunk], group, k)
        w = w.to(COMPUTE_DTYPE) * _expand(scales[chunk], group, k)  # |q - z| <= 255: exact in bf16
        out[:, chunk] = x @ w.t()
    return out


# ----- intra-op threads --------------------------------------------------------------------------------------
# PyTorch's int4 CPU kernel makes every call an OpenMP parallel region, however small (grain size 0). At
# M <= 32 an expert's GEMM takes 0.1-1 ms, and on cores that other processes also use, each region's join
# waits for a descheduled thread while the others spin: measured here at ~22 ms a region with two busy
# processes on the two cores, 350 ms for a one-token qwen3-30b-a3b forward that takes 2-3 ms without them
# (BENCHMARKS.md). So this backend gives its work a grain size: the calling thread's OpenMP team shrinks to
# one thread per GEMM_GRAIN multiply-adds of an expert (per GLUE_GRAIN elements of the gather and sum), at most
# torch.get_num_threads(), and is restored afterwards. Other threads are not affected.

# Multiply-adds per intra-op thread for an expert's GEMMs: 2**26 take ~1.7 ms on one core here, far more than
# a region costs on idle cores and a fraction of what it can cost on busy ones. 0 restores one region per GEMM
# at every size (PyTorch's own behaviour), for machines whose cores nothing else uses.
GEMM_GRAIN = 1 << 26
# Elements per intra-op thread for the gather of the routed inputs and the per-token sum (~1 ms of copying).
GLUE_GRAIN = 1 << 22
# The int8 dequantizing path converts the whole expert at every call: it costs about as much as this many
# more token rows of multiply-adds (measured: 3.4 ms for a 1536 x 2048 int8 g128 expert on one core).
DEQUANT_ROWS = 64


@functools.cache
def _omp_set_num_threads() -> Callable[[int], object] | None:
    """The OpenMP runtime's `omp_set_num_threads` (it sets the calling thread's team size only), or None where
    torch does not run its intra-op work on OpenMP or the symbol is not visible (then the team size is left as
    the caller set it)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        # torch loads its OpenMP runtime with global symbols (libtorch_global_deps), so the process finds it.
        return ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError, TypeError):
        return None


def team_size(work: int, grain: int, limit: int) -> int:
    """Intra-op threads for `work` units at `grain` units per thread: 1 to `limit` (grain 0: `limit`)."""
    if grain <= 0:
        return limit
    return max(1, min(limit, work // grain))


class IntraOpThreads:
    """Sets the OpenMP team size of the calling thread (`set(n)`), and `restore()`s the caller's setting."""

    def __init__(self) -> None:
        # torch fixes a thread's team size at its first parallel op: reading it here does that now, so it
        # cannot later undo what `set` does.
        self.limit = torch.get_num_threads()
        self._set = _omp_set_num_threads() if self.limit > 1 else None
        self._current = self.limit

    def set(self, n: int) -> None:
        if self._set is not None and n != self._current:
            self._set(n)
            self._current = n

    def restore(self) -> None:
        self.set(self.limit)


class CPUExperts(Experts):
    """PyTorch's packed int4 / int8 CPU matmuls per expert: int4 and int8, symmetric or zero points, act-order,
    every activation, bias and clamp; bfloat16 activations."""

    NAME = NAME
    SUPPORTS_EXPERT_MAP = True

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.CPU:
            return fail(f"runs on the CPU only, got {device.name} ({device.platform.value})")
        missing = [op for op in OPS if not hasattr(torch.ops.aten, op)]
        if missing:
            return fail(f"this torch build ({torch.__version__}) lacks {', '.join(f'aten.{op}' for op in missing)}")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        if scheme.bits == 4 and scheme.group_size is not None and scheme.group_size not in INT4_GROUPS:
            return fail(f"int4 group_size {scheme.group_size} is not supported; expected channel-wise or one of "
                        f"{labels(INT4_GROUPS)} (the groups of aten.{INT4_MM_OP})")
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        scheme = spec.scheme
        if not (split := check_tp_groups(spec)).ok:
            return split
        if scheme.bits == 8:
            return OK  # the int8 paths take any K and a partial last group
        if scheme.group_size is not None:
            return check_whole_groups(spec)
        h, i = spec.moe.hidden_size, spec.intermediate_per_shard
        if int4_kernel_group(h, None) is None or int4_kernel_group(i, None) is None:
            return fail(f"channel-wise int4 needs H and I/tp to be multiples of {INT4_GROUPS[0]} (the int4 kernel's "
                        f"smallest group), got H={h}, I/tp={i}")
        return OK

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        return check_clamp(clamp_limit, activation, CLAMP_ACTIVATIONS)

    def __init__(self, spec: LayerSpec, quant: MoEQuantConfig, device: torch.device) -> None:
        super().__init__(spec, quant, device)
        h, i = spec.moe.hidden_size, spec.intermediate_per_shard
        group = self.scheme.group_size
        if self.scheme.bits == 4:
            self.groups = {"w13": int4_kernel_group(h, group), "w2": int4_kernel_group(i, group)}
        else:
            self.groups = {"w13": group or h, "w2": group or i}
        # Multiply-adds per token row of an expert (both GEMMs), and the extra rows' worth the int8 dequantizing
        # path spends converting weights, for the team size of each expert.
        self.macs_per_row = 3 * h * i  # w13: 2I x H, w2: H x I
        self.dequant_rows = DEQUANT_ROWS if self.scheme.bits == 8 and not uses_int8pack(self.scheme) else 0
        self.w13_bias = None if quant.w1_bias is None else quant.w1_bias.to(device, torch.float32)
        self.w2_bias = None if quant.w2_bias is None else quant.w2_bias.to(device, torch.float32)

    @classmethod
    def prepare_weights(cls, experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
        return prepare_cpu_weights(experts, device)

    def _gemm(self, x: torch.Tensor, weights: dict[str, torch.Tensor], name: str, expert: int) -> torch.Tensor:
        """x [m, K] bf16 @ W.T of projection `name` of `expert` -> [m, N] bf16."""
        perm = weights.get(f"{name}_perm")
        if perm is not None:
            x = x.index_select(1, perm[expert])
        x = x.contiguous()
        if self.scheme.bits == 4:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weights[name][expert], self.groups[name],
                                                               weights[f"{name}_sz"][expert])
        if uses_int8pack(self.scheme):
            return torch.ops.aten._weight_int8pack_mm(x, weights[name][expert], weights[f"{name}_scales"][expert])
        zeros = weights.get(f"{name}_zeros")
        return dequant_matmul(x, weights[name][expert], weights[f"{name}_scales"][expert],
                              None if zeros is None else zeros[expert], self.groups[name])

    def _expert(self, x: torch.Tensor, expert: int, weights: dict[str, torch.Tensor], router: torch.Tensor,
                out: torch.Tensor) -> None:
        """One expert on its tokens x [m, H] bf16: writes its output times the router weights [m, 1] float32
        into out [m, H] float32."""
        q = self.quant
        gate_up = self._gemm(x, weights, "w13", expert)
        if self.w13_bias is not None:
            gate_up = gate_up.float() + self.w13_bias[expert]
        # The activation computes in float32 and returns its input's dtype: from bf16 GEMM output straight to
        # the bf16 intermediate, the same single rounding as converting its float32 result.
        act = apply_activation(gate_up, self.moe.activation, q.gemm1_alpha, q.gemm1_beta, q.gemm1_clamp_limit)
        down = self._gemm(act.to(COMPUTE_DTYPE), weights, "w2", expert)
        if self.w2_bias is not None:
            down = down.float() + self.w2_bias[expert]
        torch.mul(down, router, out=out)  # bf16 * float32 computes in float32

    def apply(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """hidden_states [T, H] bf16, topk_weights [T, K] float, topk_ids [T, K] int (-1: skipped) -> [T, H] bf16."""
        self.check_routed(hidden_states, topk_weights, topk_ids)
        if hidden_states.dtype not in ACT_DTYPES:
            raise InvalidInputError(f"hidden_states must be {labels(ACT_DTYPES)} for the CPU backend, got "
                                    f"{hidden_states.dtype}")
        num_experts = weights["w13"].shape[0]
        top_k = topk_ids.shape[1]
        threads = IntraOpThreads()
        try:
            # Every op here is small at decode sizes: even the routing bookkeeping would otherwise open regions.
            threads.set(team_size(topk_ids.numel() * hidden_states.shape[1], GLUE_GRAIN, threads.limit))
            flat = topk_ids.reshape(-1).long()
            pairs = torch.nonzero(flat >= 0).squeeze(1)
            ids = flat[pairs]
            if ids.numel() and int(ids.max()) >= num_experts:
                raise InvalidInputError(f"topk_ids holds expert {int(ids.max())}, but the layer has {num_experts} "
                                        "experts")
            pairs = pairs[torch.argsort(ids, stable=True)]
            tokens = pairs // top_k
            with torch.no_grad():
                # Pairs in expert order: one gather of the inputs, each expert writes its rows of `down`, and one
                # index_add sums them per token (in expert order, as a per-expert accumulation would).
                x = hidden_states.index_select(0, tokens)
                router = topk_weights.reshape(-1)[pairs].float().unsqueeze(1)
                down = torch.empty(x.shape, dtype=torch.float32, device=x.device)
                start = 0
                for expert, count in enumerate(torch.bincount(ids, minlength=num_experts).tolist()):
                    if count:
                        rows = slice(start, start + count)
                        threads.set(team_size((count + self.dequant_rows) * self.macs_per_row, GEMM_GRAIN,
                                              threads.limit))
                        self._expert(x[rows], expert, weights, router[rows], down[rows])
                        start += count
                threads.set(team_size(down.numel(), GLUE_GRAIN, threads.limit))
                out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
                out.index_add_(0, tokens, down)
                return out.to(hidden_states.dtype)
        finally:
            threads.restore()
