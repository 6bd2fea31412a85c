"""One stage of a recipe (examples/recipes/*.yaml) -> a `himix-train --config` YAML file.

    python examples/slurm/stage_config.py --recipe examples/recipes/llava15_regular.yaml \
        --stage-name finetune --data-root $HIMIX_DATA/shards --language-model llama3.2-1b --output stage.yaml

The recipe stays the single source of the data and hyperparameters; the sbatch scripts add only what
depends on the cluster (parallelism, micro-batch, memory, checkpoint paths) as flags, which override
the file.

Datasets with a `fraction` (LLaVA-OneVision's "first:X%") become a weighted blend whose weights are
fraction x the real sample count from each index.json, and one epoch becomes that many samples
(`train_samples`): a weighted blend's own epoch is the full size of every dataset, so `train_epochs`
would read each sampled subset 1/fraction times too often.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Recipe stage names -> the trainer's --stage, and what that stage trains (optimizer.apply_stage).
STAGES = {"pretrain": ("pretrain", "himix_vision"),
          "further_pretrain": ("further-pretrain", "lm_and_himix_vision"),
          "finetune": ("finetune", "lm_and_himix_vision")}


def stage_config(recipe_path: str, stage_name: str, data_root: str, model: str) -> dict:
    from himix_megatron.data.recipes import load_recipe, per_model, stage
    from himix_megatron.data.shards import ShardDirectory

    recipe = load_recipe(recipe_path)
    st = stage(recipe, stage_name, data_root=data_root, model=model)
    if st.name not in STAGES:
        raise SystemExit(f"{recipe_path}: stage {st.name!r} has no trainer stage; known: {sorted(STAGES)}")
    trainer_stage, trains = STAGES[st.name]
    if st.trainable != trains:
        raise SystemExit(f"{recipe_path}: stage {st.name!r} trains {st.trainable!r}, but --stage {trainer_stage} "
                         f"trains {trains!r}")
    common = {k: per_model(v, model) for k, v in st.common.items()}
    if common.get("optimizer", "adamw") != "adamw":
        raise SystemExit(f"{recipe_path}: optimizer {common['optimizer']!r}; the trainer has AdamW only")

    cfg = {"stage": trainer_stage, "template": st.template, "lr": st.lr, "global_batch_size": st.global_batch_size}
    paths = [spec.paths[0] for spec in st.datasets]
    fractions = [spec.fraction for spec in st.datasets]
    if all(f == 1.0 for f in fractions):
        cfg["data_path"] = paths  # concatenated: one epoch reads every sample once
        cfg["train_epochs"] = float(st.epochs)
    else:
        weights = [f * ShardDirectory.open(p).num_samples for f, p in zip(fractions, paths)]
        cfg["data_path"] = [x for w, p in zip(weights, paths) for x in (float(w), p)]
        cfg["train_samples"] = int(round(st.epochs * sum(weights)))
    for key, flag in (("weight_decay", "weight_decay"), ("warmup_ratio", "lr_warmup_fraction"),
                      ("lr_schedule", "lr_decay_style"), ("seq_length", "seq_length")):
        if key in common:
            cfg[flag] = common[key]
    if "precision" in common:
        if common["precision"] not in ("bf16", "fp32"):
            raise SystemExit(f"{recipe_path}: precision {common['precision']!r}: the trainer has bf16 or fp32")
        cfg["bf16"] = common["precision"] == "bf16"
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--stage-name", required=True, help="a stage of the recipe: pretrain, further_pretrain, finetune")
    p.add_argument("--data-root", required=True, help="directory the recipe's `shards` paths are relative to")
    p.add_argument("--language-model", default="default", help="preset name for per-model recipe values")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    import yaml

    from himix_megatron.data import DataError

    try:
        cfg = stage_config(args.recipe, args.stage_name, args.data_root, args.language_model)
    except DataError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# {args.recipe} stage {args.stage_name} for {args.language_model}; written by {p.prog}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, args.output)  # a job killed mid-write leaves the previous file, never half of one
    datasets = len(cfg["data_path"]) // (1 if "train_epochs" in cfg else 2)
    print(f"{args.output}: --stage {cfg['stage']}, {datasets} dataset(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
