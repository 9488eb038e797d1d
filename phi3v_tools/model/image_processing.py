"""Phi-3-vision image preprocessing: pure, model-free functions.

The HD transform of the original ``Phi3VImageProcessor``, written without torchvision:

1. convert to RGB (a plain PIL conversion: alpha is dropped, not composited);
2. make the image landscape (transpose a portrait), pick the largest integer ``scale`` with
   ``scale * ceil(scale / ratio) <= num_crops``, resize (PIL bilinear) so the long side is
   ``scale * 336``, pad the short side with white, centred, to a multiple of 336, transpose back;
3. scale to 0..1 and normalise with the CLIP mean and std;
4. global view: an un-antialiased bicubic resize of the normalised HD tensor to 336 x 336;
5. crops: the HD tensor cut into 336 x 336 tiles in row-major order;
6. ``[global, tile_0, ...]`` zero-padded along the crop axis to ``num_crops + 1``.

An image yields ``(h * w + 1) * 144 + 1 + (h + 1) * 12`` tokens for an ``h x w`` crop grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v_tools.errors import ImageError
from phi3v_tools.model.pil import EXIF_ORIENTATION as EXIF_ORIENTATION  # re-exported: to_rgb lives in model.pil
from phi3v_tools.model.pil import MAX_EXIF_BYTES as MAX_EXIF_BYTES
from phi3v_tools.model.pil import to_rgb

CROP_SIZE = 336  # CLIP ViT-L/14-336 input side, in pixels
TOKENS_PER_CROP = 144  # 24 x 24 patches merged 2 x 2 -> 12 x 12
TOKENS_PER_CROP_ROW = 12  # merged tokens along one side of a crop
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------------------------------------------
# Sizes and token counts (no pixels needed)


def hd_scale(width: int, height: int, num_crops: int) -> int:
    """The number of 336-pixel tiles along the long side of the HD image."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    ratio = max(width, height) / min(width, height)  # >= 1, a Python float as in the original
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_resized_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) the image is resized to before padding, in its own orientation.

    The short side is at least 1 pixel: for very thin images (long/short > long side in pixels) the original
    asked for a 0-pixel resize and crashed.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    new_long = hd_scale(width, height, num_crops) * CROP_SIZE
    new_short = max(1, int(new_long / ratio))
    return (new_short, new_long) if transposed else (new_long, new_short)


def hd_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(height, width) of the padded HD image in pixels, both multiples of 336 (the ``image_sizes`` entry)."""
    new_w, new_h = hd_resized_size(width, height, num_crops)
    pad_to = lambda n: math.ceil(n / CROP_SIZE) * CROP_SIZE  # noqa: E731
    return pad_to(new_h), pad_to(new_w)


def num_image_tokens_for_grid(grid_h: int, grid_w: int) -> int:
    """Tokens for an ``grid_h x grid_w`` crop grid: sub-crops with row newlines, a separator, the global view."""
    return (grid_h * grid_w + 1) * TOKENS_PER_CROP + 1 + (grid_h + 1) * TOKENS_PER_CROP_ROW


def num_image_tokens(width: int, height: int, num_crops: int) -> int:
    """Tokens an image of ``width x height`` pixels takes in the prompt at ``num_crops``."""
    hd_h, hd_w = hd_image_size(width, height, num_crops)
    return num_image_tokens_for_grid(hd_h // CROP_SIZE, hd_w // CROP_SIZE)


# ---------------------------------------------------------------------------------------------------------------------
# Pixels


def hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    """Resize (PIL bilinear) and white-pad an RGB image to the HD canvas of ``num_crops``.

    Portrait images are transposed, processed as landscape, and transposed back, as in the original:
    PIL resizes in two 8-bit passes, so resizing the untransposed image would round differently.
    """
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = hd_resized_size(image.width, image.height, num_crops)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    canvas = Image.new("RGB", (new_w, padded_h), WHITE)
    canvas.paste(resized, (0, (padded_h - new_h) // 2))  # white bands above and below, floor half on top
    return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas


def normalize(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W], scaled to 0..1 then CLIP-normalised."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # H, W, 3
    tensor = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # 3, H, W
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (tensor - mean) / std


def crops_from_hd(hd: torch.Tensor, num_crops: int) -> torch.Tensor:
    """[3, H, W] HD tensor -> [num_crops + 1, 3, 336, 336]: global view, row-major tiles, zero padding."""
    _, height, width = hd.shape
    grid_h, grid_w = height // CROP_SIZE, width // CROP_SIZE
    global_view = F.interpolate(hd[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)
    tiles = (
        hd.reshape(3, grid_h, CROP_SIZE, grid_w, CROP_SIZE)  # 3, h, 336, w, 336
        .permute(1, 3, 0, 2, 4)  # h, w, 3, 336, 336
        .reshape(grid_h * grid_w, 3, CROP_SIZE, CROP_SIZE)
    )
    out = torch.zeros(num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=hd.dtype)
    out[0] = global_view[0]
    out[1 : 1 + grid_h * grid_w] = tiles
    return out


def preprocess_image(
    image: Image.Image, num_crops: int, *, exif_transpose: bool = True
) -> tuple[torch.Tensor, int, int]:
    """One image -> (crops [num_crops + 1, 3, 336, 336], HD height, HD width)."""
    rgb = to_rgb(image, exif_transpose=exif_transpose)
    hd = normalize(hd_transform(rgb, num_crops))
    return crops_from_hd(hd, num_crops), hd.shape[1], hd.shape[2]


class Phi3VImageProcessor:
    """Images -> ``pixel_values`` [n, num_crops + 1, 3, 336, 336] and ``image_sizes`` [n, 2] (height, width)."""

    def __init__(self, num_crops: int = 1, num_img_tokens: int = TOKENS_PER_CROP, exif_transpose: bool = True) -> None:
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        if num_img_tokens != TOKENS_PER_CROP:
            raise ValueError(f"only num_img_tokens={TOKENS_PER_CROP} is supported (CLIP 24x24 merged 2x2)")
        self.num_crops = num_crops
        self.exif_transpose = exif_transpose

    def __repr__(self) -> str:
        return f"Phi3VImageProcessor(num_crops={self.num_crops}, exif_transpose={self.exif_transpose})"

    def num_image_tokens(self, width: int, height: int) -> int:
        return num_image_tokens(width, height, self.num_crops)

    def __call__(self, images: Sequence[Image.Image], num_crops: int | None = None) -> dict[str, torch.Tensor]:
        crops = self.num_crops if num_crops is None else num_crops
        if crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {crops}")
        pixel_values, sizes = [], []
        for image in images:
            values, hd_h, hd_w = preprocess_image(image, crops, exif_transpose=self.exif_transpose)
            pixel_values.append(values)
            sizes.append((hd_h, hd_w))
        if not pixel_values:
            return {
                "pixel_values": torch.zeros(0, crops + 1, 3, CROP_SIZE, CROP_SIZE),
                "image_sizes": torch.zeros(0, 2, dtype=torch.long),
            }
        return {"pixel_values": torch.stack(pixel_values), "image_sizes": torch.tensor(sizes, dtype=torch.long)}
