"""Decode bombs: time and peak memory of decoding each one with plain Pillow (before) and through decode_bytes (after).

    .venv/bin/python benchmarks/decode_bombs.py [--timeout 60] [--out benchmarks/results/decode_bombs.json]

Each bomb (tests/bombs.py) is built at full size, under the 20 MiB byte cap and the 40 Mpx pixel cap, and
decoded in a fresh subprocess that reports its time and its peak resident (VmHWM) and virtual (VmPeak) memory;
"decode MiB" is VmHWM minus the resident size before decoding (imports excluded). "Before" is Pillow as
phi3v-tools called it (open, first frame, load, EXIF orientation, the old mode conversions); "after" is
``phi3v_tools.images.decode_bytes``. A process that runs past ``--timeout`` is killed and reported as such,
with the per-scan cost measured on a smaller copy to estimate the full run.

Then the two ways to bound a decode are compared on normal pictures (1 and 12 Mpx, JPEG and PNG): the
structural pre-checks in this process against a separate decoding process under rlimits, both a fresh
process per image and a persistent worker fed over a pipe (the pixels come back as raw RGB).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MEMORY_LIMIT = 6 * 2**30  # address space of each child: keeps a bomb from taking the machine down
MAX_BYTES = 20 * 2**20  # the default byte cap: every bomb fits under it
BIG_POLICY_BYTES = 64 * 2**20  # the normal-picture comparison includes PNGs over 20 MiB


def bombs() -> dict[str, tuple[str, Any]]:
    """name -> (what it is, builder of its bytes)."""
    from tests import bombs as b

    return {
        "tiff-huge-tile": ("1x1 deflate TIFF, one 32768x32768 tile", lambda: b.tiff_huge_tile(32768)),
        "tiff-huge-rows-per-strip": ("4096x1 YCbCr TIFF, RowsPerStrip 65536", lambda: b.tiff_huge_strip(4096, 65536)),
        "tiff-huge-byte-count": ("1x1 deflate TIFF, a 4 GiB strip byte count", lambda: b.tiff_huge_byte_count()),
        "tiff-many-strips": ("1x2 TIFF listing 3 million strips", lambda: b.tiff_many_strips(3_000_000)),
        "tiff-many-entries": ("BigTIFF, one IFD of 1 million entries", lambda: b.tiff_many_entries(1_000_000)),
        "tiff-long-chain": ("1x1 TIFF + a chain of 3 million IFDs", lambda: b.tiff_long_chain(3_000_000)),
        "tiff-exif-subifd": ("1x1 TIFF, EXIF sub-IFD of 65535 entries", lambda: b.tiff_huge_subifd(65535)),
        "jpeg-repeated-scans": (
            "4096x4096 progressive JPEG, one 33-byte scan repeated to 20 MiB",
            lambda: b.jpeg_repeated_scans(4096, fill_to=MAX_BYTES),
        ),
        "mpo-repeated-scans": (
            "MPO, first frame 256x256 with one 12-byte scan repeated to 20 MiB",
            lambda: b.mpo_repeated_scans(fill_to=MAX_BYTES),
        ),
        "jpeg-many-markers": ("8x8 JPEG after 5 million empty COM segments", lambda: b.jpeg_many_markers(5_000_000)),
        "png-many-chunks": ("16x12 PNG after 1.7 million empty chunks", lambda: b.png_many_chunks(1_700_000)),
        "gif-many-extensions": ("8x8 GIF after 6.9 million empty extensions", lambda: b.gif_many_extensions(6_900_000)),
        "bmp-rle8-single-runs": ("4096x2500 RLE8 BMP of one-pixel runs", lambda: b.bmp_rle8(4096, 2500)),
        "png-huge-exif": ("8x8 PNG, 16 MB eXIf: 65535 entries, orientation 6", lambda: b.png_with_exif(b.exif_block())),
        "webp-huge-exif": (
            "8x8 WebP, 16 MB EXIF: 65535 entries, orientation 6",
            lambda: b.webp_with_exif(b.exif_block()),
        ),
        "valid-float-tiff-36mpx": ("a valid 6000x6000 32-bit float TIFF (memory of the conversion)", b.float_tiff),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Child side: one decode, then the figures on stdout as JSON


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmPeak", "VmRSS"):
                values[key] = int(rest.split()[0]) // 1024  # MiB
    return values


def _old_to_rgb(image: Any) -> Any:
    """phi3v-tools' to_rgb before the change (git 1311b26): getexif on any block, three float64 copies."""
    import numpy as np
    from PIL import Image, ImageOps

    image.load()
    if image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / peak if peak > 255.0 else 1.0
        image = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def child(mode: str, path: str) -> None:
    import warnings

    from PIL import Image

    from phi3v_tools.errors import ImageError
    from phi3v_tools.images import ImagePolicy, decode_bytes

    warnings.simplefilter("ignore")
    data = Path(path).read_bytes()
    policy = ImagePolicy(allowed_dirs=(), max_bytes=max(BIG_POLICY_BYTES, len(data)))
    Image.init()
    before = _status()["VmRSS"]
    start = time.perf_counter()
    outcome = "decoded"
    try:
        if mode == "before":
            image = Image.open(io.BytesIO(data), formats=["BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP"])
            image.seek(0)
            rgb = _old_to_rgb(image)
            outcome = f"decoded {rgb.size[0]}x{rgb.size[1]}"
        else:
            loaded = decode_bytes(data, "the bomb", policy)
            outcome = f"decoded {loaded.width}x{loaded.height}"
    except ImageError as exc:
        outcome = f"ImageError: {exc}"
    except Exception as exc:  # plain Pillow: whatever it raises
        outcome = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    status = _status()
    print(
        json.dumps(
            {
                "seconds": round(seconds, 3),
                "peak_rss_mib": status["VmHWM"],
                "decode_mib": status["VmHWM"] - before,
                "peak_vm_mib": status["VmPeak"],
                "outcome": outcome[:300],
            }
        )
    )


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_child(mode: str, path: Path, timeout: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, str(path)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "killed_after_s": timeout, "outcome": f"still decoding after {timeout:.0f} s: killed"}
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr or "").strip().splitlines()[-1:] or [""]
        return {"seconds": round(time.perf_counter() - start, 3), "outcome": f"exit {done.returncode}: {tail[0]}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def per_scan_seconds(folder: Path, name: str) -> float:
    """The cost of one repeated scan, from a smaller copy of the same picture (for the full run's estimate)."""
    from tests import bombs as b

    scans = 300 if name.startswith("jpeg") else 20000
    small = folder / f"{name}-{scans}"
    small.write_bytes(b.jpeg_repeated_scans(4096, scans) if name.startswith("jpeg") else b.mpo_repeated_scans(scans))
    figures = run_child("before", small, 600)
    return float(figures["seconds"]) / scans


# ---------------------------------------------------------------------------------------------------------------------
# Pre-checks in process vs a separate decoding process


WORKER = r"""
import io, resource, struct, sys
from multiprocessing import shared_memory
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
import numpy as np
from PIL import Image
Image.init()
shm = shared_memory.SharedMemory(name=sys.argv[1])
from multiprocessing import resource_tracker
resource_tracker.unregister(shm._name, "shared_memory")  # the parent owns it (Python < 3.13 would unlink it)
read, write = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = read.read(4)
    if len(head) < 4:
        break
    size = struct.unpack("<I", head)[0]
    image = Image.open(io.BytesIO(shm.buf[:size]), formats=["BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP"])
    image.load()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    out = np.ndarray((rgb.height, rgb.width, 3), np.uint8, buffer=shm.buf, offset=SHM_INPUT)
    out[...] = np.asarray(rgb)
    del out
    write.write(struct.pack("<II", rgb.width, rgb.height))
    write.flush()
shm.close()
""".replace("MEMORY_CAP", str(2 * 2**30)).replace("SHM_INPUT", str(64 * 2**20))

ONE_SHOT = r"""
import io, resource, struct, sys
resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
from PIL import Image
data = sys.stdin.buffer.read()
image = Image.open(io.BytesIO(data), formats=["BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP"])
image.load()
rgb = image if image.mode == "RGB" else image.convert("RGB")
pixels = rgb.tobytes()
sys.stdout.buffer.write(struct.pack("<II", rgb.width, rgb.height) + pixels)
""".replace("MEMORY_CAP", str(2 * 2**30))


def normal_pictures() -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    out = {}
    for name, (width, height) in (("1mpx", (1152, 864)), ("12mpx", (4000, 3000))):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        rng = np.random.default_rng(0)
        base = np.stack([128 + 100 * np.sin(x / 97 + k) * np.cos(y / 61 - k) for k in range(3)], axis=-1)
        photo = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(photo)
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 6}))
            out[f"{name}-{fmt.lower()}"] = buffer.getvalue()
    return out


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 2)


def compare_isolation(repeats: int) -> dict[str, Any]:
    """Per picture: decode in process, the pre-checks alone, a persistent worker (bytes in and RGB pixels out
    through shared memory, the cheapest transfer), and a fresh process per picture (pixels over a pipe)."""
    from multiprocessing import shared_memory

    from PIL import Image

    from phi3v_tools.image_checks import check_structure
    from phi3v_tools.model.image_processing import to_rgb

    Image.init()
    results: dict[str, Any] = {}
    shm = shared_memory.SharedMemory(create=True, size=64 * 2**20 + 3 * 40_000_000)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, shm.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    try:
        for name, data in normal_pictures().items():
            plain, checks, pooled, fresh = [], [], [], []
            for _ in range(repeats):
                start = time.perf_counter()
                reference = to_rgb(Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])).copy()
                plain.append(time.perf_counter() - start)

                start = time.perf_counter()
                assert check_structure(data) is None
                checks.append(time.perf_counter() - start)

                start = time.perf_counter()
                shm.buf[: len(data)] = data
                worker.stdin.write(struct.pack("<I", len(data)))
                worker.stdin.flush()
                width, height = struct.unpack("<II", worker.stdout.read(8))
                rgb = Image.frombytes("RGB", (width, height), shm.buf[64 * 2**20 : 64 * 2**20 + width * height * 3])
                pooled.append(time.perf_counter() - start)
                assert rgb.tobytes() == reference.tobytes()

                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", ONE_SHOT], input=data, capture_output=True, check=True)
                width, height = struct.unpack("<II", done.stdout[:8])
                Image.frombytes("RGB", (width, height), done.stdout[8:])
                fresh.append(time.perf_counter() - start)
            base = statistics.median(plain)
            results[name] = {
                "bytes": len(data),
                "decode_in_process_ms": _median_ms(plain),
                "pre_checks_ms": _median_ms(checks),
                "persistent_worker_ms": _median_ms(pooled),
                "fresh_process_ms": _median_ms(fresh),
                "overhead_pre_checks_ms": _median_ms(checks),
                "overhead_persistent_worker_ms": round((statistics.median(pooled) - base) * 1000, 2),
                "overhead_fresh_process_ms": round((statistics.median(fresh) - base) * 1000, 2),
            }
            print(f"  {name:12} {json.dumps(results[name])}", flush=True)
    finally:
        worker.stdin.close()
        worker.wait(timeout=10)
        shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()
    return results


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    import PIL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a decode is killed")
    parser.add_argument("--repeats", type=int, default=5, help="runs per normal picture (median)")
    parser.add_argument("--only", nargs="*", help="bomb names to run (default: all, then the isolation comparison)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decode_bombs.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from PIL import features

    results: dict[str, Any] = {
        "machine": machine(),
        "pillow": PIL.__version__,
        "libtiff": features.version("libtiff"),
        "libjpeg": features.version("jpg"),
        "timeout_s": args.timeout,
        "memory_limit_gib": MEMORY_LIMIT / 2**30,
        "bombs": {},
    }
    if args.only and args.out.is_file():  # a partial run updates the named bombs of the last full one
        previous = json.loads(args.out.read_text())
        results = {**previous, **{k: v for k, v in results.items() if k != "bombs"}, "bombs": previous["bombs"]}
    print(f"decode bombs on a {results['machine']}, Pillow {PIL.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (what, build) in bombs().items():
            if args.only and name not in args.only:
                continue
            path = folder / name
            path.write_bytes(build())
            entry: dict[str, Any] = {"what": what, "bytes": path.stat().st_size}
            assert entry["bytes"] <= MAX_BYTES, (name, entry["bytes"])
            for mode in ("before", "after"):
                entry[mode] = run_child(mode, path, args.timeout)
            if "scans" in name and entry["before"].get("seconds") is None:
                count = path.read_bytes().count(b"\xff\xda")
                cost = per_scan_seconds(folder, name)
                entry["before"]["estimated_s"] = round(cost * count)
                entry["before"]["estimate"] = f"{cost * 1000:.3f} ms per scan x {count} scans"
            results["bombs"][name] = entry
            print(f"- {name} ({what}, {entry['bytes']} bytes)")
            for mode in ("before", "after"):
                print(f"    {mode:6} {json.dumps(entry[mode])}", flush=True)
    if not args.only:
        print("pre-checks in process vs a separate decoding process (median ms per picture):")
        results["isolation"] = compare_isolation(args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
