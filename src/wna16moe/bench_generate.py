"""Decode speed of a whole Qwen3-MoE-shaped model through `wna16moe.hf` against stock transformers in bf16:
`python -m wna16moe.bench_generate [--layers 8] [--batch 1 8] [--modes eager compile] [--out DIR_OR_FILE]`
(defaults shown; about 2.5 minutes on one H100 or H200).

What is built (no network, no tokenizer: prompts are random token ids):

1. A Qwen3-30B-A3B-shaped `Qwen3MoeForCausalLM` (hidden 2048, 128 experts of 768, top-8, 32 heads / 4 kv
   heads of 128, vocab 151936) with `--layers` of its 48 decoder layers, random weights (transformers' own
   init, seeded), built in bf16 directly on the device.
2. Its routed experts quantized by round-to-nearest to int4, group 128, symmetric, bf16 scales, and written
   with the library's writers (`wna16moe.formats`) as a compressed-tensors `pack-quantized` checkpoint in a
   temporary directory. Everything else (attention, router, norms, embeddings, lm_head) is stored in bf16
   and listed in `quantization_config.ignore`, as llm-compressor checkpoints that quantize only the experts
   are. No bf16 copy of the experts is written.
3. The stock model's experts are then overwritten with the dequantized int4 weights, so the bf16 peer is
   stock transformers running *the same function* as the quantized model (its speed does not depend on the
   values). Before timing, each MoE block of the quantized model is run on the stock model's own block inputs
   and compared with its outputs, and the logits of both over the stock model's greedy continuation.

Measured per model, mode and batch: greedy `generate` with `cache_implementation="static"`, one warm-up call
with the same arguments, then `--repeats` timed calls of `--new-tokens + 1` new tokens. A streamer stamps
each emitted token (after `torch.cuda.synchronize()`, with `time.perf_counter`); decode time is from the
first new token (the end of the prefill, excluded) to the last, so it covers exactly `--new-tokens` decode
steps. The median call (by decode time) is reported. Modes: `eager` (generate's auto-compile disabled) and
`compile` (generate's own auto-compile of the decode step: torch.compile with its default CompileConfig,
mode="reduce-overhead", i.e. CUDA graphs, fullgraph=False; graph breaks and CUDA-graph skips are counted).
Memory: the model's parameter and buffer bytes, and `torch.cuda.max_memory_allocated` over the warm-up and
timed calls (only that model on the GPU: the bf16 model waits in host memory while the quantized one runs).
On CUDA, every MoE block (router and experts) of each model is also timed alone at each batch size, eagerly
and from a CUDA graph (CUDA events, all layers in turn), which tells the experts' share of a decode step.

Stages print their progress with timings as they go, a failing stage is recorded and the next one runs, and
the JSON is rewritten after every stage, so a truncated run still leaves what it measured. `--tiny` builds
a small model of the same architecture that runs on CPU in seconds (the test's configuration).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.generation.streamers import BaseStreamer

from wna16moe.bench import commit_id
from wna16moe.experts.base import relative_error
from wna16moe.formats import HF_NAMING, CheckpointFormat, quantization_config, write_experts
from wna16moe.hf.modules import PackedExperts, WNA16Linear
from wna16moe.hf.run import load_model, module_bytes
from wna16moe.quantized import QuantizedExperts
from wna16moe.scheme import WeightScheme

T = TypeVar("T")

FULL_LAYERS = 48  # Qwen3-30B-A3B
# What stays bf16 in the checkpoint (compressed-tensors `ignore`): every module but the routed experts.
IGNORE = ["lm_head", r"re:.*mlp\.gate$", r"re:.*self_attn\..*"]
# The quantized model against the stock model on the dequantized weights: both compute the same function, so
# what differs is bf16 rounding (kernel vs stock order of operations, bf16-rounded dequantized weights). Each
# MoE block, fed the stock model's own inputs, must agree to MOE_TOLERANCE (a wrong layout or scale gives
# errors of order 1; the bf16 weights *before* quantization differ by the int4 noise, about 0.1). Logits are
# checked end to end too, more loosely: rounding compounds over the layers, and with random weights the
# experts' share of the logits is small, so the logits alone would not catch much.
MOE_TOLERANCE = 2e-2
LOGITS_TOLERANCE = 5e-2
GIB = 1024**3


@dataclass(frozen=True)
class Dims:
    """The model's shape (a Qwen3-MoE config's fields)."""

    vocab: int
    hidden: int
    moe_intermediate: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int

    def config(self, layers: int) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, moe_intermediate_size=self.moe_intermediate,
            intermediate_size=3 * self.hidden, num_experts=self.experts, num_experts_per_tok=self.top_k,
            num_hidden_layers=layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim, max_position_embeddings=40960, rms_norm_eps=1e-6, norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
            decoder_sparse_step=1, mlp_only_layers=[], architectures=["Qwen3MoeForCausalLM"])


QWEN3_30B_A3B = Dims(vocab=151936, hidden=2048, moe_intermediate=768, experts=128, top_k=8, heads=32, kv_heads=4,
                     head_dim=128)
# Same architecture, small enough for a CPU test; K = 256 and 128 keep whole groups of 128.
TINY = Dims(vocab=512, hidden=256, moe_intermediate=128, experts=8, top_k=2, heads=4, kv_heads=2, head_dim=64)


def _human(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 8 else f"{nbytes / 2**20:.1f} MiB"


class Bench:
    """The run's results, its log and its stages. Each stage's outcome is kept and the JSON rewritten."""

    def __init__(self, result: dict[str, Any], out: Path, deadline_s: float | None) -> None:
        self.result = result
        self.out = out
        self.deadline_s = deadline_s
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=1))

    def stage(self, name: str, fn: Callable[[], T]) -> T | None:
        """Run one stage: its time and error (if any) are recorded; None when it failed or was skipped."""
        record: dict[str, Any] = {"stage": name}
        self.result["stages"].append(record)
        elapsed = time.perf_counter() - self.start
        if self.deadline_s is not None and elapsed > self.deadline_s:
            record.update(ok=False, skipped=f"past the {self.deadline_s:.0f} s deadline")
            self.log(f"{name}: skipped ({record['skipped']})")
            self.save()
            return None
        self.log(f"{name} ...")
        began = time.perf_counter()
        try:
            value = fn()
        except Exception as error:  # one stage's failure must not cost the other model's numbers
            record.update(ok=False, seconds=round(time.perf_counter() - began, 2),
                          error=f"{type(error).__name__}: {error}"[:2000])
            self.log(f"{name}: FAILED after {record['seconds']} s: {record['error'][:500]}")
            traceback.print_exc(limit=6)
            sys.stderr.flush()
            _free()
            self.save()
            return None
        record.update(ok=True, seconds=round(time.perf_counter() - began, 2))
        self.log(f"{name}: done in {record['seconds']} s")
        self.save()
        return value


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(BaseStreamer):
    """Stamps every `put` of `generate`: first the prompt, then each new token as it is chosen."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.tokens: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        _sync(self.device)  # generate already copied the tokens to the host; this makes the stamp certain
        self.times.append(time.perf_counter())
        self.tokens.append(value)

    def end(self) -> None:
        pass

    @property
    def decode_seconds(self) -> float:
        """From the first new token (prefill done) to the last."""
        return self.times[-1] - self.times[1]

    @property
    def decode_steps(self) -> int:
        return len(self.times) - 2

    @property
    def prefill_seconds(self) -> float:
        return self.times[1] - self.times[0]

    def step_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.times[1:-1], self.times[2:], strict=True)]


# ----- building the model and its checkpoint -----------------------------------------------------------------

def build_bf16(config: Qwen3MoeConfig, device: torch.device, seed: int) -> nn.Module:
    """The stock model with transformers' random init, allocated and initialized on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> its routed-experts module (`model.layers.N.mlp.experts`)."""
    return {i: layer.mlp.experts for i, layer in enumerate(model.model.layers)}


@torch.no_grad()
def write_checkpoint(model: nn.Module, scheme: WeightScheme, directory: Path, log: Callable[[str], None]
                     ) -> dict[str, Any]:
    """Quantize the model's experts into a compressed-tensors checkpoint at `directory` (one shard per layer's
    experts, one for the bf16 rest), and put the dequantized experts back into the model."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for index, experts in experts_modules(model).items():
        began = time.perf_counter()
        gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H] gate rows first, [E, H, I]
        quantized = QuantizedExperts.quantize(gate_up, down, scheme)
        tensors = {k: v.cpu() for k, v in write_experts(quantized, CheckpointFormat.COMPRESSED_TENSORS, index,
                                                       HF_NAMING).items()}
        shard = f"model-experts-{index:03d}.safetensors"
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
        # The bf16 peer runs what the checkpoint holds (one expert at a time: no float32 copy of the layer).
        for e in range(quantized.num_experts):
            gate_up[e].copy_(quantized.w13.dequantize(e))
            down[e].copy_(quantized.w2.dequantize(e))
        del quantized, tensors
        log(f"  layer {index}: experts quantized and written in {time.perf_counter() - began:.1f} s")
    rest = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    save_file(rest, directory / "model-dense.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "model-dense.safetensors"))
    total += sum(t.nbytes for t in rest.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config.update(dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"],
                  quantization_config=quantization_config(CheckpointFormat.COMPRESSED_TENSORS, scheme, IGNORE))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return {"path": str(directory), "bytes_on_disk": sum(f.stat().st_size for f in directory.iterdir()),
            "format": "compressed-tensors pack-quantized", "scheme": scheme.name, "ignore": IGNORE}


# ----- measuring -----------------------------------------------------------------------------------------------

def weights_report(model: nn.Module) -> dict[str, Any]:
    """Bytes the model holds (parameters and buffers), its experts' share, and how it runs them."""
    packed = [m for m in model.modules() if isinstance(m, PackedExperts)]
    report: dict[str, Any] = {"weights_bytes": module_bytes(model),
                              "attn_implementation": model.config._attn_implementation}
    if packed:
        report.update(
            experts_bytes=sum(module_bytes(m) for m in packed),
            experts_checkpoint_bytes=sum(p.nbytes for m in packed for p in m.parameters()),
            backends=sorted({m.selection.backend.value for m in packed}),
            kernels=sorted({m.selection.kernel.__name__ for m in packed}),
            quantized_dense_layers=sum(isinstance(m, WNA16Linear) for m in model.modules()))
    else:
        report.update(
            experts_bytes=sum(module_bytes(m) for m in experts_modules(model).values()),
            # generate switches grouped_mm to batched_mm for its decode steps on accelerators
            experts_implementation=model.config._experts_implementation)
    device = next(model.parameters()).device
    if device.type == "cuda":
        report["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
    return report


def _compile_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


@torch.no_grad()
def bench_generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, mode: str, repeats: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """One row: warm-up then `repeats` timed greedy static-cache `generate` calls of `prompts` [B, P]."""
    device = next(model.parameters()).device
    ids = prompts.to(device)
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens + 1, "do_sample": False,
              "cache_implementation": "static", "disable_compile": mode == "eager"}
    if mode == "compile":
        from torch._dynamo.utils import counters

        torch._dynamo.reset()  # a fresh compile for this batch size; frees earlier CUDA graphs
        counters.clear()
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
    _free()
    allocated_before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    warm = StepClock(device)
    model.generate(ids, streamer=warm, **kwargs)
    warmup_s = time.perf_counter() - began
    log(f"  warm-up generate {warmup_s:.1f} s ({warm.decode_steps / warm.decode_seconds:.1f} tok/s)")
    clocks = []
    for _ in range(repeats):
        clock = StepClock(device)
        began = time.perf_counter()
        out = model.generate(ids, streamer=clock, **kwargs)
        _sync(device)
        clock.total_seconds = time.perf_counter() - began  # type: ignore[attr-defined]
        clocks.append(clock)
        log(f"  decode {clock.decode_steps} steps in {clock.decode_seconds * 1e3:.1f} ms "
            f"({clock.decode_steps / clock.decode_seconds:.1f} tok/s per sequence)")
    clock = sorted(clocks, key=lambda c: c.decode_seconds)[len(clocks) // 2]
    per_sequence = clock.decode_steps / clock.decode_seconds
    steps = clock.step_ms()
    row: dict[str, Any] = {
        "batch": ids.shape[0], "prompt_tokens": ids.shape[1], "decode_steps": clock.decode_steps,
        "decode_tokens_per_s": round(per_sequence, 2),
        "decode_tokens_per_s_total": round(per_sequence * ids.shape[0], 2),
        "ms_per_step_median": round(statistics.median(steps), 3),
        "decode_tokens_per_s_median_step": round(1e3 / statistics.median(steps), 2),
        # A slow first step or outliers (a CUDA-graph re-recording, say) show here, not in the median.
        "ms_first_step": round(steps[0], 3), "ms_per_step_max": round(max(steps), 3),
        "decode_s_runs": [round(c.decode_seconds, 5) for c in clocks],
        "prefill_ms": round(clock.prefill_seconds * 1e3, 2),
        "generate_s": round(clock.total_seconds, 4),  # type: ignore[attr-defined]
        "warmup_s": round(warmup_s, 2),
        "first_ids": out[0, ids.shape[1]:ids.shape[1] + 16].tolist(),
    }
    if device.type == "cuda":
        row.update(peak_bytes=torch.cuda.max_memory_allocated(device), peak_kind="CUDA max allocated",
                   allocated_before_bytes=allocated_before)
    else:
        row.update(peak_bytes=None, peak_kind="not measured on CPU")
    if mode == "compile":
        row["compiled"] = hasattr(model, "_compiled_call")  # generate took its auto-compile path
        row.update(_compile_counters())
    return row


@torch.no_grad()
def bench_moe_blocks(model: nn.Module, tokens: int, reps: int = 50) -> dict[str, Any]:
    """Median µs per layer of every MoE block (router and experts) of the model run one after the other on
    random [1, tokens, H] bf16 inputs, eagerly and replayed from one CUDA graph. All layers in turn, so the
    weights come from HBM as in a decode step, not from L2. The stock model runs the experts implementation
    generate uses for decoding (batched_mm where it would switch grouped_mm to it)."""
    device = next(model.parameters()).device
    blocks = [layer.mlp for layer in model.model.layers]
    x = torch.randn(1, tokens, model.config.hidden_size, dtype=torch.bfloat16, device=device)
    previous = model.config._experts_implementation
    decode = "batched_mm" if previous == "grouped_mm" else previous
    report: dict[str, Any] = {"tokens": tokens, "layers": len(blocks)}
    if not any(isinstance(m, PackedExperts) for m in model.modules()):
        report["experts_implementation"] = decode
        model.set_experts_implementation(decode)

    def run() -> None:
        for block in blocks:
            block(x)

    def median_us(fn: Callable[[], None]) -> float:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / len(blocks)

    try:
        for _ in range(3):
            run()
        report["eager_us_per_layer"] = round(median_us(run), 2)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # capture warm-up off the default stream, as CUDA graphs need
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            report["graph_us_per_layer"] = round(median_us(graph.replay), 2)
        except Exception as error:  # the eager number still stands
            report["graph_error"] = f"{type(error).__name__}: {error}"[:500]
        finally:
            del graph
    finally:
        if previous != model.config._experts_implementation:
            model.set_experts_implementation(previous)
    return report


@torch.no_grad()
def reference_forward(model: nn.Module, sequence: torch.Tensor, positions: slice
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One uncached forward over `sequence` [1, T]: float32 logits at `positions` and every MoE block's
    (input, output), all on the host."""
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        output = output[0] if isinstance(output, tuple) else output
        blocks.append((args[0].detach().cpu(), output.detach().cpu()))

    hooks = [layer.mlp.register_forward_hook(keep) for layer in model.model.layers]
    try:
        logits = forward_logits(model, sequence, positions)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, blocks


@torch.no_grad()
def forward_logits(model: nn.Module, sequence: torch.Tensor, positions: slice) -> torch.Tensor:
    """float32 logits of one uncached forward over `sequence` [1, T], at `positions`, on the host."""
    device = next(model.parameters()).device
    return model(sequence.to(device)).logits[0, positions].float().cpu()


@torch.no_grad()
def check_model(model: nn.Module, sequence: torch.Tensor, positions: slice, reference: torch.Tensor,
                blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """`model` against the reference forward: each MoE block (router and experts) on the reference's own
    input, and the logits over `sequence`, with the share of positions whose argmax is the reference's greedy
    token (the token that follows in `sequence`)."""
    device = next(model.parameters()).device
    moe = [relative_error(layer.mlp(inp.to(device)).cpu(), out) for layer, (inp, out) in zip(
        model.model.layers, blocks, strict=True)]
    logits = forward_logits(model, sequence, positions)
    targets = sequence[0, positions.start + 1:]
    agree = (logits[: len(targets)].argmax(-1) == targets).float().mean().item() if len(targets) else 1.0
    logits_err = relative_error(logits, reference)
    return {"moe_rel_err_max": float(f"{max(moe):.3e}"), "moe_rel_err_per_layer": [float(f"{e:.3e}") for e in moe],
            "moe_tolerance": MOE_TOLERANCE, "positions": logits.shape[0], "logits_rel_err": float(f"{logits_err:.3e}"),
            "logits_max_abs_err": float(f"{(logits - reference).abs().max().item():.3e}"),
            "logits_abs_max": float(f"{reference.abs().max().item():.3e}"), "logits_tolerance": LOGITS_TOLERANCE,
            "argmax_agreement": round(agree, 4),
            "ok": bool(max(moe) < MOE_TOLERANCE and logits_err < LOGITS_TOLERANCE)}


# ----- the run -------------------------------------------------------------------------------------------------

def _bench_model(bench: Bench, model: nn.Module, label: str, backend: str, args: argparse.Namespace,
                 prompts: torch.Tensor) -> None:
    if next(model.parameters()).device.type == "cuda":
        for batch in args.batch:
            blocks = bench.stage(f"{label} MoE blocks alone, {batch} token(s)",
                                 lambda batch=batch: bench_moe_blocks(model, batch))
            if blocks is not None:
                bench.result["moe_blocks"].append({"model": label, "backend": backend, **blocks})
                bench.log(f"  {blocks.get('eager_us_per_layer')} µs per layer eager, "
                          f"{blocks.get('graph_us_per_layer', blocks.get('graph_error'))} µs per layer in a CUDA graph")
    for mode in args.modes:
        for batch in args.batch:
            row = bench.stage(f"{label} {mode} batch {batch}",
                              lambda mode=mode, batch=batch: bench_generate(
                                  model, prompts[:batch], args.new_tokens, mode, args.repeats, bench.log))
            if row is not None:
                bench.result["rows"].append({"model": label, "backend": backend, "mode": mode, **row})
                bench.save()


def _default_out(card: str, date: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in card.replace(" ", "_"))
    return f"{safe}-generate-{date}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wna16moe.bench_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help=f"decoder layers of the {FULL_LAYERS} (default 8; --tiny 2)")
    parser.add_argument("--tiny", action="store_true", help="small dims of the same architecture (CPU test)")
    parser.add_argument("--new-tokens", type=int, default=128, help="timed decode steps per call (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt ids per sequence (default 16)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--modes", nargs="+", choices=("eager", "compile"),
                        help="default: eager compile on CUDA, eager elsewhere (generate compiles on accelerators)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per row (median; default 3)")
    parser.add_argument("--backend", help="wna16moe backend of the experts (default triton on CUDA, else auto)")
    parser.add_argument("--models", nargs="+", choices=("wna16moe", "bf16"), default=["wna16moe", "bf16"])
    parser.add_argument("--check-tokens", type=int, default=8,
                        help="greedy tokens of the bf16 model over which the logits are compared (default 8)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint is written (default: a temp dir, removed)")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="skip stages that would start later than this many seconds into the run (default 540)")
    parser.add_argument("--out", type=Path, help="JSON file, or a directory for the default name "
                                                 "(default benchmarks/results/<card>-generate-<date>.json)")
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 8)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.repeats < 1 or min(args.batch) < 1:
        parser.error("--new-tokens >= 2, --prompt-tokens >= 1, --repeats >= 1 and batch sizes >= 1 are needed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = args.modes or (["eager", "compile"] if device.type == "cuda" else ["eager"])
    args.modes = modes
    backend = args.backend or ("triton" if device.type == "cuda" else "auto")
    dims = TINY if args.tiny else QWEN3_30B_A3B
    scheme = WeightScheme(4, args.group_size)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    out = args.out or Path("benchmarks/results")
    if out.suffix != ".json":  # a directory (existing or not): the default name inside it
        out = out / _default_out(card, date)
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    result: dict[str, Any] = {
        "benchmark": "generate decode", "card": card, "device": str(device), "date": date, "commit": commit_id(),
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
        "python": platform.python_version(),
        "command": "python -m wna16moe.bench_generate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"model": "Qwen3-MoE" + (" (tiny)" if args.tiny else ", Qwen3-30B-A3B dims"),
                   "layers": args.layers, "full_layers": None if args.tiny else FULL_LAYERS,
                   "vocab": dims.vocab, "hidden": dims.hidden, "moe_intermediate": dims.moe_intermediate,
                   "experts": dims.experts, "top_k": dims.top_k, "heads": dims.heads, "kv_heads": dims.kv_heads,
                   "head_dim": dims.head_dim, "scheme": scheme.name, "scale_dtype": "bfloat16",
                   "dense_layers": "bf16 (compressed-tensors ignore)", "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "batches": args.batch, "modes": modes, "repeats": args.repeats,
                   "backend": backend, "seed": args.seed, "cache_implementation": "static", "greedy": True},
        "method": {
            "bf16_weights": "stock transformers bf16 model whose experts hold the dequantized int4 weights (the "
                            "same function as the quantized model; everything else is the identical bf16 weights)",
            "timing": "streamer timestamps after torch.cuda.synchronize + time.perf_counter; decode = first new "
                      "token (end of prefill, excluded) to last, new_tokens steps; median of repeats after one "
                      "warm-up generate with the same arguments",
            "modes": {"eager": "generate(disable_compile=True)",
                      "compile": "generate's auto-compile of the decode forward: torch.compile with "
                                 f"{transformers.CompileConfig().to_dict()} (reduce-overhead = CUDA graphs)"},
            "peak_bytes": "torch.cuda.max_memory_allocated over warm-up and timed calls, only this model on the GPU",
        },
        "stages": [], "models": {}, "rows": [], "moe_blocks": [],
    }
    bench = Bench(result, out, args.deadline_s)
    bench.log(f"{card}: {result['config']['model']}, {args.layers} layers, {scheme.name} experts, backend {backend}, "
              f"modes {modes}, batch {args.batch}, torch {torch.__version__}, transformers {transformers.__version__}")
    config = dims.config(args.layers)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wna16moe-bench-generate-"))
    prompts = torch.randint(0, dims.vocab, (max(args.batch), args.prompt_tokens),
                            generator=torch.Generator().manual_seed(args.seed))
    try:
        _run(bench, args, config, scheme, device, backend, workdir / "checkpoint", prompts)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    bench.save()
    print(f"wrote {out}", flush=True)
    return 0


def _run(bench: Bench, args: argparse.Namespace, config: Qwen3MoeConfig, scheme: WeightScheme,
         device: torch.device, backend: str, path: Path, prompts: torch.Tensor) -> None:
    result = bench.result
    bf16 = bench.stage("build bf16 model on " + str(device), lambda: build_bf16(config, device, args.seed))
    if bf16 is None:
        return
    ckpt = bench.stage("quantize experts and write checkpoint",
                       lambda: write_checkpoint(bf16, scheme, path, bench.log))
    result["checkpoint"] = ckpt
    result["models"]["bf16"] = weights_report(bf16)

    # The reference for the check: the bf16 model's greedy continuation and its logits over it.
    p, k = args.prompt_tokens, args.check_tokens

    def reference() -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        ids = prompts[:1].to(device)
        sequence = bf16.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, do_sample=False,
                                 disable_compile=True).cpu()
        return sequence, *reference_forward(bf16, sequence, slice(p - 1, None))

    ref = bench.stage("bf16 reference logits", reference) if ckpt is not None else None

    if ckpt is not None and "wna16moe" in args.models:
        if device.type == "cuda":  # only one model on the GPU at a time: the peak memory is that model's
            bench.stage("move bf16 model to host memory", lambda: bf16.to("cpu"))
            _free()
        quantized = bench.stage(f"load checkpoint through wna16moe.hf (backend {backend})",
                                lambda: load_model(path, backend=backend, device=str(device)))
        if quantized is not None:
            result["models"]["wna16moe"] = weights_report(quantized)
            report = result["models"]["wna16moe"]
            bench.log(f"  wna16moe model: {_human(report['weights_bytes'])}, experts on {report['backends']}")
            if ref is not None:
                check = bench.stage("check vs bf16 on the dequantized weights (MoE blocks, logits)",
                                    lambda: check_model(quantized, ref[0], slice(p - 1, None), ref[1], ref[2]))
                if check is not None:
                    result["check"] = check
                    bench.log(f"  {_check_line(check)}")
            _bench_model(bench, quantized, "wna16moe", ",".join(report["backends"]), args, prompts)
            del quantized
            if device.type == "cuda":
                torch._dynamo.reset()
            _free()
        if device.type == "cuda":
            bench.stage("move bf16 model back to " + str(device), lambda: bf16.to(device))
    if "bf16" in args.models and next(bf16.parameters()).device.type == device.type:
        _bench_model(bench, bf16, "bf16", "stock", args, prompts)


def _check_line(check: dict[str, Any]) -> str:
    return (f"MoE blocks rel err <= {check['moe_rel_err_max']:.2e} (tolerance {check['moe_tolerance']:.0e}), logits "
            f"rel err {check['logits_rel_err']:.2e} (tolerance {check['logits_tolerance']:.0e}) over "
            f"{check['positions']} positions, argmax agreement {check['argmax_agreement']:.2f}: "
            f"{'ok' if check['ok'] else 'NOT OK'}")


def print_table(result: dict[str, Any]) -> None:
    """One screen: configuration, one line per row with the speed-up over the bf16 row of the same mode and
    batch, the check, and what failed."""
    cfg = result["config"]
    print()
    print(f"{result['card']}  {cfg['model']}: {cfg['layers']} layers, E={cfg['experts']} top-{cfg['top_k']} "
          f"H={cfg['hidden']} I={cfg['moe_intermediate']}, experts {cfg['scheme']} (compressed-tensors), "
          f"dense bf16")
    print(f"prompt {cfg['prompt_tokens']} tokens, decode {cfg['new_tokens']} tokens (prefill excluded), greedy, "
          f"static cache, median of {cfg['repeats']}; commit {result['commit']}, torch {result['torch']}, "
          f"transformers {result['transformers']}")
    bf16 = {(r["mode"], r["batch"]): r for r in result["rows"] if r["model"] == "bf16"}
    models = result["models"]
    header = (f"{'model':<9} {'backend':<8} {'mode':<8} {'batch':>5} {'tok/s/seq':>10} {'tok/s':>9} {'ms/step':>8} "
              f"{'peak mem':>10} {'weights':>10} {'vs bf16':>8}")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        peer = bf16.get((row["mode"], row["batch"]))
        ratio = (f"{row['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}x"
                 if peer is not None and row["model"] != "bf16" else "")
        mode = row["mode"] if row.get("compiled", True) else row["mode"] + "?"
        weights = models.get(row["model"], {}).get("weights_bytes")
        print(f"{row['model']:<9} {row['backend']:<8} {mode:<8} {row['batch']:>5} {row['decode_tokens_per_s']:>10.1f} "
              f"{row['decode_tokens_per_s_total']:>9.1f} {row['ms_per_step_median']:>8.2f} "
              f"{_human(row['peak_bytes']):>10} {_human(weights):>10} {ratio:>8}")
    for blocks in result.get("moe_blocks", []):
        print(f"{blocks['model']} MoE blocks alone (router + experts, {blocks['tokens']} token(s), all "
              f"{blocks['layers']} layers in turn): {blocks.get('eager_us_per_layer')} µs/layer eager, "
              f"{blocks.get('graph_us_per_layer', '-')} µs/layer CUDA graph")
    for name, report in models.items():
        extra = (f", experts {report.get('backends')}, {report.get('quantized_dense_layers')} quantized dense layers"
                 if "backends" in report else f", experts_implementation {report.get('experts_implementation')}")
        print(f"{name}: weights {_human(report['weights_bytes'])} (experts {_human(report['experts_bytes'])}){extra}")
    check = result.get("check")
    if check is not None:
        print(f"check vs bf16 on the dequantized weights: {_check_line(check)}")
    failed = [s for s in result["stages"] if not s.get("ok")]
    for stage in failed:
        print(f"FAILED {stage['stage']}: {stage.get('error') or stage.get('skipped')}"[:300])
    if not failed:
        print(f"all {len(result['stages'])} stages ok")


if __name__ == "__main__":
    raise SystemExit(main())
