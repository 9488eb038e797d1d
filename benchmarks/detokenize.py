"""Streaming text: decoding a short window per token (runner.TextDeltas) vs re-decoding the whole answer.

    .venv/bin/python benchmarks/detokenize.py [--tokenizer DIR] [--out benchmarks/results/detokenize.json]

Every streaming request (MCP progress, the CLI on a terminal, Runner.stream) turns each new token into
text on the runner's worker thread, the thread that drives the model. Milliseconds per token per
streaming row, at 500, 1000 and 2000 generated tokens. The tokenizer defaults to the official Phi-3-vision
one in ../shared/phi3v-reference when it is there, else the tiny checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OFFICIAL = REPO.parent / "shared" / "phi3v-reference" / "phi-3-vision-128k-instruct"
TEXT = "The quick brown fox jumps over the lazy dog; naïve café, 日本語のテキスト, 12.5 € 🎉. " * 300


def main(argv: list[str] | None = None) -> int:
    from phi3v_tools.model import make_tiny_checkpoint
    from phi3v_tools.model.processing import load_tokenizer
    from phi3v_tools.runner import TextDeltas

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=OFFICIAL if (OFFICIAL / "tokenizer.json").is_file() else None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "detokenize.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.tokenizer or make_tiny_checkpoint(Path(tmp) / "tiny")
        tokenizer = load_tokenizer(directory)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]

    def decode(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=True))

    results: dict[str, object] = {"tokenizer": "official Phi-3-vision" if args.tokenizer else "tiny checkpoint"}
    for n in (500, 1000, 2000):
        started = time.perf_counter()
        sent = ""
        for i in range(n):  # the former way: decode everything, send what is new
            text = decode(ids[: i + 1])
            if not text.endswith("\ufffd") and len(text) > len(sent):
                sent = text
        whole = (time.perf_counter() - started) / n * 1000
        started = time.perf_counter()
        stream = TextDeltas(decode)
        pieces = [stream.push(ids[: i + 1]) for i in range(n)]
        window = (time.perf_counter() - started) / n * 1000
        assert "".join(pieces) == sent, "the pieces must add up to the same text"
        results[f"{n}_tokens"] = {
            "whole_answer_ms_per_token": round(whole, 4),
            "window_ms_per_token": round(window, 4),
            "speedup": round(whole / window, 1),
        }
        print(n, results[f"{n}_tokens"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
