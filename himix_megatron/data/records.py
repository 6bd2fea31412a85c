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
    """User/assistant rounds with the image placeholder taken out of the text.

    `has_image` says whether an image belongs in front of the first question; templates decide
    whether to mark that spot (vanilla LLaVA) or leave it out (HiMix).
    """

    rounds: tuple[tuple[str, str], ...]
    system: Optional[str] = None
    has_image: bool = False


def parse_conversation(turns: Any, *, has_image: bool) -> Conversation:
    """Validate LLaVA `conversations` and return them as rounds.

    Rules: an optional leading system turn, then user/assistant turns alternating, ending on an
    assistant turn; no empty turn; at most one `<image>` placeholder, in a user turn, and only if the
    sample has an image. The placeholder moves to the front of the first question (as LLaVA does);
    a sample with an image but no placeholder gets it there too.
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
        if not value.strip():
            raise SampleError("empty turn", f"turn {i} ({turn.get('from')}) is empty")
        roles.append(role)
        texts.append(value)

    system = None
    if roles[0] == "system":
        system = texts[0].strip()
        roles, texts = roles[1:], texts[1:]
    if not roles:
        raise SampleError("malformed conversation", "only a system turn")
    for i, role in enumerate(roles):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise SampleError("malformed conversation", f"turn {i} is from {role}, expected {want}")
    if roles[-1] != "assistant":
        raise SampleError("malformed conversation", "the last turn is from the user: nothing to learn")

    placeholders = [i for i, t in enumerate(texts) for _ in range(t.count(IMAGE_PLACEHOLDER))]
    if placeholders and not has_image:
        raise SampleError("malformed conversation", "<image> placeholder but the sample has no image")
    if len(placeholders) > 1:
        raise SampleError("malformed conversation", f"{len(placeholders)} <image> placeholders for one image")
    if placeholders and roles[placeholders[0]] != "user":
        raise SampleError("malformed conversation", "<image> placeholder in an assistant turn")
    if placeholders:
        i = placeholders[0]
        texts[i] = texts[i].replace(IMAGE_PLACEHOLDER, "").strip()
    rounds = tuple((texts[i], texts[i + 1]) for i in range(0, len(texts), 2))
    return Conversation(rounds=rounds, system=system, has_image=has_image)
