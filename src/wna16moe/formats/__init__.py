"""Checkpoint readers and writers, one module per format, behind `open_checkpoint`."""

from wna16moe.formats.checkpoint import (
    HF_NAMING,
    MIXTRAL_LINEARIZED_NAMING,
    MIXTRAL_NAMING,
    Checkpoint,
    CheckpointFormat,
    ExpertNaming,
    moe_config_from_hf,
    open_checkpoint,
    quantization_config,
    read_experts,
    write_experts,
)
from wna16moe.formats.common import DictSource, Projection

__all__ = [
    "HF_NAMING",
    "MIXTRAL_LINEARIZED_NAMING",
    "MIXTRAL_NAMING",
    "Checkpoint",
    "CheckpointFormat",
    "DictSource",
    "ExpertNaming",
    "Projection",
    "moe_config_from_hf",
    "open_checkpoint",
    "quantization_config",
    "read_experts",
    "write_experts",
]
