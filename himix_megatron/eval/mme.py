"""MME: accuracy and accuracy+ per subtask, and the perception and cognition totals.

Follows MME's own `eval_tool/calculation.py` (with LLaVA's `convert_answer_to_mme.py` in front of it, which
pairs answers with the ground truth); tests/eval/test_scoring.py checks hand-worked cases.

The annotation is the `MME_Benchmark_release_version` directory. Each subtask is a folder: either with an
`images/` folder and a `questions_answers_YN/` folder of `<image stem>.txt` files, or with the images and their
`.txt` files side by side. Every line of such a file is `question<TAB>yes|no`; each image has two questions.

An answer is matched to its question by (subtask, image, question text): LLaVA's `llava_mme.jsonl` has
`question_id` "<subtask>/<image file>" and the question, with its instruction, in the answer's `prompt`.

Scores: acc = questions right / questions; acc+ = images with both questions right / images; a subtask scores
acc + acc+ in percent, so at most 200 points; perception sums its ten subtasks, cognition its four. A reply is
"yes" or "no" when it is exactly that, else by which of the two its first four characters contain, else wrong.
"""

from __future__ import annotations

import os
from collections import defaultdict

from himix_megatron.eval.scoring_io import ScoringError, coverage, pair_answers

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

_LLAVA_INSTRUCTION = "Answer the question using a single word or phrase."
_MME_INSTRUCTION = "Please answer yes or no."


def _squash(text: str) -> str:
    # MME's files are inconsistent about the space before "Please answer yes or no." (LLaVA retries with two).
    return " ".join(text.split())


def read_ground_truth(root: str) -> dict[tuple[str, str, str], str]:
    """(subtask, image stem, question) -> "yes" | "no"."""
    if not os.path.isdir(root):
        raise ScoringError(f"MME annotations {root}: no such directory (want MME_Benchmark_release_version)")
    truth = {}
    for subtask in sorted(os.listdir(root)):
        folder = os.path.join(root, subtask)
        if not os.path.isdir(folder):
            continue
        qa = os.path.join(folder, "questions_answers_YN") if os.path.isdir(os.path.join(folder, "images")) else folder
        if not os.path.isdir(qa):
            raise ScoringError(f"MME annotations {folder}: has images/ but no questions_answers_YN/")
        for name in sorted(os.listdir(qa)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa, name)
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise ScoringError(f"{path}:{line_no}: want 'question<TAB>yes|no'")
                    key = (subtask, name[:-len(".txt")], _squash(parts[0]))
                    if key in truth:
                        raise ScoringError(f"{path}:{line_no}: the question appears twice")
                    truth[key] = parts[1].strip().lower()
    if not truth:
        raise ScoringError(f"MME annotations {root}: no subtask folder with question files")
    return truth


def answer_key(record: dict) -> tuple[str, str, str] | None:
    qid = str(record["question_id"])
    subtask = qid.split("/")[0] if "/" in qid else record.get("category")
    stem = qid.split("/")[-1].split(".")[0]
    prompt = record.get("prompt", record.get("question"))
    if not isinstance(subtask, str) or not isinstance(prompt, str):
        return None
    prompt = prompt.replace(_LLAVA_INSTRUCTION, "").strip()
    if _MME_INSTRUCTION not in prompt:
        prompt += " " + _MME_INSTRUCTION
    return subtask, stem, _squash(prompt)


def parse_reply(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(answers: list[dict], annotations: str, source: str = "answers") -> dict:
    truth = read_ground_truth(annotations)
    pairs = pair_answers(answers, source, annotations, truth, answer_key,
                         how="MME answers are matched by subtask, image and question: question_id "
                             "'<subtask>/<image file>' and the question in 'prompt', as in LLaVA's llava_mme.jsonl")
    questions_of = defaultdict(int)  # (subtask, stem) -> questions the ground truth has for that image
    for subtask, stem, _ in truth:
        questions_of[subtask, stem] += 1
    right = defaultdict(list)  # (subtask, stem) -> one bool per answered question
    for key, record in pairs:
        right[key[:2]].append(parse_reply(record["text"]) == truth[key])
    subtasks, points = {}, {}
    for subtask in sorted({s for s, _ in right}):
        images = {stem: v for (s, stem), v in right.items() if s == subtask}
        questions = sum(len(v) for v in images.values())
        # acc+ needs every question of an image: images answered only in part are left out of it.
        whole = [v for stem, v in images.items() if len(v) == questions_of[subtask, stem]]
        acc = 100.0 * sum(map(sum, images.values())) / questions
        acc_plus = 100.0 * sum(all(v) for v in whole) / len(whole) if whole else 0.0
        points[subtask] = acc + acc_plus
        subtasks[subtask] = {"acc": round(acc, 2), "acc_plus": round(acc_plus, 2), "score": round(acc + acc_plus, 2),
                             "questions": questions, "images": len(whole)}
    result = {"perception": round(sum(points[s] for s in PERCEPTION if s in points), 2),
              "cognition": round(sum(points[s] for s in COGNITION if s in points), 2),
              "subtasks": subtasks}
    missing = [s for s in PERCEPTION + COGNITION if s not in subtasks]
    if missing:
        result["missing_subtasks"] = missing
    result.update(coverage(len(pairs), len(truth)))
    return result
