"""The CPU demo's vision encoder: a tiny SigLIP trained briefly on the demo's images, then frozen.

Real recipes start from a pretrained SigLIP. The demo has no download, so it makes its own: a
transformers `SiglipVisionModel` of the `tiny-112` preset's shape, trained for 200 steps of 32 images
with small classification heads (colour, shape, position: the synthetic generator records all three
for every image in the sample's `meta`) on the *training* shards only, then saved with
`save_pretrained` (safetensors) for `tools/convert_checkpoint.py import`.

The heads read what HiMix reads: the penultimate layer's hidden states with the first patch dropped
(`himix_megatron/model/vision.py`), here max-pooled over the patches (see `Probe`). So only the patch
embedding, the position embedding and layers 0..L-2 are trained; the last layer, post-layernorm and pooling head stay at
their random initialisation (HiMix never reads them; the import carries them along for the export).

    python examples/demo_encoder.py --train DIR --valid DIR --output DIR [--steps N]

`probe accuracy` is the heads' accuracy on the held-out shards: how well the frozen features
separate the three attributes before any decoder sees them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# megatron-core (imported by himix_megatron.convert) warns about the absent GPU libraries; on a CPU demo
# that says nothing (pytest.ini filters the same).
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

PRESET = "tiny-112"
ATTRIBUTES = ("colour", "shape", "position")


@dataclass
class EncoderReport:
    output: str
    steps: int
    batch_size: int
    train_images: int
    seconds: float  # training only (not image decoding or saving)
    final_loss: float
    probe_accuracy: dict  # attribute -> held-out accuracy of its head
    probe_images: int

    @property
    def mean_probe_accuracy(self) -> float:
        return float(np.mean(list(self.probe_accuracy.values())))


def hf_config(preset: str = PRESET):
    """The SiglipVisionConfig of a vision preset, as the converter maps it (`layout.vision_to_hf`)."""
    from transformers import SiglipVisionConfig

    from himix_megatron.config import vision_model_preset
    from himix_megatron.convert.layout import vision_to_hf

    fields = vision_to_hf(vision_model_preset(preset))
    fields.pop("model_type")
    return SiglipVisionConfig(**fields)


def load_images(shard_dir: str, image_size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` (default all) images as resized uint8 pixels [n, S, S, 3] (the trainer's resize;
    `normalize` finishes its preprocessing) and their labels [n, 3] (colour, shape, position)."""
    from himix_megatron.data import ImageConfig
    from himix_megatron.data.image import load_and_preprocess
    from himix_megatron.data.shards import ShardDirectory, ShardReader
    from himix_megatron.data.synthetic import ANSWERS

    directory, reader, cfg = ShardDirectory.open(shard_dir), ShardReader(), ImageConfig(size=image_size)
    n = directory.num_samples if limit is None else min(limit, directory.num_samples)
    pixels = np.empty((n, image_size, image_size, 3), dtype=np.uint8)  # a quarter of float32's memory
    labels = np.empty((n, len(ATTRIBUTES)), dtype=np.int64)
    i = 0
    try:
        for shard in directory.shards:
            for j in range(shard.count):
                if i == n:
                    break
                sample = reader.read(shard, j)
                meta = sample.record.get("meta") or {}
                if any(f"image_{a}" not in meta for a in ATTRIBUTES):
                    raise ValueError(f"{shard.path} sample {j}: no image_colour/shape/position in its meta; "
                                     "these shards were not written by himix_megatron.data.synthetic")
                pixels[i] = load_and_preprocess(sample.image, cfg, what=f"{shard.path} sample {j}", normalized=False)
                labels[i] = [ANSWERS[a].index(meta[f"image_{a}"]) for a in ATTRIBUTES]
                i += 1
    finally:
        reader.close()
    return torch.from_numpy(pixels[:i]), torch.from_numpy(labels[:i])


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [b, S, S, 3] -> float32 [b, 3, S, S], (x / 255 - 0.5) / 0.5: `data.image.normalize`'s arithmetic."""
    return pixels.permute(0, 3, 1, 2).float() * (1.0 / (255.0 * 0.5)) - 1.0


def penultimate_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """[b, N - 1, d]: hidden_states[-2] of `model(pixels)` without its first patch, i.e. the features
    HiMix's encoder returns (sequence-first there). The last layer is skipped, not computed."""
    vm = getattr(model, "vision_model", model)  # transformers < 5.x nests the tower one level down
    hidden = vm.embeddings(pixels)
    for layer in vm.encoder.layers[:-1]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
    return hidden[:, 1:]


class Probe(torch.nn.Module):
    """LayerNorm per patch -> max over patches -> one linear head per attribute (3 classes each).

    Max-pooled rather than mean-pooled: the shape covers about 16 of the 63 patches, and a mean over
    the background washes it out. On the demo's images (AdamW 1e-3), after 120 steps of 16 mean
    pooling had shape / position 0.42 / 0.49 held-out, max pooling 0.90 / 0.81; with 32 a step, max
    pooling reached 0.997 / 0.995 in 200 steps, mean pooling took about 600."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.heads = torch.nn.Linear(width, 3 * len(ATTRIBUTES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads(self.norm(features).amax(dim=1)).view(-1, len(ATTRIBUTES), 3)


def _accuracy(model, probe, pixels, labels, batch_size: int = 200) -> dict:
    correct = torch.zeros(len(ATTRIBUTES))
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            logits = probe(penultimate_features(model, normalize(pixels[start:start + batch_size])))
            correct += (logits.argmax(-1) == labels[start:start + batch_size]).sum(0)
    return {a: float(c) / len(pixels) for a, c in zip(ATTRIBUTES, correct)}


def train_encoder(train_dir: str, valid_dir: str, output: str, *, steps: int = 200, batch_size: int = 32,
                  lr: float = 1e-3, seed: int = 0, preset: str = PRESET, max_train_images: int | None = None,
                  log=print) -> EncoderReport:
    """Train a SiglipVisionModel of `preset`'s shape on `train_dir`'s images, probe it on `valid_dir`'s,
    and save it to `output` (save_pretrained, safetensors). Returns the report (also in encoder.json).

    Reads the first `max_train_images` training images (default: steps x batch_size, one pass)."""
    from transformers import SiglipVisionModel

    config = hf_config(preset)
    torch.manual_seed(seed)
    model = SiglipVisionModel(config)
    probe = Probe(config.hidden_size)
    pixels, labels = load_images(train_dir, config.image_size, max_train_images or steps * batch_size)
    valid_pixels, valid_labels = load_images(valid_dir, config.image_size)

    model.train()
    params = [p for p in list(model.parameters()) + list(probe.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pixels), generator=generator)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(steps):
        at = (step * batch_size) % len(pixels)
        if at + batch_size > len(pixels):  # a fresh order each pass
            order, at = torch.randperm(len(pixels), generator=generator), 0
        idx = order[at:at + batch_size]
        logits = probe(penultimate_features(model, normalize(pixels[idx])))
        loss = F.cross_entropy(logits.reshape(-1, 3), labels[idx].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if log and (step + 1) % max(steps // 4, 1) == 0:
            log(f"encoder step {step + 1}/{steps} | loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = _accuracy(model, probe, valid_pixels, valid_labels)

    os.makedirs(output, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" for one small file
    model.save_pretrained(output, safe_serialization=True)
    report = EncoderReport(output, steps, batch_size, len(pixels), seconds, float(loss.item()), accuracy,
                           len(valid_pixels))
    with open(os.path.join(output, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(asdict(report), f, indent=1)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training shard directory (synthetic)")
    p.add_argument("--valid", required=True, help="held-out shard directory, for the probe accuracy")
    p.add_argument("--output", required=True, help="HF directory to write")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    r = train_encoder(args.train, args.valid, args.output, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed)
    print(f"encoder: {r.steps} steps of {r.batch_size} in {r.seconds:.1f} s; probe accuracy "
          + ", ".join(f"{a} {v:.3f}" for a, v in r.probe_accuracy.items()))


if __name__ == "__main__":
    main()
