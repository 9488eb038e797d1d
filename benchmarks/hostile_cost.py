"""What each hostile input of the reliability corpus costs the server: wall time and peak memory, per case.

Every case of ``tests/reliability/corpus.py`` is sent through the Python API and over MCP streamable HTTP (uvicorn
in this process, loopback), with an innocent ``describe_image`` call beside it, over the tiny checkpoint with
16-token answers, as the test suite does. For each call it records the wall time of the hostile call and of the
innocent one, and the process's peak resident memory above what it held before the call (Linux: the peak is
reset through ``/proc/self/clear_refs`` before each call). Then the worst case of each group, plus the review's
20 MB schema. Writes ``benchmarks/results/hostile_cost.json``.

    .venv/bin/python benchmarks/hostile_cost.py
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the corpus and its loopback servers live with the tests

import torch  # noqa: E402

from phi3v_tools.model import Phi3VForCausalLM, Phi3VProcessor, make_tiny_checkpoint  # noqa: E402
from phi3v_tools.runner import Runner  # noqa: E402
from phi3v_tools.settings import Settings  # noqa: E402
from phi3v_tools.tools import Toolbox  # noqa: E402
from tests.hostile import serving  # noqa: E402
from tests.mcp_http import http_server  # noqa: E402
from tests.reliability.corpus import corpus, make_env  # noqa: E402
from tests.reliability.surfaces import McpHttpSurface, Outcome, PythonSurface  # noqa: E402


def _status(field: str) -> int:
    """A VmRSS/VmHWM figure of this process in KiB (0 where /proc is not there)."""
    try:
        match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(surface: Any, tool: str, args: dict[str, Any], good: str) -> dict[str, Any]:
    exact = _reset_peak()
    before = _status("VmRSS")

    def timed(*call: Any) -> tuple[Outcome, float]:
        outcome = surface.call(*call)
        return outcome, time.perf_counter() - started

    with ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        innocent = pool.submit(timed, "describe_image", {"image": good, "detail": "brief"})
        hostile = pool.submit(timed, tool, args)
        outcome, hostile_s = hostile.result(300)
        beside, innocent_s = innocent.result(300)
    return {
        "seconds": round(hostile_s, 4),
        "innocent_seconds": round(innocent_s, 4),
        "innocent_ok": beside.error is None,
        "peak_mib": round(max(_status("VmHWM") - before, 0) / 1024, 1) if exact else None,
        "outcome": "error" if outcome.error is not None else "result",
        "message": (outcome.error or "")[:160],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--surfaces", default="python,mcp_http")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hostile_cost.json")
    options = parser.parse_args()
    torch.set_num_threads(1)
    surfaces_wanted = options.surfaces.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, serving("127.0.0.1") as web, serving("127.0.0.2") as internal:
        root = Path(tmp)
        (root / "env").mkdir()
        env = make_env(root / "env", web, internal)
        tiny = make_tiny_checkpoint(root / "tiny")
        settings = Settings(model=str(tiny), max_new_tokens=16, batch_window_ms=1, allowed_dirs=(env.allowed,))
        runner = Runner(Phi3VForCausalLM.from_pretrained(tiny), Phi3VProcessor.from_pretrained(tiny), settings)
        runner.grammars.warm_up()
        toolbox = Toolbox(runner, env.policy())
        try:
            with http_server(settings, toolbox) as url:
                surfaces = {"python": PythonSurface(toolbox), "mcp_http": McpHttpSurface(url)}
                for surface in surfaces.values():  # warm up: first calls allocate for good
                    for _ in range(3):
                        surface.call("describe_image", {"image": str(env.good), "detail": "brief"})
                extra = [
                    (
                        "schemas",
                        "schema-with-a-20-mb-description",
                        "ask_images",
                        {
                            "images": [str(env.good)],
                            "question": "q",
                            "output_schema": {"type": "string", "description": "x" * 20 * 2**20},
                        },
                    )
                ]
                cases = [(c.group, c.id, c.tool, c, c.surfaces) for c in corpus()]
                cases += [(g, i, t, a, ("python", "mcp_http")) for g, i, t, a in extra]
                for group, case_id, tool, case_or_args, allowed in cases:
                    for name in surfaces_wanted:
                        if name not in allowed:
                            continue
                        args = case_or_args.args(env) if hasattr(case_or_args, "args") else case_or_args
                        row = {"group": group, "case": case_id, "surface": name}
                        row.update(measure(surfaces[name], tool, args, str(env.good)))
                        rows.append(row)
                        print(
                            f"{group:9s} {case_id:52s} {name:8s} {row['seconds']:7.3f} s  "
                            f"{row['peak_mib'] if row['peak_mib'] is not None else '-':>7} MiB  "
                            f"innocent {row['innocent_seconds']:.3f} s {'ok' if row['innocent_ok'] else 'FAILED'}"
                        )
        finally:
            runner.close()
    worst: dict[str, Any] = {}
    for group in sorted({r["group"] for r in rows}):
        mine = [r for r in rows if r["group"] == group]
        slow = max(mine, key=lambda r: r["seconds"])
        big = max(mine, key=lambda r: r["peak_mib"] or 0)
        worst[group] = {
            "cases": len({r["case"] for r in mine}),
            "slowest": {k: slow[k] for k in ("case", "surface", "seconds", "innocent_seconds")},
            "largest": {k: big[k] for k in ("case", "surface", "peak_mib")},
            "innocent_all_ok": all(r["innocent_ok"] for r in mine),
            "innocent_slowest_s": max(r["innocent_seconds"] for r in mine),
        }
    report = {
        "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch thread, "
        f"{__import__('os').cpu_count()} CPUs, no GPU; tiny checkpoint, 16-token answers",
        "date": time.strftime("%Y-%m-%d"),
        "cases": len({r["case"] for r in rows}),
        "calls": len(rows),
        "worst_per_group": worst,
        "rows": rows,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(worst, indent=1))


if __name__ == "__main__":
    main()
