"""Image preprocessing as the vision tower's own Hugging Face image processor does it: decode, optional
pad-to-square, bicubic resize (and, for CLIP, a centre crop), normalise.

- SigLIP (`SiglipImageProcessor`, so400m-patch14-384): PIL bicubic resize of the uint8 image to
  size x size, then (x / 255 - 0.5) / 0.5.
- CLIP (`CLIPImageProcessor`, LLaVA-1.5's ViT-L/14-336, TinyCLIP): PIL bicubic resize of the shorter
  edge to `size` (the longer one to int(size * long / short)), the centre size x size crop, then
  (x / 255 - mean) / std per channel with OpenAI CLIP's mean and std.

`aspect_ratio="pad"` is LLaVA-1.5's `image_aspect_ratio="pad"`: the image is first centred on a square
of its longer side filled with the mean colour, so the resize keeps the whole image undistorted
(CLIP's crop then cuts nothing). `image_config_for(vision)` is the one place that picks these settings
for an encoder; features agree with the released encoders only with their own preprocessing.
The arithmetic runs on whole arrays in the loader workers; PIL does the resize in C.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import numpy as np
from PIL import Image

from himix_megatron.data.records import SampleError

if TYPE_CHECKING:
    from himix_megatron.config import VisionModelConfig

AspectRatio = Literal["resize", "pad"]
# "square": straight to size x size (SigLIP); "shortest_edge": the shorter edge to size, then the centre
# crop (CLIP).
ResizeMode = Literal["square", "shortest_edge"]
Channels = Union[float, tuple[float, float, float]]

# Shards keep the original encoding; these are the extensions the builder writes.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}

# A decompression bomb is a bad sample, not a reason to exhaust a loader worker's memory.
MAX_PIXELS = 128 * 1024 * 1024

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, CLIPImageProcessor's
# defaults; open_clip's, and so TinyCLIP's, too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageConfig:
    """mean / std: one value for every channel (SigLIP's 0.5) or one per RGB channel (CLIP)."""

    size: int = 384  # SigLIP so400m-patch14-384; the tiny test encoder uses 56
    aspect_ratio: AspectRatio = "resize"
    mean: Channels = 0.5
    std: Channels = 0.5
    resize_mode: ResizeMode = "square"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"ImageConfig.size={self.size} must be positive")
        if self.aspect_ratio not in ("resize", "pad"):
            raise ValueError(f"ImageConfig.aspect_ratio={self.aspect_ratio!r} must be 'resize' or 'pad'")
        if self.resize_mode not in ("square", "shortest_edge"):
            raise ValueError(f"ImageConfig.resize_mode={self.resize_mode!r} must be 'square' or 'shortest_edge'")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)):
                if len(value) != 3:
                    raise ValueError(f"ImageConfig.{field}={value!r} must be one number or three (R, G, B)")
                # a tuple, so the config stays hashable and compares equal however it was given
                object.__setattr__(self, field, tuple(float(x) for x in value))
        if min(self.channel_std) <= 0:
            raise ValueError(f"ImageConfig.std={self.std} must be positive")

    @property
    def channel_mean(self) -> tuple[float, float, float]:
        return _channels(self.mean)

    @property
    def channel_std(self) -> tuple[float, float, float]:
        return _channels(self.std)

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        # LLaVA pads with the normalisation mean (`tuple(int(x * 255) for x in image_mean)`), which becomes
        # ~0 after normalising (up to uint8 rounding: 127/255 - 0.5 = -0.002).
        return tuple(int(m * 255) for m in self.channel_mean)


def _channels(value: Channels) -> tuple[float, float, float]:
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(value)


def image_config_for(vision: "VisionModelConfig", aspect_ratio: AspectRatio = "resize") -> ImageConfig:
    """The preprocessing of `vision`'s own Hugging Face image processor (the module docstring)."""
    if vision.kind == "clip":
        return ImageConfig(size=vision.image_size, aspect_ratio=aspect_ratio, mean=CLIP_MEAN, std=CLIP_STD,
                           resize_mode="shortest_edge")
    return ImageConfig(size=vision.image_size, aspect_ratio=aspect_ratio)


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
    """RGB PIL image -> uint8 [size, size, 3]: optional pad-to-square, then bicubic resize (and crop)."""
    if cfg.aspect_ratio == "pad":
        image = expand_to_square(image, cfg.pad_colour)
    if cfg.resize_mode == "shortest_edge":
        return np.ascontiguousarray(center_crop(np.asarray(_resize(image, shortest_edge_size(image.size, cfg.size))),
                                                cfg.size))
    return np.asarray(_resize(image, (cfg.size, cfg.size)))


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, resample=Image.Resampling.BICUBIC)


def shortest_edge_size(size: tuple[int, int], shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shortest_edge` and the longer one int(shortest_edge * long /
    short), as transformers' `get_resize_output_image_size(default_to_square=False)` computes it."""
    w, h = size
    short, long = min(w, h), max(w, h)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if w <= h else (new_long, shortest_edge)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size of an HWC array at least that large, the offsets rounded down as transformers'
    `center_crop` does."""
    h, w = pixels.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[top:top + size, left:left + size]


def normalize(pixels: np.ndarray, cfg: ImageConfig, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std, written into `out` if given.

    Per channel straight from uint8 into the CHW output: no HWC float copy to transpose. (Measured
    against a lookup table and torch ops: this is the fastest, ~0.4 ms at 384 px.)
    """
    size = pixels.shape[0]
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    for c, (mean, std) in enumerate(zip(cfg.channel_mean, cfg.channel_std)):
        np.multiply(pixels[:, :, c], np.float32(1.0 / (255.0 * std)), out=out[c], dtype=np.float32)
        np.subtract(out[c], np.float32(mean / std), out=out[c])
    return out


def preprocess(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """RGB PIL image -> float32 array [3, size, size], normalised."""
    return normalize(resize(image, cfg), cfg)


def load_and_preprocess(data: bytes, cfg: ImageConfig, *, what: str = "image", normalized: bool = True) -> np.ndarray:
    """Encoded bytes -> float32 CHW (or, with normalized=False, the resized uint8 HWC pixels)."""
    pixels = resize(decode_image(data, what=what), cfg)
    return normalize(pixels, cfg) if normalized else pixels
