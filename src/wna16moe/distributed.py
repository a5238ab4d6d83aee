"""Tensor and expert parallelism over torch.distributed: weight sharding, process groups, and the
prepare/finalize step around the experts kernel. Gloo (CPU) and NCCL (GPU) both work.

Layout (see `ParallelConfig`): a layer runs on tp_size * ep_size ranks, rank = ep_rank * tp_size + tp_rank.
EP rank r owns the contiguous expert range `ParallelConfig.local_experts(E)`; the expert map sends a global
expert id to its index in that range, or to -1 when another rank owns it. Each TP rank holds I/tp of every
local expert's intermediate dimension: the matching gate and up rows of w13 and input columns of w2
(`tp_shard`), so its output is a partial sum over I that the TP ranks add up.

Prepare/finalize, one interface (`make_prepare_finalize` picks from the parallel config):
    NoParallel  one rank: the routed ids pass through and the output is final.
    AllReduce   tokens shared by every rank of the layer (TP; EP with dp_size 1; TP x EP): global ids become
                local ids (-1: remote), every rank runs its experts and I shard on every token, and an
                all-reduce over the layer's ranks sums the partial outputs.
    AllToAll    data-parallel tokens (dp_size == ep_size: each EP rank and its TP group hold their own tokens),
                standard format: each token goes once to every EP rank owning one of its experts
                (all_to_all_single after exchanging the counts), its top-k ids mapped to that rank's local ids;
                the experts' weighted sums return the same way and add up per token; an all-reduce over the
                TP group then sums the I shards.
    Batched     the batched format around AllToAll (or NoParallel / AllReduce): the tokens a rank runs are
                copied per local expert into [E_local, max_tokens, H], the batched kernel runs them
                unweighted, and finalize weights each row by its router weight and sums it back per token.

    FixedAllToAll  AllToAll with fixed-size buffers of `ParallelConfig.max_tokens_per_rank` tokens per rank:
                each rank sends every EP rank all its (padded) tokens with only that rank's ids, so no
                counts are exchanged.

The prepare step of AllToAll and Batched reads counts on the host (all_to_all_single takes split sizes as
Python lists; the batched buffer is sized by the busiest expert), so those paths cannot be captured in a CUDA
graph; NoParallel, AllReduce and FixedAllToAll need no host synchronization.

NCCL on machines whose GPUs others share: keep NVLink multicast (NVLS) off, NCCL_NVLS_ENABLE=0; the GPU tests
and `wna16moe.bench_parallel` set it unless the environment already does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from wna16moe.config import ActivationFormat, ParallelConfig, expert_range
from wna16moe.errors import InvalidInputError, UnsupportedError
from wna16moe.experts.base import tp_group_split
from wna16moe.quantized import QuantizedExperts, QuantizedWeight

# ----- expert placement and weight sharding -----------------------------------------------------------------


@dataclass(frozen=True)
class ExpertPlacement:
    """Which EP rank owns each global expert: contiguous ranges (`ParallelConfig.local_experts`)."""

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def local(self) -> range:
        """Global ids of this rank's experts."""
        return expert_range(self.num_experts, self.ep_size, self.ep_rank)

    def expert_map(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[E] int32: the local index of each global expert on this rank, -1 where another rank owns it."""
        table = torch.full((self.num_experts,), -1, dtype=torch.int32, device=device)
        local = self.local
        table[local.start:local.stop] = torch.arange(len(local), dtype=torch.int32, device=device)
        return table

    def owners(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[E] int64: the EP rank owning each global expert."""
        table = torch.empty(self.num_experts, dtype=torch.int64, device=device)
        for rank in range(self.ep_size):
            owned = expert_range(self.num_experts, self.ep_size, rank)
            table[owned.start:owned.stop] = rank
        return table


def _rows(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """tensor [E, N, ...] -> [E, n, ...]: rows index[e] (index [E, n] int64) of each expert."""
    if tensor is None:
        return None
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def select_experts(experts: QuantizedExperts, ids: range) -> QuantizedExperts:
    """The experts `ids` (a contiguous range of global ids) of a layer's experts, without copying."""
    def part(w: QuantizedWeight) -> QuantizedWeight:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[ids.start:ids.stop]
        return QuantizedWeight(w.scheme, w.codes[ids.start:ids.stop], w.scales[ids.start:ids.stop], cut(w.zeros),
                               cut(w.g_idx))

    return QuantizedExperts(part(experts.w13), part(experts.w2))


def tp_columns(w2: QuantizedWeight, tp_size: int, tp_rank: int) -> torch.Tensor:
    """[E, I/tp] int64: the intermediate columns TP rank `tp_rank` holds, per expert, ascending.

    Without act-order, the contiguous range [tp_rank * I/tp, (tp_rank + 1) * I/tp). With act-order the
    columns of groups [tp_rank * G/tp, (tp_rank + 1) * G/tp) (by w2's g_idx), so each shard still holds whole
    groups with their own scales; any partition of I works, as long as w13's rows follow it.
    """
    e, _, i = w2.shape
    shard = i // tp_size
    group = w2.scheme.group_size
    if w2.g_idx is None or group is None:
        return torch.arange(tp_rank * shard, (tp_rank + 1) * shard, device=w2.codes.device).expand(e, shard)
    mine = w2.g_idx.long() // (shard // group) == tp_rank
    counts = mine.sum(1)
    bad = torch.nonzero(counts != shard)
    if bad.numel():
        expert = int(bad[0])
        raise UnsupportedError(f"w2 g_idx of expert {expert} puts {int(counts[expert])} columns into the groups of TP "
                               f"rank {tp_rank}, expected I/tp={shard} (groups of exactly {group} columns); act-order "
                               "weights with uneven groups cannot be tensor-parallel sharded, use expert parallelism")
    return torch.nonzero(mine)[:, 1].view(e, shard)


def tp_shard(experts: QuantizedExperts, tp_size: int, tp_rank: int) -> QuantizedExperts:
    """TP rank `tp_rank`'s shard of every expert: w13 [E, 2I/tp, H] (its gate rows, then its up rows) and
    w2 [E, H, I/tp], for the columns `tp_columns` picks. Raises `UnsupportedError` when I/tp would split a
    quantization group."""
    if tp_size == 1:
        return experts
    i, scheme = experts.intermediate_size, experts.scheme
    if i % tp_size:
        raise InvalidInputError(f"intermediate_size={i} is not divisible by tp_size={tp_size}")
    reason = tp_group_split(i, tp_size, scheme.group_size)
    if reason is not None:
        raise UnsupportedError(reason)
    shard = i // tp_size
    cols = tp_columns(experts.w2, tp_size, tp_rank)
    rows = torch.cat([cols, cols + i], dim=1)
    w13 = experts.w13
    w13 = QuantizedWeight(scheme, _rows(w13.codes, rows), _rows(w13.scales, rows), _rows(w13.zeros, rows), w13.g_idx)
    w2 = experts.w2
    e, h, _ = w2.shape
    codes = w2.codes.gather(2, cols[:, None, :].expand(e, h, shard))
    if scheme.group_size is None:  # channel-wise: one scale per row covers any columns
        groups, g_idx = slice(None), None if w2.g_idx is None else w2.g_idx.gather(1, cols)
    else:
        per_rank = shard // scheme.group_size
        groups = slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
        g_idx = None if w2.g_idx is None else w2.g_idx.gather(1, cols) - tp_rank * per_rank
    zeros = None if w2.zeros is None else w2.zeros[:, :, groups]
    return QuantizedExperts(w13, QuantizedWeight(scheme, codes, w2.scales[:, :, groups], zeros, g_idx))


def shard_experts(experts: QuantizedExperts, parallel: ParallelConfig, num_experts: int) -> QuantizedExperts:
    """This rank's part of a layer's experts: its EP range, then its TP shard of I.

    `experts` holds either all `num_experts` experts or already just this rank's range (as
    `Checkpoint.load_layer(layer, parallel.local_experts(E))` reads them), always with the full I.
    """
    local = parallel.local_experts(num_experts)
    if experts.num_experts == num_experts:
        experts = select_experts(experts, local)
    elif experts.num_experts != len(local):
        raise InvalidInputError(f"experts hold {experts.num_experts} experts; expected all {num_experts} or this EP "
                                f"rank's {len(local)} (experts {local.start}..{local.stop - 1})")
    return tp_shard(experts, parallel.tp_size, parallel.tp_rank)


def shard_biases(w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None, experts: QuantizedExperts,
                 parallel: ParallelConfig, num_experts: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """This rank's part of the expert biases w13_bias [E, 2I] and w2_bias [E, H] (global, as checkpoints hold
    them), to match `shard_experts(experts, ...)` (`experts` with the full I, all or this rank's experts).

    w13_bias takes the rank's experts and TP rows; w2_bias is added after the TP reduction's partial sums, so
    only TP rank 0 keeps it and the other TP ranks hold zeros (the same tensors on every rank).
    """
    local = parallel.local_experts(num_experts)
    for bias, name, width in ((w13_bias, "w13_bias", 2 * experts.intermediate_size),
                              (w2_bias, "w2_bias", experts.hidden_size)):
        if bias is not None and tuple(bias.shape) != (num_experts, width):
            raise InvalidInputError(f"{name} must be [E={num_experts}, {width}], got {list(bias.shape)}")
    if experts.num_experts == num_experts:
        experts = select_experts(experts, local)
    w13 = None if w13_bias is None else w13_bias[local.start:local.stop]
    w2 = None if w2_bias is None else w2_bias[local.start:local.stop]
    if parallel.tp_size > 1:
        if w13 is not None:
            cols = tp_columns(experts.w2, parallel.tp_size, parallel.tp_rank).to(w13.device)
            w13 = w13.gather(1, torch.cat([cols, cols + experts.intermediate_size], dim=1))
        if w2 is not None and parallel.tp_rank != 0:
            w2 = torch.zeros_like(w2)
    return w13, w2


# ----- process groups ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEGroups:
    """The process groups one layer communicates over; None where the group would be this rank alone.

    world: all tp_size * ep_size ranks (the default group); tp: the ranks with this ep_rank; ep: the ranks
    with this tp_rank.
    """

    world: Any = None
    tp: Any = None
    ep: Any = None

    @classmethod
    def create(cls, parallel: ParallelConfig) -> MoEGroups:
        """The groups of `parallel` on the default process group, which must hold exactly its ranks.

        With both TP and EP this creates subgroups: a collective call that every rank must make, in the same
        order; build the groups once and pass them to every layer.
        """
        if parallel.world_size == 1:
            return cls()
        if not dist.is_available() or not dist.is_initialized():
            raise InvalidInputError(f"tp_size={parallel.tp_size} x ep_size={parallel.ep_size} needs torch.distributed "
                                    "initialized (torchrun, or torch.distributed.init_process_group) with that many "
                                    "ranks")
        world, rank = dist.get_world_size(), dist.get_rank()
        if (world, rank) != (parallel.world_size, parallel.rank):
            raise InvalidInputError(f"the default process group has {world} ranks and this is rank {rank}; the "
                                    f"parallel config needs {parallel.world_size} ranks and rank {parallel.rank} "
                                    "(ep_rank * tp_size + tp_rank)")
        group = dist.group.WORLD
        if parallel.ep_size == 1:
            return cls(group, tp=group)
        if parallel.tp_size == 1:
            return cls(group, ep=group)
        tp_size, ep_size = parallel.tp_size, parallel.ep_size
        tp_groups = [dist.new_group([e * tp_size + t for t in range(tp_size)]) for e in range(ep_size)]
        ep_groups = [dist.new_group([e * tp_size + t for e in range(ep_size)]) for t in range(tp_size)]
        return cls(group, tp=tp_groups[parallel.ep_rank], ep=ep_groups[parallel.tp_rank])


def parallel_config(tp_size: int = 1, ep_size: int = 1, *, data_parallel: bool = False, batched: bool = False,
                    max_tokens_per_rank: int | None = None) -> ParallelConfig:
    """This process's `ParallelConfig` from its rank in the default process group (rank = ep_rank * tp_size +
    tp_rank). `data_parallel`: each EP rank holds its own tokens (dp_size = ep_size, dp_rank = ep_rank)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ep_rank, tp_rank = divmod(rank, tp_size)
    dp_size = ep_size if data_parallel else 1
    return ParallelConfig(tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank, dp_size=dp_size,
                          dp_rank=ep_rank if data_parallel else 0, batched=batched,
                          max_tokens_per_rank=max_tokens_per_rank)


# ----- prepare / finalize -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertInput:
    """What the experts kernel runs on this rank, and what finalize needs to undo the dispatch.

    Parameters
    ----------
    hidden : STANDARD [R, H], the tokens this rank runs; BATCHED [E_local, max_tokens, H].
    topk_weights : STANDARD [R, K] float32 router weights; None for BATCHED.
    topk_ids : STANDARD [R, K] int32 local expert ids, -1 for another rank's expert; None for BATCHED.
    num_tokens : BATCHED [E_local] int32, the valid leading rows of each expert (the rest are garbage);
        None for STANDARD.
    state : the prepare step's bookkeeping, read only by the same object's finalize.
    """

    hidden: torch.Tensor
    topk_weights: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    state: Any = None

    @property
    def empty(self) -> bool:
        """No row for the experts on this rank (the kernel is skipped; its output is all zero)."""
        return self.hidden.shape[-2] == 0


class PrepareFinalize:
    """Moves routed tokens to the experts that run them, and their outputs back into [T, H] per token.

    `prepare(hidden [T, H], topk_weights [T, K] float32, topk_ids [T, K] int32 global ids)` returns the
    `ExpertInput` in ACTIVATION_FORMAT; the kernel's output (shaped like `ExpertInput.hidden`) goes to
    `finalize(output, input)`, which returns this rank's [T, H] layer output. Every rank of the layer must
    call both, in the same order (they may communicate).
    """

    ACTIVATION_FORMAT: ClassVar[ActivationFormat] = ActivationFormat.STANDARD

    def prepare(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertInput:
        raise NotImplementedError

    def finalize(self, output: torch.Tensor, expert_input: ExpertInput) -> torch.Tensor:
        raise NotImplementedError


class NoParallel(PrepareFinalize):
    """One rank: ids pass through, the kernel's output is the layer's output."""

    def prepare(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertInput:
        return ExpertInput(hidden, topk_weights, topk_ids)

    def finalize(self, output: torch.Tensor, expert_input: ExpertInput) -> torch.Tensor:
        return self.reduce(output)

    def reduce(self, output: torch.Tensor) -> torch.Tensor:
        """The layer output from this rank's [T, H] partial output (monolithic kernels call it directly)."""
        return output


class AllReduce(NoParallel):
    """Tokens shared by every rank of `group`: map ids through the expert map, all-reduce the outputs."""

    def __init__(self, placement: ExpertPlacement, group: Any, device: torch.device) -> None:
        self.placement = placement
        self.group = group
        self.expert_map = placement.expert_map(device) if placement.ep_size > 1 else None

    def prepare(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertInput:
        ids = topk_ids if self.expert_map is None else self.expert_map[topk_ids.long()]
        return ExpertInput(hidden, topk_weights, ids)

    def reduce(self, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=self.group)
        return output


@dataclass(frozen=True)
class _Dispatch:
    """AllToAll bookkeeping: the token of each sent row (rows in destination-rank order), split sizes."""

    token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


def _exchange(send: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: Any) -> torch.Tensor:
    recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return recv


class AllToAll(PrepareFinalize):
    """Data-parallel tokens, standard format: all-to-all to the experts' owners and back (module docstring)."""

    def __init__(self, placement: ExpertPlacement, ep_group: Any, tp_group: Any, device: torch.device) -> None:
        self.placement = placement
        self.ep_group = ep_group
        self.tp_group = tp_group
        self.expert_map = placement.expert_map(device)
        self.owners = placement.owners(device)

    def prepare(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertInput:
        t = hidden.shape[0]
        ids = topk_ids.long()
        sends = torch.zeros(t, self.placement.ep_size, dtype=torch.bool, device=hidden.device)
        sends.scatter_(1, self.owners[ids], True)  # token t goes to rank r once, whatever its experts there
        token = torch.nonzero(sends.t())[:, 1]  # destination-major, tokens ascending within a destination
        send_counts = sends.sum(0)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # host sync: splits are lists
        recv_hidden = _exchange(hidden[token], recv_splits, send_splits, self.ep_group)
        recv_ids = _exchange(topk_ids[token].to(torch.int32), recv_splits, send_splits, self.ep_group)
        recv_weights = _exchange(topk_weights[token].float(), recv_splits, send_splits, self.ep_group)
        local_ids = self.expert_map[recv_ids.long()]
        return ExpertInput(recv_hidden, recv_weights, local_ids, state=_Dispatch(token, send_splits, recv_splits, t))

    def finalize(self, output: torch.Tensor, expert_input: ExpertInput) -> torch.Tensor:
        state: _Dispatch = expert_input.state
        back = _exchange(output, state.send_splits, state.recv_splits, self.ep_group)
        out = torch.zeros(state.num_tokens, output.shape[1], dtype=torch.float32, device=output.device)
        out.index_add_(0, state.token, back.float())  # a token's partial sums from every rank it went to
        out = out.to(output.dtype)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


class FixedAllToAll(AllToAll):
    """AllToAll with fixed-size buffers (`ParallelConfig.max_tokens_per_rank` = C): no host synchronization.

    Every rank sends every EP rank C rows: its tokens (padded to C), each with the top-k ids that rank owns
    (-1 for the others and for padding) and the router weights; a row none of whose pairs a rank owns costs
    that rank's kernel nothing (alignment drops -1 pairs). The experts' outputs return the same way, and a
    token's partial sums are the sum over the EP ranks of its row. Shapes depend only on C, so the step can be
    captured in a CUDA graph; the price is ep_size * C rows on the wire per rank, which suits decode.
    """

    def __init__(self, placement: ExpertPlacement, ep_group: Any, tp_group: Any, device: torch.device,
                 capacity: int) -> None:
        super().__init__(placement, ep_group, tp_group, device)
        self.capacity = capacity
        # Every rank must exchange the same C rows, else the first forward aborts inside the collective: one
        # collective at build time compares them (the largest C and the largest -C). (Without a process group,
        # in unit tests, nothing can be exchanged.)
        if not dist.is_initialized():
            return
        bounds = torch.tensor([capacity, -capacity], dtype=torch.int64, device=device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=ep_group)
        largest, smallest = int(bounds[0]), -int(bounds[1])
        if largest != smallest:
            raise InvalidInputError(f"ParallelConfig.max_tokens_per_rank differs between the EP ranks ({smallest} to "
                                    f"{largest}, this rank {capacity}): every rank must set the same value")

    def prepare(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertInput:
        t, cap, ep = hidden.shape[0], self.capacity, self.placement.ep_size
        # A rank with more than C tokens still takes its part in the step's collectives, with its first C, and
        # raises in `finalize`: raising here would leave the other ranks waiting in them, and this rank's next
        # step out of step with theirs.
        sent = min(t, cap)
        padded = hidden.new_zeros(cap, hidden.shape[1])
        padded[:sent] = hidden[:sent]
        ids = torch.full((cap, topk_ids.shape[1]), -1, dtype=torch.int64, device=hidden.device)
        ids[:sent] = topk_ids[:sent].long()
        weights = torch.zeros(cap, topk_ids.shape[1], dtype=torch.float32, device=hidden.device)
        weights[:sent] = topk_weights[:sent].float()
        destination = torch.arange(ep, device=hidden.device).view(ep, 1, 1)
        owned = (ids >= 0) & (self.owners[ids.clamp(min=0)] == destination)  # [ep, C, K]
        # Global ids (those the destination owns, else -1) and weights travel in one float32 buffer (ids
        # bit-cast): one collective instead of two.
        sent_ids = torch.where(owned, ids, -1).to(torch.int32)
        meta = torch.cat([weights.expand(ep, cap, -1), sent_ids.view(torch.float32)], dim=-1)
        recv_hidden = torch.empty(ep * cap, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        dist.all_to_all_single(recv_hidden, padded.repeat(ep, 1), group=self.ep_group)
        recv_meta = torch.empty(ep * cap, meta.shape[-1], dtype=torch.float32, device=hidden.device)
        dist.all_to_all_single(recv_meta, meta.reshape(ep * cap, -1), group=self.ep_group)
        k = topk_ids.shape[1]
        recv_ids = recv_meta[:, k:].contiguous().view(torch.int32).long()
        local_ids = torch.where(recv_ids >= 0, self.expert_map[recv_ids.clamp(min=0)], -1).to(torch.int32)
        return ExpertInput(recv_hidden, recv_meta[:, :k].contiguous(), local_ids, state=t)

    def finalize(self, output: torch.Tensor, expert_input: ExpertInput) -> torch.Tensor:
        ep, cap = self.placement.ep_size, self.capacity
        back = torch.empty_like(output)
        dist.all_to_all_single(back, output.contiguous(), group=self.ep_group)
        out = back.view(ep, cap, -1).float().sum(0)[: expert_input.state].to(output.dtype)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        if expert_input.state > cap:  # (`prepare`: the other ranks have finished the step)
            raise InvalidInputError(f"{expert_input.state} tokens on this rank exceed ParallelConfig."
                                    f"max_tokens_per_rank={cap}; the step's collectives ran with its first {cap}, "
                                    f"so the other ranks finished it")
        return out


@dataclass(frozen=True)
class _Expansion:
    """Batched bookkeeping: the standard input, and for every valid pair its (expert, row) in the buffer."""

    standard: ExpertInput
    pair: torch.Tensor
    expert: torch.Tensor
    row: torch.Tensor


class Batched(PrepareFinalize):
    """The batched format on top of a standard prepare/finalize (`inner`): see the module docstring."""

    ACTIVATION_FORMAT = ActivationFormat.BATCHED

    def __init__(self, inner: PrepareFinalize, num_local_experts: int) -> None:
        if inner.ACTIVATION_FORMAT != ActivationFormat.STANDARD:
            raise InvalidInputError(f"Batched wraps a standard-format prepare/finalize, got {type(inner).__name__}")
        self.inner = inner
        self.num_local_experts = num_local_experts

    def prepare(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> ExpertInput:
        standard = self.inner.prepare(hidden, topk_weights, topk_ids)
        ids = standard.topk_ids.reshape(-1).long()
        top_k = standard.topk_ids.shape[1]
        valid = torch.nonzero(ids >= 0).squeeze(1)
        order = torch.argsort(ids[valid], stable=True)
        pair = valid[order]  # valid pairs grouped by local expert, in pair order within an expert
        expert = ids[pair]
        counts = torch.bincount(expert, minlength=self.num_local_experts)
        row = torch.arange(pair.numel(), device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert]
        max_tokens = int(counts.max()) if pair.numel() else 0  # host sync: sizes the buffer
        buffer = standard.hidden.new_empty(self.num_local_experts, max_tokens, standard.hidden.shape[1])
        buffer[expert, row] = standard.hidden[pair // top_k]
        return ExpertInput(buffer, num_tokens=counts.to(torch.int32), state=_Expansion(standard, pair, expert, row))

    def finalize(self, output: torch.Tensor, expert_input: ExpertInput) -> torch.Tensor:
        state: _Expansion = expert_input.state
        standard = state.standard
        top_k = standard.topk_ids.shape[1]
        weights = standard.topk_weights.reshape(-1)[state.pair].float()
        rows = output[state.expert, state.row].float() * weights[:, None]
        out = torch.zeros(standard.hidden.shape[0], output.shape[2], dtype=torch.float32, device=output.device)
        out.index_add_(0, state.pair // top_k, rows)
        return self.inner.finalize(out.to(output.dtype), standard)


def make_prepare_finalize(parallel: ParallelConfig, num_experts: int, groups: MoEGroups,
                          device: torch.device) -> PrepareFinalize:
    """The prepare/finalize for `parallel` (module docstring); `groups` from `MoEGroups.create(parallel)`.

    Raises `UnsupportedError` for data parallelism without matching expert parallelism.
    """
    placement = ExpertPlacement(num_experts, parallel.ep_size, parallel.ep_rank)
    inner: PrepareFinalize
    if parallel.dp_size > 1:
        if parallel.dp_size != parallel.ep_size or parallel.dp_rank != parallel.ep_rank:
            raise UnsupportedError(f"dp_size={parallel.dp_size}, dp_rank={parallel.dp_rank} with ep_size="
                                   f"{parallel.ep_size}, ep_rank={parallel.ep_rank}: data-parallel tokens need expert "
                                   "parallelism with ep_size == dp_size and dp_rank == ep_rank (each EP rank and its "
                                   "TP group serve their own tokens); use dp_size=1 when every rank holds all tokens")
        if parallel.max_tokens_per_rank is not None:
            inner = FixedAllToAll(placement, groups.ep, groups.tp, device, parallel.max_tokens_per_rank)
        else:
            inner = AllToAll(placement, groups.ep, groups.tp, device)
    elif parallel.world_size > 1:
        inner = AllReduce(placement, groups.world, device)
    else:
        inner = NoParallel()
    return Batched(inner, len(placement.local)) if parallel.batched else inner
