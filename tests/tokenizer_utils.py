"""Real tokenizers trained here on a small chat corpus: a LLaMA-like sentencepiece model and a byte-level BPE
with Llama-3's and Qwen2's chat special tokens. Nothing is downloaded."""

from __future__ import annotations

from himix_megatron.data.templates import DEFAULT_SYSTEMS

CORPUS = [
    # Three system prompts of earlier releases: kept so the tokenizers (and every length the tests expect) stay.
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    DEFAULT_SYSTEMS["llama3_instruct"],
    DEFAULT_SYSTEMS["chatml"],
    "USER: What is in the image? ASSISTANT: A red circle.",
    "USER: Where is it? ASSISTANT: On the left.",
    "What colour is the shape? Which shape is it? Describe the picture briefly.",
    "A green square on a dark background. A blue triangle in the middle.",
    "system user assistant the a is it on in of and to",
] * 20

CHAT_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def train_sentencepiece(directory) -> str:
    """A sentencepiece model configured like LLaMA's: byte fallback, no whitespace folding, unk=0 bos=1 eos=2
    and no pad piece. Returns the path of `directory`/tokenizer.model."""
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=300, hard_vocab_limit=False,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return str(directory / "tokenizer.model")


def train_byte_bpe():
    """A byte-level BPE `tokenizers.Tokenizer` (the Llama-3 / Qwen2 family) with their chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def save_word_level_tokenizer(directory, size: int) -> None:
    """A word-level tokenizer.json of exactly `size` entries ("w3".."w{size-1}" after <unk> <s> </s>), with
    Llama-style special tokens in its tokenizer_config.json: a stand-in for an HF checkpoint's tokenizer."""
    import json
    import os

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>"}, f)
