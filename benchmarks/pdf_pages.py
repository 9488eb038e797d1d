"""Pages per second of read_text on a PDF, tiny model on CPU: the text-layer path against the OCR path.

    .venv/bin/python benchmarks/pdf_pages.py [--pages 10] [--repeats 3] [--max-new-tokens 128] \
        [--out benchmarks/results/pdf_pages.json]      # about 2 minutes on 2 cores

One document of ``--pages`` pages, each an invoice with a real text layer, read through one Toolbox over one
engine, in one process, the runs interleaved:

- text layer: ``read_text`` with text layers on (the default): every page's text is its own, no model call;
- OCR, pages at once: the same document with ``PHI3V_PDF_TEXT_LAYER`` off: every page is read by the model, the
  pages sent to the engine together (what ``read_text`` on a scan does), so they share decode batches;
- OCR, page by page: one ``read_text(pages="k")`` call after another: what an agent that renders and reads one
  page at a time gets (the document is rendered again for each call, which this figure includes).

Reported: the median over ``--repeats`` runs of pages per second (wall time of the call, rendering included), the
rendering's share (the worker process: start, parse, draw), and the ratios. The tiny model's weights are random:
it writes until ``--max-new-tokens`` (the engine shortens read_text's 800 to it), so an OCR page's cost here is
that many decode steps at one row per page; the real model's pages stop where their text ends. ``--threads``
defaults to 1, as in ``engine_cpu.py`` (the tiny model's matrices are too small for intra-op threads to help).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from phi3v_tools.documents import DocumentPolicy  # noqa: E402
from phi3v_tools.images import ImagePolicy  # noqa: E402
from phi3v_tools.pdf_samples import INVOICE, document, text_content  # noqa: E402
from phi3v_tools.settings import Settings  # noqa: E402
from phi3v_tools.tools import TextReading, Toolbox  # noqa: E402


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), Python {platform.python_version()}"


def invoice_document(pages: int) -> bytes:
    """``pages`` invoices, each numbered, each with a real text layer."""
    contents = [text_content([*INVOICE, (72, 480, 10, f"Page {k} of {pages}")]) for k in range(1, pages + 1)]
    return document(contents)


def timed(call: Any) -> tuple[float, list[TextReading]]:
    started = time.perf_counter()
    readings = call()
    return time.perf_counter() - started, readings if isinstance(readings, list) else [readings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pdf_pages.json")
    args = parser.parse_args()

    from phi3v_tools.model.tiny import make_tiny_checkpoint
    from phi3v_tools.runner import Runner

    pdf = invoice_document(args.pages)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            model=str(make_tiny_checkpoint(Path(tmp) / "tiny")),
            cpu_threads=args.threads,
            max_new_tokens=args.max_new_tokens,
            cache_dir=Path(tmp) / "cache",
            feature_cache_mb=0,  # every run reads its pages afresh, as a new document would be
        )
        runner = Runner.load(settings, progress=False)
        runner.wait_until_warm(60)
        policy = ImagePolicy(allowed_dirs=())
        limits = DocumentPolicy(max_pages=max(args.pages, 10))
        text_tools = Toolbox(runner, policy, documents=limits)
        ocr_tools = Toolbox(runner, policy, documents=DocumentPolicy(max_pages=limits.max_pages, text_layer=False))
        runs: dict[str, list[float]] = {"text_layer": [], "ocr_at_once": [], "ocr_page_by_page": []}
        render: dict[str, list[float]] = {name: [] for name in runs}
        tokens: list[int] = []
        try:
            ocr_tools.read_text(pdf, pages="1")  # warm-up: the first JSON request compiles its grammar
            for _ in range(args.repeats):
                for name, call in (
                    ("text_layer", lambda: text_tools.read_text(pdf)),
                    ("ocr_at_once", lambda: ocr_tools.read_text(pdf)),
                    (
                        "ocr_page_by_page",
                        lambda: [ocr_tools.read_text(pdf, pages=str(k)) for k in range(1, args.pages + 1)],
                    ),
                ):
                    seconds, readings = timed(call)
                    pages = sum(len(r.pages or ()) for r in readings)
                    assert pages == args.pages, (name, pages)
                    sources = {p.source for r in readings for p in r.pages or ()}
                    assert sources == ({"text"} if name == "text_layer" else {"ocr"}), (name, sources)
                    runs[name].append(seconds)
                    render[name].append(sum(r.call.seconds["render"] for r in readings))
                    if name == "ocr_at_once":
                        tokens.append(sum(r.call.completion_tokens for r in readings))
        finally:
            runner.close()

    pages_per_s = {name: round(args.pages / statistics.median(times), 3) for name, times in runs.items()}
    results = {
        "machine": machine(),
        "model": "tiny random checkpoint (phi3v_tools.model.tiny)",
        "pages": args.pages,
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "ocr_completion_tokens_per_page": round(statistics.median(tokens) / args.pages, 1),
        "pages_per_s": pages_per_s,
        "median_call_s": {name: round(statistics.median(times), 3) for name, times in runs.items()},
        "median_render_s": {name: round(statistics.median(times), 3) for name, times in render.items()},
        "ratios": {
            "text_layer_over_ocr_at_once": round(pages_per_s["text_layer"] / pages_per_s["ocr_at_once"], 1),
            "ocr_at_once_over_page_by_page": round(pages_per_s["ocr_at_once"] / pages_per_s["ocr_page_by_page"], 2),
        },
    }
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
