"""Run Triton kernels through the interpreter when there is no GPU. Import this before any wna16moe.kernels
module: triton decides at decoration time whether a kernel is interpreted."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The interpreter computes bf16 tl.dot wrongly (triton 3.6): CPU runs use fp16, the GPU covers bf16 too.
DTYPES = (torch.bfloat16, torch.float16) if HAS_CUDA else (torch.float16,)
