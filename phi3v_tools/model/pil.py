"""PIL-only image helpers: no torch, so image loading (:mod:`phi3v_tools.images`) stays light.

Re-exported by :mod:`phi3v_tools.model.image_processing`, whose HD transform starts with :func:`to_rgb`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from phi3v_tools.errors import ImageError

__all__ = ["EXIF_ORIENTATION", "MAX_EXIF_BYTES", "to_rgb"]

EXIF_ORIENTATION = 0x0112
MAX_EXIF_BYTES = 65536  # a JPEG APP1 segment can hold no more; larger blocks (PNG eXIf, WebP EXIF) are ignored


def to_rgb(image: Image.Image, *, exif_transpose: bool = True) -> Image.Image:
    """Any PIL image as 8-bit RGB, like the original's ``convert("RGB")``.

    Alpha is dropped (not composited), as in the original. Differences, where the original misbehaves:
    16- and 32-bit grey images are scaled to 8 bits instead of being clipped to white, and the EXIF
    orientation of a photo is applied (``exif_transpose=False`` keeps the stored orientation).
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    try:
        image.load()  # decode now, so truncated or corrupt data fails here with a clear error
        if exif_transpose and _orientation(image) != 1:  # else exif_transpose only copies
            image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            wide = np.asarray(image, dtype=np.uint32)
            wide >>= 8  # in place: one 4-byte copy per pixel, not two
            image = Image.fromarray(wide.astype(np.uint8), mode="L")
        elif image.mode in ("I", "F"):
            arr = np.asarray(image, dtype=np.float64)
            peak = float(arr.max()) if arr.size else 0.0
            scale = 255.0 / peak if peak > 255.0 else 1.0
            arr *= scale  # in place, the same values as arr * scale: one 8-byte copy per pixel, not three
            image = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), mode="L")
        elif image.mode == "P":
            image = image.convert("RGBA")  # palette transparency, quietly; alpha is dropped next
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # truncated or hostile data surfaces on first pixel access, as any decoder error
        raise ImageError(f"could not decode the image ({image.mode} {image.size}): {exc}") from exc


def _orientation(image: Image.Image) -> object:
    """The EXIF orientation, ignoring EXIF blocks over MAX_EXIF_BYTES (parsing a huge one costs seconds)."""
    block = image.info.get("exif")
    raw = image.info.get("Raw profile type exif")  # hex text (PNG text chunks written by ImageMagick)
    if (isinstance(block, bytes | bytearray) and len(block) > MAX_EXIF_BYTES) or (
        isinstance(raw, str | bytes) and len(raw) > 2 * MAX_EXIF_BYTES + 1024
    ):
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)
