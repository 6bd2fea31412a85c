"""POPE: accuracy, precision, recall, F1 and yes-ratio per split, and the F1 averaged over the splits.

Follows LLaVA's `llava/eval/eval_pope.py` (the numbers LLaVA-style papers report); tests/eval/test_scoring.py
checks hand-worked cases.

The annotation is a directory holding POPE's `coco_pope_random.json`, `coco_pope_popular.json` and
`coco_pope_adversarial.json`, JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`. Two kinds of
answer file are accepted, answer by answer:
* ours (himix-eval's): an answer names its split in `category` (copied from LLaVA's `llava_pope_test.jsonl`) and
  its question by the `question_id` of that split's file;
* LLaVA's own (`model_vqa_loader`'s): no `category`; its `question_id` is that of LLaVA's question file
  (`llava_pope_test.jsonl`, which the scorer then needs: `questions`), whose line gives the split. eval_pope.py
  pairs the k-th answer of a split with the k-th label of that split's file, i.e. with the split's k-th question
  in the question file, since model_vqa_loader answers in question-file order. The scorer pairs each answer
  with the label at its question's position within its split in the question file: the same pairs for such a
  file, and answers may come in any order; a missing answer is counted as unanswered instead of shifting every
  later pair. Where both files name the question's image, they must agree.

A reply is "no" when its first sentence (up to the first period), commas removed, has the word "No", "no" or
"not"; any other reply is "yes". "Yes" is the positive class. A split with no "yes" reply has no precision
(eval_pope.py divides by zero there) and one with no "yes" label no recall: both are reported as 0, as is the
F1 without either.
"""

from __future__ import annotations

import os
from typing import Optional

from himix_megatron.eval.scoring_io import (ScoringError, coverage, field, jsonl_records, pair_answers, percent,
                                            qid_key)

SPLITS = ("random", "popular", "adversarial")


def read_split_files(directory: str) -> dict[str, list[tuple[str, str, bool, object]]]:
    """split -> [(where, question id as text, the label is "yes", image or None)], in file order."""
    if not os.path.isdir(directory):
        raise ScoringError(f"POPE annotations {directory}: no such directory (want the folder holding "
                           "coco_pope_{random,popular,adversarial}.json)")
    splits = {}
    for split in SPLITS:
        path = os.path.join(directory, f"coco_pope_{split}.json")
        if not os.path.isfile(path):
            raise ScoringError(f"POPE annotations: {path}: no such file")
        rows, seen = [], set()
        for where, record in jsonl_records(path, "a POPE question"):
            qid = qid_key(field(record, "question_id", where, (int, str)))
            label = field(record, "label", where)
            if label not in ("yes", "no"):
                raise ScoringError(f"{where}: 'label' must be 'yes' or 'no', not {label!r}")
            if qid in seen:
                raise ScoringError(f"{where}: question_id {record['question_id']!r} appears twice")
            seen.add(qid)
            rows.append((where, qid, label == "yes", record.get("image")))
        splits[split] = rows
    return splits


def llava_question_positions(path: str, splits: dict) -> dict[str, tuple[str, int]]:
    """LLaVA's POPE question file (llava_pope_test.jsonl) -> {question id: (split, position within the split)}."""
    if not os.path.isfile(path):
        raise ScoringError(f"POPE questions file {path}: no such file (LLaVA's llava_pope_test.jsonl, which pairs "
                           "answers without 'category' with their labels)")
    positions, counts = {}, dict.fromkeys(SPLITS, 0)
    for where, record in jsonl_records(path, "a POPE question"):
        qid = qid_key(field(record, "question_id", where, (int, str)))
        split = field(record, "category", where)
        if split not in SPLITS:
            raise ScoringError(f"{where}: 'category' must be one of {', '.join(SPLITS)}, not {split!r}")
        if qid in positions:
            raise ScoringError(f"{where}: question_id {record['question_id']!r} appears twice")
        k = counts[split]
        if k >= len(splits[split]):
            raise ScoringError(f"{where}: question {k + 1} of split {split!r}, but coco_pope_{split}.json has only "
                               f"{len(splits[split])}: the question file and the annotations do not belong together")
        label_where, _, _, image = splits[split][k]
        if isinstance(image, str) and isinstance(record.get("image"), str) and \
                os.path.basename(image) != os.path.basename(record["image"]):
            raise ScoringError(f"{where}: image {record['image']!r}, but the {split} label at the same position "
                               f"({label_where}) is for {image!r}: the question file and the annotations do not "
                               "belong together")
        counts[split] = k + 1
        positions[qid] = (split, k)
    return positions


def says_yes(text: str) -> bool:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def metrics(pairs: list[tuple[bool, bool]]) -> dict:
    """(predicted yes, label yes) pairs -> the metrics in percent and the four counts."""
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(tp + tn, len(pairs)), "precision": round(100 * precision, 2),
            "recall": round(100 * recall, 2), "f1": round(100 * f1, 2),
            "yes_ratio": percent(tp + fp, len(pairs)), "count": len(pairs), "tp": tp, "fp": fp, "tn": tn,
            "fn": fn, "_f1": f1}


def score_pope(answers: list[dict], annotations: str, source: str = "answers",
               questions: Optional[str] = None) -> dict:
    """`questions`: LLaVA's llava_pope_test.jsonl, needed only for answers without `category`."""
    splits = read_split_files(annotations)
    labels = {(split, k): yes for split, rows in splits.items() for k, (_, _, yes, _) in enumerate(rows)}
    by_id = {(split, qid): (split, k) for split, rows in splits.items() for k, (_, qid, _, _) in enumerate(rows)}
    positions = None
    if questions is not None or any("category" not in r for r in answers if isinstance(r, dict)):
        if questions is None:
            raise ScoringError(f"{source}: answers without 'category' (LLaVA's answer files) are paired by "
                               "position in LLaVA's question file: give it (--questions llava_pope_test.jsonl)")
        positions = llava_question_positions(questions, splits)

    def key(record):
        if "category" in record:
            split = record["category"]
            return by_id.get((split, qid_key(record["question_id"]))) if split in SPLITS else None
        return positions.get(qid_key(record["question_id"]))

    how = (f"a POPE answer names its split in 'category': one of {', '.join(SPLITS)}, and its question by that "
           "split's question_id" + (f"; or, without 'category', its question in {questions}" if questions else ""))
    pairs = pair_answers(answers, source, annotations, labels, key, how=how)
    by_split = {}
    for split in SPLITS:
        scored = [(says_yes(r["text"]), labels[k]) for k, r in pairs if k[0] == split]
        if scored:
            by_split[split] = metrics(scored)
    mean_f1 = 100 * sum(m.pop("_f1") for m in by_split.values()) / len(by_split)
    result = {"mean_f1": round(mean_f1, 2),
              "mean_accuracy": round(sum(100 * (m["tp"] + m["tn"]) / m["count"] for m in by_split.values())
                                     / len(by_split), 2),
              "splits": by_split}
    missing = [s for s in SPLITS if s not in by_split]
    if missing:
        result["missing_splits"] = missing
    result.update(coverage(len(pairs), len(labels)))
    return result
