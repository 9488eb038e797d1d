"""Finding and loading official Phi-3-vision checkpoints, without running any code from them.

A checkpoint is a directory with ``config.json``, tokenizer files, ``preprocessor_config.json`` and either
``model.safetensors`` or sharded ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``.
A hub id is downloaded with ``huggingface_hub`` (only those files: never ``*.py``). The ``auto_map`` entries
of the official config are ignored.

Weights are mapped by one declarative table, :data:`CHECKPOINT_TO_MODULE`; anything the table does not
place, and anything the model needs but the checkpoint lacks, is an error that names the tensors.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from phi3v_tools.errors import CheckpointError, DeviceError, ModelNotFoundError, OptionalDependencyError
from phi3v_tools.model.config import Phi3VConfig
from phi3v_tools.model.modeling import Phi3VForCausalLM
from phi3v_tools.model.names import (  # re-exported from here too
    DEFAULT_CACHE_DIR,
    DEFAULT_MODEL_ID,
    TINY_MODEL_ID,
    did_you_mean,
)
from phi3v_tools.model.quantize import MODES, quantize_modules

CHECKPOINT_FILES = ["*.json", "*.safetensors"]  # what a download fetches: data, never code
PROCESSOR_FILES = ["*.json"]

# Checkpoint name prefix -> module prefix, first match wins. "{clip}" is where CLIPVisionModel keeps its
# weights in the installed transformers ("" in 5.x, "vision_model." before).
CHECKPOINT_TO_MODULE: tuple[tuple[str, str], ...] = (
    ("model.vision_embed_tokens.img_processor.vision_model.", "vision_tower.{clip}"),
    ("model.vision_embed_tokens.img_projection.", "image_projection.img_projection."),
    ("model.vision_embed_tokens.glb_GN", "image_projection.glb_GN"),
    ("model.vision_embed_tokens.sub_GN", "image_projection.sub_GN"),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# A copy of model.embed_tokens that fine-tuned derivatives sometimes save; verified equal, then dropped.
EMBEDDING_ALIAS = "model.vision_embed_tokens.wte.weight"

M = TypeVar("M", bound=Phi3VForCausalLM)


# ---------------------------------------------------------------------------------------------------------------------
# Finding the files


def resolve_checkpoint(
    path_or_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    weights: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local checkpoint directory for a path or a hub id, downloading (with progress) when needed.

    ``weights=False`` fetches only the small files (configs, tokenizer), as a processor needs.
    ``"tiny"`` is the package's own tiny random checkpoint, written under ``cache_dir`` on first use.
    """
    if os.fspath(path_or_id) == TINY_MODEL_ID:
        from phi3v_tools.model.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint(Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR)
    path = Path(os.fspath(path_or_id)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; it is not a Phi-3-vision checkpoint directory")
        return path
    text = os.fspath(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(
            f"{text!r} is neither a checkpoint directory nor a hub id like {DEFAULT_MODEL_ID!r}.{did_you_mean(text)} "
            "Point PHI3V_MODEL (or --model) at a local directory holding config.json and the safetensors, "
            f"or use {TINY_MODEL_ID!r} for the built-in random test model."
        )
    return Path(_download(text, revision, CHECKPOINT_FILES if weights else PROCESSOR_FILES))


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelNotFoundError(
            f"downloading {repo_id!r} needs huggingface_hub, which is not installed: pip install 'huggingface_hub>=1.0'"
        ) from exc
    try:
        return str(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc})."
            f"{did_you_mean(repo_id)} "
            "Offline, download it elsewhere (e.g. `hf download microsoft/Phi-3-vision-128k-instruct "
            "--local-dir DIR`), copy DIR here and set PHI3V_MODEL=DIR (or pass --model DIR)."
        ) from exc


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read {index}: {exc}") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        raise CheckpointError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks weight files named by its index: {', '.join(missing)}")
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Name mapping


def clip_prefix(model: Phi3VForCausalLM) -> str:
    """Where the installed CLIPVisionModel keeps its weights ("" or "vision_model.")."""
    name = next(n for n, _ in model.vision_tower.named_parameters() if n.endswith("embeddings.class_embedding"))
    return name[: -len("embeddings.class_embedding")]


def map_checkpoint_name(name: str, clip: str) -> str | None:
    """The model parameter a checkpoint tensor loads into, or None when no rule places it."""
    for source, target in CHECKPOINT_TO_MODULE:
        if name.startswith(source):
            return target.format(clip=clip) + name[len(source) :]
    return None


def checkpoint_name(module_name: str, clip: str) -> str:
    """The inverse of :func:`map_checkpoint_name`: how the official checkpoints name a model parameter."""
    for source, target in CHECKPOINT_TO_MODULE:
        prefix = target.format(clip=clip)
        if module_name.startswith(prefix):
            return source + module_name[len(prefix) :]
    raise ValueError(f"no checkpoint name for the parameter {module_name}")


def unused_checkpoint_names(config: Phi3VConfig) -> set[str]:
    """Prefixes of checkpoint tensors that are read but never used: CLIP layers after ``layer_idx``."""
    base = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers."
    total = int(config.vision_config.num_hidden_layers)
    return {f"{base}{i}." for i in range(config.vision_layers_used, total)}


def plan_loading(
    checkpoint_names: list[str], model: Phi3VForCausalLM
) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """(checkpoint -> parameter map, skipped names, unexpected names, missing names), all in checkpoint naming."""
    clip = clip_prefix(model)
    skipped_prefixes = tuple(unused_checkpoint_names(model.config))
    expected = {name for name, _ in model.named_parameters()}
    mapping: dict[str, str] = {}
    skipped, unexpected = [], []
    for name in checkpoint_names:
        if name.startswith(skipped_prefixes) or name == EMBEDDING_ALIAS:
            skipped.append(name)
            continue
        target = map_checkpoint_name(name, clip)
        if target is None or target not in expected:
            unexpected.append(name)
        else:
            mapping[name] = target
    missing = sorted(checkpoint_name(name, clip) for name in expected - set(mapping.values()))
    return mapping, skipped, sorted(unexpected), missing


# ---------------------------------------------------------------------------------------------------------------------
# Device, dtype, attention


def choose_device(device_map: Any = None, device: Any = None) -> torch.device:
    """One device from transformers-style ``device_map`` ("auto", "cuda", "cpu", {"": dev}) or ``device``."""
    choice = device if device is not None else device_map
    if isinstance(choice, dict):
        targets = set(choice.values())
        if len(targets) != 1:
            raise ValueError(
                f"device_map splits the model over {sorted(map(str, targets))}; Phi-3-vision (4.2 B parameters) "
                "runs on one device: pass one device, e.g. device_map='cuda:0'"
            )
        choice = targets.pop()
    if choice is None or choice == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(choice, int):
        return torch.device("cuda", choice)
    return torch.device(choice)


def _cuda_install_hint() -> str:
    pin = f"torch=={torch.__version__.split('+')[0]}"
    return (
        f"install a CUDA build of PyTorch (on Linux PyPI's is one: pip install --force-reinstall '{pin}'; "
        "see https://pytorch.org/get-started/locally/), or use the CPU (PHI3V_DEVICE=cpu)"
    )


def check_device(device: torch.device) -> None:
    """Refuse a device this PyTorch cannot use, with what to do instead (a :class:`DeviceError`), before loading."""
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceError(
                f"device {str(device)!r} was asked for, but this PyTorch ({torch.__version__}) is built without CUDA; "
                + _cuda_install_hint()
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(
                f"device {str(device)!r} was asked for, but PyTorch sees no CUDA GPU (check the driver with "
                "nvidia-smi, and CUDA_VISIBLE_DEVICES); or use the CPU (PHI3V_DEVICE=cpu)"
            )
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"device {str(device)!r} was asked for, but PyTorch sees {count} CUDA GPU{'s' if count > 1 else ''} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            f"device 'mps' (Apple silicon) was asked for, but this PyTorch ({torch.__version__}) cannot use it "
            "here (it needs macOS 12.3+ on Apple silicon); use PHI3V_DEVICE=cpu"
        )


def choose_dtype(dtype: Any, device: torch.device, config: Phi3VConfig) -> torch.dtype:
    """bf16 on CUDA, fp16 on MPS (untested: no Mac here) and fp32 on CPU unless asked; "auto" = the checkpoint's
    own dtype."""
    if dtype is None:
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if dtype == "auto":
        dtype = config.raw.get("torch_dtype") or config.raw.get("dtype") or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use 'bfloat16', 'float16', 'float32' or 'auto'")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or a string, got {dtype!r}")
    return dtype


def check_quantization(mode: str, device: torch.device) -> None:
    """Refuse a quantization mode that is unknown, or that this PyTorch cannot run, before anything loads."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "int4" and device.type == "cpu" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise DeviceError(
            f"int4 on the CPU needs PyTorch 2.5 or later (this is {torch.__version__}); use int8, or upgrade torch"
        )


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attn_implementation(requested: str | None, device: torch.device) -> str:
    """SDPA by default, flash-attn 2 on CUDA when installed; "eager" or an explicit choice when asked."""
    if requested is None:
        return "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"
    if requested not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be 'sdpa', 'eager' or 'flash_attention_2', got {requested!r}")
    if requested == "flash_attention_2":
        if device.type != "cuda":
            raise DeviceError(
                f"flash_attention_2 runs on CUDA only, not on {device.type}; use sdpa (PHI3V_ATTN_IMPLEMENTATION=sdpa)"
            )
        if not flash_attn_available():
            raise OptionalDependencyError("flash-attn", "gpu", "attn_implementation='flash_attention_2'")
    return requested


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def build_empty_model(config: Phi3VConfig, model_cls: type[M] = Phi3VForCausalLM) -> M:  # type: ignore[assignment]
    """The model with every parameter on the meta device (no memory, no init), buffers real on the CPU."""
    with torch.device("meta"):
        model = model_cls(config)
    _rebuild_buffers(model)
    return model


def _rebuild_buffers(model: Phi3VForCausalLM) -> None:
    """Recompute the non-persistent buffers that building on the meta device left without values."""
    lm = model.language_model.model
    lm.rotary_emb = Phi3RotaryEmbedding(config=model.config.text_config)
    embeddings = model.vision_tower.embeddings
    if getattr(embeddings, "position_ids", None) is not None:
        embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
    left = [name for name, buf in model.named_buffers() if buf.is_meta]
    if left:
        raise CheckpointError(f"internal: buffers left on the meta device after building: {', '.join(left)}")


def load_model(
    path_or_id: str | os.PathLike[str],
    *,
    model_cls: type[M] = Phi3VForCausalLM,  # type: ignore[assignment]
    dtype: Any = None,
    torch_dtype: Any = None,
    device_map: Any = None,
    device: Any = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    trust_remote_code: bool | None = None,
    quantization: str | None = None,
    max_context: int = 4096,
    num_crops: int = 16,
    **kwargs: Any,
) -> M:
    """Load an official Phi-3-vision checkpoint natively.

    Args:
        path_or_id: a checkpoint directory, a hub id (downloaded when online), or "tiny".
        dtype / torch_dtype: ``torch.bfloat16``, ``"float32"``, ``"auto"`` (the checkpoint's), or None for
            bf16 on CUDA and fp32 on CPU.
        device_map / device: one device ("cuda", "cuda:1", "cpu", "auto", {"": "cuda:0"}).
        attn_implementation: "sdpa" (default), "flash_attention_2" (default on CUDA when installed) or "eager".
        progress: show a progress bar while the weights are read.
        trust_remote_code: accepted for seed compatibility and ignored: no checkpoint code is ever run.
        quantization: "int8" or "int4" quantizes the language model's decoder linears as they are read
            (:mod:`phi3v_tools.model.quantize`); None keeps every weight in ``dtype``.
        max_context / num_crops: the longest request and the crops per image to leave room for. A load that
            cannot fit them beside the weights fails before it allocates, naming a mode that fits
            (:func:`~phi3v_tools.model.memory.check_fits`).
    """
    attn_implementation = kwargs.pop("_attn_implementation", attn_implementation)
    kwargs.pop("low_cpu_mem_usage", None)
    if kwargs:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
    del trust_remote_code  # no remote code, ever
    started = time.perf_counter()
    directory = resolve_checkpoint(path_or_id, revision=revision, cache_dir=cache_dir)
    config = Phi3VConfig.from_json_file(directory / "config.json")
    config.name_or_path = os.fspath(path_or_id)
    target_device = choose_device(device_map, device)
    check_device(target_device)
    target_dtype = choose_dtype(dtype if dtype is not None else torch_dtype, target_device, config)
    config = config.with_attn_implementation(choose_attn_implementation(attn_implementation, target_device))

    model = build_empty_model(config, model_cls)
    if quantization is not None:
        check_quantization(quantization, target_device)
    from phi3v_tools.model.memory import check_fits

    check_fits(config, target_device, target_dtype, quantization, num_crops=num_crops, max_context=max_context)
    load_weights(
        model, weight_files(directory), target_device, target_dtype, progress=progress, quantization=quantization
    )
    model.to(target_device)  # the rebuilt buffers
    model.eval()
    model.load_seconds = time.perf_counter() - started  # type: ignore[assignment]
    return model


def load_weights(
    model: Phi3VForCausalLM,
    files: list[Path],
    device: torch.device,
    dtype: torch.dtype,
    *,
    progress: bool = False,
    quantization: str | None = None,
) -> None:
    """Read every tensor of ``files`` into ``model`` (built on meta) by the name table; strict."""
    keys: dict[str, Path] = {}  # checkpoint name -> the file holding it
    for file in files:
        with _open(file) as handle:
            keys.update(dict.fromkeys(handle.keys(), file))
    _load_state(model, keys, files[0].parent, device, dtype, progress, quantization)


def _open(file: Path) -> Any:
    try:
        return safe_open(os.fspath(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {file}: {exc}") from exc


def _load_state(
    model: Phi3VForCausalLM,
    keys: dict[str, Path],
    directory: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    quantization: str | None = None,
) -> None:
    """Check the names against the model, then load each tensor (converted, or quantized) by the name table.

    One file is open (memory-mapped) at a time, and a tensor converted on the way (another dtype or device,
    or quantized) releases its shard's pages once read: a load holds the model and one shard, not the whole
    checkpoint, which on a laptop is the difference between fitting and swapping. A tensor kept as the file
    stores it on the CPU stays a view of the file's (clean, reclaimable) pages instead of a copy.
    """
    mapping, _skipped, unexpected, missing = plan_loading(sorted(keys), model)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"not used by Phi-3-vision: {_listing(unexpected)}")
        raise CheckpointError(f"the weights in {directory} do not match the model; " + "; ".join(parts))

    params = dict(model.named_parameters())
    swapped = quantize_modules(model, quantization, dtype, device) if quantization is not None else {}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in mapping:
        by_file.setdefault(keys[name], []).append(name)
    with tqdm(total=len(mapping), desc="loading weights", unit="tensor", disable=not progress) as bar:
        for file, names in by_file.items():
            with _open(file) as handle:
                for name in names:
                    target = mapping[name]
                    tensor = handle.get_tensor(name)
                    expected_shape = tuple(params[target].shape)
                    if tuple(tensor.shape) != expected_shape:
                        raise CheckpointError(
                            f"{name} has shape {tuple(tensor.shape)} but the config implies {expected_shape}"
                        )
                    owner, _, kind = target.rpartition(".")
                    if owner in swapped and kind == "weight":  # quantized one layer at a time: never all in 16 bits
                        for buffer, value in swapped[owner].quantized(tensor.to(device=device, dtype=dtype)).items():
                            state[f"{owner}.{buffer}"] = value
                    else:
                        state[target] = tensor.to(device=device, dtype=dtype)
                    del tensor
                    bar.update()
    if EMBEDDING_ALIAS in keys:
        with _open(keys[EMBEDDING_ALIAS]) as handle:  # compared on the CPU: no second copy on the device
            alias = handle.get_tensor(EMBEDDING_ALIAS).to(dtype=dtype)
        if not torch.equal(alias, state["language_model.model.embed_tokens.weight"].cpu()):
            raise CheckpointError(f"{EMBEDDING_ALIAS} differs from model.embed_tokens.weight; refusing to guess")
    model.load_state_dict(state, strict=False, assign=True)
    if device.type == "cuda":  # the temporaries of converting and quantizing: free for the KV cache and features
        torch.cuda.empty_cache()


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
