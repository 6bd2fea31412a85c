"""A HiMix export in lmms-eval's generic `huggingface` model, replayed offline on CPU without lmms-eval.

lmms-eval (0.7.2, lmms_eval/models/chat/huggingface.py, class `Huggingface`) does, for `--model huggingface
--model_args pretrained=DIR,trust_remote_code=True`:

    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=...)
    model_cls = AutoModelForCausalLM if config.model_type in AutoModelForCausalLM._model_mapping.keys() else
                AutoModelForImageTextToText if (likewise) else AutoModel
    model = model_cls.from_pretrained(pretrained, trust_remote_code=..., torch_dtype="bfloat16", device_map=...)
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=...)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=...)
    texts = [processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) for msg in batch]
    inputs = processor(text=texts, padding=True, return_tensors="pt", images=..., videos=[], audios=[])
    cont = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          do_sample=False, temperature=None, top_p=None, num_beams=1, max_new_tokens=...,
                          use_cache=True)
    answers = processor.batch_decode([o[len(i):] for i, o in zip(inputs.input_ids, cont)],
                                     skip_special_tokens=True, clean_up_tokenization_spaces=False)

with messages from `ChatMessages.to_hf_messages()`: [{"role": "user", "content": [{"type": "image", "image": PIL},
{"type": "text", "text": question}]}] (a system message first with --model_args system_prompt=...). The calls
below are those, in that order. `device_map` needs accelerate (an lmms-eval dependency); it is passed only where
accelerate is installed.

The export is built in this process (the steps of hf_import's rank worker at TP=1), so nothing here spawns.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, \
    SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from himix_megatron.config import ParallelConfig
from himix_megatron.convert.hf_export import chat_template
from himix_megatron.convert.layout import ConversionError
from himix_megatron.data.templates import TemplateConfig, generation_prompt
from himix_megatron.data.tokenizer import load_tokenizer
from himix_megatron.hf import AUTO_MAP, REMOTE_CODE_FILES
from himix_megatron.hf.processing_himix import HiMixProcessor
from model_utils import randomize_hf, set_model_field
from tokenizer_utils import train_byte_bpe, train_sentencepiece

QUESTIONS = ["What is in the image?", "Describe the picture briefly.\nWhich shape is it?"]
LM_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
GREEDY = dict(do_sample=False, temperature=None, top_p=None, num_beams=1, max_new_tokens=8, use_cache=True)


# --- tokenizers and checkpoints, built here ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{name: directory}: a LLaMA-like sentencepiece model with Vicuna's tokenizer_config (legacy=False, under
    which the text after a special token encodes differently in one string than alone), and byte-level BPE
    tokenizer.json files with Llama-3's and Qwen2's special tokens."""
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {name: root / name for name in ("vicuna", "llama3", "qwen2")}
    for d in dirs.values():
        d.mkdir()
    shutil.copy(train_sentencepiece(root), dirs["vicuna"] / "tokenizer.model")
    bpe = train_byte_bpe()
    configs = {
        "vicuna": {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "legacy": False, "add_bos_token": True},
        "llama3": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>"},
        "qwen2": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                  "pad_token": "<|endoftext|>"},
    }
    for name, d in dirs.items():
        if name != "vicuna":
            bpe.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(configs[name]))
    return {k: str(v) for k, v in dirs.items()}




def _checkpoint(hf_llm, hf_vision, template, output, staging):
    """What `import_checkpoint(..., ParallelConfig(), ...)` writes, built in this process."""
    from himix_megatron.checkpoint import build_model, save_checkpoint
    from himix_megatron.convert.hf_files import HFTensors, read_config, stage_tokenizer
    from himix_megatron.convert.hf_import import fill_from_hf, plan_import

    plan = plan_import(hf_llm, hf_vision, "himix", ParallelConfig(), template)
    chunks, encoder = build_model(plan.description, ParallelConfig())
    fill_from_hf(chunks, encoder, plan.description, HFTensors(hf_llm), HFTensors(hf_vision), seed=plan.seed,
                 init_method_std=plan.init_method_std)
    tokenizer = os.path.join(staging, "tokenizer")
    assert stage_tokenizer(hf_llm, tokenizer, read_config(hf_llm))
    save_checkpoint(output, chunks, plan.description, iteration=0, encoder=encoder, tokenizer_dir=tokenizer)
    return output


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    randomize_hf(SiglipVisionModel(SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=56, patch_size=14)), 3) \
        .save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def exports(tokenizers, siglip, tmp_path_factory, single_rank):
    """template -> (checkpoint, export), built once each: Llama + the Vicuna sentencepiece tokenizer (its <image>
    id is past the LM's vocabulary) for tinyllama, Qwen2 + the BPE tokenizer (no BOS, a pad token, <image> inside
    the vocabulary) for qwen2_base."""
    from himix_megatron.convert.hf_export import export_checkpoint

    built = {}

    def get(template):
        if template not in built:
            root = tmp_path_factory.mktemp(template)
            if template == "tinyllama":
                lm, tok = LlamaForCausalLM(LlamaConfig(vocab_size=300, bos_token_id=1, eos_token_id=2, **LM_SHAPE)), \
                    "vicuna"
            else:
                lm, tok = Qwen2ForCausalLM(Qwen2Config(vocab_size=420, tie_word_embeddings=True, **LM_SHAPE)), "qwen2"
            randomize_hf(lm, 1).save_pretrained(root / "lm")
            for name in os.listdir(tokenizers[tok]):
                shutil.copy(os.path.join(tokenizers[tok], name), root / "lm" / name)
            (root / "staging").mkdir()
            ckpt = _checkpoint(str(root / "lm"), siglip, template, str(root / "ckpt"), str(root / "staging"))
            built[template] = ckpt, export_checkpoint(ckpt, str(root / "hf"), hf_vision=siglip, log=lambda _: None)
        return built[template]

    return get


@pytest.fixture(params=["tinyllama", "qwen2_base"])
def exported(request, exports):
    """(template, checkpoint, export)."""
    return (request.param, *exports(request.param))


def _images(n=2):
    return [Image.fromarray(np.random.default_rng(i).integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8))
            for i in range(n)]


def _messages(question, image=None, system=None):
    """As lmms-eval's ChatMessages.to_hf_messages() writes them (its doc_to_messages puts visuals first)."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    system = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    return system + [{"role": "user", "content": content}]


# --- 1. the chat templates give training's prompt ids -----------------------------------------------------------


@pytest.mark.parametrize("template,tok", [("tinyllama", "vicuna"), ("qwen2_base", "qwen2"), ("pretrain", "vicuna"),
                                          ("llama3_instruct", "llama3"), ("chatml", "qwen2")])
def test_chat_template_and_processor_give_the_training_prompt(tokenizers, template, tok):
    hf_tok = AutoTokenizer.from_pretrained(tokenizers[tok])
    ours = load_tokenizer(tokenizers[tok])  # what training encodes with
    processor = HiMixProcessor(SiglipImageProcessor(size={"height": 56, "width": 56}), hf_tok,
                               chat_template=chat_template(template, None))
    cfg = TemplateConfig.for_arch(template, "himix")
    image = _images(1)[0]
    for question in QUESTIONS:
        for system in (None, "Answer briefly.", ""):
            if template == "pretrain" and system is not None:
                continue
            text = processor.apply_chat_template(_messages(question, image, system), tokenize=False,
                                                 add_generation_prompt=True)
            assert text.count("<image>") == 1
            batch = processor(text=text, images=image, return_tensors="pt")
            stated = TemplateConfig.for_arch(template, "himix", system=system)
            expected = generation_prompt([question], [], ours, stated, has_image=True)
            assert batch["input_ids"][0].tolist() == expected, text
            assert batch["pixel_values"].shape == (1, 3, 56, 56)
    if template == "pretrain":
        return
    # Where training put the image (vanilla's "mark" placement) is where the placeholder is.
    marked = generation_prompt([QUESTIONS[0]], [], ours, TemplateConfig(template, image="mark"), has_image=True)
    text = processor.apply_chat_template(_messages(QUESTIONS[0], image), add_generation_prompt=True)
    head = text[:text.index("<image>")]
    assert processor.encode_text(head) == marked[:marked.index(-200)]
    # A second round after an answer, string contents as well as part lists.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
                {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": QUESTIONS[1]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = generation_prompt(QUESTIONS, ["A red circle."], ours, cfg, has_image=True)
    assert processor(text=[text], images=[image])["input_ids"][0] == expected
    if tok == "vicuna":  # why the processor encodes piece by piece: the pieces' own dummy-prefix "▁" stay
        assert hf_tok.encode(text.replace("<image>", "")) != expected
    # The tokenizer of an export reads the same template (AutoTokenizer.apply_chat_template).
    hf_tok.chat_template = processor.chat_template
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text


def test_chat_templates_refuse_what_training_never_saw(tokenizers):
    processor = HiMixProcessor(SiglipImageProcessor(), AutoTokenizer.from_pretrained(tokenizers["qwen2"]),
                               chat_template=chat_template("chatml", None))
    with pytest.raises(Exception, match="starting with the user"):
        processor.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)
    for name in ("alpaca", "vicuna_v1"):  # unknown, retired
        with pytest.raises(ConversionError, match=f"'{name}' has no chat-template equivalent"):
            chat_template(name, None)


# --- 2. lmms-eval's calls, replayed ------------------------------------------------------------------------------


def _lmms_eval_load(directory, dtype="bfloat16"):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    if config.model_type in AutoModelForCausalLM._model_mapping.keys():
        model_cls = AutoModelForCausalLM
    elif config.model_type in AutoModelForImageTextToText._model_mapping.keys():
        model_cls = AutoModelForImageTextToText
    else:
        model_cls = AutoModel
    kwargs = {"torch_dtype": dtype}
    if importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = "cpu"
    model = model_cls.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    return model_cls, model, processor, tokenizer


def _lmms_eval_generate(model, processor, tokenizer, batch):
    """generate_until for one chunk of (question, image or None) requests."""
    batched_messages = [_messages(q, im) for q, im in batch]
    texts = [processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) for msg in batched_messages]
    images = [im for _, im in batch if im is not None]
    inputs = processor(text=texts, padding=True, return_tensors="pt", images=images, videos=[], audios=[])
    inputs = inputs.to(torch.device("cpu"))
    with torch.no_grad():
        cont = model.generate(**inputs, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              **GREEDY)
    trimmed = [out_ids[len(in_ids):] for in_ids, out_ids in zip(inputs.input_ids, cont)]
    answers = processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return texts, inputs, trimmed, answers


def test_lmms_eval_huggingface_model_runs_the_export(exported):
    from himix_megatron.data.image import ImageConfig, preprocess
    from himix_megatron.hf.modeling_himix import HiMixForCausalLM

    template, ckpt, directory = exported
    files = set(os.listdir(directory))
    assert {*REMOTE_CODE_FILES, "processor_config.json", "chat_template.jinja", "preprocessor_config.json"} <= files
    config = json.load(open(os.path.join(directory, "config.json")))
    assert config["auto_map"] == AUTO_MAP and config["himix_template"] == template
    assert config["himix_system_prompt"] == TemplateConfig(template).system_prompt  # an import records the default
    assert open(os.path.join(directory, "chat_template.jinja")).read() == chat_template(template, None)

    model_cls, model, processor, tokenizer = _lmms_eval_load(directory)
    assert model_cls.__name__ == "AutoModel"  # lmms-eval's choice for a model type transformers does not know
    # The export's own remote code, not this repository's modules.
    assert type(model).__name__ == "HiMixForCausalLM" and type(model) is not HiMixForCausalLM
    assert type(processor).__name__ == "HiMixProcessor" and type(processor) is not HiMixProcessor
    assert model.dtype == torch.bfloat16
    assert processor.chat_template == tokenizer.chat_template == chat_template(template, None)

    image = _images(1)[0]
    texts, inputs, trimmed, answers = _lmms_eval_generate(model, processor, tokenizer, [(QUESTIONS[0], image)])
    training_tok = load_tokenizer(os.path.join(ckpt, "iter_0000000", "tokenizer"))
    expected = generation_prompt([QUESTIONS[0]], [], training_tok, TemplateConfig.for_arch(template, "himix"),
                                 has_image=True)
    assert inputs["input_ids"][0].tolist() == expected
    assert inputs["attention_mask"].all()
    pixels = torch.from_numpy(preprocess(image, ImageConfig(size=56)))[None]  # our data pipeline's
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)

    # The same tokens as HiMixForCausalLM.generate on training's ids and our preprocessing.
    direct = HiMixForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.tensor([expected])
    with torch.no_grad():
        reference = direct.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                    eos_token_id=tokenizer.eos_token_id, **GREEDY)[0, ids.shape[1]:]
    assert trimmed[0].tolist() == reference.tolist() and len(reference) > 0
    assert answers == [tokenizer.decode(reference, skip_special_tokens=True, clean_up_tokenization_spaces=False)]
    assert model.generation_config.suppress_tokens == (
        [config["image_token_index"]] if config["image_token_index"] < config["vocab_size"] else None)

    # A text-only request (images=[]): no pixel_values, the base LM path.
    _, inputs, trimmed, _ = _lmms_eval_generate(model, processor, tokenizer, [(QUESTIONS[1], None)])
    assert "pixel_values" not in inputs and len(trimmed[0]) > 0


def test_lmms_eval_batch_equals_one_by_one(exported):
    """batch_size=2: two prompts of different lengths, padded on the left by the processor. In float32: bfloat16
    rounds differently at another batch shape, which is no property of the export."""
    _, _, directory = exported
    _, model, processor, tokenizer = _lmms_eval_load(directory, dtype="float32")
    requests = list(zip(QUESTIONS, _images(2)))
    _, inputs, batched, answers = _lmms_eval_generate(model, processor, tokenizer, requests)
    mask = inputs["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert lengths[0] != lengths[1] and not mask[:, -1].eq(0).any()  # left padding
    assert mask[lengths.index(min(lengths)), 0] == 0
    for i, request in enumerate(requests):
        _, _, single, answer = _lmms_eval_generate(model, processor, tokenizer, [request])
        assert batched[i].tolist() == single[0].tolist() and answers[i] == answer[0]


# --- 3. the processor refuses what HiMix cannot take --------------------------------------------------------------


def test_processor_refuses_what_himix_cannot_take(tokenizers):
    processor = HiMixProcessor(SiglipImageProcessor(size={"height": 56, "width": 56}),
                               AutoTokenizer.from_pretrained(tokenizers["vicuna"]),
                               chat_template=chat_template("tinyllama", None))
    one = processor.apply_chat_template(_messages("q", "image"), add_generation_prompt=True)
    none = processor.apply_chat_template(_messages("q"), add_generation_prompt=True)
    a, b = _images(2)
    with pytest.raises(ValueError, match="videos are not supported"):
        processor(text=[one], images=[a], videos=[np.zeros((2, 8, 8, 3))])
    with pytest.raises(ValueError, match="audios are not supported"):
        processor(text=[one], images=[a], audios=[np.zeros(16000)])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) in the text but 2 image"):
        processor(text=[one], images=[a, b])
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) in the text but 1 image"):
        processor(text=[none], images=[a])
    with pytest.raises(ValueError, match="one image per sample"):
        processor(text=[one.replace("<image>", "<image><image>")], images=[a, b])
    with pytest.raises(ValueError, match="an image for every sample"):
        processor(text=[one, none], images=[a], padding=True)
    with pytest.raises(TypeError, match="unsupported arguments"):
        processor(text=[one], images=[a], truncation=True)
    # Per-text image lists, as apply_chat_template(tokenize=True) passes them, and right padding on request.
    out = processor(text=[one, one + " more"], images=[[a], [b]], padding=True, padding_side="right",
                    return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 56, 56) and out["attention_mask"][0, -1] == 0
    tokenized = processor.apply_chat_template(_messages("q", a), add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt")
    assert tokenized["input_ids"][0].tolist() == processor.encode_text(one)


def test_processor_saves_and_loads_standalone(tokenizers, tmp_path):
    processor = HiMixProcessor(SiglipImageProcessor(size={"height": 56, "width": 56}),
                               AutoTokenizer.from_pretrained(tokenizers["qwen2"]), chat_template=chat_template("chatml", None),
                               padding_side="right")
    processor.save_pretrained(tmp_path)
    loaded = HiMixProcessor.from_pretrained(tmp_path)
    assert loaded.padding_side == "right" and loaded.chat_template == chat_template("chatml", None)
    text = loaded.apply_chat_template(_messages("q", "image"), add_generation_prompt=True)
    assert loaded.decode(loaded(text=text, images=_images(1))["input_ids"][0]) == text.replace("<image>", "")


# --- 4. the export writes the recorded prompt, and refuses what it cannot express ----------------------------------


def _with_fields(ckpt, tmp_path, **fields):
    copy = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, copy)
    for key, value in fields.items():
        set_model_field(os.path.join(copy, "iter_0000000"), key, value)
    return copy


@pytest.mark.parametrize("system", ["Answer in one word.", ""])
def test_export_carries_the_recorded_system_prompt(exports, tmp_path, system):
    """A model trained with another system prompt (or none) is prompted with it by the export's chat template and
    by himix-eval, with no flags: their prompt ids equal training's."""
    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.eval.generate import load_model
    from himix_megatron.eval.prompts import Question, prompt_ids

    ckpt, _ = exports("tinyllama")
    out = export_checkpoint(_with_fields(ckpt, tmp_path, system_prompt=system), str(tmp_path / "out"),
                            log=lambda _: None)
    assert json.load(open(os.path.join(out, "config.json")))["himix_system_prompt"] == system
    assert open(os.path.join(out, "chat_template.jinja")).read() == chat_template("tinyllama", system)
    training = generation_prompt([QUESTIONS[0]], [], load_tokenizer(os.path.join(ckpt, "iter_0000000", "tokenizer")),
                                 TemplateConfig("tinyllama", system=system), has_image=True)
    _, _, processor, _ = _lmms_eval_load(out, dtype="float32")
    text = processor.apply_chat_template(_messages(QUESTIONS[0], _images(1)[0]), add_generation_prompt=True)
    assert processor(text=text, images=_images(1))["input_ids"][0] == training
    model = load_model(out, template=None, log=lambda _: None)
    assert model.template.system_prompt == system
    assert prompt_ids(Question("q0", QUESTIONS[0], "image.png"), model.tokenizer, model.template) == training


def test_export_template_choice(exports, tmp_path):
    from himix_megatron.convert.hf_export import export_checkpoint

    ckpt, _ = exports("tinyllama")
    with pytest.raises(ConversionError, match="unknown conversation template 'alpaca'"):
        export_checkpoint(_with_fields(ckpt, tmp_path / "a", template="alpaca"), str(tmp_path / "out"),
                          log=lambda _: None)
    assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(ConversionError, match="records no conversation template"):
        export_checkpoint(_with_fields(ckpt, tmp_path / "b", template=None), str(tmp_path / "out"), log=lambda _: None)
    logs = []  # an earlier release's checkpoint: no system prompt recorded, the template's default assumed
    out = export_checkpoint(_with_fields(ckpt, tmp_path / "c", system_prompt=None), str(tmp_path / "out"),
                            log=logs.append)
    assert any("records no system prompt" in line for line in logs)
    assert open(os.path.join(out, "chat_template.jinja")).read() == chat_template("tinyllama", None)
