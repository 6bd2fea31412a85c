"""One LLaVA-format record checked and normalised into a `Conversation`.

The builder runs this before a sample enters a shard and the loader runs it again on what it reads back,
so a hand-edited or damaged shard cannot reach training with a malformed conversation.

Every rejection is a `SampleError` whose `reason` is a short category ("malformed conversation",
"empty turn", ...) used for counting, and whose message adds the detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

IMAGE_PLACEHOLDER = "<image>"

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Input that cannot be used; the message names the file or field at fault."""


class SampleError(DataError):
    """One sample that must be skipped. `reason` is the category counted in reports."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Conversation:
    """User/assistant rounds, the `<image>` placeholder taken out of the text.

    `image_rounds`: the rounds whose question held the placeholder (the question is then stripped, as the
    reference strips it); templates render `<image>\n{question}` there. `has_image`: the sample has an image,
    with or without a placeholder (HiMix attends it either way).
    """

    rounds: tuple[tuple[str, Optional[str]], ...]
    has_image: bool = False
    image_rounds: tuple[int, ...] = ()


def parse_conversation(turns: Any, *, has_image: bool) -> Conversation:
    """Validate LLaVA `conversations` and return them as rounds, keeping what the HiMix authors' code trains on.

    As the reference (`Template.get_list_from_message`): a first turn that is not from the user (a system
    turn, empty or not) is dropped; a last question without an answer is dropped. Then user and assistant
    turns must alternate, and no turn may be empty. `<image>` placeholders may stand in user turns only, and
    only if the sample has an image.
    """
    if not isinstance(turns, (list, tuple)) or not turns:
        raise SampleError("malformed conversation", "'conversations' must be a non-empty list")
    roles, texts = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError("malformed conversation", f"turn {i} is {type(turn).__name__}, not an object")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise SampleError("malformed conversation", f"turn {i} has unknown 'from' {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise SampleError("malformed conversation", f"turn {i} 'value' is {type(value).__name__}, not a string")
        roles.append(role)
        texts.append(value)
    if roles[0] != "user":
        roles, texts = roles[1:], texts[1:]
    if len(roles) % 2:
        roles, texts = roles[:-1], texts[:-1]
    if not roles:
        raise SampleError("malformed conversation", "no question with an answer")
    for i, (role, text) in enumerate(zip(roles, texts)):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise SampleError("malformed conversation", f"turn {i} is from {role}, expected {want}")
        if not text.strip():
            raise SampleError("empty turn", f"turn {i} ({role}) is empty")

    placed = [i for i, t in enumerate(texts) if IMAGE_PLACEHOLDER in t]
    if placed and not has_image:
        raise SampleError("malformed conversation", "<image> placeholder but the sample has no image")
    if any(roles[i] != "user" for i in placed):
        raise SampleError("malformed conversation", "<image> placeholder in an assistant turn")
    for i in placed:
        texts[i] = texts[i].replace(IMAGE_PLACEHOLDER, "").strip()
    rounds = tuple((texts[i], texts[i + 1]) for i in range(0, len(texts), 2))
    return Conversation(rounds=rounds, has_image=has_image, image_rounds=tuple(i // 2 for i in placed))
