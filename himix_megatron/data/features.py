"""Cached vision features: the frozen encoder's output stored beside the shards, read instead of the images.

With HiMix the decoder is cheap and the frozen SigLIP is most of a training step (paper Table 1: 671 GFLOP of
encoder forward per sample against ~576 for the 1B decoder's forward and backward), and the recipes read the
same images for several epochs. tools/cache_vision_features.py runs the encoder once; `himix-train
--vision-features NAME` then reads `[N, d_v]` per sample instead of decoding and encoding the image.

Layout, inside each shard directory D (tools/build_shards.py's output):

    D/features/NAME/features.json              what was cached, and from what (below)
    D/features/NAME/shard-000000.safetensors   "features" [count, N, d_v] and "has_image" [count] (uint8);
                                               metadata "ids": the samples' ids, in shard order

features.json records the encoder (its preset name, the sha256 of its weights, and a fingerprint: its
features of a fixed probe image), the preprocessing (resolution, aspect ratio, mean, std, resize mode:
SigLIP's square resize or CLIP's shortest edge and centre crop), the feature layer and selection, the
dtype, and the sha256 of D/index.json (which samples, in which shards). Training
refuses a feature set whose encoder, resolution, preprocessing or samples differ from its own, naming the
field. The fingerprint is what training compares (within 2e-2, relative): a TP-sharded encoder cannot hash
its full weights without gathering them, and the same weights give the same probe features up to kernel
rounding on any device and TP.

Cost on disk: N x d_v x 2 bytes per sample in bf16, 728 x 1152 x 2 = 1.68 MB for SigLIP-so400m-384.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from himix_megatron.data.records import DataError
from himix_megatron.data.shards import INDEX_FILE

FORMAT, VERSION = "himix-vision-features", 1
DESCRIPTION = "features.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FINGERPRINT_RTOL = 2e-2
# What our encoder hands the decoder (model/vision.py): the penultimate layer, without SigLIP's first patch or
# CLIP's class token.
FEATURE_LAYER, SELECTION = -2, {"siglip": "drop_first_patch", "clip": "drop_class_token"}
# Preprocessing fields recorded since they were added, with the value every feature set made before had (all
# were SigLIP's), so those still load.
_PREPROCESSING_BEFORE = {"resize_mode": "square"}


def features_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "features", name)


def feature_file(shard_tar: str) -> str:
    return os.path.basename(shard_tar)[: -len(".tar")] + ".safetensors"


def index_sha256(data_dir: str) -> str:
    with open(os.path.join(data_dir, INDEX_FILE), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def probe_image(size: int) -> torch.Tensor:
    """[1, 3, size, size]: a fixed, normalised-range image whose features fingerprint an encoder."""
    g = torch.Generator().manual_seed(20240101)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1


def fingerprint(encoder) -> list[float]:
    """The encoder's features of the probe image, averaged over tokens: [d_v] floats (runs on any TP)."""
    weight = encoder.conv1.weight
    features = encoder(probe_image(encoder.vision.image_size).to(weight.device, weight.dtype))  # [N, 1, d_v]
    return features.float().mean(dim=(0, 1)).tolist()


def weights_sha256(encoder) -> str:
    """sha256 over the encoder's tensors (name, shape, fp32 bytes) in name order; its TP shards, at TP > 1."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def expected_description(vision, image_cfg, dtype: Optional[str] = None, encoder=None) -> dict:
    """What a feature set for `vision` with this preprocessing records (less the per-directory parts). Without
    `dtype` any stored dtype is accepted; without `encoder` (a later pipeline stage) the fingerprint is not
    checked: the first stage, which holds the encoder, checks it."""
    encoder_fields = {"name": vision.name, "image_size": vision.image_size, "feature_layer": FEATURE_LAYER,
                      "selection": SELECTION[vision.kind]}
    if encoder is not None:
        encoder_fields["fingerprint"] = fingerprint(encoder)
    return {"format": FORMAT, "version": VERSION, "dtype": dtype, "shape": [vision.num_features, vision.hidden_size],
            "encoder": encoder_fields,
            "preprocessing": {"size": image_cfg.size, "aspect_ratio": image_cfg.aspect_ratio,
                              "mean": _json(image_cfg.mean), "std": _json(image_cfg.std),
                              "resize_mode": image_cfg.resize_mode}}


def _json(value):
    """A per-channel mean / std as JSON reads it back (a list), so a stored one compares equal."""
    return list(value) if isinstance(value, tuple) else value


def check_description(found: dict, expected: dict, where: str) -> None:
    """Refuse a feature set that was not made by this encoder and preprocessing, naming the first difference."""
    for key in ("format", "version"):
        if found.get(key) != expected[key]:
            raise DataError(f"{where}: {key} is {found.get(key)!r}, this run needs {expected[key]!r}")
    for section in ("encoder", "preprocessing"):
        got = found.get(section, {})
        if section == "preprocessing":
            got = {**_PREPROCESSING_BEFORE, **got}
        for key, want in expected[section].items():
            if key == "fingerprint":
                have = torch.tensor(got.get(key, []), dtype=torch.float64)
                want_t = torch.tensor(want, dtype=torch.float64)
                if have.shape != want_t.shape or not torch.allclose(have, want_t, rtol=FINGERPRINT_RTOL,
                                                                    atol=FINGERPRINT_RTOL * float(want_t.abs().mean())):
                    raise DataError(f"{where}: the features were computed by a different vision encoder (its "
                                    "features of the probe image differ from this run's encoder's)")
            elif got.get(key) != want:
                raise DataError(f"{where}: {section}.{key} is {got.get(key)!r}, this run's is {want!r}")
    for key in ("dtype", "shape"):  # after the encoder's fields, which say why a shape would differ
        if expected[key] is not None and found.get(key) != expected[key]:
            raise DataError(f"{where}: {key} is {found.get(key)!r}, this run needs {expected[key]!r}")


@dataclass
class _Shard:
    path: str
    count: int
    handle: Optional[object] = None
    ids: Optional[list] = None


class FeatureStore:
    """The feature sets of a run's shard directories, read lazily (memory-mapped) by loader workers."""

    def __init__(self, name: str, data_dirs: list[str], expected: dict):
        self.name, self._shape = name, tuple(expected["shape"])
        self._shards: dict[str, _Shard] = {}  # shard tar path -> its features
        dtypes = set()
        for data_dir in data_dirs:
            directory = features_dir(data_dir, name)
            path = os.path.join(directory, DESCRIPTION)
            if not os.path.isfile(path):
                raise DataError(f"--vision-features {name}: {path} is missing; compute it with "
                                f"tools/cache_vision_features.py --data-path {data_dir} --name {name}")
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
            check_description(found, expected, path)
            dtypes.add(found["dtype"])
            if found.get("index_sha256") != index_sha256(data_dir):
                raise DataError(f"{path}: computed for other samples ({data_dir}/{INDEX_FILE} changed since)")
            for shard_name, entry in found["shards"].items():
                self._shards[os.path.join(data_dir, shard_name)] = _Shard(os.path.join(directory, entry["file"]),
                                                                          int(entry["count"]))
        if len(dtypes) > 1:
            raise DataError(f"--vision-features {name}: the directories hold different dtypes {sorted(dtypes)}")
        self.dtype = DTYPES[dtypes.pop()]

    def __getstate__(self):  # to loader workers: without open handles, which cannot be pickled
        state = dict(self.__dict__)
        state["_shards"] = {k: _Shard(v.path, v.count) for k, v in self._shards.items()}
        return state

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def read(self, shard_tar: str, index: int, sample_id: str) -> Optional[torch.Tensor]:
        """[N, d_v] for sample `index` of `shard_tar` (`sample_id`: its tar key), None if it has no image."""
        shard = self._shards.get(shard_tar)
        if shard is None:
            raise DataError(f"--vision-features {self.name}: no features for {shard_tar}")
        if shard.handle is None:  # opened in the worker that reads it (memory maps do not survive a fork well)
            from safetensors import safe_open

            shard.handle = safe_open(shard.path, framework="pt")
            shard.ids = json.loads(shard.handle.metadata()["ids"])
        if shard.ids[index] != sample_id:
            raise DataError(f"{shard.path}: sample {index} was cached for id {shard.ids[index]!r}, the shard now "
                            f"holds {sample_id!r}")
        if not bool(shard.handle.get_slice("has_image")[index: index + 1][0]):
            return None
        return shard.handle.get_slice("features")[index: index + 1][0]
