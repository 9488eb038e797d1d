"""Read the text of every image in a folder into a JSON Lines file.

    python examples/read_folder.py scans/ out.jsonl --fields title,author
    PHI3V_MODEL=tiny python examples/read_folder.py scans/ out.jsonl    # the tiny random model, offline

The calls go through the async API all at once (a bounded number in flight), so the shared runner batches
them. Each line is ``{"path": ..., "result": {...}}``, or ``{"path": ..., "error": "..."}`` for an image
that could not be read; the run goes on. Lines are written as results arrive, so their order is not the
folder's. The exit status is 0 when every image was read, and 1 when any was not (the lines with "error"
say which and why) or the folder holds no images, so that a script or a scheduled job notices.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phi3v_tools.api import toolbox_from_settings
from phi3v_tools.errors import Phi3VToolsError
from phi3v_tools.settings import Settings
from phi3v_tools.tools import Toolbox

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


async def read_one(tools: Toolbox, path: Path, fields: list[str] | None, slots: asyncio.Semaphore) -> dict[str, Any]:
    async with slots:
        try:
            result = await tools.aread_text(path, fields)
        except Phi3VToolsError as exc:
            return {"path": str(path), "error": str(exc)}
    return {"path": str(path), "result": result.model_dump(mode="json")}


async def read_folder(folder: Path, out: Path, fields: list[str] | None) -> tuple[int, int]:
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    settings = Settings.from_env(allowed_dirs=(folder,))
    tools = toolbox_from_settings(settings)
    slots = asyncio.Semaphore(settings.max_batch_size * 2)  # enough to fill batches, far below max_queue
    errors = 0
    with out.open("w", encoding="utf-8") as f, tqdm(total=len(paths), unit="image", file=sys.stderr) as bar:
        for next_done in asyncio.as_completed([read_one(tools, p, fields, slots) for p in paths]):
            line = await next_done
            errors += "error" in line
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            bar.update()
    return len(paths), errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a folder of images (not searched recursively)")
    parser.add_argument("out", type=Path, help="the JSON Lines file to write")
    parser.add_argument("--fields", help="also extract these fields, comma-separated (e.g. title,author)")
    args = parser.parse_args()
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    fields = [name.strip() for name in args.fields.split(",") if name.strip()] if args.fields else None
    total, errors = asyncio.run(read_folder(args.folder.resolve(), args.out, fields))
    if total == 0:
        print(f"no images in {args.folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})", file=sys.stderr)
        return 1
    print(f"{total} images, {errors} errors -> {args.out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
