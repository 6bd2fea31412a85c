"""Conversation templates: a `Conversation` becomes token ids plus a per-token "trained" flag.

A template renders a list of parts (text, special token, image slot), each flagged trained or not;
text parts are tokenized one by one and special tokens are placed by id. Cutting the text at the
train/no-train boundaries means the label mask is exact by construction, with no offset
arithmetic on a joined string. Cuts fall just before a space (vicuna, plain) or at newlines and
special tokens (llama3, qwen2), where both sentencepiece (dummy prefix) and byte-level BPE
(pre-tokenizer splits) produce the same tokens as for the joined string.

The same renderer builds inference prompts (`add_generation_prompt=True`), so training and generation
see identical token sequences.

Templates:
- `plain`: LLaVA pretraining. `<s>` [image] caption "\\n"; loss on the caption and the newline. The
  question text is ignored (it is a random "describe the image" instruction in LLaVA-558k).
- `vicuna_v1`: `<s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`.
- `llama3`: the Llama-3 instruct header format, loss on `{a}<|eot_id|>`.
- `qwen2`: ChatML, loss on `{a}<|im_end|>` (the newline after it is context, not target).

The image (if any) sits at the front of the first question. HiMix (and its ablation variants) drop
it from the sequence; vanilla LLaVA gets one `image_token_index` there, which the model expands into
the vision features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

from himix_megatron.data.records import Conversation, DataError, SampleError
from himix_megatron.data.tokenizer import Tokenizer

TEMPLATES = ("plain", "vicuna_v1", "llama3", "qwen2")
ImagePlacement = Literal["remove", "mark"]

# Same value as LLaVA and megatron-core's LLaVAModel use for the image slot in input ids.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

DEFAULT_SYSTEMS = {
    "plain": None,
    "vicuna_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    "llama3": (
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language."
    ),
    "qwen2": "You are a helpful assistant.",
}


@dataclass(frozen=True)
class TemplateConfig:
    name: str = "vicuna_v1"
    image: ImagePlacement = "remove"
    # None: the sample's own system turn if it has one, else the template default. "" drops it.
    system: Optional[str] = None
    image_token_index: int = IMAGE_TOKEN_INDEX

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise DataError(f"unknown conversation template {self.name!r}; choose one of {list(TEMPLATES)}")
        if self.image not in ("remove", "mark"):
            raise DataError(f"TemplateConfig.image={self.image!r} must be 'remove' or 'mark'")

    @classmethod
    def for_arch(cls, name: str, arch: str, **kwargs) -> "TemplateConfig":
        """Vanilla LLaVA keeps an image slot in the text; HiMix-style archs inject vision by attention."""
        return cls(name=name, image="mark" if arch == "vanilla" else "remove", **kwargs)


@dataclass(frozen=True)
class _Text:
    text: str
    train: bool = False


@dataclass(frozen=True)
class _Special:
    token: Union[str, int]  # a token string looked up in the vocabulary, or an id
    train: bool = False


class _Image:
    pass


_Part = Union[_Text, _Special, _Image]


@dataclass
class Encoded:
    """`ids[t]` is a token; `targets[t]` says the model is trained to produce it."""

    ids: list[int]
    targets: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def encode_conversation(
    conv: Conversation, tok: Tokenizer, cfg: TemplateConfig, *, add_generation_prompt: bool = False
) -> Encoded:
    """Render and tokenize. With `add_generation_prompt`, the last round's answer is left out and the
    sequence ends where the assistant starts to speak."""
    parts = _render(conv, cfg, tok, add_generation_prompt)
    ids: list[int] = []
    targets: list[bool] = []
    pending: Optional[_Text] = None

    def flush():
        nonlocal pending
        if pending is not None:
            new = tok.encode(pending.text)
            ids.extend(new)
            targets.extend([pending.train] * len(new))
            pending = None

    for part in parts:
        if isinstance(part, _Text):
            # Neighbouring text with the same flag is tokenized as one string, as it would be joined.
            if pending is not None and pending.train == part.train:
                pending = _Text(pending.text + part.text, part.train)
            else:
                flush()
                pending = part
            continue
        flush()
        if isinstance(part, _Special):
            token = part.token if isinstance(part.token, int) else tok.token_id(part.token)
            ids.append(token)
            targets.append(part.train)
        else:
            ids.append(cfg.image_token_index)
            targets.append(False)
    flush()
    return Encoded(ids, targets)


def truncate(enc: Encoded, max_len: int) -> Optional[Encoded]:
    """Cut to `max_len` tokens; None if no trained token is left to predict (the sample is dropped).

    The first token is only ever an input, so a valid sample needs a trained token at position >= 1.
    """
    if len(enc) > max_len:
        enc = Encoded(enc.ids[:max_len], enc.targets[:max_len])
    if not any(enc.targets[1:]):
        return None
    return enc


def _render(conv: Conversation, cfg: TemplateConfig, tok: Tokenizer, gen: bool) -> list[_Part]:
    rounds = list(conv.rounds)
    if gen:
        if not rounds:
            raise DataError("a generation prompt needs at least one question")
    elif not rounds or any(a is None for _, a in rounds):
        raise SampleError("malformed conversation", "every round needs an answer for training")
    system = cfg.system if cfg.system is not None else conv.system
    if system is None:
        system = DEFAULT_SYSTEMS[cfg.name]
    mark = conv.has_image and cfg.image == "mark"
    return _RENDERERS[cfg.name](rounds, system or "", mark, tok, gen)


def _need(tok: Tokenizer, which: str, template: str) -> int:
    value = getattr(tok, f"{which}_id")
    if value is None:
        raise DataError(f"template {template} needs a {which.upper()} token; {tok.path} defines none")
    return value


def _plain(rounds, system, mark, tok, gen) -> list[_Part]:
    if len(rounds) != 1:
        raise SampleError("malformed conversation", f"plain template takes one round, got {len(rounds)}")
    parts: list[_Part] = [_Special(_need(tok, "bos", "plain"))]
    if mark:
        parts.append(_Image())
    if not gen:
        parts.append(_Text(rounds[0][1] + "\n", train=True))
    return parts


def _vicuna_v1(rounds, system, mark, tok, gen) -> list[_Part]:
    parts: list[_Part] = [_Special(_need(tok, "bos", "vicuna_v1"))]
    eos = _need(tok, "eos", "vicuna_v1")
    for i, (q, a) in enumerate(rounds):
        head = (f"{system} USER:" if system else "USER:") if i == 0 else "USER:"
        if i == 0 and mark:
            parts += [_Text(head), _Image(), _Text(("\n" + q if q else "") + " ASSISTANT:")]
        else:
            parts.append(_Text(head + (" " + q if q else "") + " ASSISTANT:"))
        if a is None:
            break
        parts += [_Text(" " + a, train=True), _Special(eos, train=True)]
    return parts


def _llama3(rounds, system, mark, tok, gen) -> list[_Part]:
    start, end, eot = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    bos = tok.bos_id if tok.bos_id is not None else "<|begin_of_text|>"
    parts: list[_Part] = [_Special(bos)]
    if system:
        parts += [_Special(start), _Text("system"), _Special(end), _Text("\n\n" + system), _Special(eot)]
    for i, (q, a) in enumerate(rounds):
        parts += [_Special(start), _Text("user"), _Special(end)]
        if i == 0 and mark:
            parts += [_Text("\n\n"), _Image(), _Text("\n" + q)]
        else:
            parts.append(_Text("\n\n" + q))
        parts += [_Special(eot), _Special(start), _Text("assistant"), _Special(end), _Text("\n\n")]
        if a is None:
            break
        parts += [_Text(a, train=True), _Special(eot, train=True)]
    return parts


def _qwen2(rounds, system, mark, tok, gen) -> list[_Part]:
    start, end = "<|im_start|>", "<|im_end|>"
    parts: list[_Part] = []
    if system:
        parts += [_Special(start), _Text("system\n" + system), _Special(end), _Text("\n")]
    for i, (q, a) in enumerate(rounds):
        parts.append(_Special(start))
        if i == 0 and mark:
            parts += [_Text("user\n"), _Image(), _Text("\n" + q)]
        else:
            parts.append(_Text("user\n" + q))
        parts += [_Special(end), _Text("\n"), _Special(start), _Text("assistant\n")]
        if a is None:
            break
        parts += [_Text(a, train=True), _Special(end, train=True), _Text("\n")]
    return parts


_RENDERERS = {"plain": _plain, "vicuna_v1": _vicuna_v1, "llama3": _llama3, "qwen2": _qwen2}


def generation_prompt(
    questions: Sequence[str], answers: Sequence[str], tok: Tokenizer, cfg: TemplateConfig, *,
    has_image: bool, system: Optional[str] = None,
) -> list[int]:
    """Token ids for asking `questions[-1]` after the earlier (question, answer) rounds."""
    if len(answers) != len(questions) - 1:
        raise DataError("generation_prompt needs exactly one answer per earlier question")
    rounds = tuple(zip(questions, list(answers) + [None]))
    conv = Conversation(rounds=rounds, system=system, has_image=has_image)
    return encode_conversation(conv, tok, cfg, add_generation_prompt=True).ids
