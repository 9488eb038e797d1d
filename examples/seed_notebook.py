"""The seed notebook's three Phi-3-vision calls, written as the notebook writes them, on the native model.

    python examples/seed_notebook.py                 # the tiny random model (offline; random words)
    PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct python examples/seed_notebook.py

Only the imports differ from the official model card: ``phi3v_tools.model`` instead of ``transformers.Auto*``
with ``trust_remote_code=True``. The pictures are drawn by ``phi3v_tools.demo`` (the notebook's own cannot be
downloaded here): a revenue chart, a book cover, two similar football scenes.
"""

import os

import torch

from phi3v_tools.demo import book_cover, revenue_chart, scene
from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor

model_id = os.environ.get("PHI3V_MODEL", "tiny")
device = "cuda" if torch.cuda.is_available() else "cpu"

model = Phi3VForCausalLM.from_pretrained(
    model_id, device_map=device, trust_remote_code=True, torch_dtype="auto", _attn_implementation="sdpa"
)
processor = Phi3VProcessor.from_pretrained(model_id, trust_remote_code=True)
generation_args = {
    "max_new_tokens": int(os.environ.get("MAX_NEW_TOKENS", "500")),
    "temperature": 0.0,
    "do_sample": False,
}


def ask(content: str, images: list) -> str:
    messages = [{"role": "user", "content": content}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(prompt, images, return_tensors="pt").to(device)
    generate_ids = model.generate(**inputs, eos_token_id=processor.tokenizer.eos_token_id, **generation_args)
    generate_ids = generate_ids[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]


# 1. A chart: "Could you please introduce this stock to me?"
print(ask("<|image_1|>\nCould you please introduce this stock to me?", [revenue_chart()]))
# 2. A book cover: title and author.
print(ask("<|image_1|>\nWhat is the title of this book, and who is its author?", [book_cover()]))
# 3. Two photos: what is different.
print(ask("<|image_1|>\n<|image_2|>\nWhat is the difference between these two images?", [scene(False), scene(True)]))
