"""Training recipes as data (examples/recipes/*.yaml): stages, their datasets and hyperparameters.

A recipe value may depend on the language model: `{default: x, <preset name>: y}`. `stage()` resolves
those for one model and turns the dataset list into loader `DatasetSpec`s rooted at a data directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from himix_megatron.data.loader import DatasetSpec
from himix_megatron.data.records import DataError
from himix_megatron.data.templates import check_template_name

TRAINABLE = ("himix_vision", "lm_and_himix_vision")


@dataclass(frozen=True)
class Stage:
    name: str
    template: str
    trainable: str
    lr: float
    global_batch_size: int
    epochs: int
    datasets: tuple[DatasetSpec, ...]
    expected_samples: Optional[int]  # per pass, after `fraction`; None if a count is unknown
    common: dict


def load_recipe(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: unreadable recipe ({e})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise DataError(f"{path}: a recipe needs a non-empty 'stages' list")
    for i, st in enumerate(recipe["stages"]):
        where = f"{path}: stage {st.get('name', i)!r}"
        for key in ("name", "template", "trainable", "lr", "global_batch_size", "epochs", "datasets"):
            if key not in st:
                raise DataError(f"{where}: missing '{key}'")
        for t in _values(st["template"]):
            check_template_name(t, f"{where}: template")
        if st["trainable"] not in TRAINABLE:
            raise DataError(f"{where}: trainable={st['trainable']!r}, expected one of {TRAINABLE}")
        for d in st["datasets"]:
            if "name" not in d or "shards" not in d:
                raise DataError(f"{where}: every dataset needs 'name' and 'shards'")
            if not 0 < float(d.get("fraction", 1.0)) <= 1:
                raise DataError(f"{where}: dataset {d['name']!r} fraction must be in (0, 1]")
    recipe["_path"] = path
    return recipe


def stage(recipe: dict, name: str, *, data_root: str, model: str = "default") -> Stage:
    found = [s for s in recipe["stages"] if s["name"] == name]
    if not found:
        raise DataError(f"{recipe.get('_path')}: no stage {name!r}; stages: {[s['name'] for s in recipe['stages']]}")
    st = found[0]
    specs, expected = [], 0
    for d in st["datasets"]:
        fraction = float(d.get("fraction", 1.0))
        specs.append(DatasetSpec((os.path.join(data_root, d["shards"]),), fraction=fraction))
        if expected is not None and d.get("samples") is not None:
            expected += int(round(int(d["samples"]) * fraction))
        else:
            expected = None
    return Stage(
        name=name,
        template=per_model(st["template"], model),
        trainable=st["trainable"],
        lr=float(per_model(st["lr"], model)),
        global_batch_size=int(per_model(st["global_batch_size"], model)),
        epochs=int(per_model(st["epochs"], model)),
        datasets=tuple(specs),
        expected_samples=expected,
        common=dict(recipe.get("common", {})),
    )


def per_model(value: Any, model: str) -> Any:
    if isinstance(value, dict):
        if model in value:
            return value[model]
        if "default" not in value:
            raise DataError(f"no value for model {model!r} and no default in {value}")
        return value["default"]
    return value


def _values(value: Any) -> list:
    return list(value.values()) if isinstance(value, dict) else [value]
