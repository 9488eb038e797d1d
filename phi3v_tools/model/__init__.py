"""Native Phi-3-vision for transformers 5: official checkpoints, no remote code.

```python
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor

processor = Phi3VProcessor.from_pretrained("microsoft/Phi-3-vision-128k-instruct")
model = Phi3VForCausalLM.from_pretrained("microsoft/Phi-3-vision-128k-instruct", device_map="cuda")
inputs = processor(prompt, [image], return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=500)
text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
```

The names below are imported on first use (PEP 562), so ``import phi3v_tools.model.names`` and the other
torch-free submodules (``chat_format``, ``pil``) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from phi3v_tools.errors import require_local

if TYPE_CHECKING:
    from phi3v_tools.model.checkpoint import load_model, resolve_checkpoint
    from phi3v_tools.model.config import Phi3VConfig
    from phi3v_tools.model.generation import generate
    from phi3v_tools.model.image_processing import Phi3VImageProcessor, num_image_tokens
    from phi3v_tools.model.modeling import Phi3VForCausalLM
    from phi3v_tools.model.names import DEFAULT_MODEL_ID
    from phi3v_tools.model.processing import Phi3VProcessor
    from phi3v_tools.model.tiny import make_tiny_checkpoint

__all__ = [
    "DEFAULT_MODEL_ID",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageProcessor",
    "Phi3VProcessor",
    "generate",
    "load_model",
    "make_tiny_checkpoint",
    "num_image_tokens",
    "resolve_checkpoint",
]

# name -> the submodule that defines it
_LAZY = {
    "DEFAULT_MODEL_ID": "names",
    "Phi3VConfig": "config",
    "Phi3VForCausalLM": "modeling",
    "Phi3VImageProcessor": "image_processing",
    "Phi3VProcessor": "processing",
    "generate": "generation",
    "load_model": "checkpoint",
    "make_tiny_checkpoint": "tiny",
    "num_image_tokens": "image_processing",
    "resolve_checkpoint": "checkpoint",
}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (torch and transformers come with most)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module != "names":
        require_local()  # one line naming what to install, not a ModuleNotFoundError from deep inside
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
