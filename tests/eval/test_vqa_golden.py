"""VQAv2 and TextVQA scoring against the official code's own output: tests/fixtures/vqa_golden.json holds a few
thousand randomized answers (rich in punctuation, contractions, number words, articles and whitespace) and the
accuracy that GT-Vision-Lab/VQA's vqaEval.py (after LLaVA's EvalAIAnswerProcessor) and LLaVA's
TextVQAAccuracyEvaluator gave each, made by tests/fixtures/make_vqa_golden.py (the fixture names the commits and
the command). Ours must equal them on every question, to the last bit, and in every aggregate."""

from __future__ import annotations

import json
import os

import pytest

from himix_megatron.eval import scoring
from himix_megatron.eval.vqa_normalize import evalai_process

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "vqa_golden.json")


@pytest.fixture(scope="module")
def golden():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


def mismatches(ours: list, official: list, inputs: list) -> list:
    return [(i, o, t) for i, (x, o, t) in enumerate(zip(ours, official, inputs)) if x != o]


def test_fixture_covers_the_kinds_of_difference(golden):
    v = golden["vqav2"]
    assert len(v["annotations"]) >= 2000
    humans = [[h["answer"] for h in a["answers"]] for a in v["annotations"]]
    assert sum(len(set(h)) == 1 for h in humans) > 200  # the all-ten-equal path
    assert sum("answer_id" not in a["answers"][0] for a in v["annotations"]) > 50  # records without ids
    texts = [r["text"] for r in v["answers"]]
    for needle in ("'", "-", "!", "{", ":", "\t", "one", "the "):
        assert sum(needle in t.lower() for t in texts) > 20, needle
    scores = set(v["per_question"])
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= scores


def test_evalai_processor_equals_llavas_copy_of_it(golden):
    v = golden["vqav2"]
    ours = [evalai_process(r["text"]) for r in v["answers"]]
    assert mismatches(ours, v["evalai_processed"], [r["text"] for r in v["answers"]]) == []


def test_vqav2_every_question_equals_vqaeval(golden):
    v = golden["vqav2"]
    ours = [scoring.vqav2_accuracy(r["text"], [h["answer"] for h in a["answers"]], a["answers"])
            for r, a in zip(v["answers"], v["annotations"])]
    assert mismatches(ours, v["per_question"], [r["text"] for r in v["answers"]]) == []


def test_vqav2_aggregates_equal_vqaeval(golden, tmp_path):
    v = golden["vqav2"]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"annotations": v["annotations"]}))
    # Answers in reverse order: the aggregate must not depend on it (vqaEval sums in the annotations' order).
    result = scoring.score("vqav2", v["answers"][::-1], str(path))
    assert result["accuracy"] == v["accuracy"]
    assert result["per_answer_type"] == v["per_answer_type"]
    assert result["count"] == len(v["annotations"])


def test_textvqa_every_question_and_the_aggregate_equal_m4c_evaluator(golden, tmp_path):
    v, t = golden["vqav2"], golden["textvqa"]
    humans = [[h["answer"] for h in a["answers"]] for a in v["annotations"]]
    ours = [scoring.textvqa_accuracy(r["text"], h) for r, h in zip(v["answers"], humans)]
    assert mismatches(ours, t["per_question"], [r["text"] for r in v["answers"]]) == []
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"data": [{"question_id": a["question_id"], "answers": h}
                                         for a, h in zip(v["annotations"], humans)]}))
    result = scoring.score("textvqa", v["answers"], str(path))
    assert result["accuracy"] == round(100.0 * t["accuracy"], 2)
