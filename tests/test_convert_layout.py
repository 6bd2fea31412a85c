"""Conversion pieces that need no model: config mapping, fused-tensor layouts, HF file I/O, and the errors an
import raises before any rank starts (each naming the tensor or field, with no output directory left)."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen2Config

from himix_megatron.config import ConfigError, ParallelConfig, language_model_preset
from himix_megatron.convert import layout
from himix_megatron.convert.hf_files import HFTensors, write_safetensors
from himix_megatron.convert.layout import ConversionError
from model_utils import shard as reference_shard
from test_convert import hf  # noqa: F401 - the tiny HF checkpoints fixture

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


# --- configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["qwen2-0.5b", "llama3.2-1b", "vicuna-7b", "tinyllama-1.1b"])
def test_language_config_round_trips_through_transformers(preset):
    import dataclasses

    lm = language_model_preset(preset)
    fields = layout.language_to_hf(lm)
    cls = Qwen2Config if fields.pop("model_type") == "qwen2" else LlamaConfig
    v5 = cls(**fields).to_dict()  # transformers 5 writes `rope_parameters`
    assert layout.language_from_hf(v5, lm.name) == dataclasses.replace(lm, head_dim=None)
    legacy = {**layout.language_to_hf(lm)}  # transformers 4 / hub form: `rope_theta` + `rope_scaling`
    assert layout.language_from_hf(legacy, lm.name) == dataclasses.replace(lm, head_dim=None)


def test_legacy_rope_fields_are_read():
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=100, rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    lm = layout.language_from_hf(cfg, "x")
    assert lm.rotary_base == 500000.0 and lm.rope_scaling_factor == 32.0 and not lm.qkv_bias


@pytest.mark.parametrize("change,field", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type='gpt2'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    (dict(rope_scaling={**LLAMA3, "high_freq_factor": 2.0}), "rope_scaling.high_freq_factor=2.0"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_language_configs_are_refused_by_field(change, field):
    cfg = {**dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, vocab_size=100), **change}
    with pytest.raises(ConversionError, match=field.replace("[", r"\[").replace("(", r"\(")):
        layout.language_from_hf(cfg, "x", where="llm/config.json")


def test_vision_config_from_siglip_model_and_vision_model():
    tower = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                 patch_size=14)
    a = layout.vision_from_hf({"model_type": "siglip_vision_model", **tower}, "v")
    b = layout.vision_from_hf({"model_type": "siglip", "vision_config": tower, "text_config": {}}, "v")
    assert a == b and a.num_features == 15
    assert layout.vision_from_hf(layout.vision_to_hf(a), "v") == a
    with pytest.raises(ConversionError, match="model_type='dinov2'"):
        layout.vision_from_hf({"model_type": "dinov2"}, "v")


# --- tensor layouts ----------------------------------------------------------------------------------


def test_qkv_is_interleaved_per_query_group_and_splits_back():
    lm = language_model_preset("tiny")  # 4 heads, 2 groups, head_dim 16
    q, k, v = (torch.randn(n, 64) for n in (64, 32, 32))
    fused = layout.fuse_qkv(q, k, v, lm)
    # group 1 = query heads 2, 3 then k head 1 then v head 1
    g1 = fused[64:128]
    assert torch.equal(g1[:32], q[32:64]) and torch.equal(g1[32:48], k[16:32]) and torch.equal(g1[48:], v[16:32])
    assert all(torch.equal(a, b) for a, b in zip(layout.split_qkv(fused, lm), (q, k, v)))
    kv = layout.fuse_kv(k, v, lm)
    assert torch.equal(kv[16:32], v[:16]) and torch.equal(kv[32:48], k[16:32])
    assert all(torch.equal(a, b) for a, b in zip(layout.split_kv(kv, lm), (k, v)))
    bias = [torch.randn(n) for n in (64, 32, 32)]
    assert all(torch.equal(a, b) for a, b in zip(layout.split_qkv(layout.fuse_qkv(*bias, lm), lm), bias))


@pytest.mark.parametrize("name,partition_dim", [("decoder.layers.0.mlp.linear_fc1.weight", 0),
                                                ("decoder.layers.0.self_attention.linear_qkv.weight", 0),
                                                ("decoder.layers.0.self_attention.linear_proj.weight", 1),
                                                ("vision_projection.encoder.linear_fc1.weight", 0)])
def test_tp_shards_agree_with_the_test_suites_reference(name, partition_dim):
    full = torch.randn(256, 128)
    param = torch.nn.Parameter(torch.empty(0))
    param.tensor_model_parallel, param.partition_dim = True, partition_dim
    for rank in range(4):
        assert torch.equal(layout.shard(name, full, param, rank, 4), reference_shard(name, full, param, rank, 4))
    if name.endswith("mlp.linear_fc1.weight"):  # [gate; up]: rank 1 of 2 holds [gate_1; up_1]
        gate, up = full.chunk(2)
        assert torch.equal(layout.shard(name, full, param, 1, 2), torch.cat([gate[64:], up[64:]]))


def test_new_parameters_are_seeded_by_name():
    w = layout.init_new_parameter("decoder.layers.3.self_attention.linear_kv_vision.weight", (64, 48), 0.02, 0)
    assert torch.equal(w, layout.init_new_parameter("decoder.layers.3.self_attention.linear_kv_vision.weight",
                                                    (64, 48), 0.02, 0))
    assert not torch.equal(w, layout.init_new_parameter("decoder.layers.2.self_attention.linear_kv_vision.weight",
                                                        (64, 48), 0.02, 0))
    assert torch.equal(layout.init_new_parameter("x.vision_norm.weight", (8,), 0.02, 0), torch.ones(8))
    assert torch.equal(layout.init_new_parameter("x.linear_kv_vision.bias", (8,), 0.02, 0), torch.zeros(8))


# --- files -------------------------------------------------------------------------------------------


def test_bin_and_safetensors_with_and_without_index(tmp_path):
    state = {f"t{i}": torch.randn(50, 50) for i in range(6)}
    os.makedirs(tmp_path / "st")
    files = write_safetensors(state, str(tmp_path / "st"), max_shard_size="30KB")
    assert len(files) > 1 and os.path.isfile(tmp_path / "st" / "model.safetensors.index.json")
    loaded = HFTensors(str(tmp_path / "st"))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    os.remove(tmp_path / "st" / "model.safetensors.index.json")  # shards without an index
    assert set(HFTensors(str(tmp_path / "st"))) == set(state)
    os.makedirs(tmp_path / "bin")
    torch.save({k: state[k] for k in ("t0", "t1", "t2")}, tmp_path / "bin" / "pytorch_model-1.bin")
    torch.save({k: state[k] for k in ("t3", "t4", "t5")}, tmp_path / "bin" / "pytorch_model-2.bin")
    with open(tmp_path / "bin" / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"weight_map": {k: f"pytorch_model-{1 + i // 3}.bin" for i, k in enumerate(sorted(state))}}, f)
    loaded = HFTensors(str(tmp_path / "bin"))
    assert loaded.shape("t4") == (50, 50) and torch.equal(loaded["t4"], state["t4"])
    os.remove(tmp_path / "bin" / "pytorch_model.bin.index.json")
    torch.save({"not": "weights"}, tmp_path / "bin" / "training_args.bin")
    loaded = HFTensors(str(tmp_path / "bin"))
    assert set(loaded) == set(state) and torch.equal(loaded["t1"], state["t1"])
    with pytest.raises(ConversionError, match="no model weights"):
        HFTensors(str(tmp_path))


# --- bad input to an import: clear errors, no output ----------------------------------------------------


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


def _import(hf_dirs, tmp_path, llm=None, vision=None, parallel=ParallelConfig()):
    from himix_megatron.convert.hf_import import import_checkpoint

    output = tmp_path / "out"
    try:
        import_checkpoint(llm or hf_dirs["llama"], vision or hf_dirs["siglip"], "himix", parallel, str(output))
    finally:
        assert not os.path.exists(output)
        assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]  # no `.tmp-<pid>` left either


def test_missing_language_tensor_is_named(hf, tmp_path):  # noqa: F811
    llm = _edited_copy(hf["llama"], tmp_path / "llm", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"missing language model tensor 'model.layers.2.mlp.up_proj.weight'"):
        _import(hf, tmp_path, llm=llm)


def test_shape_mismatch_is_named(hf, tmp_path):  # noqa: F811
    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:16]

    llm = _edited_copy(hf["llama"], tmp_path / "llm", edit)
    with pytest.raises(ConversionError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\), "
                                              r"the config implies \(32, 64\)"):
        _import(hf, tmp_path, llm=llm)


def test_missing_vision_tensor_is_named(hf, tmp_path):  # noqa: F811
    vision = _edited_copy(hf["siglip"], tmp_path / "vis", lambda t: t.pop("encoder.layers.0.mlp.fc1.bias"))
    with pytest.raises(ConversionError, match=r"missing vision tensor 'encoder.layers.0.mlp.fc1.bias'"):
        _import(hf, tmp_path, vision=vision)


def test_unsupported_architecture_is_named(hf, tmp_path):  # noqa: F811
    gpt2 = tmp_path / "gpt2"
    os.makedirs(gpt2)
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(ConversionError, match=r"gpt2/config.json: unsupported language model architecture "
                                              r"model_type='gpt2' \(architectures=\['GPT2LMHeadModel'\]\)"):
        _import(hf, tmp_path, llm=str(gpt2))


def test_tp_not_dividing_heads_is_named(hf, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=3 does not divide hf:llama's "
                                          "num_attention_heads=4"):
        _import(hf, tmp_path, parallel=ParallelConfig(tensor_model_parallel_size=3))


def test_cli_reports_errors_without_a_traceback(hf, tmp_path, capsys):  # noqa: F811
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(["import", "--hf-llm", hf["llama"], "--hf-vision", hf["siglip"], "--arch", "himix",
                     "--tensor-model-parallel-size", "3", "--output", str(tmp_path / "out")])
    assert code == 1 and "error: tensor_model_parallel_size=3 does not divide" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_plan_reads_the_vision_tower_inside_a_siglip_model(hf, tmp_path):  # noqa: F811
    from transformers import SiglipConfig, SiglipModel

    from himix_megatron.convert.hf_import import plan_import

    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(tmp_path / "siglip")
    plan = plan_import(hf["llama"], str(tmp_path / "siglip"), "vanilla", ParallelConfig(tensor_model_parallel_size=2),
                       template="tinyllama")
    # Both directories are named "siglip", so even the recorded names agree.
    other = plan_import(hf["llama"], hf["siglip"], "himix", ParallelConfig())
    assert plan.description.vision == other.description.vision
    assert plan.description.language.vocab_size == 300 and plan.description.template == "tinyllama"
