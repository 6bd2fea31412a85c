"""Small encoded images for the data tests, importable from spawned ranks (a test module's `from conftest import`
finds tests/conftest.py there, not tests/data's)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(rgb=(200, 30, 30), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed=0, size=(16, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()
