"""One TRITON and one MARLIN layer forward per (shape, M), for Nsight Compute: warm-up first, then the profiled
forwards between cudaProfilerStart/Stop. Run under ncu, for example:

    ncu --clock-control none --profile-from-start off --kernel-name regex:'_moe_gemm_kernel|[Mm]arlin' \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --section LaunchStats --section MemoryWorkloadAnalysis \\
        python benchmarks/ncu_layer.py deepseek-v3:32 kimi-k2:128 qwen3-30b-a3b:128:int8_g128_sym

(MARLIN needs WNA16MOE_MARLIN_LIB, as for the bench; without it only TRITON runs.) TRITON runs its shipped
configuration, or with $NCU_CONFIG ("field=value,...", as try_configs.py's --variant) that one changed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch
from try_configs import parse_variant

from wna16moe.bench import random_layer, random_routing
from wna16moe.device import DeviceInfo
from wna16moe.experts.marlin import MarlinExperts
from wna16moe.experts.triton import TritonExperts


def main(cases: list[str]) -> None:
    device = torch.device("cuda")
    for case in cases:
        name, m, *scheme = case.split(":")  # shape:M, or shape:M:scheme (default int4 symmetric)
        spec, experts = random_layer(name, device, *scheme)
        cfg = spec.moe
        x = torch.randn(int(m), cfg.hidden_size, dtype=torch.bfloat16, device=device)
        tw, ids = random_routing(int(m), cfg.num_experts, cfg.top_k, device)
        quant = experts.quant_config()
        backends = [(TritonExperts(spec, quant, device), TritonExperts.prepare_weights(experts, device))]
        if MarlinExperts.is_supported(spec, DeviceInfo.current()).ok:
            backends.append((MarlinExperts(spec, quant, device), MarlinExperts.prepare_weights(experts, device)))
        for kernel, weights in backends:
            args = (x, tw, ids, weights)
            if isinstance(kernel, TritonExperts) and os.environ.get("NCU_CONFIG"):
                args += (replace(kernel.config(int(m)), **parse_variant(os.environ["NCU_CONFIG"])),)
            for _ in range(3):
                kernel.apply(*args)
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            kernel.apply(*args)
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            print(f"{case} {type(kernel).__name__} profiled", flush=True)
        del experts, backends
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
