"""Weights & Biases logging with Megatron-LM's flags: --wandb-project, --wandb-exp-name, --wandb-save-dir,
--wandb-entity.

As in Megatron-LM, one rank logs: the last one (world size - 1), into `--wandb-save-dir` (default `--save`/wandb).
It logs the scalars TensorBoard gets, under the same names (metrics.py), and the run's whole configuration: every
TrainConfig field, plus the model the checkpoint describes and the sizes derived at start.

Resuming continues the same W&B run. The run's id is kept beside the checkpoints, in `--save`/wandb_run.json;
a resume from a checkpoint (`--load` at the same stage, not `--finetune`) reads it from the `--load` directory
(or the one above it, for `--load DIR/iter_N`), else from `--save`, and passes it to
`wandb.init(id=..., resume="allow")`. A fresh start or a weights-only load (a new stage) is a new run. Steps
are the training iterations; after a resume from a checkpoint older than the last logged iteration, wandb drops
(with a warning) the values of steps below the run's last one, so those iterations keep their first values.

`wandb` is the optional extra `pip install 'himix_megatron[wandb]'`; a --wandb-* flag without it is refused
before anything is built (`check`). `WANDB_MODE=offline` keeps everything on the machine (the tests run so);
`wandb sync DIR` uploads it later.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
from typing import Optional

from himix_megatron.config import ConfigError

RUN_FILE = "wandb_run.json"
FLAGS = ("wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity")


def check(cfg) -> None:
    """Refuse --wandb-* flags that cannot work, naming the flag: without --wandb-project, or without wandb."""
    given = [name for name in FLAGS if getattr(cfg, name) is not None]
    if not given:
        return
    if cfg.wandb_project is None:
        raise ConfigError(f"--{given[0].replace('_', '-')} needs --wandb-project (W&B logs only with a project)")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb-project needs the wandb package, which is not installed: "
                          "pip install 'himix_megatron[wandb]' (or pip install wandb)")
    if cfg.wandb_save_dir is None and cfg.save is None:
        raise ConfigError("--wandb-project needs --wandb-save-dir or --save (its default is --save/wandb, and the "
                          "run id that a resume continues is kept in --save)")


def _read_record(directory: Optional[str]) -> Optional[dict]:
    path = os.path.join(directory, RUN_FILE) if directory else None
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ValueError("no string field 'id'")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a W&B run record ({e}); delete it to start a new W&B run") from e
    return record


def _write_record(directory: str, record: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RUN_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


class WandbWriter:
    """The W&B run of this training run, on the logging rank only (create it there)."""

    def __init__(self, cfg, config: dict, *, resumed: bool):
        import wandb

        previous = None
        if resumed:  # the checkpoint resumed from first: --load D[/iter_N] --save E continues D's run into E
            load = os.path.normpath(cfg.load) if cfg.load else None
            root = os.path.dirname(load) if load and os.path.basename(load).startswith("iter_") else None
            previous = _read_record(load) or _read_record(root) or _read_record(cfg.save)
        if previous is not None and (previous.get("project"), previous.get("entity")) != (cfg.wandb_project,
                                                                                           cfg.wandb_entity):
            print(f"W&B: the checkpoint's run {previous['id']} is in project {previous.get('project')!r} (entity "
                  f"{previous.get('entity')!r}), not --wandb-project {cfg.wandb_project!r} (--wandb-entity "
                  f"{cfg.wandb_entity!r}): starting a new W&B run", flush=True)
            previous = None
        run_id = previous["id"] if previous else secrets.token_hex(4)
        save_dir = cfg.wandb_save_dir or os.path.join(cfg.save, "wandb")
        os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_exp_name,
                              dir=save_dir, config=config, id=run_id, resume="allow" if previous else None)
        self.id = run_id
        self.resumed = previous is not None
        if cfg.save:
            _write_record(cfg.save, {"id": run_id, "project": cfg.wandb_project, "entity": cfg.wandb_entity,
                                     "name": cfg.wandb_exp_name})
        print(f"W&B: {'resumed' if self.resumed else 'started'} run {run_id} in project {cfg.wandb_project} "
              f"(logs in {save_dir})", flush=True)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def run_config(cfg, description, **derived) -> dict:
    """What W&B records as the run's config: every flag's value, the model the checkpoint describes (which
    --load makes the flags ignore), and the sizes derived at start."""
    config = dataclasses.asdict(cfg)
    config["model_description"] = description.to_dict()
    config.update(derived)
    return config
