"""The content identity of a picture: no torch here, so the image-loading side can use it too.

:func:`image_digest` keys the handle store (:mod:`phi3v_tools.images`) and the feature cache
(:mod:`phi3v_tools.feature_cache`, which re-exports it).
"""

from __future__ import annotations

import hashlib

from PIL import Image

__all__ = ["image_digest"]


def image_digest(image: Image.Image) -> str:
    """sha256 (hex) of an RGB image's size and pixels: the identity of a picture, whatever file it came in."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()
