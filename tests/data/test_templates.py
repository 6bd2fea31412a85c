"""Templates, label masks, truncation, tokenizer wrappers and conversation checks. The authors' templates are
held against their own code in test_reference_templates.py; these tests pin the rest by hand."""

from __future__ import annotations

import json
import pickle

import pytest

from himix_megatron.data import (
    IMAGE_TOKEN_INDEX,
    DataError,
    HFTokenizer,
    SampleError,
    TemplateConfig,
    check_tokenizer,
    encode_conversation,
    generation_prompt,
    has_target,
    load_tokenizer,
    parse_conversation,
)
from himix_megatron.data.templates import DEFAULT_SYSTEMS, REFERENCE_SYSTEM, paper_template, resolve_prompt

TWO_ROUNDS = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the left."},
]


def trained_text(enc, tok):
    """The trained tokens, decoded run by run."""
    runs, cur = [], []
    for i, t in zip(enc.ids, enc.targets):
        if t:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.fixture(scope="module")
def conversation():
    return parse_conversation(TWO_ROUNDS, has_image=True)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    from himix_megatron.data.synthetic import write_word_tokenizer

    return load_tokenizer(write_word_tokenizer(str(tmp_path_factory.mktemp("words"))))


def test_tinyllama_word_level_tokens_by_hand(word_tok):
    """Fully literal ids: a word-level vocabulary makes every token checkable by eye."""
    tok = word_tok
    v = lambda w: tok.token_id(w)  # noqa: E731
    conv = parse_conversation([{"from": "human", "value": "<image>\nWhich shape is it?"},
                               {"from": "gpt", "value": "circle"}], has_image=True)
    enc = encode_conversation(conv, tok, TemplateConfig("tinyllama", image="remove", system=""))
    words = "<s> USER : Which shape is it ? ASSISTANT : circle </s>".split()
    assert enc.ids == [v(w) for w in words]
    assert enc.targets == [False] * 10 + [True, True]
    enc = encode_conversation(conv, tok, TemplateConfig("tinyllama", image="mark", system=""))
    assert enc.ids == [v("<s>"), v("USER"), v(":"), IMAGE_TOKEN_INDEX] + [v(w) for w in words[3:]]


def test_tinyllama_keeps_the_text_around_the_image_as_tokenized(sp_tok, conversation):
    """The image is cut out after tokenizing: "USER: ▁" + "▁\\nWhat", not "USER: ▁What" (the reference's ids)."""
    himix = encode_conversation(conversation, sp_tok, TemplateConfig("tinyllama"))
    vanilla = encode_conversation(conversation, sp_tok, TemplateConfig("tinyllama", image="mark"))
    at = vanilla.ids.index(IMAGE_TOKEN_INDEX)
    assert himix.ids == vanilla.ids[:at] + vanilla.ids[at + 1:]
    space, newline = sp_tok.token_id("\u2581"), sp_tok.token_id("<0x0A>")
    assert sp_tok.decode(vanilla.ids[:at]).endswith("USER: ") and himix.ids[at - 1:at + 2] == [space, space, newline]
    assert sp_tok.decode(himix.ids).startswith(REFERENCE_SYSTEM + " USER:")
    # Each answer from the space its first token carries (sentencepiece decodes a leading space away); </s> decodes
    # to nothing.
    assert trained_text(himix, sp_tok) == ["A red circle.", "On the left."]


def test_system_prompt_stated_empty_and_default(sp_tok, conversation):
    for system, head in ((None, REFERENCE_SYSTEM + " USER:"), ("Be brief.", "Be brief. USER:"), ("", "USER:")):
        enc = encode_conversation(conversation, sp_tok, TemplateConfig("tinyllama", system=system))
        assert sp_tok.decode(enc.ids).startswith(head), system
    with pytest.raises(DataError, match="takes no system prompt"):
        TemplateConfig("pretrain", system="Be brief.")


def test_pretrain_concatenates_rounds(sp_tok):
    conv = parse_conversation([{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A cat."},
                               {"from": "human", "value": "More?"}, {"from": "gpt", "value": "It sleeps."}],
                              has_image=True)
    himix = encode_conversation(conv, sp_tok, TemplateConfig("pretrain"))
    assert himix.ids[0] == sp_tok.bos_id and IMAGE_TOKEN_INDEX not in himix.ids
    # The questions are not part of the prompt; each caption is tokenized on its own (a dummy-prefix space).
    assert trained_text(himix, sp_tok) == ["A cat.\n It sleeps.\n"]
    vanilla = encode_conversation(conv, sp_tok, TemplateConfig("pretrain", image="mark"))
    assert vanilla.ids[:2] == [sp_tok.bos_id, IMAGE_TOKEN_INDEX] and vanilla.ids.count(IMAGE_TOKEN_INDEX) == 1


def test_llama3_instruct(bpe_path, conversation):
    tok = HFTokenizer(bpe_path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    enc = encode_conversation(conversation, tok, TemplateConfig("llama3_instruct", image="mark", system="Be brief."))
    at = enc.ids.index(IMAGE_TOKEN_INDEX)
    assert tok.decode(enc.ids[:at]) == ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                                        "<|start_header_id|>user<|end_header_id|>\n\n")
    assert tok.decode(enc.ids[at + 1:]) == (
        "\nWhat is in the image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA red circle.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere is it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nOn the left.<|eot_id|>")
    assert trained_text(enc, tok) == ["A red circle.<|eot_id|>", "On the left.<|eot_id|>"]


def test_chatml_vanilla(bpe_path, conversation):
    tok = HFTokenizer(bpe_path, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert tok.bos_id is None and tok.pad_id == tok.token_id("<|endoftext|>")
    enc = encode_conversation(conversation, tok, TemplateConfig("chatml", image="mark"))
    at = enc.ids.index(IMAGE_TOKEN_INDEX)
    assert tok.decode(enc.ids[:at]) == f"<|im_start|>system\n{DEFAULT_SYSTEMS['chatml']}<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(enc.ids[at + 1:]) == (
        "\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\nOn the left.<|im_end|>\n")
    assert trained_text(enc, tok) == ["A red circle.<|im_end|>", "On the left.<|im_end|>"]


@pytest.mark.parametrize("name", ["tinyllama", "llama3_instruct", "chatml"])
def test_generation_prompt_is_training_prefix(name, sp_tok, bpe_path, conversation):
    """Up to the space the first answer token carries: the reference's eval prompt ends in "ASSISTANT:"."""
    tok = sp_tok if name == "tinyllama" else HFTokenizer(bpe_path, eos_token="<|eot_id|>")
    cfg = TemplateConfig(name)
    full = encode_conversation(conversation, tok, cfg)
    prompt = generation_prompt(["What is in the image?", "Where is it?"], ["A red circle."], tok, cfg, has_image=True)
    second_answer_start = [i for i in range(1, len(full.ids)) if full.targets[i] and not full.targets[i - 1]][1]
    assert prompt == full.ids[:second_answer_start]


def test_truncation_counts_the_image(word_tok):
    """--seq-length is the authors' model_max_length: the image placeholder is one of its tokens."""
    conv = parse_conversation([{"from": "human", "value": "<image>\nWhich shape is it?"},
                               {"from": "gpt", "value": "circle"}], has_image=True)
    cfg = TemplateConfig("tinyllama", system="")
    full = encode_conversation(conv, word_tok, cfg)
    cut = encode_conversation(conv, word_tok, cfg, max_tokens=12)  # 12 with the image: 11 text tokens
    assert cut.ids == full.ids[:11] and has_target(cut)
    assert not has_target(encode_conversation(conv, word_tok, cfg, max_tokens=10))  # nothing left to learn
    assert encode_conversation(conv, word_tok, cfg, max_tokens=10**6).ids == full.ids


@pytest.mark.parametrize("turns, has_image, reason", [
    ("not a list", False, "malformed conversation"),
    ([], False, "malformed conversation"),
    ([{"from": "human", "value": "q"}], False, "malformed conversation"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "a"}], False, "malformed conversation"),
    ([{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}], False, "malformed conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}], False, "malformed conversation"),
    ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}], False, "empty turn"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}], False, "malformed conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>a"}], True, "malformed conversation"),
])
def test_conversation_rejects(turns, has_image, reason):
    with pytest.raises(SampleError) as e:
        parse_conversation(turns, has_image=has_image)
    assert e.value.reason == reason


@pytest.mark.parametrize("first", [{"from": "system", "value": "Be brief."}, {"from": "system", "value": ""},
                                   {"from": "gpt", "value": "Hello."}])
def test_conversation_drops_a_first_turn_not_from_the_user(first):
    """As the reference: the data's system turn (empty or not) is ignored; so is a first answer; and so is a last
    question without an answer."""
    conv = parse_conversation([first, {"from": "human", "value": "q <image>"}, {"from": "gpt", "value": "a"},
                               {"from": "human", "value": "unanswered"}], has_image=True)
    assert conv.rounds == (("q", "a"),) and conv.image_rounds == (0,) and conv.has_image


def test_placeholders_in_later_turns():
    conv = parse_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                               {"from": "human", "value": "<image>\n r "}, {"from": "gpt", "value": "b"}],
                              has_image=True)
    assert conv.rounds == (("q", "a"), ("r", "b")) and conv.image_rounds == (1,)


def test_tokenizers_pickle_by_path(sp_tok, bpe_path):
    hf = HFTokenizer(bpe_path, eos_token="<|im_end|>")
    for tok in (sp_tok, hf):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode_chunk("A red circle.</s>") == tok.encode_chunk("A red circle.</s>")
        assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                                 tok.vocab_size)
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 0)  # LLaMA layout; pad falls back to unk


def test_sentencepiece_legacy_flag(sp_path, tmp_path):
    """legacy=False (vicuna-7b-v1.5): no dummy-prefix space after a special token; legacy=True (the default)
    gives one."""
    import shutil

    shutil.copy(sp_path, tmp_path / "tokenizer.model")
    after_eos = {}
    for legacy in (True, False):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy}))
        tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
        ids, starts = tok.encode_chunk("a</s>USER")
        assert ids[0] == tok.bos_id and starts[0] == -1 and tok.eos_id in ids
        after_eos[legacy] = tok.decode(tok.encode_chunk("a")[0][1:] + ids[ids.index(tok.eos_id) + 1:])
    assert after_eos == {True: "a USER", False: "aUSER"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": "no"}))
    with pytest.raises(DataError, match="legacy='no' must be true or false"):
        load_tokenizer(str(tmp_path / "tokenizer.model"))


def test_template_names_and_tokenizer_fit(sp_tok, bpe_path):
    with pytest.raises(DataError, match="unknown conversation template 'nope'"):
        TemplateConfig("nope")
    with pytest.raises(DataError, match="'vicuna_v1' was retired.*'tinyllama'"):
        TemplateConfig("vicuna_v1")
    qwen = HFTokenizer(bpe_path, eos_token="<|endoftext|>")
    with pytest.raises(DataError, match=r"special token '</s>'.*--template 'qwen2_base'"):
        check_tokenizer(qwen, TemplateConfig("tinyllama"))
    assert paper_template(sp_tok) == "tinyllama" and paper_template(qwen) == "qwen2_base"
    check_tokenizer(qwen, TemplateConfig("pretrain"))  # no BOS, no end token needed: Qwen2 pretrains


def test_resolve_prompt_order(sp_tok):
    """Stated, else recorded (the prompt only with its own template), else the paper's template and prompt."""
    assert resolve_prompt(sp_tok, None, None).system_prompt == REFERENCE_SYSTEM
    recorded = dict(recorded_template="tinyllama", recorded_system="")
    assert resolve_prompt(sp_tok, None, None, **recorded).system_prompt == ""
    assert resolve_prompt(sp_tok, "tinyllama", "Hi.", **recorded).system_prompt == "Hi."
    assert resolve_prompt(sp_tok, "pretrain", None, **recorded).system_prompt == ""
    heard = []  # an earlier release's checkpoint: a template but no prompt recorded
    assert resolve_prompt(sp_tok, None, None, recorded_template="tinyllama", warn=heard.append,
                          where="ckpt/iter_1").system_prompt == REFERENCE_SYSTEM
    assert len(heard) == 1 and "ckpt/iter_1 records no system prompt" in heard[0]
    resolve_prompt(sp_tok, None, None, warn=heard.append, **recorded)
    assert len(heard) == 1
    with pytest.raises(DataError, match="recorded template.*retired"):
        resolve_prompt(sp_tok, None, None, recorded_template="vicuna_v1")


def test_tokenizer_errors(tmp_path, bpe_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="not in the vocabulary"):
        HFTokenizer(bpe_path, eos_token="<nope>")


def test_special_tokens_named_by_the_config_are_split_out(tmp_path):
    """As transformers does: a tokenizer.json that does not list `</s>` as an added token still reads `a</s>b` as
    three tokens when tokenizer_config.json names `</s>` the EOS."""
    from tokenizer_utils import save_word_level_tokenizer

    save_word_level_tokenizer(tmp_path, 10)
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode_chunk("w3</s>w4")[0] == [tok.token_id("w3"), tok.eos_id, tok.token_id("w4")]
    check_tokenizer(tok, TemplateConfig("tinyllama"))
