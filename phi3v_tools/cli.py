"""The ``phi3v-tools`` command.

Options are bound to ``PHI3V_*`` environment variables here, once, and handed down as a Settings object.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from phi3v_tools.errors import Phi3VToolsError
from phi3v_tools.settings import Settings

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="phi3v-tools")
def main() -> None:
    """Phi-3-vision as tools for agents.

    \b
    Examples:
      phi3v-tools demo                              # offline, tiny random model
      PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct phi3v-tools demo
      phi3v-tools make-tiny-checkpoint ./tiny       # a test checkpoint in the official layout
    """


@main.command()
@click.option(
    "--model",
    envvar="PHI3V_MODEL",
    default="tiny",
    show_default=True,
    help="Checkpoint directory, hub id, or 'tiny' (the built-in random test model). Env: PHI3V_MODEL.",
)
@click.option("--device", envvar="PHI3V_DEVICE", default=None, help="cuda, cuda:1, cpu (default: CUDA if present).")
@click.option("--num-crops", envvar="PHI3V_NUM_CROPS", type=int, default=None, help="Crops per image (1-16).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
def demo(model: str, device: str | None, num_crops: int | None, max_new_tokens: int) -> None:
    """Run the seed notebook's three tasks (chart, book cover, two photos) through the model API."""
    settings = Settings.from_env(model=model, device=device, num_crops=num_crops)
    try:
        run_demo(settings, max_new_tokens)
    except Phi3VToolsError as exc:
        raise click.ClickException(str(exc)) from exc


def run_demo(settings: Settings, max_new_tokens: int) -> None:
    from phi3v_tools.demo import SEED_TASKS
    from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor

    started = time.perf_counter()
    processor = Phi3VProcessor.from_pretrained(
        settings.model, num_crops=settings.num_crops, cache_dir=settings.cache_dir
    )
    model = Phi3VForCausalLM.from_pretrained(
        settings.model,
        device_map=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
        attn_implementation=settings.attn_implementation,
    )
    click.echo(
        f"model {settings.model} on {model.device} ({str(model.dtype).removeprefix('torch.')}, "
        f"{model.attn_implementation}), num_crops {processor.num_crops}, loaded in {time.perf_counter() - started:.1f}s"
    )
    if settings.model == "tiny":
        click.echo("(the tiny model has random weights: expect random words; set PHI3V_MODEL for real answers)")
    for task in SEED_TASKS:
        messages = [{"role": "user", "content": task.user_content}]
        prompt = processor.apply_chat_template(messages)
        inputs = processor(prompt, task.images(), return_tensors="pt").to(model.device)
        t0 = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            do_sample=False,
            eos_token_id=processor.tokenizer.eos_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        answer = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        click.echo(f"\n## {task.name}: {task.question}")
        click.echo(
            f"[{inputs['input_ids'].shape[1]} prompt tokens, {new.shape[1]} new, {time.perf_counter() - t0:.2f}s]"
        )
        click.echo(answer.strip() or "(empty answer)")


@main.command("make-tiny-checkpoint")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--num-crops", type=int, default=4, show_default=True, help="Default num_crops of its processor.")
def make_tiny_checkpoint_command(directory: Path, seed: int, num_crops: int) -> None:
    """Write a tiny random Phi-3-vision checkpoint in the official layout to DIRECTORY."""
    from phi3v_tools.model import make_tiny_checkpoint

    path = make_tiny_checkpoint(directory, seed=seed, num_crops=num_crops)
    click.echo(f"wrote a tiny Phi-3-vision checkpoint to {path}")
