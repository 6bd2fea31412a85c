"""CLIP preprocessing (shortest edge, centre crop, OpenAI mean / std) against transformers' CLIPImageProcessor, SigLIP's
still against SiglipImageProcessor, through the one function that picks them (`image_config_for`), and cached
feature sets that tell the two apart."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from himix_megatron.config import vision_model_preset
from himix_megatron.data.image import ImageConfig, expand_to_square, image_config_for, preprocess

transformers = pytest.importorskip("transformers")

CLIP = vision_model_preset("tiny-clip")  # 56 px
SIGLIP = vision_model_preset("tiny")  # 56 px
# Non-square (portrait and landscape, odd and even margins to crop), square, and smaller than the output.
SHAPES = [(30, 50), (77, 41), (64, 64), (100, 37), (57, 112)]
# Both sides resize the same uint8 image with PIL's bicubic and crop the same pixels; what differs is float32
# arithmetic order ((x / 255 - m) / s here as x * (1 / (255 s)) - m / s). Measured over 90 random images of 20 to
# 700 px a side at 56, 224 and 336 px, transformers 5.6.0 and 5.24.0: at most 4.8e-7 (CLIP, with and without pad),
# 1.2e-7 (SigLIP).
ATOL = 1e-6


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SHAPES]


def _clip_processor(size):
    # transformers' own CLIP defaults (OpenAI mean / std, bicubic, crop on): only the size is ours. The PIL backend
    # is what CLIPImageProcessor is without torchvision (as here), and what LLaVA's and OpenAI's CLIP use; with
    # torchvision, transformers 5 would pick its tensor backend, whose bicubic differs.
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def test_clip_matches_transformers_clip_image_processor():
    cfg = image_config_for(CLIP)
    assert (cfg.size, cfg.resize_mode, cfg.aspect_ratio) == (56, "shortest_edge", "resize")
    processor = _clip_processor(56)
    for image in _images():
        want = processor(image, return_tensors="np")["pixel_values"][0]
        got = preprocess(image, cfg)
        assert got.dtype == np.float32 and got.shape == want.shape == (3, 56, 56)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=str(image.size))


def test_clip_pad_is_llava_expand_to_square_with_the_mean_colour():
    """LLaVA-1.5's image_aspect_ratio="pad": expand2square(image, tuple(int(x * 255) for x in image_mean)), then the
    processor, whose crop then cuts nothing."""
    processor = _clip_processor(56)
    colour = tuple(int(x * 255) for x in processor.image_mean)
    cfg = image_config_for(CLIP, aspect_ratio="pad")
    assert cfg.pad_colour == colour == (122, 116, 104)
    for image in _images(1):
        want = processor(expand_to_square(image, colour), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(preprocess(image, cfg), want, atol=ATOL, rtol=0, err_msg=str(image.size))
    # The padding is ~0 after normalising, in every channel.
    wide = Image.new("RGB", (56, 20), (255, 255, 255))
    np.testing.assert_allclose(preprocess(wide, cfg)[:, 0], 0.0, atol=0.02)


def test_siglip_still_matches_transformers_siglip_image_processor():
    cfg = image_config_for(SIGLIP)
    assert cfg == ImageConfig(size=56)  # exactly what training used before CLIP preprocessing existed
    processor = transformers.SiglipImageProcessorPil(size={"height": 56, "width": 56}, resample=3,
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for image in _images(2):
        want = processor(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(preprocess(image, cfg), want, atol=ATOL, rtol=0, err_msg=str(image.size))


def test_per_channel_config_checks():
    assert ImageConfig(mean=[0.1, 0.2, 0.3]).mean == (0.1, 0.2, 0.3)  # a tuple: hashable, compares equal
    assert ImageConfig().channel_std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="three"):
        ImageConfig(mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="std"):
        ImageConfig(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="resize_mode"):
        ImageConfig(resize_mode="crop")


def test_eval_reads_the_preprocessing_of_the_exported_tower(tmp_path):
    from himix_megatron.convert.layout import vision_to_hf
    from himix_megatron.eval.generate import _image_config

    for vision in (CLIP, SIGLIP):
        hf_config = transformers.AutoConfig.for_model(**vision_to_hf(vision))
        assert _image_config(hf_config, str(tmp_path), "pad") == image_config_for(vision, aspect_ratio="pad")


def test_training_loader_preprocesses_for_its_encoder(tmp_path):
    from himix_megatron.training import data as training_data
    from himix_megatron.training.config import TrainConfig

    cfg = TrainConfig(data_path=[str(tmp_path)], tokenizer_model=str(tmp_path), train_iters=1, micro_batch_size=1)
    assert training_data.loader_config(cfg, "tinyllama", CLIP).image == image_config_for(CLIP)
    assert training_data.loader_config(cfg, "tinyllama", SIGLIP).image == ImageConfig(size=56)
    padded = dataclasses.replace(cfg, image_aspect_ratio="pad")
    assert training_data.loader_config(padded, "tinyllama", CLIP).image == image_config_for(CLIP, aspect_ratio="pad")


def test_cached_feature_sets_tell_clip_and_siglip_preprocessing_apart():
    from himix_megatron.data.features import check_description, expected_description
    from himix_megatron.data.records import DataError

    clip = expected_description(CLIP, image_config_for(CLIP), "float32")
    siglip = expected_description(SIGLIP, image_config_for(SIGLIP), "float32")
    assert clip["preprocessing"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert clip["preprocessing"]["resize_mode"] == "shortest_edge" and clip["encoder"]["selection"] == "drop_class_token"
    stored = json.loads(json.dumps(clip))  # as features.json reads back
    check_description(stored, clip, "clip/features.json")
    # Each of these alone refuses a CLIP feature set for a run that preprocesses (or selects) as SigLIP.
    for section, key in (("encoder", "selection"), ("preprocessing", "mean"), ("preprocessing", "std"),
                         ("preprocessing", "resize_mode")):
        expected = copy.deepcopy(clip)
        expected[section][key] = siglip[section][key]
        with pytest.raises(DataError, match=rf"clip/features.json: {section}.{key} is .*, this run's is "
                                            + re.escape(repr(siglip[section][key]))):
            check_description(stored, expected, "clip/features.json")
    # A SigLIP feature set written before resize_mode was recorded still loads.
    old = json.loads(json.dumps(siglip))
    del old["preprocessing"]["resize_mode"]
    check_description(old, siglip, "old/features.json")
