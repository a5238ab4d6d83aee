"""Bit packing of unsigned integer codes into int32 words, shared by the checkpoint formats.

A word holds `32 // bits` codes. Slot j of a word occupies bits [j * bits, (j + 1) * bits) (LSB first);
`order[j]` says which of the word's consecutive elements sits in slot j (identity unless a format
interleaves, as AWQ does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def codes_per_word(bits: int) -> int:
    return 32 // bits


def packed_size(size: int, bits: int) -> int:
    """Words needed for `size` codes (the last word is zero-padded)."""
    per_word = codes_per_word(bits)
    return -(-size // per_word)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, size: int,
                 order: Sequence[int] | None = None) -> torch.Tensor:
    """Unpack int32 words along `dim` into `size` uint8 codes along that dim."""
    per_word = codes_per_word(bits)
    moved = packed.movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    slots = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, per_word], slot order
    if order is not None:
        slots = slots[..., _inverse(order)]
    codes = slots.reshape(*moved.shape[:-1], moved.shape[-1] * per_word)[..., :size]
    return codes.to(torch.uint8).movedim(-1, dim).contiguous()


def pack_int32(codes: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack uint8 codes along `dim` into int32 words (inverse of `unpack_int32`)."""
    per_word = codes_per_word(bits)
    moved = codes.movedim(dim, -1).to(torch.int64)
    size = moved.shape[-1]
    words = packed_size(size, bits)
    padded = torch.nn.functional.pad(moved, (0, words * per_word - size))
    elements = padded.reshape(*moved.shape[:-1], words, per_word)
    if order is not None:
        elements = elements[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    unsigned = (elements << shifts).sum(-1)
    signed = torch.where(unsigned >= 1 << 31, unsigned - (1 << 32), unsigned)
    return signed.to(torch.int32).movedim(-1, dim).contiguous()


def _inverse(order: Sequence[int]) -> list[int]:
    inverse = [0] * len(order)
    for slot, element in enumerate(order):
        inverse[element] = slot
    return inverse
