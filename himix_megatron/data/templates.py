"""Conversation templates: a `Conversation` becomes token ids plus a per-token "trained" flag, token for token
as the HiMix authors trained (Xuange923/HiMix at 417fac3, whose `tinyllava/data/template/` is TinyLLaVA
Factory's).

As in the reference, a template renders the conversation into one prompt string; the string is cut at each
"<image>", every piece is tokenized as `tokenizer(piece).input_ids` (`Tokenizer.encode_chunk`), the BOS of all
pieces but the first is dropped, and the image id (-200) goes between pieces. Truncation to `max_tokens` then
counts the image id, as the reference's `model_max_length` does. Last, HiMix drops the image ids (the text
around them stays as it was tokenized: `USER: ▁ \\n What`, not `USER: ▁What`), as the reference model's
`prepare_inputs_labels_for_img_text` does; vanilla LLaVA keeps the first.

Templates, by the authors' names:
- `pretrain` (every model's pretraining): `<image>{caption}\\n` per round, no system prompt, the questions
  unused; loss on everything after the first image. A multi-round sample is the rounds concatenated.
- `tinyllama` (Vicuna-7B and TinyLlama), `llama-3` (Llama-3.2), `qwen2_base` (Qwen2): one Vicuna-style format,
  `{system} USER: {q} ASSISTANT: {a}{end}` per round, `{end}` = `</s>`, `<|end_of_text|>`, `<|endoftext|>`.
  The question that held the placeholder becomes `<image>\\n{q}`. Loss on each answer and its end token.
Two more, for instruct-tuned decoders the paper did not train (choose them only to continue such a model's
own chat format): `llama3_instruct` (Llama-3's header format) and `chatml` (Qwen2-instruct's).

The system prompt is the reference's ("... a curious user ... the user's questions.") unless the run states
another; "" leaves it out (with its separating space). A system turn in the data is ignored, as the
reference ignores it. The training run records the prompt in its checkpoints, and exports and `himix-eval`
use the recorded one.

Where this differs from the reference, on purpose:
- The reference finds the answers by splitting the rendered text at " ASSISTANT: " and the end token and
  counting ids; an answer that contains either string trains nothing (its "tokenization mismatch" path masks
  the whole sample). Here each answer's characters are known from rendering, and a token is trained when it
  starts in an answer (or on the space before it, which the answer's first token carries), so such a sample
  trains on its answers. Every other sample gets the reference's mask.
- Vanilla LLaVA on a multi-round `pretrain` sample keeps one image id, where the reference leaves one per
  round (and then fails for want of images); on a text-only `pretrain` sample it keeps none, where the
  reference's template writes one for a zero image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

from himix_megatron.data.records import IMAGE_PLACEHOLDER, Conversation, DataError, SampleError
from himix_megatron.data.tokenizer import Tokenizer

ImagePlacement = Literal["remove", "mark"]

# Same value as LLaVA and megatron-core's LLaVAModel use for the image slot in input ids.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

REFERENCE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class _Format:
    system: Optional[str]  # the default system prompt; None: the format has none
    end: Optional[str]  # the token closing an answer, a special token of the tokenizer
    paper: bool  # one of the authors' templates


FORMATS = {
    "pretrain": _Format(None, None, True),
    "tinyllama": _Format(REFERENCE_SYSTEM, "</s>", True),
    "llama-3": _Format(REFERENCE_SYSTEM, "<|end_of_text|>", True),
    "qwen2_base": _Format(REFERENCE_SYSTEM, "<|endoftext|>", True),
    "llama3_instruct": _Format(
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language.",
        "<|eot_id|>", False),
    "chatml": _Format("You are a helpful assistant.", "<|im_end|>", False),
}
TEMPLATES = tuple(FORMATS)
DEFAULT_SYSTEMS = {name: f.system for name, f in FORMATS.items()}
END_TOKENS = {name: f.end for name, f in FORMATS.items()}
# Names of earlier releases; checkpoints that record them must state the template to use now.
RETIRED = {"plain": "pretrain", "vicuna_v1": "tinyllama", "llama3": "llama3_instruct", "qwen2": "chatml"}


def check_template_name(name: str, where: str) -> None:
    if name in FORMATS:
        return
    if name in RETIRED:
        raise DataError(f"{where}: template {name!r} was retired (it did not reproduce the authors' token ids); "
                        f"use {RETIRED[name]!r}, stating the system prompt it was trained with if it was not "
                        "the default")
    raise DataError(f"{where}: unknown conversation template {name!r}; choose one of {list(TEMPLATES)}")


@dataclass(frozen=True)
class TemplateConfig:
    name: str = "tinyllama"
    image: ImagePlacement = "remove"
    # None: the template's default system prompt. "" leaves the system prompt out.
    system: Optional[str] = None
    image_token_index: int = IMAGE_TOKEN_INDEX

    def __post_init__(self):
        check_template_name(self.name, "TemplateConfig.name")
        if self.image not in ("remove", "mark"):
            raise DataError(f"TemplateConfig.image={self.image!r} must be 'remove' or 'mark'")
        if self.system is not None and FORMATS[self.name].system is None and self.system:
            raise DataError(f"template {self.name} takes no system prompt; got {self.system!r}")

    @property
    def system_prompt(self) -> str:
        """The system prompt this config renders ("" for none)."""
        return (self.system if self.system is not None else FORMATS[self.name].system) or ""

    @classmethod
    def for_arch(cls, name: str, arch: str, **kwargs) -> "TemplateConfig":
        """Vanilla LLaVA keeps an image slot in the text; HiMix-style archs inject vision by attention."""
        return cls(name=name, image="mark" if arch == "vanilla" else "remove", **kwargs)


@dataclass
class Encoded:
    """`ids[t]` is a token; `targets[t]` says the model is trained to produce it."""

    ids: list[int]
    targets: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def paper_template(tok: Tokenizer) -> str:
    """The authors' template for a decoder, told by its tokenizer's end-of-text token: `</s>` (Vicuna,
    TinyLlama) -> tinyllama, `<|end_of_text|>` (Llama-3.2) -> llama-3, `<|endoftext|>` (Qwen2) -> qwen2_base."""
    found = [name for name in ("tinyllama", "llama-3", "qwen2_base") if _special_id(tok, FORMATS[name].end) is not None]
    matching_eos = [name for name in found if _special_id(tok, FORMATS[name].end) == tok.eos_id]
    if matching_eos or found:
        return (matching_eos or found)[0]
    raise DataError(f"tokenizer {tok.path} has none of the end tokens of the paper's templates (</s>, "
                    "<|end_of_text|>, <|endoftext|>); choose a template with --template")


def resolve_prompt(tok: Tokenizer, template: Optional[str], system: Optional[str], *,
                   recorded_template: Optional[str] = None, recorded_system: Optional[str] = None,
                   where: str = "the checkpoint", warn: Optional[Callable[[str], None]] = None) -> TemplateConfig:
    """The template and system prompt of a run: the stated ones, else the recorded ones (the recorded prompt only
    with its own template), else the paper's template for this tokenizer and its default prompt. `warn` hears of
    a recorded template without a recorded prompt (a checkpoint of an earlier release)."""
    if template is None and recorded_template is not None:
        check_template_name(recorded_template, f"{where} (its recorded template; pass --template to choose)")
    name = template or recorded_template or paper_template(tok)
    if system is None and name == recorded_template:
        system = recorded_system
        if system is None and warn is not None:
            warn(f"warning: {where} records no system prompt (an earlier release): using the {name} template's "
                 "default; pass --system-prompt if the model was trained with another")
    cfg = TemplateConfig(name, system=system)
    check_tokenizer(tok, cfg)
    return cfg


def _special_id(tok: Tokenizer, text: str) -> Optional[int]:
    ids, _ = tok.encode_chunk(text)
    if tok.bos_id is not None and ids[:1] == [tok.bos_id]:
        ids = ids[1:]
    return ids[0] if len(ids) == 1 else None


def check_tokenizer(tok: Tokenizer, cfg: TemplateConfig) -> None:
    """Refuse a tokenizer the template cannot serve, naming the token it lacks."""
    end = FORMATS[cfg.name].end
    if end is not None and _special_id(tok, end) is None:
        raise DataError(f"template {cfg.name} ends each answer with the special token {end!r}, which tokenizer "
                        f"{tok.path} does not have; choose the template of this model family (--template "
                        f"{paper_template(tok)!r} is the paper's for it)")


def encode_conversation(
    conv: Conversation, tok: Tokenizer, cfg: TemplateConfig, *, add_generation_prompt: bool = False,
    max_tokens: Optional[int] = None,
) -> Encoded:
    """Render and tokenize; keep the first `max_tokens` (image ids counted). With `add_generation_prompt`, the
    last round's answer is left out and the sequence ends where the assistant starts to speak."""
    rounds = list(conv.rounds)
    if add_generation_prompt:
        if not rounds:
            raise DataError("a generation prompt needs at least one question")
        rounds[-1] = (rounds[-1][0], None)
    elif not rounds or any(a is None for _, a in rounds):
        raise SampleError("malformed conversation", "every round needs an answer for training")
    image_rounds = conv.image_rounds
    if not image_rounds and conv.has_image and cfg.image == "mark":
        image_rounds = (0,)  # vanilla needs a slot: in front of the first question, as LLaVA puts it
    prompt, answers = _render(cfg, rounds, image_rounds)
    ids, targets = _tokenize(prompt, answers, tok, cfg.image_token_index)
    if max_tokens is not None:
        ids, targets = ids[:max_tokens], targets[:max_tokens]
    keep = [i for i, t in enumerate(ids) if t != cfg.image_token_index]
    if cfg.image == "mark" and conv.has_image and len(keep) < len(ids):
        first = ids.index(cfg.image_token_index)
        keep = sorted(keep + [first])
    return Encoded([ids[i] for i in keep], [targets[i] for i in keep])


def has_target(enc: Encoded) -> bool:
    """The first token is only ever an input, so a trainable sample has a trained token at position >= 1."""
    return any(enc.targets[1:])


def _render(cfg: TemplateConfig, rounds: list, image_rounds: tuple) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string and the [start, end) character span of each answer (with its end token)."""
    fmt = FORMATS[cfg.name]
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    at = 0

    def put(text: str, answer: bool = False) -> None:
        nonlocal at
        if answer:  # the space before an answer is carried by its first token ("▁Yes", " Yes")
            spans.append((at - 1 if out and out[-1].endswith(" ") else at, at + len(text)))
        out.append(text)
        at += len(text)

    if cfg.name == "pretrain":
        for _, a in rounds:
            put(IMAGE_PLACEHOLDER)
            if a is None:
                break
            put(a + "\n", answer=True)
        return "".join(out), spans

    system = cfg.system_prompt
    chat = _CHAT[cfg.name]
    put(chat.system(system) if system else chat.first)
    for i, (q, a) in enumerate(rounds):
        if i in image_rounds:
            q = f"{IMAGE_PLACEHOLDER}\n{q}".strip()
        put(chat.user(q))
        if a is None:
            put(chat.generation)
            break
        put(chat.assistant)
        put(a + fmt.end, answer=True)
        put(chat.after_answer)
    return "".join(out), spans


@dataclass(frozen=True)
class _Chat:
    system: callable  # system prompt -> its text
    user: callable  # question -> the user turn, up to the assistant's header
    assistant: str  # the assistant's header before an answer
    generation: str  # ... and where a generation prompt ends
    first: str = ""  # what starts a conversation without a system prompt
    after_answer: str = ""


_VICUNA = _Chat(lambda s: s + " ", lambda q: f"USER: {q} ", "ASSISTANT: ", "ASSISTANT:")
_CHAT = {
    "tinyllama": _VICUNA,
    "llama-3": _VICUNA,
    "qwen2_base": _VICUNA,
    "llama3_instruct": _Chat(
        lambda s: f"<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>",
        lambda q: f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": _Chat(
        lambda s: f"<|im_start|>system\n{s}<|im_end|>\n",
        lambda q: f"<|im_start|>user\n{q}<|im_end|>\n",
        "<|im_start|>assistant\n", "<|im_start|>assistant\n", after_answer="\n"),
}


def _tokenize(prompt: str, answers: list[tuple[int, int]], tok: Tokenizer, image_id: int):
    ids: list[int] = []
    targets: list[bool] = []
    strip_bos = False
    at = 0
    for k, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        chunk_ids, starts = tok.encode_chunk(chunk)
        if k == 0:
            strip_bos = bool(chunk_ids) and tok.bos_id is not None and chunk_ids[0] == tok.bos_id
        else:
            ids.append(image_id)
            targets.append(False)
            if strip_bos:  # the reference drops the first id of every later piece: its BOS
                chunk_ids, starts = chunk_ids[1:], starts[1:]
        ids.extend(chunk_ids)
        targets.extend(s >= 0 and any(a <= at + s < b for a, b in answers) for s in starts)
        at += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, targets


def generation_prompt(
    questions: Sequence[str], answers: Sequence[str], tok: Tokenizer, cfg: TemplateConfig, *,
    has_image: bool,
) -> list[int]:
    """Token ids for asking `questions[-1]` after the earlier (question, answer) rounds; the image (if any)
    goes in front of the first question, as evaluation prompts put it."""
    if len(answers) != len(questions) - 1:
        raise DataError("generation_prompt needs exactly one answer per earlier question")
    rounds = tuple(zip(questions, list(answers) + [None]))
    conv = Conversation(rounds=rounds, has_image=has_image, image_rounds=(0,) if has_image else ())
    return encode_conversation(conv, tok, cfg, add_generation_prompt=True).ids
