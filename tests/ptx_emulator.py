"""A tiny interpreter for the PTX that `kernels/dequant.py` generates, so CPU CI can check its arithmetic.

It knows exactly the instructions that module emits (mov.b32, prmt.b32, lop3.b32, shr.u32, fma.rn.bf16x2 /
fma.rn.f16x2) on 32-bit registers: `$i` operands and the names in `.reg` lines. Packed halves are rounded to
nearest-even through torch, as the hardware does; the products involved are exact in float64. It is a test oracle
written from the PTX ISA, not from the generator, and rejects any other instruction.
"""

from __future__ import annotations

import re

import torch

_HALF_DTYPES = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}


def _prmt(a: int, b: int, selector: int) -> int:
    """prmt.b32 (default mode): byte i of the result is byte (selector nibble i) of the 8-byte value {b, a}."""
    source = (b << 32) | a
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0x7
        out |= ((source >> (8 * nibble)) & 0xFF) << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def _halves(word: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double()


def _pack(values: torch.Tensor, dtype: torch.dtype) -> int:
    bits = values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(bits[0]) | (int(bits[1]) << 16)


def run(asm: str, operands: list[int]) -> list[int]:
    """Execute `asm` with `$i` registers preset from `operands` (32-bit words); returns them afterwards."""
    regs = {f"${i}": word & 0xFFFFFFFF for i, word in enumerate(operands)}

    def value(token: str) -> int:
        return int(token, 16) if token.startswith("0x") else regs[token]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            result = value(src[0])
        elif op == "prmt.b32":
            result = _prmt(value(src[0]), value(src[1]), value(src[2]))
        elif op == "lop3.b32":
            result = _lop3(value(src[0]), value(src[1]), value(src[2]), value(src[3]))
        elif op == "shr.u32":
            result = value(src[0]) >> int(src[1])
        elif match := re.fullmatch(r"fma\.rn\.(bf16x2|f16x2)", op):
            dtype = _HALF_DTYPES[match.group(1)]
            a, b, c = (_halves(value(s), dtype) for s in src)
            result = _pack(a * b + c, dtype)
        else:
            raise ValueError(f"the emulator does not know {op!r}")
        regs[dst] = result & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(len(operands))]
