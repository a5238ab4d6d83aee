"""FLASHINFER_TRTLLM: FlashInfer's TRT-LLM MxInt4 fused MoE, which routes and runs both GEMMs in one call.

Monolithic: `flashinfer.fused_moe.trtllm_mxint4_block_scale_moe` takes router logits [T, E] and bf16 hidden
states and does routing, GEMM1 + SwiGLU, GEMM2 and the weighted top-k sum in one kernel, on SM10x only.
"MxInt4" here means symmetric int4 weights with one bfloat16 scale per 32 input elements (not e8m0 scales).

Status: NOT RUN ON HARDWARE BY US. The converter and `apply_monolithic` are written against FlashInfer
0.7.2's source (signature of trtllm_mxint4_block_scale_moe, its layout helpers) and everything that runs on
a CPU is tested, but the kernel itself has never run here: there is no SM100 GPU (our H100s are sm_90, where
FlashInfer ships no MxInt4 cubins). The oracle chooses it on SM10x with flashinfer installed (it says so, with
this caveat, in `explain`), so it guards itself: the first time a configuration (device, layer spec) is
built in a process, `self_check` runs the real monolithic call on a few tokens through the layer's own
weights and compares it with EMULATION run on the same weights (read back through `flashinfer_to_canonical`);
a relative error above SELF_CHECK_RTOL (or an exception from the call itself) raises a BackendError naming the
error and telling the user to force another backend with WNA16MOE_BACKEND. WNA16MoE calls it at construction
(and, unless this backend was requested, builds the layer on the oracle's next choice instead);
`apply_monolithic` calls it first if nothing has, so no caller gets unchecked output.

Prepared layout (`prepare_weights`; E experts, H hidden, I = I/tp, Kb = K / 256):
    w13        [E, H/256, 2I, 128] uint8   BlockMajorK bytes of the gate/up projection
    w13_scale  [E, 2I, H/32] bf16          its scales, rows shuffled like the weights, 128x4-swizzled
    w2         [E, I/256, H, 128] uint8, w2_scale [E, H, I/32] bf16 likewise (no gate/up interleave)
built per expert from canonical codes q (w = (q - 8) * s) in these steps:
    1. signed nibbles: v = q - 8 in two's complement, (q - 8) & 0xF == q ^ 8; byte j of a row holds input
       2j in its low nibble and 2j + 1 in its high nibble.
    2. w13 rows [gate; up] -> [up; gate] (FlashInfer's w3/w1 order), then the gated-activation interleave:
       row 2i <- up_i, row 2i + 1 <- gate_i.
    3. epilogue shuffle (epilogue_tile_m = 128): in every block of 32 rows, source row t goes to row
       8 * (t % 4) + t // 4 (FlashInfer's srcToDstBlk32RowMap); w2 gets this step only.
    4. scales: the same row permutation, then the 128x4 swizzle (`block_scale_interleave`): scale (r, c) of
       an [R, C] matrix lands at (c % 4) + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4
       + (r // 128) * 128 * C (R % 128 == 0 and C % 4 == 0 here, so nothing is padded).
    5. BlockMajorK: the byte matrix [N, K/2] becomes [K/256, N, 128]: 128-byte K blocks outermost.
`flashinfer_to_canonical` inverts all of it.

Decisions (see the checks below):
  * Routed scaling: the kernel applies it. `wna16moe.routing` multiplies the router weights by
    routed_scaling_factor, so a layer's output includes it; the kernel's DeepSeekV3 routing does the same
    when given the factor, so apply passes it (vLLM passes None and scales outside). Other routing methods
    have no scaling step, so a factor other than 1 rejects them.
  * SWIGLU_OAI is rejected: apply passes no alpha/beta/limit, so the kernel computes plain silu(gate) * up;
    accepting SWIGLU_OAI would silently drop its alpha, `up + beta` and clamp.
  * bfloat16 activations are a capability check, not an assertion at the first forward. Scales of other
    dtypes are rounded to bfloat16 by the converter (relative 2**-8, the size of the bf16 rounding of
    the dequantized weights the MMA reads).
  * Expert parallelism is rejected: the kernel addresses local experts by a contiguous offset and takes no
    expert map; apply passes local_expert_offset 0 and every expert as local.
  * H and I/tp must be multiples of 256 (whole 256-element K blocks); vLLM does not check this before
    preparing the weights.
  * Tiles: the kernel's launcher picks its token tile (8 to 128) with FlashInfer's autotuner over
    tune_max_num_tokens (TUNE_MAX_NUM_TOKENS); the API takes no tile argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from wna16moe.config import Activation, MoEQuantConfig, ParallelConfig, RoutingConfig, RoutingMethod
from wna16moe.device import DeviceInfo, Platform
from wna16moe.errors import BackendError, InvalidInputError, UnsupportedError
from wna16moe.experts.base import (
    OK,
    Check,
    Experts,
    LayerSpec,
    check_member,
    dtype_label,
    fail,
    labels,
    relative_error,
)
from wna16moe.experts.emulation import EmulationExperts
from wna16moe.quantized import QuantizedExperts, QuantizedWeight
from wna16moe.routing import route
from wna16moe.scheme import WeightScheme

NAME = "flashinfer_trtllm"

# The TRT-LLM MxInt4 kernels are built for the SM10x family (B200 sm_100, B300 sm_103); SM12x (RTX 50xx)
# is a different family. Some FlashInfer builds ship sm_100-only cubins, so sm_103 can still fail to load.
ARCHS = (100, 103)
_ARCH_NAMES = " or ".join(f"sm_{sm}" for sm in ARCHS)
REQUIRED_PACKAGES = ("flashinfer",)
# The one weight format the kernel reads: int4, symmetric, one bf16 scale per 32 inputs.
BITS = 4
GROUP_SIZE = 32
SCALE_DTYPE = torch.bfloat16
# The kernel takes bf16 activations only (vLLM asserts it inside the wrapper).
ACT_DTYPES = (torch.bfloat16,)
# Plain silu(gate) * up is all the kernel computes (no alpha, beta or clamp are passed).
ACTIVATIONS = (Activation.SILU,)
# Weights are stored BlockMajorK: K split into 128-byte blocks of 256 int4 values, for both GEMMs
# (GEMM1's K is H, GEMM2's K is I/tp).
K_BLOCK = 256
K_BLOCK_BYTES = K_BLOCK // 2
# Epilogue shuffle: epilogue_tile_m = 128 permutes rows within blocks of 32.
SHUFFLE_BLOCK = 32
# Scale swizzle tiles: 128 rows (as 4 x 32) by 4 columns.
SF_TILE_ROWS, SF_TILE_SUB_ROWS, SF_TILE_COLS = 128, 32, 4
# Router-logit dtypes per routing method: bf16 for all; DeepSeek-V3 routing also reads fp32 logits.
LOGITS_DTYPES: dict[RoutingMethod, tuple[torch.dtype, ...]] = {
    RoutingMethod.SOFTMAX: (torch.bfloat16,),
    RoutingMethod.SIGMOID: (torch.bfloat16,),
    RoutingMethod.DEEPSEEK_V3: (torch.bfloat16, torch.float32),
}
# FlashInfer's RoutingMethodType values for the routing each of our methods is accepted as (supports_routing):
# Renormalize (TopK -> Softmax, the same weights as softmax -> top-k -> renormalize), DeepSeekV3, Llama4.
ROUTING_METHOD_TYPES: dict[RoutingMethod, int] = {
    RoutingMethod.SOFTMAX: 1,
    RoutingMethod.DEEPSEEK_V3: 2,
    RoutingMethod.SIGMOID: 3,
}
# Largest token count FlashInfer's autotuner tunes the kernel's tiles for (vLLM's value).
TUNE_MAX_NUM_TOKENS = 8192
# What `explain` adds to this kernel's verdict when it passes every check.
CAVEAT = ("caveat: never run on SM100 hardware by wna16moe's developers; each configuration is checked against "
          "EMULATION on a few tokens when its first layer is built, and refuses to run if they disagree")
# Self-check: tokens compared, the candidate tokens they are drawn from (those whose routing has no near-tie),
# the logit perturbation a kept token's expert choice must survive and the random sign patterns it is probed with,
# and the largest relative (Frobenius) error accepted. The kernel reads bf16 activations and weights and writes a
# bf16 intermediate, like the CPU and Triton backends (about 4e-3 against EMULATION); a layout or convention mistake
# gives errors near 1.
SELF_CHECK_TOKENS = 4
SELF_CHECK_CANDIDATES = 64
SELF_CHECK_MARGIN = 0.05
SELF_CHECK_PROBES = 16
SELF_CHECK_RTOL = 3e-2
SELF_CHECK_SEED = 0
# (device, layer spec) -> None (passed) or the failure message, for this process.
_SELF_CHECKS: dict[tuple[str, LayerSpec], str | None] = {}


# ----- layout: row permutations ------------------------------------------------------------------------------

def shuffle_destination(row: torch.Tensor) -> torch.Tensor:
    """Epilogue shuffle: where source row `row` goes; within each 32-row block t -> 8 * (t % 4) + t // 4."""
    t = row % SHUFFLE_BLOCK
    return row - t + 8 * (t % 4) + t // 4


def shuffle_source(row: torch.Tensor) -> torch.Tensor:
    """Inverse of `shuffle_destination`: the source row that lands on `row` (d -> 4 * (d % 8) + d // 8)."""
    d = row % SHUFFLE_BLOCK
    return row - d + 4 * (d % 8) + d // 8


def gemm1_row_sources(rows: int) -> torch.Tensor:
    """int64 [2I]: the canonical w13 row ([gate; up], gate rows first) stored at each row of the kernel's w13.

    Row j after the gated interleave holds up_{j//2} (j even) or gate_{j//2} (j odd); the epilogue shuffle
    then puts row j at shuffle_destination(j).
    """
    if rows % (2 * SHUFFLE_BLOCK):
        raise InvalidInputError(f"w13 needs a multiple of {2 * SHUFFLE_BLOCK} rows (2I), got {rows}")
    interleaved = shuffle_source(torch.arange(rows))
    half = rows // 2
    return torch.where(interleaved % 2 == 0, half + interleaved // 2, interleaved // 2)


def gemm2_row_sources(rows: int) -> torch.Tensor:
    """int64 [H]: the canonical w2 row stored at each row of the kernel's w2 (the epilogue shuffle only)."""
    if rows % SHUFFLE_BLOCK:
        raise InvalidInputError(f"w2 needs a multiple of {SHUFFLE_BLOCK} rows (H), got {rows}")
    return shuffle_source(torch.arange(rows))


# ----- layout: bytes and scales ------------------------------------------------------------------------------

def pack_signed_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] unsigned codes (w = (q - 8) * s) -> uint8 [..., K/2] two's-complement nibbles, input 2j
    in the low nibble of byte j."""
    signed = codes ^ 8  # (q - 8) & 0xF
    return signed[..., 0::2] | (signed[..., 1::2] << 4)


def unpack_signed_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_signed_nibbles`: uint8 [..., K/2] -> unsigned codes uint8 [..., K]."""
    low, high = packed & 0xF, packed >> 4
    return (torch.stack([low, high], dim=-1) ^ 8).flatten(-2)


def to_block_major_k(rows: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> [K/256, N, 128]: 128-byte K blocks outermost (BlockMajorK)."""
    n, kb = rows.shape
    return rows.view(n, kb // K_BLOCK_BYTES, K_BLOCK_BYTES).transpose(0, 1)


def from_block_major_k(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_block_major_k`: [K/256, N, 128] -> [N, K/2]."""
    nb, n, width = blocks.shape
    return blocks.transpose(0, 1).reshape(n, nb * width)


def _check_swizzle_shape(scales: torch.Tensor) -> tuple[int, int]:
    rows, cols = scales.shape
    if rows % SF_TILE_ROWS or cols % SF_TILE_COLS:
        raise InvalidInputError(f"scales [R, C] need R % {SF_TILE_ROWS} == 0 and C % {SF_TILE_COLS} == 0 for the "
                                f"unpadded swizzle, got {list(scales.shape)}")
    return rows, cols


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """[R, C] scales -> the same shape holding FlashInfer's 128x4 swizzled order (R % 128 == 0, C % 4 == 0).

    Row r = 128 * rt + 32 * r1 + r0 and column c = 4 * ct + c0 go to flat position
    ((((rt * C/4 + ct) * 32 + r0) * 4 + r1) * 4 + c0).
    """
    rows, cols = _check_swizzle_shape(scales)
    tiles = scales.reshape(rows // SF_TILE_ROWS, SF_TILE_ROWS // SF_TILE_SUB_ROWS, SF_TILE_SUB_ROWS,
                           cols // SF_TILE_COLS, SF_TILE_COLS)  # (rt, r1, r0, ct, c0)
    return tiles.permute(0, 3, 2, 1, 4).reshape(rows, cols)


def unswizzle_scales(swizzled: torch.Tensor) -> torch.Tensor:
    """Inverse of `swizzle_scales`: [R, C] in swizzled order -> [R, C] row-major scales."""
    rows, cols = _check_swizzle_shape(swizzled)
    tiles = swizzled.reshape(rows // SF_TILE_ROWS, cols // SF_TILE_COLS, SF_TILE_SUB_ROWS,
                             SF_TILE_ROWS // SF_TILE_SUB_ROWS, SF_TILE_COLS)  # (rt, ct, r0, r1, c0)
    return tiles.permute(0, 3, 2, 1, 4).reshape(rows, cols)


# ----- converter and its inverse ----------------------------------------------------------------------------

def _prepare_projection(weight: QuantizedWeight, sources: torch.Tensor, name: str,
                        device: torch.device) -> dict[str, torch.Tensor]:
    e, n, k = weight.shape
    out = {
        name: torch.empty(e, k // K_BLOCK, n, K_BLOCK_BYTES, dtype=torch.uint8, device=device),
        f"{name}_scale": torch.empty(e, n, k // GROUP_SIZE, dtype=SCALE_DTYPE, device=device),
    }
    sources = sources.to(device)
    for expert in range(e):
        codes = weight.codes[expert].to(device).index_select(0, sources)
        out[name][expert] = to_block_major_k(pack_signed_nibbles(codes))
        scales = weight.scales[expert].to(device, SCALE_DTYPE).index_select(0, sources)
        out[f"{name}_scale"][expert] = swizzle_scales(scales)
    return out


def check_layout(experts_scheme: WeightScheme, hidden_size: int, intermediate_size: int) -> None:
    """Raise unless the kernel's layout can hold these experts (int4_g32_sym, H and I multiples of 256)."""
    s = experts_scheme
    if s.bits != BITS or s.group_size != GROUP_SIZE or s.zero_point or s.act_order:
        raise UnsupportedError(f"the FlashInfer MxInt4 layout holds int{BITS}_g{GROUP_SIZE}_sym weights only, got "
                               f"{s.name}")
    if hidden_size % K_BLOCK or intermediate_size % K_BLOCK:
        raise UnsupportedError(f"the FlashInfer MxInt4 layout needs H and I to be multiples of {K_BLOCK}, got "
                               f"H={hidden_size}, I={intermediate_size}")


def prepare_flashinfer_weights(experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
    """Pure converter from canonical experts to the MxInt4 layout (module docstring), on `device`.

    Expert by expert into preallocated tensors: extra memory is one expert's permuted codes and scales.
    Raises `UnsupportedError` for schemes and shapes the layout cannot hold.
    """
    h, i = experts.hidden_size, experts.intermediate_size
    check_layout(experts.scheme, h, i)
    out = _prepare_projection(experts.w13, gemm1_row_sources(2 * i), "w13", device)
    out.update(_prepare_projection(experts.w2, gemm2_row_sources(h), "w2", device))
    return out


def _canonical_projection(blocks: torch.Tensor, scales: torch.Tensor, sources: torch.Tensor,
                          experts: Sequence[int]) -> QuantizedWeight:
    _, kb, n, _ = blocks.shape
    codes = torch.empty(len(experts), n, kb * K_BLOCK, dtype=torch.uint8, device=blocks.device)
    canonical_scales = torch.empty(len(experts), *scales.shape[1:], dtype=SCALE_DTYPE, device=scales.device)
    sources = sources.to(blocks.device)
    for out, expert in enumerate(experts):
        codes[out, sources] = unpack_signed_nibbles(from_block_major_k(blocks[expert]))
        canonical_scales[out, sources] = unswizzle_scales(scales[expert])
    return QuantizedWeight(WeightScheme(BITS, GROUP_SIZE, scale_dtype=SCALE_DTYPE), codes, canonical_scales)


def flashinfer_to_canonical(prepared: dict[str, torch.Tensor],
                            experts: Sequence[int] | None = None) -> QuantizedExperts:
    """Inverse of `prepare_flashinfer_weights`: canonical experts (bf16 scales) from the four prepared tensors;
    all of them, or only `experts` (in that order, so a check reads back one expert without the whole layer)."""
    for key in ("w13", "w13_scale", "w2", "w2_scale"):
        if key not in prepared:
            raise InvalidInputError(f"prepared FlashInfer weights lack {key!r}; got {sorted(prepared)}")
    chosen = list(range(prepared["w13"].shape[0])) if experts is None else list(experts)
    w13 = _canonical_projection(prepared["w13"], prepared["w13_scale"], gemm1_row_sources(prepared["w13"].shape[2]),
                                chosen)
    w2 = _canonical_projection(prepared["w2"], prepared["w2_scale"], gemm2_row_sources(prepared["w2"].shape[2]),
                               chosen)
    return QuantizedExperts(w13, w2)


# ----- the self-check -----------------------------------------------------------------------------------------

def kernel_function() -> Callable[..., list[torch.Tensor]]:
    """FlashInfer's `trtllm_mxint4_block_scale_moe` (imported at first use: flashinfer probes the GPU on import)."""
    from flashinfer.fused_moe import trtllm_mxint4_block_scale_moe

    return trtllm_mxint4_block_scale_moe


def untied_router_logits(routing: RoutingConfig, top_k: int, num_experts: int, correction_bias: torch.Tensor | None,
                         dtype: torch.dtype, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Router logits [tokens, E] (CPU, `dtype`) whose chosen experts stay the same when every logit moves by up to
    about SELF_CHECK_MARGIN and when the correction bias is rounded to bf16 (as the kernel receives it), so the
    kernel's routing and `wna16moe.routing` cannot split on a near-tie, which would read as a false alarm.
    Probed with SELF_CHECK_PROBES patterns of +-SELF_CHECK_MARGIN per logit, each added and subtracted: two experts
    within twice the margin of a tie move apart against their order under half of them, so such a row survives all
    with probability 2^-PROBES. (Gaussian probes of the same scale kept a row whose two experts were 0.027 apart in
    logit, which a 0.01-scale move then split.)

    Drawn from SELF_CHECK_CANDIDATES random rows; if fewer rows than `tokens` qualify, the first candidates
    make up the rest (a split then fails the check loudly rather than passing it quietly).
    """
    candidates = (torch.randn(SELF_CHECK_CANDIDATES, num_experts, generator=generator) * 2).to(dtype)
    base = candidates.float()
    bias = None if correction_bias is None else correction_bias.detach().float().cpu()
    variants = [(base, bias)] + ([(base, bias.to(torch.bfloat16).float())] if bias is not None else [])
    for _ in range(SELF_CHECK_PROBES):
        noise = (torch.randint(0, 2, base.shape, generator=generator) * 2 - 1) * SELF_CHECK_MARGIN
        variants += [(base + noise, bias), (base - noise, bias)]
    chosen = [route(logits, routing, top_k, b)[1].sort(dim=1).values for logits, b in variants]
    stable = torch.stack([ids == chosen[0] for ids in chosen]).all(dim=0).all(dim=1)
    rows = torch.cat([stable.nonzero().squeeze(1), (~stable).nonzero().squeeze(1)])[:tokens]
    return candidates[rows]


class FlashInferTrtllmExperts(Experts):
    """FlashInfer TRT-LLM MxInt4 MoE: int4 g32 symmetric, bf16, SiLU, fused routing. Never run on hardware by
    us: it checks itself against EMULATION before its first output (`self_check`, module docstring)."""

    NAME = NAME
    MONOLITHIC = True
    CAVEAT = CAVEAT

    def __init__(self, spec: LayerSpec, quant: MoEQuantConfig, device: torch.device) -> None:
        super().__init__(spec, quant, device)
        self.checked = False  # set by a passing self_check

    @classmethod
    def supports_device(cls, device: DeviceInfo) -> Check:
        if device.platform != Platform.CUDA:
            return fail(f"needs a CUDA device of compute capability {_ARCH_NAMES}, got {device.name} "
                        f"({device.platform.value})")
        if device.sm not in ARCHS:
            return fail(f"needs compute capability {_ARCH_NAMES} (the SM10x family), got sm_{device.sm} "
                        f"({device.name})")
        missing = [p for p in REQUIRED_PACKAGES if not device.has_package(p)]
        if missing:
            return fail(f"needs the {', '.join(missing)} package (with TRT-LLM fused MoE), which is not importable")
        return OK

    @classmethod
    def supports_scheme(cls, scheme: WeightScheme, act_dtype: torch.dtype) -> Check:
        wanted = f"int{BITS}_g{GROUP_SIZE}_sym"
        if scheme.bits != BITS or scheme.group_size != GROUP_SIZE or scheme.zero_point or scheme.act_order:
            return fail(f"weight scheme {scheme.name} is not supported; the kernel reads only {wanted} (int4, "
                        f"symmetric, group_size {GROUP_SIZE}, no act-order)")
        return check_member(act_dtype, ACT_DTYPES, "activation dtype")

    @classmethod
    def supports_activation(cls, activation: Activation) -> Check:
        if activation == Activation.SWIGLU_OAI:
            return fail("activation swiglu_oai is not supported: the kernel computes plain silu(gate) * up and "
                        "would drop SwiGLU-OAI's alpha, beta and limit; expected silu")
        if activation not in ACTIVATIONS:
            return fail(f"activation {activation.value} is not supported; expected {labels(ACTIVATIONS)}")
        return OK

    @classmethod
    def supports_routing(cls, routing: RoutingConfig, top_k: int, logits_dtype: torch.dtype | None) -> Check:
        method = routing.method
        # Our three methods map to the kernel's Renormalize, Llama4 and DeepSeekV3 routing; anything those
        # do not compute exactly is rejected rather than approximated.
        if method == RoutingMethod.SOFTMAX and not routing.renormalize:
            return fail("softmax routing without renormalization is not supported; the kernel's Renormalize "
                        "routing always renormalizes the top-k weights")
        if method == RoutingMethod.SIGMOID and (top_k != 1 or routing.renormalize):
            return fail(f"sigmoid routing is supported only as Llama-4 routing (top_k=1, no renormalization), got "
                        f"top_k={top_k}, renormalize={routing.renormalize}")
        if method == RoutingMethod.DEEPSEEK_V3 and not routing.renormalize:
            return fail("deepseek_v3 routing without renormalization is not supported; the kernel's DeepSeekV3 "
                        "routing always renormalizes")
        # Only the kernel's DeepSeekV3 routing has a scaling step; elsewhere the factor would be dropped.
        if method != RoutingMethod.DEEPSEEK_V3 and routing.routed_scaling_factor != 1.0:
            return fail(f"routed_scaling_factor={routing.routed_scaling_factor} is supported only with deepseek_v3 "
                        f"routing, got {method.value}")
        allowed = LOGITS_DTYPES[method]
        if logits_dtype is not None and logits_dtype not in allowed:
            return fail(f"router logits dtype {dtype_label(logits_dtype)} is not supported with {method.value} "
                        f"routing; expected {labels(allowed)}")
        return OK

    @classmethod
    def supports_parallel(cls, parallel: ParallelConfig) -> Check:
        if parallel.use_ep:
            return fail(f"expert parallelism (ep_size={parallel.ep_size}) is not supported: the kernel takes no "
                        "expert map and this library does not model its contiguous expert offset; use tp_size "
                        "instead")
        return OK

    @classmethod
    def supports_shape(cls, spec: LayerSpec) -> Check:
        h, i = spec.moe.hidden_size, spec.intermediate_per_shard
        if h % K_BLOCK or i % K_BLOCK:
            return fail(f"H and I/tp must be multiples of {K_BLOCK} (whole 256-element K blocks in the kernel's "
                        f"weight layout), got H={h}, I/tp={i}")
        return OK

    @classmethod
    def supports_extras(cls, has_bias: bool, clamp_limit: float | None, activation: Activation) -> Check:
        if has_bias:
            return fail("expert bias is not supported: the kernel takes no bias")
        if clamp_limit is not None:
            return fail(f"the SwiGLU clamp limit ({clamp_limit}) is not supported: the kernel computes unclamped "
                        "silu(gate) * up")
        return OK

    @classmethod
    def prepare_weights(cls, experts: QuantizedExperts, device: torch.device) -> dict[str, torch.Tensor]:
        return prepare_flashinfer_weights(experts, device)

    def apply_monolithic(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                         weights: dict[str, torch.Tensor], correction_bias: torch.Tensor | None) -> torch.Tensor:
        """hidden_states [T, H] bf16, router_logits [T, E] (bf16; fp32 too with DeepSeekV3), correction_bias [E]
        (DeepSeekV3; passed as bf16, as vLLM does) -> [T, H] bf16: routing, both GEMMs, SwiGLU and the
        weighted top-k sum (including routed_scaling_factor) in one FlashInfer call. Runs `self_check` first
        if nothing has yet."""
        if not self.checked:
            self.self_check(weights, correction_bias)
        return self._call(hidden_states, router_logits, weights, correction_bias)

    def _call(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: dict[str, torch.Tensor],
              correction_bias: torch.Tensor | None) -> torch.Tensor:
        moe, routing = self.moe, self.moe.routing
        deepseek = routing.method == RoutingMethod.DEEPSEEK_V3
        outputs = kernel_function()(
            routing_logits=router_logits,
            routing_bias=None if correction_bias is None else correction_bias.to(torch.bfloat16),
            hidden_states=hidden_states,
            gemm1_weights=weights["w13"],
            gemm1_weights_scale=weights["w13_scale"],
            gemm1_alpha=None,
            gemm1_beta=None,
            gemm1_clamp_limit=None,
            gemm2_weights=weights["w2"],
            gemm2_weights_scale=weights["w2_scale"],
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            n_group=routing.n_group if deepseek else None,
            topk_group=routing.topk_group if deepseek else None,
            intermediate_size=self.spec.intermediate_per_shard,
            # supports_parallel rejects EP: this rank holds every expert.
            local_expert_offset=0,
            local_num_experts=moe.num_experts,
            routed_scaling_factor=routing.routed_scaling_factor if deepseek else None,
            routing_method_type=ROUTING_METHOD_TYPES[routing.method],
            tune_max_num_tokens=TUNE_MAX_NUM_TOKENS,
        )
        return outputs[0]

    def self_check(self, weights: dict[str, torch.Tensor], correction_bias: torch.Tensor | None) -> None:
        """Compare the kernel with EMULATION on SELF_CHECK_TOKENS tokens through these prepared weights, once per
        process for each (device, layer spec); raise `BackendError` (then at every later call for that
        configuration) when the relative error exceeds SELF_CHECK_RTOL.

        The tokens and router logits (chosen free of routing near-ties) come from a private generator, so the
        caller's random state is untouched. The reference routes with `wna16moe.routing` and runs EMULATION on
        each chosen expert read back through `flashinfer_to_canonical`, one expert at a time (bounded memory).
        """
        key = (str(weights["w13"].device), self.spec)
        if key not in _SELF_CHECKS:
            _SELF_CHECKS[key] = self._self_check_failure(weights, correction_bias)
        failure = _SELF_CHECKS[key]
        if failure is not None:
            raise BackendError(failure)
        self.checked = True

    def _self_check_failure(self, weights: dict[str, torch.Tensor], correction_bias: torch.Tensor | None) -> str | None:
        """None when the kernel agrees with EMULATION, else the message of the error to raise."""
        moe = self.moe
        device = weights["w13"].device
        generator = torch.Generator().manual_seed(SELF_CHECK_SEED)
        hidden = torch.randn(SELF_CHECK_TOKENS, moe.hidden_size, generator=generator).to(device, torch.bfloat16)
        logits = untied_router_logits(moe.routing, moe.top_k, moe.num_experts, correction_bias, self.spec.logits_dtype,
                                      SELF_CHECK_TOKENS, generator).to(device)
        layer = (f"{SELF_CHECK_TOKENS} tokens through this layer's weights (E={moe.num_experts} top_k={moe.top_k} "
                 f"H={moe.hidden_size} I/tp={self.spec.intermediate_per_shard}, {moe.routing.method.value} routing)")
        advice = ("This backend has never been run on hardware by wna16moe's developers; its outputs are not used. "
                  "Force another backend with WNA16MOE_BACKEND (e.g. WNA16MOE_BACKEND=marlin or "
                  "WNA16MOE_BACKEND=triton), and please report this error")
        with torch.no_grad():
            try:
                out = self._call(hidden, logits, weights, correction_bias).float()
            except Exception as error:  # FlashInfer's own failure (no cubin for this GPU, a rejected argument, ...)
                return (f"{NAME} (FlashInfer's trtllm_mxint4_block_scale_moe) failed its self-check on {device}: "
                        f"the call on {layer} raised {type(error).__name__}: {error}. {advice}")
            want = self._reference(hidden, logits, weights, correction_bias)
        err = relative_error(out, want)
        if err <= SELF_CHECK_RTOL:  # False for NaN
            return None
        return (f"{NAME} (FlashInfer's trtllm_mxint4_block_scale_moe) failed its self-check on {device}: on {layer} "
                f"its output differs from EMULATION's by a relative error of {err:.3g} (at most {SELF_CHECK_RTOL:g} "
                f"expected), so its weight layout or call is likely wrong for this FlashInfer build. {advice}")

    def _reference(self, hidden: torch.Tensor, logits: torch.Tensor, weights: dict[str, torch.Tensor],
                   correction_bias: torch.Tensor | None) -> torch.Tensor:
        """float32 [T, H]: `wna16moe.routing` and EMULATION on each routed expert of the prepared weights."""
        topk_weights, topk_ids = route(logits, self.moe.routing, self.moe.top_k, correction_bias)
        # Canonical weights read back from the prepared layout carry bf16 scales (what the kernel reads).
        emulation = EmulationExperts(LayerSpec(self.moe, WeightScheme(BITS, GROUP_SIZE, scale_dtype=SCALE_DTYPE),
                                               self.spec.parallel), self.quant, hidden.device)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for expert in torch.unique(topk_ids).tolist():
            token, slot = torch.nonzero(topk_ids == expert, as_tuple=True)
            one = EmulationExperts.prepare_weights(flashinfer_to_canonical(weights, [expert]), hidden.device)
            local = torch.zeros(token.numel(), 1, dtype=torch.int32, device=hidden.device)
            out.index_add_(0, token, emulation.apply(hidden[token].float(), topk_weights[token, slot].unsqueeze(1),
                                                     local, one))
        return out
