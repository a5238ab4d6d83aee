"""The packed weight layout the Triton MoE GEMM reads (pure torch, importable without triton).

K-major and tile-interleaved: the reduction dim is cut into tiles of TILE_K elements; within a tile, word r
(of R = TILE_K // PACK words per column) holds in slot j (bits [j * bits, (j + 1) * bits)) the code of
reduction index j * R + r. Slot j of a tile's words is thus the contiguous sub-block [j * R, (j + 1) * R).
"""

from __future__ import annotations

import torch

TILE_K = 128


def words_per_tile(bits: int) -> int:
    return TILE_K * bits // 32


def tile_interleave(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [..., KD] (uint8) into words [..., ceil(KD / TILE_K) * R] int32; KD is zero-padded."""
    pack = 32 // bits
    r = words_per_tile(bits)
    kd = codes.shape[-1]
    tiles = -(-kd // TILE_K)
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, tiles * TILE_K - kd))
    slots = padded.reshape(*codes.shape[:-1], tiles, pack, r)  # [..., t, j, r]
    shifts = (torch.arange(pack, device=codes.device) * bits).view(pack, 1)
    words = (slots << shifts).sum(-2)  # [..., t, r]; slots do not overlap, so the sum is an OR
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.reshape(*codes.shape[:-1], tiles * r).to(torch.int32)


def tile_deinterleave(words: torch.Tensor, bits: int, kd: int) -> torch.Tensor:
    """Inverse of `tile_interleave`: words [..., tiles * R] int32 -> codes [..., kd] uint8."""
    pack = 32 // bits
    r = words_per_tile(bits)
    tiles = words.shape[-1] // r
    shifts = (torch.arange(pack, device=words.device, dtype=torch.int32) * bits).view(pack, 1)
    slots = (words.reshape(*words.shape[:-1], tiles, 1, r) >> shifts) & ((1 << bits) - 1)  # [..., t, j, r]
    return slots.reshape(*words.shape[:-1], tiles * TILE_K)[..., :kd].to(torch.uint8)
