"""MMMU (validation split): the official response parsing and matching, accuracy per discipline and overall.

Follows MMMU's official `eval/eval_utils.py` (parse_multi_choice_response, parse_open_response,
eval_multi_choice, eval_open) and `main_eval_only.py` (instance-level accuracy per discipline and overall);
tests/eval/test_scoring.py checks hand-worked cases.

Annotation: one JSON object keyed by MMMU id, MMMU's `answer_dict_val.json` with each question's options added:

    {"validation_Art_Theory_3": {"question_type": "multiple-choice", "ground_truth": "B",
                                 "options": ["Baroque", "Rococo", "Gothic", "Romanesque"]},
     "validation_Math_12": {"question_type": "open", "ground_truth": "1.06"}, ...}

`ground_truth` is an option letter (or a list of them) for a multiple-choice question, a string (or a list of
accepted strings) otherwise; every type but "multiple-choice" counts as open, as in the official code. `options`
(a list, or the dataset's string form of one) may instead come with the answer record; parsing a free reply
needs them. The subject, and from it the discipline, is read from the id `validation_<Subject>_<n>`.

A reply the parser cannot place is, officially, a random option; here that draw comes from one generator seeded
with 42 per call, in answer order, as a fresh run of the official script draws it.
"""

from __future__ import annotations

import ast
import random
import re

from himix_megatron.eval.scoring_io import ScoringError, coverage, pair_answers, percent

DISCIPLINES = {
    "Art & Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health & Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                          "Pharmacy", "Public_Health"),
    "Humanities & Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech & Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                           "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
DISCIPLINE_OF = {subject: d for d, subjects in DISCIPLINES.items() for subject in subjects}

# ----- multiple choice ----------------------------------------------------------------------------------------


def parse_multi_choice(response: str, options: list[str], rng: random.Random) -> str:
    """The option letter a reply picks: "(B)" first, then a bare " B ", then (in a reply of more than five
    words) an option's text; the last mentioned wins when several are; a random letter when none is."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "  # so that " A " also matches at either end
    bracketed = [c for c in letters if f"({c})" in response]
    candidates, by_text = bracketed, False
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in zip(letters, options) if text.lower() in response.lower()]
        by_text = True
    if not candidates:
        return rng.choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        where = [response.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    else:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    return candidates[where.index(max(where))]  # the first of equals, as numpy's argmax


# ----- open answers -------------------------------------------------------------------------------------------

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize(text: str) -> list:
    """A number as one float to two decimals; text lowercased, a single character padded with a space on
    either side (two candidates) so that it cannot match inside a word."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    return _WITH_COMMAS.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The official split is r"\.\s(?=[A-Z])|\n" applied after lowercasing, so only newlines ever split.
    parts = response.split("\n")
    keys = []
    for n, part in enumerate(parts):
        indicators = _INDICATORS + (("=",) if n == len(parts) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # `not`: an empty tail is replaced by the next
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    """The candidate answers in a free reply: the tails after "is", "so", "answer", "=", ... and every number
    in them, normalised (see `normalize`), without duplicates."""
    keys = _key_responses(response)
    candidates = keys + [number for key in keys for number in extract_numbers(key)]
    return list({value: None for c in candidates for value in normalize(c)})


def eval_open(gold, candidates: list) -> bool:
    answers = [value for g in (gold if isinstance(gold, list) else [gold]) for value in normalize(str(g))]
    for c in candidates:
        if isinstance(c, str):
            if any(isinstance(a, str) and a in c for a in answers):
                return True
        elif c in answers:
            return True
    return False


# ----- scoring ------------------------------------------------------------------------------------------------


def _options(entry: dict, record: dict, where: str) -> list[str]:
    options = entry.get("options", record.get("options"))
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            options = None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ScoringError(f"{where}: a multiple-choice question needs 'options' (a list of strings) in its "
                           "annotation or its answer record")
    return options


def score_mmmu(answers: list[dict], annotations: str, table: dict, source: str = "answers") -> dict:
    """`table` is the loaded annotation JSON (`annotations` its path, for messages)."""
    if not isinstance(table, dict) or not table:
        raise ScoringError(f"MMMU annotations {annotations}: want a JSON object {{id: {{question_type, "
                           "ground_truth, options}}}}")
    for qid, entry in table.items():
        where = f"{annotations}: {qid}"
        if not isinstance(entry, dict) or "question_type" not in entry or "ground_truth" not in entry:
            raise ScoringError(f"{where}: want 'question_type' and 'ground_truth'")
        if "_".join(qid.split("_")[1:-1]) not in DISCIPLINE_OF:
            raise ScoringError(f"{where}: not an MMMU id 'validation_<Subject>_<n>' with a known subject")
    rng = random.Random(42)
    right = {d: [] for d in DISCIPLINES}
    subjects = {}
    for qid, record in pair_answers(answers, source, annotations, table):
        entry = table[qid]
        gold = entry["ground_truth"]
        if entry["question_type"] == "multiple-choice":
            choice = parse_multi_choice(record["text"], _options(entry, record, f"{annotations}: {qid}"), rng)
            correct = choice in gold if isinstance(gold, list) else choice == gold
        else:
            correct = eval_open(gold, parse_open(record["text"]))
        subject = "_".join(qid.split("_")[1:-1])
        right[DISCIPLINE_OF[subject]].append(correct)
        subjects.setdefault(subject, []).append(correct)
    scored = [c for v in right.values() for c in v]
    return {"accuracy": percent(sum(scored), len(scored)), "count": len(scored),
            "per_discipline": {d: percent(sum(v), len(v)) for d, v in right.items() if v},
            "per_subject": {s: percent(sum(v), len(v)) for s, v in sorted(subjects.items())},
            **coverage(len(scored), len(table))}
