"""Vanilla LLaVA with the image where the authors' template puts it (issue 22 item 8, issue 23 item 4), end to end:
our model on training's ids (one image id after `{system} USER: `) equals transformers' LlavaForConditionalGeneration
on the same ids with the image id expanded to N `<image>` tokens; the export's chat template and LlavaProcessor
give exactly those ids (recorded, another and an empty system prompt; sentencepiece with legacy true and false,
byte-level BPE with and without BOS); himix-eval prompts the export with them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from himix_megatron.checkpoint import ModelDescription, build_model, save_checkpoint
from himix_megatron.config import ParallelConfig
from himix_megatron.convert import hf_export
from himix_megatron.convert.layout import ConversionError
from himix_megatron.data.records import Conversation
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX, TemplateConfig, encode_conversation, generation_prompt
from himix_megatron.data.tokenizer import load_tokenizer
from model_utils import TINY_LM, TINY_VISION, randomize

TOKENIZERS = os.path.join(os.path.dirname(__file__), "fixtures", "reference_templates", "tokenizers")
LM = dataclasses.replace(TINY_LM, vocab_size=1024)  # the fixture tokenizers hold up to 1000 ids
SYSTEM = "Answer briefly and in English."  # recorded by the checkpoint: not the template's default
TEMPLATE = {"spm_legacy": "tinyllama", "spm_nonlegacy": "tinyllama", "bpe_bos": "qwen2_base",
            "bpe_nobos": "qwen2_base"}


def _checkpoint(root, name: str) -> str:
    tok = str(root / f"tok-{name}")
    shutil.copytree(os.path.join(TOKENIZERS, name), tok)
    description = ModelDescription("vanilla", LM, TINY_VISION, TEMPLATE[name], system_prompt=SYSTEM)
    chunks, encoder = build_model(description, ParallelConfig())
    randomize(chunks + [encoder], 0, scale=0.5)
    path = str(root / f"ckpt-{name}")
    save_checkpoint(path, chunks, description, iteration=1, encoder=encoder, tokenizer_dir=tok)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory, single_rank):
    """name -> (checkpoint, export) for each fixture tokenizer."""
    root = tmp_path_factory.mktemp("vanilla-export")
    out = {}
    for name in TEMPLATE:
        ckpt = _checkpoint(root, name)
        hf_export.export_checkpoint(ckpt, str(root / f"hf-{name}"), log=lambda _: None)
        out[name] = (ckpt, str(root / f"hf-{name}"))
    return out


def _expand(ids, image_id, n):
    return [t for i in ids for t in ([image_id] * n if i == IMAGE_TOKEN_INDEX else [i])]


def test_megatron_vanilla_equals_transformers_llava_on_the_spliced_ids(exports):
    """A training sample's ids (loss included) through our model, and the same conversation through the export with
    its image id expanded to N image tokens: the same logits at every text position."""
    from transformers import LlavaForConditionalGeneration

    from himix_megatron.convert.hf_export import load_tp1

    ckpt, exported = exports["spm_nonlegacy"]
    tok = load_tokenizer(os.path.join(ckpt, "iter_0000001", "tokenizer"))
    conv = Conversation(rounds=(("What is in the image?", "A red circle."), ("Where is it?", "On the left.")),
                        has_image=True, image_rounds=(0,))
    enc = encode_conversation(conv, tok, TemplateConfig("tinyllama", image="mark", system=SYSTEM))
    ids = torch.tensor([enc.ids])
    slot = enc.ids.index(IMAGE_TOKEN_INDEX)
    assert tok.decode(enc.ids[:slot]).rstrip().endswith("USER:")  # after `{system} USER: `, as the authors put it
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    _, _, chunks, encoder, _ = load_tp1(ckpt)
    model = chunks[0].eval()
    with torch.no_grad():
        features = encoder(pixels)
        n = features.shape[0]
        ours = model(ids, torch.arange(ids.shape[1])[None], features)[..., :LM.vocab_size]
        loss = model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None], features, labels=ids[:, 1:].clamp(min=0))
    llava = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    image_id = llava.config.image_token_index
    with torch.no_grad():
        theirs = llava(input_ids=torch.tensor([_expand(enc.ids, image_id, n)]), pixel_values=pixels).logits
    at = [t + (n - 1) * (t >= slot) for t in range(ids.shape[1])]  # the image id's output: the last image token's
    torch.testing.assert_close(ours[0], theirs[0, at, :LM.vocab_size], atol=1e-4, rtol=0)
    expected = torch.nn.functional.cross_entropy(theirs[0, at[:-1], :LM.vocab_size], ids[0, 1:].clamp(min=0),
                                                 reduction="none")
    torch.testing.assert_close(loss[0], expected, atol=1e-4, rtol=0)
    with torch.no_grad():  # the image reaches the text after it only
        other = llava(input_ids=torch.tensor([_expand(enc.ids, image_id, n)]), pixel_values=-pixels).logits
    assert torch.equal(other[0, :slot], theirs[0, :slot]) and (other[0, -1] - theirs[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(TEMPLATE))
def test_the_chat_template_and_processor_give_trainings_ids(exports, name):
    """What lmms-eval's llava_hf does (apply_chat_template, then the processor with the image) gives training's mark
    ids with the image id expanded: by default with the recorded system prompt, and with another and an empty one
    stated as a system message."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    ckpt, exported = exports[name]
    tok = load_tokenizer(os.path.join(ckpt, "iter_0000001", "tokenizer"))
    processor = AutoProcessor.from_pretrained(exported)
    assert type(processor).__name__ == "LlavaProcessor"
    assert os.path.isfile(os.path.join(exported, "chat_template.jinja"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    config = json.load(open(os.path.join(exported, "config.json")))
    image_id, n = config["image_token_index"], config["image_seq_length"]
    for stated in (None, "Be terse.", ""):
        messages = [] if stated is None else [{"role": "system", "content": stated}]
        messages += [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = processor(text=text, images=[image])["input_ids"][0]
        cfg = TemplateConfig(TEMPLATE[name], image="mark", system=SYSTEM if stated is None else stated)
        expected = generation_prompt(["What colour is it?"], [], tok, cfg, has_image=True)
        assert list(ids) == _expand(expected, image_id, n), (name, stated, text)
    if name == "spm_nonlegacy":  # the processor tokenizes the whole string: the template writes the dummy prefix
        assert " \n" in text
    else:
        assert "<image>\n" in text


def test_himix_eval_prompts_the_vanilla_export_with_trainings_ids(exports, tmp_path):
    """himix-eval's prompt for a question with an image is training's mark ids, the image id expanded to the N
    image tokens, with the recorded system prompt; its first greedy token is our model's on the training ids."""
    from PIL import Image

    from himix_megatron.convert.hf_export import load_tp1
    from himix_megatron.eval import generate
    from himix_megatron.eval.prompts import Question, load_image

    ckpt, exported = exports["spm_legacy"]
    m = generate.load_model(exported, template=None, log=lambda _: None)
    assert m.template.system_prompt == SYSTEM and m.template.image == "mark"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    question = Question(question_id=0, text="What colour is it?", image="red.png")
    tok = load_tokenizer(os.path.join(ckpt, "iter_0000001", "tokenizer"))
    training = generation_prompt([question.text], [], tok, TemplateConfig("tinyllama", image="mark", system=SYSTEM),
                                 has_image=True)
    prompt = generate._ids(m, question)
    assert prompt == _expand(training, m.model.config.image_token_index, m.image_tokens)
    pixels = torch.from_numpy(load_image(question, str(tmp_path), m.image))[None]
    _, _, chunks, encoder, _ = load_tp1(ckpt)
    with torch.no_grad():
        ours = chunks[0].eval()(torch.tensor([training]), torch.arange(len(training))[None], encoder(pixels))
        theirs = m.model(input_ids=torch.tensor([prompt]), pixel_values=pixels).logits
    torch.testing.assert_close(ours[0, -1, :LM.vocab_size], theirs[0, -1, :LM.vocab_size], atol=1e-4, rtol=0)
    text_only = Question(question_id=1, text="What colour is it?", image=None)  # no image: no image id
    assert IMAGE_TOKEN_INDEX not in generate._ids(m, text_only) and \
        m.model.config.image_token_index not in generate._ids(m, text_only)


def test_an_export_whose_processor_cannot_reproduce_the_prompt_is_refused(exports, tmp_path, monkeypatch):
    """A chat template that renders another prompt (here: every user turn shouted) is refused before the directory
    exists, naming what differs."""
    ckpt, _ = exports["bpe_bos"]
    real = hf_export.chat_template
    monkeypatch.setattr(hf_export, "chat_template", lambda *a: real(*a).replace("'USER: '", "'USER:  '"))
    with pytest.raises(ConversionError, match=r"LlavaProcessor tokenizes the prompt differently from training.*"
                                              r"1 round\(s\), system message None"):
        hf_export.export_checkpoint(ckpt, str(tmp_path / "refused"), log=lambda _: None)
    assert not os.path.exists(tmp_path / "refused")


@pytest.mark.parametrize("ranking", ["last_token", "all_tokens"])
def test_megatron_fastv_equals_the_exports_fastv_with_the_image_after_the_header(exports, tmp_path, ranking):
    """FastV ranks and prunes the image tokens where the image id put them: our forward-only FastV and the FastV
    export (transformers' LLaVA with the baselines' layer loop) keep the same tokens and give the same logits."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    from himix_megatron.convert.hf_export import load_tp1
    from himix_megatron.model.fastv import FastVConfig, fastv_logits

    ckpt, _ = exports["spm_legacy"]
    fastv = str(tmp_path / "fastv")
    hf_export.export_checkpoint(ckpt, fastv, baselines={"fastv_k": 2, "fastv_r": 0.5, "fastv_ranking": ranking},
                                log=lambda _: None)
    tok = load_tokenizer(os.path.join(ckpt, "iter_0000001", "tokenizer"))
    ids = generation_prompt(["What colour is the square?"], [], tok,
                            TemplateConfig("tinyllama", image="mark", system=SYSTEM), has_image=True)
    slot = ids.index(IMAGE_TOKEN_INDEX)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    _, _, chunks, encoder, _ = load_tp1(ckpt)
    with torch.no_grad():
        features = encoder(pixels)
        n = features.shape[0]
        ours, kept = fastv_logits(chunks[0].eval(), torch.tensor([ids]), features, FastVConfig(2, 0.5, ranking))
    model = AutoModelForCausalLM.from_pretrained(fastv, trust_remote_code=True).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([_expand(ids, model.config.image_token_index, n)]),
                       pixel_values=pixels).logits
    assert [int(i) for i in model.model.language_model.fastv_last_kept[0]] == (slot + kept[0]).tolist()
    processor = AutoProcessor.from_pretrained(fastv)  # its prompts are training's too (the tokenizer's class)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}], add_generation_prompt=True)
    prompt = processor(text=text, images=[Image.new("RGB", (56, 56))])["input_ids"][0]
    assert list(prompt) == _expand(ids, model.config.image_token_index, n)
    at = [t + (n - 1) * (t >= slot) for t in range(len(ids))]
    torch.testing.assert_close(ours[0, :, :LM.vocab_size], theirs[0, at, :LM.vocab_size], atol=1e-4, rtol=0)
