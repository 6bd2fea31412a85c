"""SigLIP image preprocessing: decode, optional pad-to-square, bicubic resize, normalise.

Matches what `SiglipImageProcessor` does for so400m-patch14-384 (PIL bicubic resize of the uint8
image to size x size, then (x / 255 - 0.5) / 0.5), so features agree with the released encoder.
The arithmetic runs on whole arrays in the loader workers; PIL does the resize in C.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from PIL import Image

from himix_megatron.data.records import SampleError

AspectRatio = Literal["resize", "pad"]

# Shards keep the original encoding; these are the extensions the builder writes.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}

# A decompression bomb is a bad sample, not a reason to exhaust a loader worker's memory.
MAX_PIXELS = 128 * 1024 * 1024


@dataclass(frozen=True)
class ImageConfig:
    size: int = 384  # SigLIP so400m-patch14-384; the tiny test encoder uses 56
    aspect_ratio: AspectRatio = "resize"
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"ImageConfig.size={self.size} must be positive")
        if self.aspect_ratio not in ("resize", "pad"):
            raise ValueError(f"ImageConfig.aspect_ratio={self.aspect_ratio!r} must be 'resize' or 'pad'")
        if self.std <= 0:
            raise ValueError(f"ImageConfig.std={self.std} must be positive")

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        # LLaVA pads with the normalisation mean, which becomes exactly 0 after normalising
        # (up to uint8 rounding: 127/255 - 0.5 = -0.002).
        v = int(self.mean * 255)
        return (v, v, v)


def decode_image(data: bytes, *, what: str = "image") -> Image.Image:
    """Fully decode to RGB; a truncated or corrupt file raises SampleError('undecodable image')."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width < 1 or im.height < 1 or im.width * im.height > MAX_PIXELS:
                raise SampleError("undecodable image", f"{what}: size {im.width}x{im.height} out of range")
            im.load()
            return im.convert("RGB")
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise SampleError("undecodable image", f"{what}: {type(e).__name__}: {e}") from None


def image_format(data: bytes, *, what: str = "image") -> str:
    """The file extension to store these bytes under, after checking they fully decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception as e:
        raise SampleError("undecodable image", f"{what}: {type(e).__name__}: {e}") from None
    decode_image(data, what=what)
    ext = IMAGE_EXTENSIONS.get(fmt or "")
    if ext is None:
        raise SampleError("undecodable image", f"{what}: unsupported format {fmt}")
    return ext


def expand_to_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (LLaVA `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """RGB PIL image -> uint8 [size, size, 3]: optional pad-to-square, then bicubic resize."""
    if cfg.aspect_ratio == "pad":
        image = expand_to_square(image, cfg.pad_colour)
    if image.size != (cfg.size, cfg.size):
        image = image.resize((cfg.size, cfg.size), resample=Image.Resampling.BICUBIC)
    return np.asarray(image)


def normalize(pixels: np.ndarray, cfg: ImageConfig, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std, written into `out` if given.

    Per channel straight from uint8 into the CHW output: no HWC float copy to transpose. (Measured
    against a lookup table and torch ops: this is the fastest, ~0.4 ms at 384 px.)
    """
    size = pixels.shape[0]
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    scale = np.float32(1.0 / (255.0 * cfg.std))
    shift = np.float32(cfg.mean / cfg.std)
    for c in range(3):
        np.multiply(pixels[:, :, c], scale, out=out[c], dtype=np.float32)
        np.subtract(out[c], shift, out=out[c])
    return out


def preprocess(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """RGB PIL image -> float32 array [3, size, size], normalised."""
    return normalize(resize(image, cfg), cfg)


def load_and_preprocess(data: bytes, cfg: ImageConfig, *, what: str = "image", normalized: bool = True) -> np.ndarray:
    """Encoded bytes -> float32 CHW (or, with normalized=False, the resized uint8 HWC pixels)."""
    pixels = resize(decode_image(data, what=what), cfg)
    return normalize(pixels, cfg) if normalized else pixels
