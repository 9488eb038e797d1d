"""The CPU suite in one command: model, runner and surfaces on the tiny checkpoint, one JSON, one PNG plot.

    .venv/bin/pip install -e '.[bench]'     # matplotlib, for the plot
    .venv/bin/python benchmarks/cpu_suite.py        # ~3 minutes on 2 cores

Runs ``model_cpu.py`` (load time, peak RSS, per-stage latency), ``runner_cpu.py`` (concurrency 8 and 32
vs sequential, the feature cache, constrained decoding), concurrency 1 and 4 as well, and
``surfaces_cpu.py`` (what each surface adds per call), each in a fresh process so their memory and
threads don't mix. Writes benchmarks/results/cpu_suite.json and benchmarks/results/cpu_suite.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run_script(name: str, *args: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        print(f"== {name} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--out", str(out), *args], check=True)
        return dict(json.loads(out.read_text()))


def low_concurrency() -> dict[str, Any]:
    """Concurrency 1 and 4 vs sequential, in this process (the runner script covers 8 and 32)."""
    sys.path.insert(0, str(HERE))
    from runner_cpu import concurrent_vs_sequential

    from phi3v_tools.runner import GenerationRequest, Runner
    from phi3v_tools.settings import Settings

    runner = Runner.load(Settings(model="tiny"), progress=False, warm_up=False)
    try:
        runner.generate_sync(GenerationRequest.from_text("warm up", max_new_tokens=2))
        return {f"concurrent_{n}": concurrent_vs_sequential(runner, n, 32) for n in (1, 4)}
    finally:
        runner.close()


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    runner = results["runner"]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    levels = [1, 4, 8, 32]
    rows = [results["low_concurrency"]["concurrent_1"], results["low_concurrency"]["concurrent_4"]]
    rows += [runner["concurrent_8"], runner["concurrent_32"]]
    left.plot(levels, [r["concurrent_tokens_per_s"] for r in rows], "o-", label="concurrent (batched)")
    left.plot(levels, [r["sequential_tokens_per_s"] for r in rows], "s--", label="one after another")
    left.set(xscale="log", xticks=levels, xticklabels=[str(n) for n in levels], xlabel="requests", ylabel="tokens/s")
    left.set_title("Throughput (tiny model, CPU)")
    left.legend()

    stages = ["preprocess_ms", "vision_ms", "prefill_ms_incl_vision", "generate_ms"]
    tasks = results["model"]["tasks"]
    for i, (name, task) in enumerate(tasks.items()):
        middle.bar([x + i * 0.25 for x in range(len(stages))], [task[s] for s in stages], width=0.25, label=name)
    middle.set_xticks([x + 0.25 for x in range(len(stages))], ["preprocess", "vision", "prefill+vision", "generate"])
    middle.set(ylabel="ms", title="One call, by stage")
    middle.legend()

    overhead = results["surfaces"]["overhead_ms"]
    right.barh(list(overhead), list(overhead.values()))
    right.set(xlabel="ms per call over a direct Toolbox call", title="What each surface adds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    results = {
        "model": run_script("model_cpu"),
        "runner": run_script("runner_cpu"),
        "low_concurrency": low_concurrency(),
        "surfaces": run_script("surfaces_cpu", "--calls", "40"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_suite.json").write_text(json.dumps(results, indent=2) + "\n")
    plotted = plot(results, RESULTS / "cpu_suite.png")
    print(f"wrote {RESULTS / 'cpu_suite.json'}" + (f" and {RESULTS / 'cpu_suite.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
