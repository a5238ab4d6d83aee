"""wna16moe: int4/int8 weight-only quantized MoE layers that choose the right kernel for the machine."""

from wna16moe.config import (
    Activation,
    ActivationFormat,
    MoEConfig,
    MoEQuantConfig,
    ParallelConfig,
    RoutingConfig,
    RoutingMethod,
    make_wna16_moe_quant_config,
)
from wna16moe.errors import BackendError, CheckpointError, InvalidInputError, UnsupportedError, WNA16MoEError
from wna16moe.formats import Checkpoint, CheckpointFormat, open_checkpoint
from wna16moe.quantized import QuantizedExperts, QuantizedWeight, quantize_rtn
from wna16moe.scheme import WeightScheme

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ActivationFormat",
    "BackendError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormat",
    "InvalidInputError",
    "MoEConfig",
    "MoEQuantConfig",
    "ParallelConfig",
    "QuantizedExperts",
    "QuantizedWeight",
    "RoutingConfig",
    "RoutingMethod",
    "UnsupportedError",
    "WNA16MoEError",
    "WeightScheme",
    "make_wna16_moe_quant_config",
    "open_checkpoint",
    "quantize_rtn",
]
