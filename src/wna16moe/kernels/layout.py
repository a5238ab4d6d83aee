"""The packed weight layout the Triton MoE GEMM reads (pure torch, importable without triton).

K-major and tile-interleaved: the reduction dim is cut into tiles of TILE_K elements; within a tile, word r
(of R = TILE_K // PACK words per column) holds in slot j (bits [j * bits, (j + 1) * bits)) the code of
reduction index j * R + r. Slot j of a tile's words is thus the contiguous sub-block [j * R, (j + 1) * R).

Paired (for the Gluon kernels): the words then exchange 16-bit halves in pairs (`exchange_halves`): of word
rows 2m and 2m + 1, the first holds both low halves (int4 slots 0-3, int8 slots 0-1), the second both high halves.
Reduction indices j * R + 2m and j * R + 2m + 1, the packed pair an mma register holds, then sit at the same
bits of the two halves of one word, which the dequantization takes without a byte permute (`kernels/dequant.py`).

Fragment tiles (as the Gluon kernels read the words, paired, `fragment_tiles`): a tile's word rows in half
tiles of 16 (one for int4, R = 16; two for int8, R = 32), each column's 16 words of a half tile contiguous,
[half tiles, N, 16], in the order of mma.sync's A fragment. Thread q of a 4-thread group holds word rows 2q,
2q + 1, 2q + 8 and 2q + 9 of a half tile's column; position p = 4q + 2h + l holds word row 8h + 2q + l, so
those four words are 16 contiguous bytes, one shared-memory load instead of four (`kernels/moe_gemm_decode.py`),
and a warp's loads of one half tile (8 columns) 512 contiguous bytes, free of bank conflicts.
"""

from __future__ import annotations

import torch

TILE_K = 128
# Words of one column in a half tile of fragment tiles: an int4 tile is one half tile, an int8 tile two.
FRAGMENT_WORDS = 16


def words_per_tile(bits: int) -> int:
    return TILE_K * bits // 32


def exchange_halves(words: torch.Tensor) -> torch.Tensor:
    """Words [..., 2P] int32 with the 16-bit halves of each pair (2m, 2m + 1) exchanged: (lo a | lo b << 16,
    hi a | hi b << 16). Its own inverse."""
    a, b = words[..., 0::2], words[..., 1::2]
    first = (a & 0xFFFF) | (b << 16)
    second = ((a >> 16) & 0xFFFF) | (b & -0x10000)
    return torch.stack((first, second), dim=-1).flatten(-2)


# Word row at each position p = 4q + 2h + l of a fragment tile's column: 8h + 2q + l (module docstring).
FRAGMENT_ROWS = tuple(8 * (p >> 1 & 1) + 2 * (p >> 2) + (p & 1) for p in range(16))


def fragment_tiles(words: torch.Tensor) -> torch.Tensor:
    """Words [..., N, tiles * R] (paired) -> fragment tiles [..., tiles * R / 16, N, 16] (module
    docstring)."""
    n, width = words.shape[-2:]
    tiles = words.reshape(*words.shape[:-2], n, width // 16, 16)[..., list(FRAGMENT_ROWS)]
    return tiles.transpose(-3, -2).contiguous()


def unfragment_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of `fragment_tiles`: [..., half tiles, N, 16] -> [..., N, half tiles * 16]."""
    columns = tiles.transpose(-3, -2)
    positions = torch.tensor(FRAGMENT_ROWS, device=tiles.device).argsort()
    return columns[..., positions].reshape(*columns.shape[:-2], -1)


def tile_interleave(codes: torch.Tensor, bits: int, paired: bool = False) -> torch.Tensor:
    """Pack codes [..., KD] (uint8) into words [..., ceil(KD / TILE_K) * R] int32; KD is zero-padded. `paired`:
    words with their halves exchanged in pairs (module docstring)."""
    pack = 32 // bits
    r = words_per_tile(bits)
    kd = codes.shape[-1]
    tiles = -(-kd // TILE_K)
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, tiles * TILE_K - kd))
    slots = padded.reshape(*codes.shape[:-1], tiles, pack, r)  # [..., t, j, r]
    shifts = (torch.arange(pack, device=codes.device) * bits).view(pack, 1)
    words = (slots << shifts).sum(-2)  # [..., t, r]; slots do not overlap, so the sum is an OR
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    words = words.reshape(*codes.shape[:-1], tiles * r).to(torch.int32)
    return exchange_halves(words) if paired else words


def tile_deinterleave(words: torch.Tensor, bits: int, kd: int, paired: bool = False) -> torch.Tensor:
    """Inverse of `tile_interleave`: words [..., tiles * R] int32 -> codes [..., kd] uint8."""
    pack = 32 // bits
    r = words_per_tile(bits)
    tiles = words.shape[-1] // r
    if paired:
        words = exchange_halves(words)
    shifts = (torch.arange(pack, device=words.device, dtype=torch.int32) * bits).view(pack, 1)
    slots = (words.reshape(*words.shape[:-1], tiles, 1, r) >> shifts) & ((1 << bits) - 1)  # [..., t, j, r]
    return slots.reshape(*words.shape[:-1], tiles * TILE_K)[..., :kd].to(torch.uint8)
