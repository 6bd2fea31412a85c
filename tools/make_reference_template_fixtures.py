#!/usr/bin/env python
"""Golden template fixtures: the token ids and label masks that the HiMix authors' own template code produces.

    git --git-dir=MIRROR/Xuange923+HiMix/repo archive 417fac3 | tar -x -C /tmp/himix_ref
    /work/refenv/bin/python tools/make_reference_template_fixtures.py --reference /tmp/himix_ref
    # add --train-tokenizers to rebuild the four tiny tokenizers first (their ids change: every fixture with them)

It must run in a separate environment with the authors' pins (transformers 4.44.0, tokenizers 0.19.0; see
tests/fixtures/reference_templates/README.md), never in the project's venv: it imports the authors' `tinyllava`
package from the exported tree and runs it unmodified. It reads tests/fixtures/reference_templates/cases.json
and the tokenizers beside it, and writes expected.json there. Nothing of the authors' code is copied here:
this script only calls it.

For each pair (template, tokenizer kind) the authors would use and each case it records
- `prompt`: `Template.prompt(*Template.get_list_from_message(conversations))`;
- `input_ids`, `labels`: `Template.encode(conversations, tokenizer, mode='train')` (the image id -200 kept,
  as a vanilla LLaVA model sees them), and `mismatch_warning` when the reference printed its
  "tokenization mismatch" warning (it then masks the whole sample);
- `himix`: the same after the collator (`DataCollatorForSupervisedDataset`) and HiMix's
  `TinyLlavaForConditionalGeneration.prepare_inputs_labels_for_img_text`, which drops the image ids from ids and
  labels (run on a stand-in `self` whose embedding table maps each id to itself);
- `truncated`: a list of the same with the tokenizer's `model_max_length` (and the model's
  `tokenizer_model_max_length`) set to --truncate (24) and to the sample's length less --truncate-last (3), so the
  collator's `[:model_max_length]` cut applies with the image id still inside (the reference also skips its
  mismatch check when the counted length reaches model_max_length);
- `eval` (chat templates only): the generation prompt as tinyllava/eval/model_vqa*.py and serve/cli.py build it
  (`Message.add_message(question)` leaves the last answer None, `mode='eval'`): its text, ids, and ids after the
  HiMix image removal.
Tokenizers are loaded as `TinyLlavaForConditionalGeneration.__init__` loads them: `AutoTokenizer.from_pretrained(
path, model_max_length=..., padding_side='right', use_fast=False)` and the post-load hook that the authors'
`LLMFactory` picks from the model's name (pad = unk for TinyLlama / Vicuna, pad = <|reserved_special_token_0|>
for Llama-3, unk = pad for Qwen2).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "reference_templates")
REFERENCE_COMMIT = "417fac3908b4767f4d87bee8c363a46d8c8184f9"

# kind -> (folder, the model name the authors' LLMFactory matches for its tokenizer post-load hook)
KINDS = {
    "spm_legacy": "TinyLlama-1.1B-Chat-v1.0",
    "spm_nonlegacy": "TinyLlama-1.1B-Chat-v1.0",
    "bpe_bos": "Llama-3.2-1B",
    "bpe_nobos": "Qwen2-0.5B",
}
# the (template, tokenizer kind) pairs the authors' scripts use: pretraining with every LLM, `tinyllama` for
# TinyLlama and Vicuna (sentencepiece), `llama-3` for Llama-3.2, `qwen2_base` for Qwen2
PAIRS = [("pretrain", k) for k in KINDS] + [
    ("tinyllama", "spm_legacy"), ("tinyllama", "spm_nonlegacy"), ("llama-3", "bpe_bos"), ("qwen2_base", "bpe_nobos")]

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
CORPUS = [
    SYSTEM,
    "USER: What is in the image? ASSISTANT: A red circle.",
    "USER: Where is it? ASSISTANT: It is on the left side of the picture.",
    "USER: What colour is the shape? ASSISTANT: The shape is blue.",
    "USER: Which shape is it? ASSISTANT: It is a triangle.",
    "USER: Describe the picture briefly. ASSISTANT: A green square on a dark background.",
    "USER: How many objects are there? ASSISTANT: There are three objects in the image.",
    "USER: Is there a person in the photo? ASSISTANT: No, there is no person in the photo.",
    "USER: What is the man holding? ASSISTANT: The man is holding a cup of coffee.",
    "USER: What is the capital of France? ASSISTANT: Paris is the capital of France.",
    "USER: Can you help me? ASSISTANT: Yes, of course. What do you need?",
    "USER: Please describe the scene in detail. ASSISTANT: The scene shows a street with cars, trees and people "
    "walking on the sidewalk under a clear blue sky.",
    "A red circle on a white background. A blue triangle in the middle. A small green square in the corner.",
    "The cat is sitting on the table next to a window. The dog is sleeping on the floor.",
    "What is this? Where is that? Who is there? When did it happen? Why is it here? How does it work?",
    "the a an is are was were it on in of and to for with from at by this that these those there here",
    "one two three four five six seven eight nine ten first second third large small big little",
    "red green blue yellow black white grey orange purple brown colour color shape circle square",
    "answer question image picture photo scene object objects background foreground left right top bottom",
    "user assistant system human chat helpful detailed polite answers questions curious artificial intelligence",
    "The US team won. It costs ten US dollars. The US flag is red, white and blue.",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,:;!?'\"()[]{}<>/\\|-_+=*&^%$#@~`",
    "Yes. No. Okay. Hello! Thanks. Sure, here it is. I think so. Maybe not. Look at this.",
]


def corpus_lines():
    return [line for _ in range(30) for line in CORPUS]


# ---------------------------------------------------------------- tiny tokenizers
def _added(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def train_sentencepiece(out_root):
    """One LLaMA-like sentencepiece model (BPE, byte fallback, dummy prefix, <unk>=0 <s>=1 </s>=2, no pad) in
    spm_legacy/ and spm_nonlegacy/, each with a tokenizer_config.json as vicuna-7b-v1.5 / TinyLlama ship it."""
    import tempfile

    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join(corpus_lines()))
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "tokenizer"), vocab_size=1000, hard_vocab_limit=False,
            model_type="bpe", byte_fallback=True, add_dummy_prefix=True, split_digits=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        model = llama_like_user_piece(open(os.path.join(tmp, "tokenizer.model"), "rb").read())
    for kind, legacy in (("spm_legacy", True), ("spm_nonlegacy", False)):
        d = os.path.join(out_root, kind)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(model)
        config = {
            "add_bos_token": True, "add_eos_token": False,
            "added_tokens_decoder": {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")},
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
            "clean_up_tokenization_spaces": False, "legacy": legacy, "model_max_length": 2048,
            "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        }
        _write_json(os.path.join(d, "tokenizer_config.json"), config)
        _write_json(os.path.join(d, "special_tokens_map.json"),
                    {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def llama_like_user_piece(model: bytes) -> bytes:
    """Rename the learned piece `▁USER` to `USER`, keeping its id and score. LLaMA's vocabulary has `USER` as one
    piece and no `▁USER` (" USER" is `▁US ER`), and the reference's legacy=False label count relies on exactly
    that: a round after `</s>` is one piece shorter in context (`USER`) than tokenized alone (`▁US ER`). With
    `▁USER` learned as one piece, every multi-round sample of a legacy=False tokenizer hits the reference's
    "tokenization mismatch" and is masked whole, so the fixtures would test nothing there."""
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import import_protobuf

    pb2 = import_protobuf()
    proto = pb2.ModelProto.FromString(model)
    pieces = {p.piece: p for p in proto.pieces}
    if "USER" in pieces or "\u2581USER" not in pieces or "\u2581US" not in pieces or "ER" not in pieces:
        raise SystemExit("error: the trained sentencepiece model lacks the pieces ▁USER, ▁US and ER "
                         "(or already has USER): change CORPUS")
    pieces["\u2581USER"].piece = "USER"
    proto.trainer_spec.ClearField("input")  # temporary paths: the file is then the same on every run
    proto.trainer_spec.ClearField("model_prefix")
    model = proto.SerializeToString()
    sp = spm.SentencePieceProcessor(model_proto=model)
    proto.normalizer_spec.add_dummy_prefix = False
    no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    if sp.encode("USER", out_type=str) != ["\u2581US", "ER"] or no_prefix.encode("USER", out_type=str) != ["USER"]:
        raise SystemExit("error: after the rename, ' USER' is not ▁US ER or 'USER' is not one piece")
    return model


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_bpe(split_regex, normalizer):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    return tok


def train_byte_bpe(out_root):
    """bpe_bos/ shaped like Llama-3.2's tokenizer (a post-processor that prepends <|begin_of_text|>) and
    bpe_nobos/ shaped like Qwen2's (NFC, no BOS, <|endoftext|> as eos and pad, vocab.json + merges.txt for the
    slow Qwen2Tokenizer that use_fast=False loads)."""
    from tokenizers import AddedToken, normalizers, processors

    # bpe_bos: the special tokens after the learned vocabulary, as in Llama-3 (128000...)
    tok = _byte_bpe(LLAMA3_SPLIT, None)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    d = os.path.join(out_root, "bpe_bos")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    _write_json(os.path.join(d, "tokenizer_config.json"), {
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added(t) for t in LLAMA3_SPECIALS},
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _write_json(os.path.join(d, "special_tokens_map.json"),
                {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})

    # bpe_nobos
    tok = _byte_bpe(QWEN2_SPLIT, normalizers.NFC())
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN2_SPECIALS])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    d = os.path.join(out_root, "bpe_nobos")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    tok.model.save(d)  # vocab.json + merges.txt
    _write_json(os.path.join(d, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added(t) for t in QWEN2_SPECIALS},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer"})
    _write_json(os.path.join(d, "special_tokens_map.json"), {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"})


# ---------------------------------------------------------------- the authors' code
def import_reference(root):
    """Import the authors' `tinyllava` package from the exported tree `root`, unmodified. Two shims, both
    outside their files: tinyllava.utils.train_utils (imports deepspeed and peft's LoRA layers, used only by
    training) is replaced by an empty module; and their Formatter dataclasses are made hashable before the
    templates are defined, because Python >= 3.11 refuses an unhashable dataclass instance as a field default
    (the authors ran Python 3.10, where the same shared default instance is accepted)."""
    if not os.path.isfile(os.path.join(root, "tinyllava", "data", "template", "base.py")):
        raise SystemExit(f"error: --reference {root}: no tinyllava/data/template/base.py there "
                         "(export the authors' tree with git archive first)")
    sys.path.insert(0, root)
    sys.modules["tinyllava.utils.train_utils"] = types.ModuleType("tinyllava.utils.train_utils")
    importlib.import_module("tinyllava")  # the empty package; its submodules follow

    name = "tinyllava.data.template.formatter"
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, *name.split(".")) + ".py")
    formatter = importlib.util.module_from_spec(spec)
    sys.modules[name] = formatter
    spec.loader.exec_module(formatter)
    formatter.EmptyFormatter.__hash__ = object.__hash__
    formatter.StringFormatter.__hash__ = object.__hash__

    from tinyllava.data.dataset import DataCollatorForSupervisedDataset
    from tinyllava.data.template import TemplateFactory
    from tinyllava.model import LLMFactory
    from tinyllava.model.modeling_tinyllava import TinyLlavaForConditionalGeneration
    from tinyllava.utils.message import Message

    return types.SimpleNamespace(TemplateFactory=TemplateFactory, LLMFactory=LLMFactory, Message=Message,
                                 Collator=DataCollatorForSupervisedDataset,
                                 prepare=TinyLlavaForConditionalGeneration.prepare_inputs_labels_for_img_text)


def load_tokenizer(ref, kind, model_max_length):
    """As TinyLlavaForConditionalGeneration.__init__ loads its tokenizer (configuration_tinyllava's defaults:
    use_fast False, padding side right), post-load hook included."""
    tokenizer_cls, post_load = ref.LLMFactory(KINDS[kind])[1]
    return post_load(tokenizer_cls.from_pretrained(
        os.path.join(FIXTURES, "tokenizers", kind), model_max_length=model_max_length, padding_side="right",
        use_fast=False))


class TextOnlyModel:
    """A stand-in `self` for TinyLlavaForConditionalGeneration.prepare_inputs_labels_for_img_text: a one-column
    embedding table whose row i holds i, so the text embeddings it returns are the text ids it kept."""

    def __init__(self, vocab_size, model_max_length):
        import torch

        self.vision_tower = object()
        self.device = torch.device("cpu")
        self.config = types.SimpleNamespace(tune_mm_mlp_adapter=False, tokenizer_padding_side="right",
                                            tokenizer_model_max_length=model_max_length)
        table = torch.nn.Embedding(vocab_size, 1, dtype=torch.float64)
        table.weight.data = torch.arange(vocab_size, dtype=torch.float64).unsqueeze(1)
        self.language_model = types.SimpleNamespace(get_input_embeddings=lambda: table)

    def encode_images(self, images):
        import torch

        return torch.zeros(images.shape[0], 1, 1, dtype=torch.float64)


def himix_view(ref, model, input_ids, attention_mask=None, labels=None):
    """The text ids (and labels) a HiMix model trains on, from its own prepare_inputs_labels_for_img_text."""
    import torch

    out = ref.prepare(model, input_ids, None, attention_mask, None, labels, torch.zeros(input_ids.shape[0], 1))
    _, _, mask, _, _, embeds, new_labels, _, _ = out
    keep = mask[0].bool() if mask is not None else torch.ones(embeds.shape[1], dtype=torch.bool)
    ids = embeds[0, :, 0][keep].round().long().tolist()
    return ids, (new_labels[0][keep].tolist() if new_labels is not None else None)


@contextlib.contextmanager
def captured(buf):
    """Capture the reference's prints; skip the time.sleep(5) its make_labels does after a mismatch."""
    sleep = time.sleep
    time.sleep = lambda seconds: None
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        time.sleep = sleep


def encode_train(ref, template, tokenizer, model, conversations):
    import copy

    buf = io.StringIO()
    with captured(buf):
        enc = template.encode(copy.deepcopy(conversations), tokenizer, mode="train")
        batch = ref.Collator(tokenizer=tokenizer)([{"input_ids": enc["input_ids"].clone(),
                                                    "labels": enc["labels"].clone()}])
    ids, labels = himix_view(ref, model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return {
        "input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist(),
        "mismatch_warning": "WARNING: tokenization mismatch" in buf.getvalue(),
        "himix": {"input_ids": ids, "labels": labels},
    }, enc


def generate(ref, args, cases):
    import copy

    import torch

    results = []
    tokenizers = {}
    chunks = {}
    for template_name, kind in PAIRS:
        template = ref.TemplateFactory(template_name)()
        full = load_tokenizer(ref, kind, args.model_max_length)
        model = TextOnlyModel(len(full), args.model_max_length)
        tokenizers[kind] = {
            "path": f"tokenizers/{kind}", "llm_name": KINDS[kind], "class": type(full).__name__,
            "legacy": getattr(full, "legacy", None), "vocab_size": len(full),
            **{f"{t}_token": getattr(full, f"{t}_token") for t in ("bos", "eos", "pad", "unk")},
            **{f"{t}_token_id": getattr(full, f"{t}_token_id") for t in ("bos", "eos", "pad", "unk")},
        }
        out = {}
        for case in cases:
            conv = case["conversations"]
            buf = io.StringIO()
            with captured(buf):
                questions, answers = template.get_list_from_message(copy.deepcopy(conv))
                prompt = template.prompt(questions, answers)
            entry, enc = encode_train(ref, template, full, model, conv)
            if not torch.equal(enc["input_ids"], torch.tensor(entry["input_ids"])):
                raise AssertionError(f"{template_name}/{kind}/{case['name']}: the collator changed the ids")
            entry = {"prompt": prompt, "qa_count_mismatch": bool(buf.getvalue()), **entry,
                     "pieces": [full.convert_ids_to_tokens(i) if i >= 0 else None for i in entry["input_ids"]]}
            entry["truncated"] = []
            for length in sorted({args.truncate, max(2, len(entry["input_ids"]) - args.truncate_last)}):
                variant, _ = encode_train(ref, template, load_tokenizer(ref, kind, length),
                                          TextOnlyModel(len(full), length), conv)
                entry["truncated"].append({"model_max_length": length, **variant})
            if template_name != "pretrain":
                entry["eval"] = eval_prompt(ref, template, full, model, conv)
            out[case["name"]] = entry
        results.append({"template": template_name, "tokenizer": kind, "cases": out})
        texts = {c for e in out.values() for c in e["prompt"].split("<image>")}
        texts |= {c for e in out.values() if "eval" in e for c in e["eval"]["prompt"].split("<image>")}
        known = chunks.setdefault(kind, {})
        known.update({text: full(text).input_ids for text in texts if text not in known})
        print(f"{template_name:10s} x {kind:13s}: {len(out)} cases, mismatch warnings: "
              f"{[n for n, e in out.items() if e['mismatch_warning']]}", file=sys.stderr)
    for kind in chunks:
        tokenizers[kind]["chunks"] = [[text, chunks[kind][text]] for text in sorted(chunks[kind])]
    return results, tokenizers


def eval_prompt(ref, template, tokenizer, model, conversations):
    """The generation prompt as the authors' eval code builds it (tinyllava/eval/model_vqa*.py, serve/cli.py):
    a Message holding the turns before the last question, then `add_message(question)`, whose answer is None;
    `encode(..., mode='eval')`."""
    last = max(i for i, t in enumerate(conversations) if t["from"] == "human")
    msg = ref.Message([dict(t) for t in conversations[:last]])
    msg.add_message(conversations[last]["value"])
    buf = io.StringIO()
    with captured(buf):
        result = template.encode(msg.messages, tokenizer, mode="eval")
    ids = result["input_ids"]
    himix_ids, _ = himix_view(ref, model, ids.unsqueeze(0))
    return {"prompt": result["prompt"], "input_ids": ids.tolist(), "himix_input_ids": himix_ids}


# ---------------------------------------------------------------- output
def _write_json(path, obj):
    with open(path, "w") as f:
        f.write(_dumps(obj) + "\n")


def _dumps(obj):
    """Indented JSON with every list of scalars on one line (readable, and small enough to diff)."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def versions():
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    return {"python": sys.version.split()[0], "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "sentencepiece": sentencepiece.__version__,
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, metavar="DIR",
                   help=f"the authors' tree (Xuange923/HiMix at {REFERENCE_COMMIT[:7]}) exported with git archive")
    p.add_argument("--train-tokenizers", action="store_true",
                   help="rebuild tokenizers/ first (changes every id in the fixtures)")
    p.add_argument("--model-max-length", type=int, default=2048, help="the authors' default (2048)")
    p.add_argument("--truncate", type=int, default=24, help="model_max_length of the first truncation variant")
    p.add_argument("--truncate-last", type=int, default=3,
                   help="the second truncation variant cuts this many ids off each sample (image id included)")
    p.add_argument("--output", default=os.path.join(FIXTURES, "expected.json"))
    args = p.parse_args(argv)

    if args.train_tokenizers:
        train_sentencepiece(os.path.join(FIXTURES, "tokenizers"))
        train_byte_bpe(os.path.join(FIXTURES, "tokenizers"))
    ref = import_reference(os.path.abspath(args.reference))
    with open(os.path.join(FIXTURES, "cases.json")) as f:
        cases = json.load(f)["cases"]
    results, tokenizers = generate(ref, args, cases)
    _write_json(args.output, {
        "reference": {"repository": "Xuange923/HiMix", "commit": REFERENCE_COMMIT,
                      "how": "tools/make_reference_template_fixtures.py (see README.md beside this file)"},
        "versions": versions(),
        "image_token_index": -200, "ignore_index": -100,
        "model_max_length": args.model_max_length,
        "tokenizers": tokenizers,
        "results": results,
    })
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
