"""What every scorer shares: reading answers and annotations, pairing them, and the errors both can raise.

Every error names the file and the field or question id at fault, so that a bad run is fixed without reading
the scorer.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Hashable, Iterable, Iterator, Optional


class ScoringError(ValueError):
    """Answers or annotations that cannot be scored; the message names the file and the field or question."""


def jsonl_records(path: str, what: str, error: type = None) -> Iterator[tuple[str, dict]]:
    """("path:line", record) for every non-blank line of a JSONL file; `error` (default ScoringError) for a
    line that is not a JSON object, naming the file and line. `what`: one record, for the message."""
    error = error or ScoringError
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise error(f"{where}: {what} must be a JSON object")
            yield where, record


def read_answer_file(path: str) -> list[dict]:
    """The records of a LLaVA answer JSONL (`question_id`, `text`, ...), in file order."""
    if not os.path.isfile(path):
        raise ScoringError(f"answers file {path}: no such file")
    return [record for _, record in jsonl_records(path, "an answer")]


def load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise ScoringError(f"{what} file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ScoringError(f"{what} file {path}: not valid JSON ({e})") from None


def write_json(path: str, data, what: str, indent: Optional[int] = None) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
    except OSError as e:
        raise ScoringError(f"{what} file {path}: cannot write it ({e.strerror})") from None


def field(record, name: str, where: str, kinds=(str,)):
    """record[name], which must exist and be one of `kinds`."""
    if not isinstance(record, dict) or name not in record:
        raise ScoringError(f"{where}: no {name!r} field")
    value = record[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in kinds)
        raise ScoringError(f"{where}: {name!r} must be {names}, not {type(value).__name__}")
    return value


def qid_key(qid) -> str:
    """Question ids compare as text: one file's 262148000 and another's "262148000" are the same question."""
    return str(qid)


def pair_answers(answers: Iterable[dict], source: str, annotations: str, index: dict,
                 key: Optional[Callable[[dict], Optional[Hashable]]] = None,
                 how: str = "") -> list[tuple[Hashable, dict]]:
    """(annotation key, answer) for every answer, in answer order.

    `index` maps annotation keys to annotations; `key(record)` finds an answer's annotation key (default: its
    question id as text), None when it has none; `how` says how the benchmark matches them, for the error of an
    answer without an annotation. Raises on a malformed answer, an answer without an annotation and two answers
    to one question."""
    key = key or (lambda record: qid_key(record["question_id"]))
    pairs, seen = [], {}
    for n, record in enumerate(answers, 1):
        where = f"{source}: answer {n}"
        qid = field(record, "question_id", where, (int, str))
        where = f"{source}: answer {n} (question_id {qid!r})"
        field(record, "text", where)
        k = key(record)
        if k is None or k not in index:
            raise ScoringError(f"{where} has no annotation in {annotations}" + (f" ({how})" if how else ""))
        if k in seen:
            raise ScoringError(f"{source}: question_id {qid!r} is answered twice (answers {seen[k]} and {n})")
        seen[k] = n
        pairs.append((k, record))
    if not pairs:
        raise ScoringError(f"{source}: no answers to score")
    return pairs


def percent(part: float, whole: float) -> float:
    """100 * part / whole to two decimals, as vqaEval.py rounds; 0.0 for an empty whole."""
    return round(100.0 * part / whole, 2) if whole else 0.0


def coverage(answered: int, total: int) -> dict:
    """The result fields that say how much of the benchmark was answered (only that much is scored)."""
    return {"answered": answered, "total": total, "unanswered": total - answered}
