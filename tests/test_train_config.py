"""The trainer's flags, YAML config and up-front refusals (single process, no compute)."""

from __future__ import annotations

import pytest

from himix_megatron.config import ConfigError
from himix_megatron.training.config import build_parser, check, parse_args, parse_data_path


@pytest.fixture
def shards(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


def _args(shards, *extra):
    return ["--data-path", str(shards / "a"), "--train-iters", "10", *extra]


def test_megatron_flag_names_parse(shards):
    cfg = parse_args(_args(shards, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--micro-batch-size", "4", "--global-batch-size", "32", "--lr", "2e-5", "--min-lr", "1e-6",
                           "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.03", "--clip-grad", "1.0",
                           "--bf16", "--use-distributed-optimizer", "--recompute-granularity", "selective",
                           "--stage", "pretrain", "--arch", "vanilla", "--no-progress"))
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.lr, cfg.min_lr) == (4, 32, 2e-5, 1e-6)
    assert cfg.bf16 and cfg.use_distributed_optimizer and not cfg.progress
    assert (cfg.recompute_granularity, cfg.stage, cfg.arch) == ("selective", "pretrain", "vanilla")


def test_yaml_config_with_flags_overriding_it(shards, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: 1.0e-3\nmicro-batch-size: 8\ndata_path: [{shards / 'a'}]\ntrain_iters: 5\n")
    cfg = parse_args(["--config", str(config), "--lr", "5e-4"])
    assert (cfg.lr, cfg.micro_batch_size, cfg.train_iters) == (5e-4, 8, 5)
    config.write_text("learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        parse_args(["--config", str(config)])


def test_unknown_flag_and_bad_choice_are_refused(shards):
    with pytest.raises(SystemExit):
        build_parser().parse_args(_args(shards, "--stage", "warmup"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(_args(shards, "--tensor-parallel", "2"))


def test_weighted_data_path(shards):
    assert parse_data_path([str(shards / "a"), str(shards / "b")]) == [(None, str(shards / "a")),
                                                                       (None, str(shards / "b"))]
    assert parse_data_path(["0.7", str(shards / "a"), "0.3", str(shards / "b")]) == [
        (0.7, str(shards / "a")), (0.3, str(shards / "b"))]
    with pytest.raises(ConfigError, match="--data-path: weighted form"):
        parse_data_path(["0.7", str(shards / "a"), "0.3"])
    with pytest.raises(ConfigError, match="is not a directory"):
        parse_data_path([str(shards / "missing")])


@pytest.mark.parametrize("extra, world, message", [
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not a multiple"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6 is not a multiple"),
    (["--train-samples", "100"], 1, "exactly one of --train-iters, --train-samples"),
    (["--fp8-format", "hybrid", "--bf16"], 1, "--fp8-format hybrid needs Transformer Engine on a GPU"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--save-interval", "10"], 1, "--save-interval needs --save"),
    (["--eval-interval", "10"], 1, "--eval-interval needs --valid-data-path"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr 1.0 is above --lr 0.1"),
    (["--lr-warmup-fraction", "1.5"], 1, "--lr-warmup-fraction 1.5 must be in"),
    # packing
    (["--packing-seq-length", "64", "--micro-batch-size", "2"], 1, "--packing-seq-length needs --micro-batch-size 1"),
    (["--packing-seq-length", "16", "--seq-length", "32"], 1, "--packing-seq-length 16 is below --seq-length 32"),
    (["--packing-seq-length", "60", "--seq-length", "32"], 1, "--packing-seq-length 60 must be a multiple of 8"),
    (["--packing-seq-length", "64", "--seq-length", "32", "--global-batch-size", "8", "--packing-buffer-size", "9"],
     1, r"--packing-buffer-size 9 must be in \[1, global batch / DP = 8\]"),
    (["--packing-buffer-size", "4"], 1, "--packing-buffer-size needs --packing-seq-length"),
    (["--packing-max-images", "4"], 1, "--packing-max-images needs --packing-seq-length"),
    (["--packing-seq-length", "64", "--seq-length", "32", "--pad-to-seq-length"], 1,
     "--pad-to-seq-length and --packing-seq-length exclude each other"),
])
def test_bad_combinations_are_refused_before_any_compute(shards, extra, world, message):
    cfg = parse_args(_args(shards, *extra))
    with pytest.raises(ConfigError, match=message):
        check(cfg, world, te_available=False, cuda=False)


def test_fp8_needs_bf16_even_with_te(shards):
    cfg = parse_args(_args(shards, "--fp8-format", "e4m3"))
    with pytest.raises(ConfigError, match="--fp8-format needs --bf16"):
        check(cfg, 1, te_available=True, cuda=True)
    check(parse_args(_args(shards, "--fp8-format", "e4m3", "--bf16")), 1, te_available=True, cuda=True)


def test_missing_data_path():
    cfg = parse_args(["--train-iters", "1"])
    with pytest.raises(ConfigError, match="--data-path is required"):
        check(cfg, 1, te_available=False, cuda=False)


@pytest.mark.parametrize("extra, message", [
    (["--pad-to-seq-length", "--seq-length", "2040"], r"--fp8-recipe delayed needs the text GEMM rows, --seq-length "
                                                     r"2040 x --micro-batch-size 1, to be a multiple of 16"),
    (["--pad-to-seq-length", "--seq-length", "2064", "--sequence-parallel", "--tensor-model-parallel-size", "2"],
     r"--seq-length 2064 / TP 2 x --micro-batch-size 1, to be a multiple of 16"),
    (["--pad-to-seq-length", "--seq-length", "2064", "--fp8-recipe", "mxfp8"], r"2064 x .* a multiple of 32"),
    (["--packing-seq-length", "2064", "--seq-length", "1024", "--fp8-recipe", "mxfp8"],
     r"--packing-seq-length 2064 must be a multiple of 32 under --fp8-recipe mxfp8"),
])
def test_fp8_shapes_are_refused_before_step_one(shards, extra, message):
    cfg = parse_args(_args(shards, "--fp8-format", "hybrid", "--bf16", *extra))
    with pytest.raises(ConfigError, match=message):
        check(cfg, 2, te_available=True, cuda=True)
    # Dynamic padding and packing round every width up to the recipe's multiple themselves.
    check(parse_args(_args(shards, "--fp8-format", "hybrid", "--bf16", "--seq-length", "2047")), 1,
          te_available=True, cuda=True)
    check(parse_args(_args(shards, "--fp8-format", "hybrid", "--bf16", "--pad-to-seq-length", "--seq-length", "2048",
                           "--fp8-recipe", "mxfp8")), 1, te_available=True, cuda=True)
