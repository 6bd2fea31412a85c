"""Templates, label masks, truncation, tokenizer wrappers and conversation checks."""

from __future__ import annotations

import pickle

import pytest

from himix_megatron.data import (
    IMAGE_TOKEN_INDEX,
    HFTokenizer,
    SampleError,
    TemplateConfig,
    encode_conversation,
    generation_prompt,
    load_tokenizer,
    parse_conversation,
    truncate,
)
from himix_megatron.data.templates import DEFAULT_SYSTEMS

TWO_ROUNDS = [
    {"from": "human", "value": "What is in the image?\n<image>"},  # placeholder moves to the front
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the left."},
]


def build(parts, tok):
    """Expected (ids, targets) from hand-written parts: (text, trained) | ('#', id, trained)."""
    ids, targets = [], []
    for p in parts:
        new = [p[1]] if p[0] == "#" else tok.encode(p[0])
        ids += new
        targets += [p[-1]] * len(new)
    return ids, targets


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


def test_vicuna_v1_himix(sp_tok, conversation):
    tok = sp_tok
    enc = encode_conversation(conversation, tok, TemplateConfig("vicuna_v1", image="remove"))
    sys_ = DEFAULT_SYSTEMS["vicuna_v1"]
    ids, targets = build([
        ("#", tok.bos_id, False),
        (f"{sys_} USER: What is in the image? ASSISTANT:", False),
        ("A red circle.", True), ("#", tok.eos_id, True),
        ("USER: Where is it? ASSISTANT:", False),
        ("On the left.", True), ("#", tok.eos_id, True),
    ], tok)
    assert enc.ids == ids and enc.targets == targets
    assert IMAGE_TOKEN_INDEX not in enc.ids
    assert tok.decode(enc.ids) == f"{sys_} USER: What is in the image? ASSISTANT: A red circle. USER: Where is it? ASSISTANT: On the left."
    assert trained_text(enc, tok) == ["A red circle.", "On the left."]  # eos decodes to nothing


def test_vicuna_v1_vanilla_marks_image_at_front(sp_tok, conversation):
    tok = sp_tok
    enc = encode_conversation(conversation, tok, TemplateConfig("vicuna_v1", image="mark", system="Be brief."))
    ids, targets = build([
        ("#", tok.bos_id, False), ("Be brief. USER:", False), ("#", IMAGE_TOKEN_INDEX, False),
        ("\nWhat is in the image? ASSISTANT:", False),
        ("A red circle.", True), ("#", tok.eos_id, True),
        ("USER: Where is it? ASSISTANT:", False), ("On the left.", True), ("#", tok.eos_id, True),
    ], tok)
    assert enc.ids == ids and enc.targets == targets
    assert enc.ids.count(IMAGE_TOKEN_INDEX) == 1


def test_word_level_tokens_by_hand(tmp_path):
    """Fully literal ids: a word-level vocabulary makes every token checkable by eye."""
    from himix_megatron.data.synthetic import write_word_tokenizer

    tok = load_tokenizer(write_word_tokenizer(str(tmp_path)))
    v = lambda w: tok.token_id(w)  # noqa: E731
    conv = parse_conversation([{"from": "human", "value": "<image>\nWhich shape is it?"},
                               {"from": "gpt", "value": "circle"}], has_image=True)
    enc = encode_conversation(conv, tok, TemplateConfig("vicuna_v1", image="remove", system=""))
    words = "<s> USER : Which shape is it ? ASSISTANT : circle </s>".split()
    assert enc.ids == [v(w) for w in words]
    assert enc.targets == [False] * 10 + [True, True]
    enc = encode_conversation(conv, tok, TemplateConfig("vicuna_v1", image="mark", system=""))
    assert enc.ids == [v("<s>"), v("USER"), v(":"), -200] + [v(w) for w in words[3:]]


def test_plain(sp_tok):
    tok = sp_tok
    conv = parse_conversation([{"from": "human", "value": "Describe the picture briefly.\n<image>"},
                               {"from": "gpt", "value": "A green square."}], has_image=True)
    enc = encode_conversation(conv, tok, TemplateConfig("plain", image="remove"))
    assert (enc.ids, enc.targets) == build([("#", tok.bos_id, False), ("A green square.\n", True)], tok)
    enc = encode_conversation(conv, tok, TemplateConfig("plain", image="mark"))
    assert (enc.ids, enc.targets) == build([("#", tok.bos_id, False), ("#", IMAGE_TOKEN_INDEX, False),
                                            ("A green square.\n", True)], tok)
    with pytest.raises(SampleError, match="one round"):
        encode_conversation(parse_conversation(TWO_ROUNDS, has_image=True), tok, TemplateConfig("plain"))


def test_llama3(bpe_path, conversation):
    tok = HFTokenizer(bpe_path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    S, E, T = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    sys_ = "Be brief."
    enc = encode_conversation(conversation, tok, TemplateConfig("llama3", image="remove", system=sys_))
    ids, targets = build([
        ("#", tok.bos_id, False), ("#", S, False), ("system", False), ("#", E, False), ("\n\nBe brief.", False),
        ("#", T, False), ("#", S, False), ("user", False), ("#", E, False), ("\n\nWhat is in the image?", False),
        ("#", T, False), ("#", S, False), ("assistant", False), ("#", E, False), ("\n\n", False),
        ("A red circle.", True), ("#", T, True),
        ("#", S, False), ("user", False), ("#", E, False), ("\n\nWhere is it?", False), ("#", T, False),
        ("#", S, False), ("assistant", False), ("#", E, False), ("\n\n", False),
        ("On the left.", True), ("#", T, True),
    ], tok)
    assert enc.ids == ids and enc.targets == targets
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is in the image?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA red circle.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhere is it?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nOn the left.<|eot_id|>")
    assert tok.decode(enc.ids) == text
    assert tok.encode(text) == enc.ids  # cutting into segments changed no token
    assert trained_text(enc, tok) == ["A red circle.<|eot_id|>", "On the left.<|eot_id|>"]
    default = encode_conversation(conversation, tok, TemplateConfig("llama3"))
    assert DEFAULT_SYSTEMS["llama3"] in tok.decode(default.ids)


def test_qwen2_vanilla(bpe_path, conversation):
    tok = HFTokenizer(bpe_path, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert tok.bos_id is None and tok.pad_id == tok.token_id("<|endoftext|>")
    enc = encode_conversation(conversation, tok, TemplateConfig("qwen2", image="mark"))
    i = enc.ids.index(IMAGE_TOKEN_INDEX)
    before, after = tok.decode(enc.ids[:i]), tok.decode(enc.ids[i + 1:])
    assert before == f"<|im_start|>system\n{DEFAULT_SYSTEMS['qwen2']}<|im_end|>\n<|im_start|>user\n"
    assert after == ("\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
                     "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\nOn the left.<|im_end|>\n")
    assert trained_text(enc, tok) == ["A red circle.<|im_end|>", "On the left.<|im_end|>"]
    himix = encode_conversation(conversation, tok, TemplateConfig("qwen2", image="remove"))
    assert tok.encode(tok.decode(himix.ids)) == himix.ids


@pytest.mark.parametrize("name", ["vicuna_v1", "llama3", "qwen2"])
def test_generation_prompt_is_training_prefix(name, sp_tok, bpe_path, conversation):
    tok = sp_tok if name == "vicuna_v1" else HFTokenizer(bpe_path, eos_token="<|eot_id|>")
    cfg = TemplateConfig(name)
    full = encode_conversation(conversation, tok, cfg)
    prompt = generation_prompt(["What is in the image?", "Where is it?"], ["A red circle."], tok, cfg, has_image=True)
    second_answer_start = [i for i in range(1, len(full.ids)) if full.targets[i] and not full.targets[i - 1]][1]
    assert prompt == full.ids[:second_answer_start]


def test_truncation(sp_tok, conversation):
    enc = encode_conversation(conversation, sp_tok, TemplateConfig("vicuna_v1"))
    first_target = enc.targets.index(True)
    kept = truncate(enc, first_target + 3)
    assert kept is not None and len(kept) == first_target + 3 and sum(kept.targets) == 3
    assert truncate(enc, first_target) is None  # nothing left to learn: the caller drops the sample
    assert truncate(enc, 10**6).ids == enc.ids


@pytest.mark.parametrize("turns, has_image, reason", [
    ("not a list", False, "malformed conversation"),
    ([], False, "malformed conversation"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}], False, "malformed conversation"),
    ([{"from": "human", "value": "q"}], False, "malformed conversation"),
    ([{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}], False, "malformed conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}], False, "malformed conversation"),
    ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}], False, "empty turn"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}], False, "malformed conversation"),
    ([{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}], True, "malformed conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>a"}], True, "malformed conversation"),
])
def test_conversation_rejects(turns, has_image, reason):
    with pytest.raises(SampleError) as e:
        parse_conversation(turns, has_image=has_image)
    assert e.value.reason == reason


def test_conversation_system_turn_and_missing_placeholder():
    conv = parse_conversation([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}], has_image=True)
    assert conv.system == "Be brief." and conv.rounds == (("q", "a"),) and conv.has_image


def test_tokenizers_pickle_by_path(sp_tok, bpe_path):
    hf = HFTokenizer(bpe_path, eos_token="<|im_end|>")
    for tok in (sp_tok, hf):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode("A red circle.") == tok.encode("A red circle.")
        assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id,
                                                                                 tok.vocab_size)
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 0)  # LLaMA layout; pad falls back to unk


def test_tokenizer_errors(tmp_path, bpe_path):
    from himix_megatron.data import DataError

    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(DataError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="not in the vocabulary"):
        HFTokenizer(bpe_path, eos_token="<nope>")
    tok = HFTokenizer(bpe_path)
    conv = parse_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], has_image=False)
    with pytest.raises(DataError, match="needs a BOS token"):
        encode_conversation(conv, tok, TemplateConfig("vicuna_v1"))
