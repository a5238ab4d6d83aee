"""MARLIN and BATCHED_MARLIN: vLLM's Marlin MoE GEMM (`moe_wna16_marlin_gemm`) over our own weight repack.

Modular: they take routed top-k ids and weights. `MarlinExperts` reads the STANDARD activation format
([T, H] plus top-k ids); `BatchedMarlinExperts` reads the BATCHED one ([E_local, max_tokens, H] plus
num_tokens [E_local], what the batched expert-parallel dispatch delivers). A layer needs exactly one of the
two formats, so at most one of them passes.

Provider. The op comes from an installed Marlin MoE op library: vLLM's `vllm/_moe_C_stable_libtorch.abi3.so`
(stable libtorch ABI, CUDA 13, torch >= 2.11; ops under `torch.ops._moe_C`) inside an installed `vllm`
package, or the file named by `$WNA16MOE_MARLIN_LIB` (see `device.find_marlin_library`). It is loaded with
`torch.ops.load_library` the first time a kernel is built, never imported through `vllm`. Without one,
the device check fails with "no Marlin op provider found (install vllm or set WNA16MOE_MARLIN_LIB)" and
nothing runs. Its Marlin MoE kernels ship as sm_75/80/89/120 cubins plus sm_80 PTX only, so on Hopper
(sm_90) the driver JIT-compiles the PTX on first use, for tens of seconds: each kernel warms up when it is
built, once per process and (scheme, dtype, device), and logs that it does. The driver caches compiled
PTX in ~/.nv/ComputeCache; raise `CUDA_CACHE_MAXSIZE` (bytes, up to 4294967296) so it keeps all of them
across processes.

Forward (`apply`), the steps of vLLM's `fused_marlin_moe` with our own glue:
    1. align the routed pairs by expert in blocks of 8/16/32/48/64 rows (wna16moe.kernels.moe_align;
       vLLM's block-size rule: the first block size with T * K / E / block < 0.9);
    2. GEMM1 [T, H] x w13 -> [T*K, 2I'] (rows are pairs t * K + k), plus the expert's w13 bias in torch;
    3. the gated activation in torch, [T*K, 2I'] -> [T*K, I'];
    4. GEMM2 [T*K, I'] x w2 -> [T*K, H], the router weight of each pair multiplied in by the op;
    5. sum over the top-k slots -> [T, H] (plus the router-weighted w2 bias in torch).
BATCHED_MARLIN runs the same forward over the flattened [E_local * max_tokens, H] rows as top-1 pairs: row j
of expert e is a pair of expert e with router weight 1 when j < num_tokens[e], else a left-out pair (-1).
The alignment leaves -1 pairs out of every block, so the op never reads their input rows (garbage in the
batched buffer) nor writes their output rows; GEMM2's output is zeroed first (as vLLM's fused_marlin_moe does
under an expert map), so those rows come out exactly 0 and compute is spent on valid rows only.
Biases are added in torch rather than passed to the op: the op's bias layout and where GEMM2 adds its
bias relative to the router weight could not be checked without a GPU, and torch gets both right.
The op's lock workspace (one int32 per thread block, at most 4 blocks per SM) is allocated at
construction for the worst case and reused, so CUDA-graph capture works at every M, M = 1 included.

Weights: `experts/marlin_layout.py` (the layout, its sources, and the inverse converters). Scales are read
in the activation dtype: scales stored in another dtype are converted on every forward (a copy of the
scales only; build the experts with `scale_dtype` equal to the activation dtype to avoid it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

from wna16moe.activations import apply_activation
from wna16moe.config import Activation, ActivationFormat, MoEQuantConfig, ParallelConfig
from wna16moe.device import (
    MARLIN_LIBRARY_ENV,
    MARLIN_PROVIDER,
    NO_TRITON,
    DeviceInfo,
    Platform,
    find_marlin_library,
)
from wna16moe.errors import BackendError, InvalidInputError
from wna16moe.experts.base import (
    OK,
    Check,
    Experts,
    LayerSpec,
    batched_pairs,
    check_clamp,
    check_member,
    dtype_label,
    fail,
    labels,
)
from wna16moe.experts.marlin_layout import (
    INTERMEDIATE_TILE,
    TILE,
    WEIGHT_TYPES,
    padded_intermediate,
    prepare_marlin_weights,
    scalar_type_id,
    weight_type,
)
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.scheme import WeightScheme

logger = logging.getLogger("wna16moe")

NAME = "marlin"
BATCHED_NAME = "batched_marlin"
NO_PROVIDER = f"no Marlin op provider found (install vllm or set {MARLIN_LIBRARY_ENV})"
OP_NAMESPACE = "_moe_C"
GEMM_OP = "moe_wna16_marlin_gemm"

# Marlin's tensor-core tiles need Turing (sm_75) or newer; it has no ROCm build.
MIN_SM = 75
# vLLM builds its sm_75 Marlin MoE kernels for float16 activations only ("Turing only support FP16 or INT8
# activation." in the op); bfloat16 needs sm_80.
MIN_BF16_SM = 80
# The op's moe_block_size: 8, or a multiple of 16 up to 64 (ops.cu); vLLM picks among these.
BLOCK_SIZES = (8, 16, 32, 48, 64)
# Thread blocks per SM the op may launch; its lock workspace needs one int32 per block (vLLM's
# MARLIN_MAX_BLOCKS_PER_SM, and the op's check `workspace >= min(n_tiles * blocks, sms * 4)`).
MAX_BLOCKS_PER_SM = 4
# Group sizes Marlin's scale layout handles; None is channel-wise (group_size -1).
GROUP_SIZES = (None, 32, 64, 128)
ACT_DTYPES = (torch.bfloat16, torch.float16)
# H is GEMM1's K and GEMM2's N; both run in thread tiles of 128.
H_MULTIPLE = 128
# The activation runs between the two GEMMs in torch, so every gated activation works.
ACTIVATIONS = (Activation.SILU, Activation.GELU, Activation.GELU_TANH, Activation.SWIGLU_OAI)
# Activations whose clamp limit the Marlin path applies.
CLAMP_ACTIVATIONS = (Activation.SILU, Activation.SWIGLU_OAI)

# (scheme name, activation dtype, device) already warmed up in this process.
_warmed: set[tuple[str, torch.dtype, torch.device]] = set()


def _gemm_op(namespace: Any) -> Any | None:
    try:
        return getattr(namespace, GEMM_OP)
    except (AttributeError, RuntimeError):
        return None


def load_marlin_ops() -> Any:
    """The `torch.ops._moe_C` namespace with `moe_wna16_marlin_gemm`, loading the provider library once.

    Uses the op if it is already registered (vLLM imported), else loads `find_marlin_library()` with
    `torch.ops.load_library`. Raises `BackendError` without a provider, or when it does not load or does not
    register the op.
    """
    namespace = getattr(torch.ops, OP_NAMESPACE)
    if _gemm_op(namespace) is not None:
        return namespace
    path = find_marlin_library()
    if path is None:
        raise BackendError(NO_PROVIDER)
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as error:
        raise BackendError(f"the Marlin op library {path} does not load: {error}. vLLM 0.33's library needs torch "
                           ">= 2.11 built for CUDA 13") from error
    if _gemm_op(namespace) is None:
        raise BackendError(f"{path} loaded but registers no torch.ops.{OP_NAMESPACE}.{GEMM_OP}; it is not a Marlin "
                           f"MoE op library (unset {MARLIN_LIBRARY_ENV} or point it at vLLM's "
                           "_moe_C_stable_libtorch.abi3.so)")
    logger.info("wna16moe: loaded the Marlin MoE ops from %s", path)
    return namespace


def block_size_for(num_tokens: int, top_k: int, num_experts: int) -> int:
    """vLLM's rule: the smallest M block that expected rows per expert fill to less than 90%, else 64."""
    for block in BLOCK_SIZES:
        if num_tokens * top_k / num_experts / block < 0.9:
            return block
    return BLOCK_SIZES[-1]


class MarlinExperts(Experts):
    """Marlin MoE, STANDARD format: int4 sym / int4 zp / int8 sym, groups -1/32/64/128, bias, any gated
    activation; needs a Marlin op provider (module docstring)."""

    NAME = NAME
    ACTIVATIONS: ClassVar[tuple[Activation, ...]] = ACTIVATIONS

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.CUDA:
            return fail(f"needs a CUDA device (sm_{MIN_SM}+), got {device.name} ({device.platform.value}); Marlin "
                        "has no ROCm, XPU or CPU build")
        if (device.sm or 0) < MIN_SM:
            return fail(f"needs compute capability sm_{MIN_SM} or newer, got sm_{device.sm} ({device.name})")
        if not device.has_package(MARLIN_PROVIDER):
            return fail(NO_PROVIDER)
        if not device.has_package("triton"):
            return fail(f"{NO_TRITON} (MARLIN aligns tokens with wna16moe's Triton kernel)")
        return OK

    @classmethod
    def supports_device_dtype(cls, device: DeviceInfo, act_dtype: torch.dtype) -> Check:
        """Turing's Marlin kernels are float16 only."""
        if act_dtype == torch.bfloat16 and (device.sm or 0) < MIN_BF16_SM:
            return fail(f"bfloat16 activations need sm_{MIN_BF16_SM}+ (vLLM builds Marlin's sm_{device.sm} kernels "
                        f"for float16 only), got {device.name}; use float16")
        return OK

    @classmethod
    def checks(cls, spec: LayerSpec, device: DeviceInfo) -> list[tuple[str, Check]]:
        """The base checks, with the device check also covering the activation dtype the device's kernels take."""
        checks = super().checks(spec, device)
        return [(name, cls.supports_device_dtype(device, spec.act_dtype) if name == "device" and check.ok else check)
                for name, check in checks]

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        if scheme.act_order:
            return fail("act-order (g_idx) is not supported: the Marlin MoE op takes no g_idx; re-quantize without "
                        "desc_act/actorder")
        if (scheme.bits, scheme.zero_point) not in WEIGHT_TYPES:
            return fail(f"int{scheme.bits} with zero points is not supported (Marlin has no uint8 + zero-point type); "
                        "expected int4 symmetric, int4 with zero points or int8 symmetric")
        if not (group := check_member(scheme.group_size, GROUP_SIZES, "group_size")).ok:
            return group
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        if activation not in cls.ACTIVATIONS:
            return fail(f"activation {activation.value} is not supported with the {cls.ACTIVATION_FORMAT.value} "
                        f"format; expected {labels(cls.ACTIVATIONS)}")
        return OK

    @classmethod
    def supports_parallel(cls, parallel: ParallelConfig) -> Check:
        if parallel.ep_size > 1:
            return fail(f"expert parallelism (ep_size={parallel.ep_size}) is not supported yet: MARLIN's apply takes "
                        "local expert ids only (no expert map)")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        h, i, group = spec.moe.hidden_size, spec.intermediate_per_shard, spec.scheme.group_size
        if h % H_MULTIPLE:
            return fail(f"H={h} is not a multiple of {H_MULTIPLE} (Marlin's tile along H)")
        if group is not None and i % group:
            tile = math.lcm(INTERMEDIATE_TILE, group)
            return fail(f"I/tp={i} is not a multiple of group_size {group}: a quantization group would straddle "
                        f"the TP shard, which padding to a multiple of lcm({INTERMEDIATE_TILE}, {group})={tile} cannot "
                        f"fix; use a tp_size that keeps I/tp a multiple of {group}")
        return OK

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        return check_clamp(clamp_limit, activation, CLAMP_ACTIVATIONS)

    # ----- weights and compute -----
    def __init__(self, spec: LayerSpec, quant: MoEQuantConfig, device: torch.device) -> None:
        """Load the op provider, allocate the lock workspace and the padded biases, warm the kernels up.

        Raises `BackendError` without a provider or off CUDA.
        """
        super().__init__(spec, quant, device)
        self.gemm_op = _gemm_op(load_marlin_ops())
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendError(f"MARLIN runs on CUDA devices only, got device {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.type_name = weight_type(self.scheme)
        self.type_id = scalar_type_id(self.type_name)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        # Marlin resets its locks after every call, so one zeroed buffer serves every forward (and graph).
        self.workspace = torch.zeros(sms * MAX_BLOCKS_PER_SM, dtype=torch.int32, device=self.device)
        from wna16moe.kernels.moe_align import align_workspace

        # The alignment's own (kernels/moe_align.py), left zero by each forward as well.
        self.align_work = align_workspace(spec.local_num_experts, self.device)
        self.w13_bias = (None if quant.w1_bias is None else
                         padded_w13_bias(quant.w1_bias, self.scheme.group_size).to(self.device))
        self.w2_bias = None if quant.w2_bias is None else quant.w2_bias.float().to(self.device).contiguous()
        self._warm_up()

    @classmethod
    def prepare_weights(cls, experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
        return prepare_marlin_weights(experts, device)

    def apply(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              weights: dict[str, torch.Tensor], block_size: int | None = None) -> torch.Tensor:
        """hidden_states [T, H] (bf16/fp16), topk_weights [T, K] any float dtype, topk_ids [T, K] int (local
        expert ids), weights from `prepare_weights` -> [T, H] in hidden_states' dtype. `block_size` overrides vLLM's
        rule."""
        self.check_routed(hidden_states, topk_weights, topk_ids)
        t, k = topk_ids.shape
        block = block_size or block_size_for(t, k, weights["w13"].shape[0])
        return marlin_moe_forward(self.gemm_op, self.workspace, self.type_id, hidden_states, topk_weights, topk_ids,
                                  weights, block, self.moe.activation, self.quant, self.w13_bias, self.w2_bias,
                                  align_work=self.align_work)

    def _warm_up(self) -> None:
        """Run every block size once on tiny zero weights of this scheme, once per process and (scheme, dtype,
        device): the first call of a Marlin kernel without a cubin for this GPU JIT-compiles its PTX."""
        dtype = self.moe.dtype
        key = (self.scheme.name, dtype, self.device)
        if key in _warmed:
            return
        logger.info("wna16moe: warming up the Marlin MoE kernels for %s (%s, %s) on %s: where vLLM ships no cubin for "
                    "this GPU (sm_90 and others) the driver JIT-compiles their sm_80 PTX now, which can take tens of "
                    "seconds; set CUDA_CACHE_MAXSIZE=4294967296 to keep the result in the driver's cache",
                    self.scheme.name, self.type_name, dtype_label(dtype), torch.cuda.get_device_name(self.device))
        start = time.perf_counter()
        weights = prepare_marlin_weights(_tiny_experts(self.scheme), self.device)
        x = torch.zeros(1, H_MULTIPLE, dtype=dtype, device=self.device)
        ids = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
        ones = torch.ones(1, 1, dtype=torch.float32, device=self.device)
        for block in BLOCK_SIZES:
            marlin_moe_forward(self.gemm_op, self.workspace, self.type_id, x, ones, ids, weights, block,
                               self.moe.activation, self.quant, None, None)
        torch.cuda.synchronize(self.device)
        _warmed.add(key)
        logger.info("wna16moe: Marlin MoE warm-up for %s (%s) took %.1f s", self.scheme.name, dtype_label(dtype),
                    time.perf_counter() - start)


def padded_w13_bias(bias: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """w13 bias [E, 2I] (gate, then up) -> float32 [E, 2I'], each half zero-padded like w13's rows."""
    i = bias.shape[1] // 2
    i_pad = padded_intermediate(i, group_size)
    out = torch.zeros(bias.shape[0], 2 * i_pad, dtype=torch.float32, device=bias.device)
    out[:, :i] = bias[:, :i].float()
    out[:, i_pad : i_pad + i] = bias[:, i:].float()
    return out


class _SharedArgs(NamedTuple):
    """What both GEMMs of one forward pass to the op: locks, the alignment, router weights [T, K] float32, block
    size and weight type id."""

    workspace: torch.Tensor
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    topk_weights: torch.Tensor
    block: int
    type_id: int


def marlin_moe_forward(gemm: Callable[..., Any], workspace: torch.Tensor, type_id: int, hidden_states: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor, weights: dict[str, torch.Tensor],
                       block: int, activation: Activation, quant: MoEQuantConfig, w13_bias: torch.Tensor | None,
                       w2_bias: torch.Tensor | None, *, skip_negative: bool = False,
                       align_work: torch.Tensor | None = None) -> torch.Tensor:
    """One MoE forward through `gemm` (`moe_wna16_marlin_gemm`, or a stand-in with its signature).

    Parameters
    ----------
    gemm : the op; called twice, with the schema's arguments in order (see `_gemm`).
    workspace : [>= SMs * 4] int32 zeros, the op's locks.
    type_id : `scalar_type_id` of the weight type.
    hidden_states : [T, H] bf16/fp16.
    topk_weights : [T, K] router weights (any float dtype; used as float32).
    topk_ids : [T, K] int expert ids in [0, E); with `skip_negative`, also -1 for a pair to leave out.
    weights : `prepare_marlin_weights` output; I' is read from w2 ([E, I'/16, ...]).
    block : moe_block_size, one of BLOCK_SIZES.
    activation, quant : the gated activation and its parameters (gemm1_alpha, gemm1_beta, gemm1_clamp_limit).
    w13_bias : [E, 2I'] float32 (gate and up halves padded like w13) or None; w2_bias : [E, H] float32 or None.
    align_work : the layer's `align_workspace` (kernels/moe_align.py) or None.
    skip_negative : True when topk_ids may hold -1. The alignment leaves those pairs out, so the op neither
        reads their input rows nor writes their output rows: GEMM2's output starts zeroed (a memset the
        standard path skips) and the biases are looked up with -1 clamped to 0 and masked out, so a -1 pair
        adds exactly 0 whatever its input row holds.

    Returns
    -------
    [T, H] in hidden_states' dtype; a token whose pairs are all -1 gets 0.
    """
    from wna16moe.kernels.moe_align import moe_align_block_size

    if block not in BLOCK_SIZES:
        raise InvalidInputError(f"block_size={block} is not one the Marlin op takes; expected one of {BLOCK_SIZES}")
    t, h = hidden_states.shape
    k = topk_ids.shape[1]
    dtype = hidden_states.dtype
    if t == 0:
        return torch.zeros(0, h, dtype=dtype, device=hidden_states.device)
    num_experts = weights["w13"].shape[0]
    i_pad = weights["w2"].shape[1] * TILE
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, num_experts, block, workspace=align_work)
    shared = _SharedArgs(workspace, sorted_ids, expert_ids, num_padded, topk_weights.to(torch.float32).contiguous(),
                         block, type_id)
    gate_up = torch.empty(t * k, 2 * i_pad, dtype=dtype, device=hidden_states.device)
    _gemm(gemm, hidden_states.contiguous(), gate_up, weights, "w13", shared, top_k=k, mul_topk_weights=False,
          size_m=t, size_n=2 * i_pad, size_k=h)
    flat_ids = topk_ids.reshape(-1).long()
    routing = shared.topk_weights
    if skip_negative:
        valid = topk_ids >= 0
        flat_ids = flat_ids.clamp(min=0)  # a -1 pair's GEMM1 row is never read by GEMM2: any bias row will do
        routing = torch.where(valid, routing, 0.0)
    if w13_bias is not None:
        gate_up = (gate_up.float() + w13_bias.index_select(0, flat_ids)).to(dtype)
    act = apply_activation(gate_up, activation, quant.gemm1_alpha, quant.gemm1_beta, quant.gemm1_clamp_limit)
    # The op writes only the rows of aligned pairs: left-out pairs' rows must already hold the 0 they add.
    down = (torch.zeros if skip_negative else torch.empty)(t * k, h, dtype=dtype, device=hidden_states.device)
    _gemm(gemm, act.contiguous(), down, weights, "w2", shared, top_k=1, mul_topk_weights=True, size_m=t * k,
          size_n=h, size_k=i_pad)
    out = down.view(t, k, h).sum(dim=1)
    if w2_bias is not None:
        routed = routing.unsqueeze(-1) * w2_bias.index_select(0, flat_ids).view(t, k, h)
        out = (out.float() + routed.sum(dim=1)).to(dtype)
    return out


def _gemm(gemm: Callable[..., Any], a: torch.Tensor, c: torch.Tensor, weights: dict[str, torch.Tensor], stem: str,
          shared: _SharedArgs, *, top_k: int, mul_topk_weights: bool, size_m: int, size_n: int,
          size_k: int) -> None:
    """One `moe_wna16_marlin_gemm` call writing `c` [size_m * top_k, size_n]. The schema's arguments, in order:
    (a, c, b_q_weight, b_bias, b_scales, a_scales, global_scale, b_zeros, workspace, sorted_token_ids,
    expert_ids, num_tokens_past_padded, topk_weights, moe_block_size, top_k, mul_topk_weights, b_type_id,
    size_m, size_n, size_k, use_atomic_add, use_fp32_reduce, is_zp_float, thread_k, thread_n, blocks_per_sm),
    passed as vLLM's fused_marlin_moe passes them: fp32 global reduce, no atomics, automatic tiles. The op
    reads scales in the activation dtype."""
    scales = weights[f"{stem}_scales"]
    if scales.dtype != a.dtype:
        scales = scales.to(a.dtype)
    gemm(a, c, weights[stem], None, scales, None, None, weights.get(f"{stem}_zeros"), shared.workspace,
         shared.sorted_ids, shared.expert_ids, shared.num_padded, shared.topk_weights, shared.block, top_k,
         mul_topk_weights, shared.type_id, size_m, size_n, size_k, False, True, False, -1, -1, -1)


def _tiny_experts(scheme: WeightScheme) -> QuantizedExperts:
    """One expert, H = 128, I = lcm(64, group_size): zero codes, unit scales, in `scheme`."""
    h, i = H_MULTIPLE, padded_intermediate(1, scheme.group_size)

    def weight(n: int, k: int) -> QuantizedWeight:
        g = scheme.num_groups(k)
        zeros = torch.zeros(1, n, g, dtype=torch.uint8) if scheme.zero_point else None
        return QuantizedWeight(scheme, torch.zeros(1, n, k, dtype=torch.uint8),
                               torch.ones(1, n, g, dtype=scheme.scale_dtype), zeros)

    return QuantizedExperts(weight(2 * i, h), weight(h, i))


class BatchedMarlinExperts(MarlinExperts):
    """Marlin MoE, BATCHED format [E_local, max_tokens, H]: as `MarlinExperts` (schemes, activations, biases),
    over the flattened rows as top-1 pairs with padding rows left out (module docstring)."""

    NAME = BATCHED_NAME
    ACTIVATION_FORMAT = ActivationFormat.BATCHED

    @classmethod
    def supports_parallel(cls, parallel: ParallelConfig) -> Check:
        """The batched format is what expert-parallel dispatch delivers: local experts only, no expert map."""
        return OK

    def apply_batched(self, hidden_states: torch.Tensor, num_tokens: torch.Tensor, weights: dict[str, torch.Tensor],
                      block_size: int | None = None) -> torch.Tensor:
        """hidden_states [E_local, max_tokens, H] (bf16/fp16), the first num_tokens[e] rows of expert e valid
        (num_tokens [E_local] int) -> [E_local, max_tokens, H], each valid row through its expert unweighted,
        rows past num_tokens[e] exactly 0 whatever they held. `block_size` overrides vLLM's rule (applied with
        max_tokens rows per expert: the counts stay on the device)."""
        e, m, h = hidden_states.shape
        # MarlinExperts.apply takes no -1 ids (its bias lookups would index -1, and GEMM2 leaves a left-out
        # pair's row unwritten, i.e. garbage), hence skip_negative. Leaving padding rows out as -1 rather than
        # running them with router weight 0 costs no GEMM work and keeps their garbage input (NaN * 0 = NaN)
        # out of the output.
        ids, ones = batched_pairs(num_tokens, m, hidden_states.device)
        block = block_size or block_size_for(e * m, 1, e)
        out = marlin_moe_forward(self.gemm_op, self.workspace, self.type_id, hidden_states.reshape(e * m, h), ones,
                                 ids, weights, block, self.moe.activation, self.quant, self.w13_bias, self.w2_bias,
                                 skip_negative=True, align_work=self.align_work)
        return out.view(e, m, h)
