"""The synthetic vision-dependent dataset."""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from himix_megatron.data import DataError, ImageConfig, ShardLoader, TemplateConfig, load_tokenizer
from himix_megatron.data.shards import ShardDirectory, ShardReader
from himix_megatron.data.synthetic import ANSWERS, SyntheticConfig, generate, write_word_tokenizer


def read_back(out, pixels=False):
    d, reader = ShardDirectory.open(out), ShardReader()
    for s in d.shards:
        for j in range(s.count):
            sample = reader.read(s, j)
            yield sample.record, (np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")) if pixels else None)


def what_is_drawn(img):
    """Colour, shape and position recovered from the pixels alone."""
    fg = img.max(-1).astype(int) - img.min(-1).astype(int) > 80  # saturated pixels; the background is grey
    ys, xs = np.nonzero(fg)
    colour = ("red", "green", "blue")[int(np.argmax(img[fg].mean(0)))]
    third = xs.mean() / img.shape[1]
    position = "left" if third < 1 / 3 else ("middle" if third < 2 / 3 else "right")
    fill = fg.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")
    return {"colour": colour, "shape": shape, "position": position}


def test_synthetic_answers_come_only_from_the_image(tmp_path):
    out = str(tmp_path / "syn")
    report = generate(SyntheticConfig(num_samples=300, image_size=56, maxcount=128), out)
    with open(os.path.join(out, "synthetic.json")) as f:
        assert json.load(f) == report.to_dict()

    per_question = defaultdict(Counter)
    n = 0
    for record, img in read_back(out, pixels=True):
        n += 1
        assert img.shape == (56, 56, 3)
        meta = record["meta"]
        assert record["conversations"][1]["value"] == meta["answer"]
        drawn = what_is_drawn(img)
        assert drawn == {k: meta[f"image_{k}"] for k in drawn}, record["id"]
        assert drawn[meta["question_type"]] == meta["answer"]
        per_question[record["conversations"][0]["value"]][meta["answer"]] += 1
    assert n == 300
    # Best text-only accuracy: majority answer per distinct question. Balanced answers keep it at 1/3.
    chance = sum(max(c.values()) for c in per_question.values()) / n
    assert chance == pytest.approx(report.text_only_chance_accuracy) and chance <= 0.34
    for c in per_question.values():
        assert len(c) == 3 and max(c.values()) - min(c.values()) <= 1


def test_synthetic_trains_with_one_token_answers(tmp_path):
    out = str(tmp_path / "syn")
    generate(SyntheticConfig(num_samples=300, image_size=32, seed=1), out)
    tok = load_tokenizer(write_word_tokenizer(str(tmp_path / "tok")))
    assert tok.vocab_size < 64
    for words in ANSWERS.values():
        for w in words:
            assert len(tok.encode_chunk(" " + w)[0]) == 2  # BOS and the word
    from himix_megatron.data import DatasetSpec, LoaderConfig

    cfg = LoaderConfig(datasets=(DatasetSpec.of(out),), micro_batch_size=8, seq_length=24,
                       template=TemplateConfig("tinyllama", system=""), image=ImageConfig(size=32), num_workers=0)
    batch = next(iter(ShardLoader(cfg, tok)))
    # Trained targets: the answer word and </s>; the answer sits where the label mask starts.
    assert (batch["loss_mask"].sum(1) == 2).all()
    for row, meta in enumerate(batch["meta"]):
        first = int(batch["loss_mask"][row].argmax())
        assert batch["labels"][row, first] == tok.token_id(meta["answer"])
        assert batch["labels"][row, first + 1] == tok.eos_id


def test_synthetic_refuses_a_leaky_dataset(tmp_path):
    with pytest.raises(DataError, match="text-only accuracy"):
        generate(SyntheticConfig(num_samples=10), str(tmp_path / "x"))
    with pytest.raises(DataError, match="question_types"):
        SyntheticConfig(question_types=("count",))
