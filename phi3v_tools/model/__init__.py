"""Native Phi-3-vision for transformers 5: official checkpoints, no remote code.

```python
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor

processor = Phi3VProcessor.from_pretrained("microsoft/Phi-3-vision-128k-instruct")
model = Phi3VForCausalLM.from_pretrained("microsoft/Phi-3-vision-128k-instruct", device_map="cuda")
inputs = processor(prompt, [image], return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=500)
text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
```
"""

from phi3v_tools.model.checkpoint import DEFAULT_MODEL_ID, load_model, resolve_checkpoint
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.generation import generate
from phi3v_tools.model.image_processing import Phi3VImageProcessor, num_image_tokens
from phi3v_tools.model.modeling import Phi3VForCausalLM
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
