"""Run Python as a tools-only install (``pip install '.[remote,mcp]'``) sees it: the 'local' extra's packages
(torch, transformers, llguidance ...) cannot be imported, although this venv has them.

    python tests/without_local.py -c CODE [ARG ...]
    python tests/without_local.py -m MODULE [ARG ...]

The path finder is replaced by one that finds none of them, so ``import torch`` raises ModuleNotFoundError and
``importlib.util.find_spec("torch")`` is None, as they would be in a venv without them. A fresh venv per test
would need the package index (and minutes); this needs neither, and it also proves what a leftover
``sys.modules`` check cannot: that nothing on the path even tries to import them.
"""

from __future__ import annotations

import importlib.machinery
import runpy
import sys
from collections.abc import Sequence
from typing import Any

ABSENT = frozenset({"torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "llguidance", "tqdm"})


class _PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> Any:
        if fullname.partition(".")[0] in ABSENT:
            return None
        return super().find_spec(fullname, path, target)


def hide_local_packages() -> None:
    if any(name.partition(".")[0] in ABSENT for name in sys.modules):
        raise RuntimeError("a local package was imported before it could be hidden")
    sys.meta_path[:] = [
        _PathFinderWithout if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path
    ]


def main(argv: list[str]) -> None:
    hide_local_packages()
    if len(argv) < 2 or argv[0] not in ("-c", "-m"):
        raise SystemExit("usage: without_local.py -c CODE [ARG ...] | -m MODULE [ARG ...]")
    kind, target, args = argv[0], argv[1], argv[2:]
    if kind == "-c":
        sys.argv = ["-c", *args]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
