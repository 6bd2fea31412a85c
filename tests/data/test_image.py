"""SigLIP preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from himix_megatron.data.image import ImageConfig, expand_to_square, load_and_preprocess, preprocess
from himix_megatron.data.records import SampleError


def test_matches_hf_siglip_processor():
    transformers = pytest.importorskip("transformers")
    proc = transformers.SiglipImageProcessor(size={"height": 24, "width": 24}, resample=3, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    want = proc(img, return_tensors="np")["pixel_values"][0]
    got = preprocess(img, ImageConfig(size=24))
    assert got.dtype == np.float32 and got.shape == (3, 24, 24)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_pad_to_square_with_mean_colour():
    img = Image.new("RGB", (4, 2), (255, 0, 255))
    square = np.asarray(expand_to_square(img, ImageConfig().pad_colour))
    assert square.shape == (4, 4, 3)
    assert (square[0] == 127).all() and (square[3] == 127).all()  # one padded row above, one below
    assert (square[1:3] == [255, 0, 255]).all()
    out = preprocess(img, ImageConfig(size=4, aspect_ratio="pad"))
    np.testing.assert_allclose(out[:, 0], 127 / 127.5 - 1, atol=1e-6)  # ~0: the mean colour
    np.testing.assert_allclose(out[0, 1:3], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1, 1:3], -1.0, atol=1e-6)
    # "resize" stretches instead: no grey rows.
    assert not np.allclose(preprocess(img, ImageConfig(size=4))[:, 0], 127 / 127.5 - 1, atol=1e-3)


def test_bad_images_raise_sample_errors():
    with pytest.raises(SampleError, match="undecodable image"):
        load_and_preprocess(b"not an image", ImageConfig(size=8))
    with pytest.raises(ValueError, match="aspect_ratio"):
        ImageConfig(aspect_ratio="crop")
