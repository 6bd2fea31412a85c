"""POPE: accuracy, precision, recall, F1 and yes-ratio per split, and the F1 averaged over the splits.

Follows LLaVA's `llava/eval/eval_pope.py` (the numbers LLaVA-style papers report); tests/eval/test_scoring.py
checks hand-worked cases.

The annotation is a directory holding POPE's `coco_pope_random.json`, `coco_pope_popular.json` and
`coco_pope_adversarial.json`, JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`. An answer names
its split in `category` (as LLaVA's `llava_pope_test.jsonl` records it, and the answer file copies it) and its
question by the `question_id` of that split's file. LLaVA pairs answers with labels by position within a split
instead; pairing by id lets answers come in any order, and a missing answer is counted as unanswered instead of
shifting every later pair.

A reply is "no" when its first sentence (up to the first period), commas removed, has the word "No", "no" or
"not"; any other reply is "yes". "Yes" is the positive class.
"""

from __future__ import annotations

import os

from himix_megatron.eval.scoring_io import (ScoringError, coverage, field, jsonl_records, pair_answers, percent,
                                            qid_key)

SPLITS = ("random", "popular", "adversarial")


def read_labels(directory: str) -> dict[tuple[str, str], bool]:
    """(split, question id) -> the label is "yes"."""
    if not os.path.isdir(directory):
        raise ScoringError(f"POPE annotations {directory}: no such directory (want the folder holding "
                           "coco_pope_{random,popular,adversarial}.json)")
    labels = {}
    for split in SPLITS:
        path = os.path.join(directory, f"coco_pope_{split}.json")
        if not os.path.isfile(path):
            raise ScoringError(f"POPE annotations: {path}: no such file")
        for where, record in jsonl_records(path, "a POPE question"):
            qid = field(record, "question_id", where, (int, str))
            label = field(record, "label", where)
            if label not in ("yes", "no"):
                raise ScoringError(f"{where}: 'label' must be 'yes' or 'no', not {label!r}")
            key = (split, qid_key(qid))
            if key in labels:
                raise ScoringError(f"{where}: question_id {qid!r} appears twice")
            labels[key] = label == "yes"
    return labels


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


def score_pope(answers: list[dict], annotations: str, source: str = "answers") -> dict:
    labels = read_labels(annotations)

    def key(record):
        split = record.get("category")
        return (split, qid_key(record["question_id"])) if split in SPLITS else None

    pairs = pair_answers(answers, source, annotations, labels, key,
                         how=f"a POPE answer names its split in 'category': one of {', '.join(SPLITS)}, and its "
                             "question by that split's question_id")
    splits = {}
    for split in SPLITS:
        scored = [(says_yes(r["text"]), labels[k]) for k, r in pairs if k[0] == split]
        if scored:
            splits[split] = metrics(scored)
    mean_f1 = 100 * sum(m.pop("_f1") for m in splits.values()) / len(splits)
    result = {"mean_f1": round(mean_f1, 2),
              "mean_accuracy": round(sum(100 * (m["tp"] + m["tn"]) / m["count"] for m in splits.values())
                                     / len(splits), 2),
              "splits": splits}
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        result["missing_splits"] = missing
    result.update(coverage(len(pairs), len(labels)))
    return result
