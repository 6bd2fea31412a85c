"""Small data the tests make: encoded images, and the synthetic training set with its word-level tokenizer.
Importable from spawned ranks (a test module's `from conftest import` finds tests/conftest.py there, not
tests/data's)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_training_data(root, train: int, *, valid: int = 0, maxcount: int = 1000):
    """`root`/train (`train` synthetic samples, seed 0), `root`/valid (`valid` of seed 1, if any) and the word-level
    tokenizer in `root`/tok. Returns `root`."""
    from himix_megatron.data.synthetic import SyntheticConfig, generate, write_word_tokenizer

    generate(SyntheticConfig(num_samples=train, seed=0, maxcount=maxcount), str(root / "train"))
    if valid:
        generate(SyntheticConfig(num_samples=valid, seed=1), str(root / "valid"))
    write_word_tokenizer(str(root / "tok"))
    return root


def png_bytes(rgb=(200, 30, 30), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed=0, size=(16, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()
