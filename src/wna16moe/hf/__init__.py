"""Hugging Face transformers drop-in: load compressed-tensors, GPTQ and AWQ MoE checkpoints with
`AutoModelForCausalLM.from_pretrained` into packed experts that run on the oracle's kernel.

```python
import wna16moe.hf
from transformers import AutoModelForCausalLM

with wna16moe.hf.loading():                    # or wna16moe.hf.enable() ... wna16moe.hf.disable()
    model = AutoModelForCausalLM.from_pretrained(path)
print(wna16moe.hf.explain(model))              # per layer: the chosen backend, and why not the others
```

Needs transformers (`pip install wna16moe[hf]`; 5.17 to 5.24 are tested).
"""

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("wna16moe.hf needs transformers: pip install 'wna16moe[hf]'") from error

from wna16moe.hf.api import Explanation, LayerExplanation, disable, enable, explain, is_enabled, loading
from wna16moe.hf.modules import PackedExperts, WNA16Linear
from wna16moe.hf.quantizer import CheckpointQuantizationConfig, WNA16Quantizer

__all__ = [
    "CheckpointQuantizationConfig",
    "Explanation",
    "LayerExplanation",
    "PackedExperts",
    "WNA16Linear",
    "WNA16Quantizer",
    "disable",
    "enable",
    "explain",
    "is_enabled",
    "loading",
]
