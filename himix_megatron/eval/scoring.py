"""The benchmark scorers of `himix-eval`: LLaVA answer JSONL + a benchmark's official annotations -> metrics.

    himix-eval score --benchmark NAME --answers A.jsonl --annotations FILE [--submission OUT]

Metrics are in percent, as the paper reports them (MME: points, out of 200 per subtask). Each scorer follows one
documented implementation, and tests/eval/test_scoring.py checks it on hand-worked cases:

* VQAv2 (val): the official VQA evaluation (GT-Vision-Lab/VQA `vqaEval.py` as it stands today, a013f00, whose
  rules the evaluation server applies) on a prediction the EvalAI processor has already normalised, as LLaVA's
  `convert_vqav2_for_submission.py` submits it. When the ten human answers (tabs and newlines to spaces,
  stripped) are not all equal, vqaEval gives them and the prediction its punctuation and digit/article rules;
  when they are all equal, it compares the prediction with them as they are (a prediction "10-30", which EvalAI
  makes "10 30", scores 0 against ten "10-30" and 100 against nine "10-30" and one "10 30"; an answer record
  equal to another, without distinct answer_id, leaves the subsets with it). vqa_normalize.py says what changed
  from its 2015 revision.
* TextVQA: the TextVQA evaluator LLaVA's `eval_textvqa.py` uses (MMF's `TextVQAAccuracyEvaluator`): the EvalAI
  processor on prediction and human answers alike. Both VQA scores average min(1, matches / 3) over the ten
  leave-one-out subsets of the human answers: one match scores 0.3, two 0.6, three 0.9, four or more 1. Both
  are computed with the originals' float operations in their order, so every per-question score and every
  aggregate equals theirs to the last bit (tests/eval/test_vqa_golden.py).
* GQA: LLaVA's `convert_gqa_for_eval.py` (trailing periods off, lowercase) and GQA's `eval.py` (exact match, over
  the questions whose `isBalanced` is true).
* POPE (pope.py): LLaVA's `eval_pope.py`. MME (mme.py): MME's `eval_tool/calculation.py`. MMMU (mmmu.py):
  MMMU's `eval/eval_utils.py`.
* MM-Vet is graded by GPT-4 on its server: `mmvet_submission` writes the file its grader reads.

No package is used: lmms-eval implements most of these but pulls in accelerate, datasets, openai, wandb and
more; pycocoevalcap only has captioning metrics.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from typing import Iterable, Optional

from himix_megatron.eval.mme import score_mme
from himix_megatron.eval.mmmu import score_mmmu
from himix_megatron.eval.paper import HEADLINE, PAPER_TABLE3, TABLE3_COLUMNS, headline, markdown_table
from himix_megatron.eval.pope import score_pope
from himix_megatron.eval.scoring_io import (ScoringError, coverage, field, load_json, pair_answers, percent,
                                            qid_key, read_answer_file, write_json)
from himix_megatron.eval.vqa_normalize import evalai_process, vqa_normalize, vqa_whitespace

__all__ = ["BENCHMARKS", "HEADLINE", "PAPER_TABLE3", "TABLE3_COLUMNS", "ScoringError", "headline", "markdown_table",
           "mmvet_submission", "score", "score_main", "vqav2_submission"]

BENCHMARKS = ("vqav2", "gqa", "textvqa", "pope", "mme", "mmmu", "mmvet")

# What `himix-eval score --help` says each benchmark accepts: (answers, annotations).
FORMATS = {
    "vqav2": ("LLaVA answer JSONL: question_id (VQAv2's, int or str), text",
              "VQAv2's v2_mscoco_val2014_annotations.json ({'annotations': [{question_id, answer_type, answers: "
              "[{answer, answer_id}, ...]}]}); none with --submission for test-dev"),
    "gqa": ("LLaVA answer JSONL: question_id (GQA's), text",
            "GQA's {testdev,val}_{balanced,all}_questions.json ({question id: {answer, isBalanced, types, ...}}); "
            "only isBalanced questions are scored"),
    "textvqa": ("LLaVA answer JSONL: question_id = TextVQA's, or LLaVA's (the image id, the question in prompt)",
                "TextVQA_0.5.1_val.json ({'data': [{question_id, image_id, question, answers: [str, ...]}]})"),
    "pope": ("LLaVA answer JSONL: himix-eval's (question_id of the split's file + category = the split), or "
             "LLaVA's own without category (then --questions llava_pope_test.jsonl pairs them by position)",
             "the folder of coco_pope_{random,popular,adversarial}.json (JSON lines: question_id, image, label)"),
    "mme": ("LLaVA answer JSONL: question_id '<subtask>/<image file>', prompt (the question), text",
            "the MME_Benchmark_release_version folder (per subtask '<image>.txt': question<TAB>yes|no lines)"),
    "mmmu": ("LLaVA answer JSONL: question_id (the MMMU id), text, and options where the annotations lack them",
             "MMMU's answer_dict_val.json with options: {id: {question_type, ground_truth, options}}"),
    "mmvet": ("LLaVA answer JSONL: question_id (0-217 or v1_N), text",
              "none: --submission OUT writes the file MM-Vet's GPT-4 grader reads"),
}


def formats_help() -> str:
    """The answer and annotation formats of every benchmark, for --help."""
    lines = ["formats accepted (answers; annotations):"]
    for name in BENCHMARKS:
        lines.append(f"  {name}:")
        for flag, text in zip(("--answers", "--annotations"), FORMATS[name]):
            lines.append(textwrap.fill(text, 110, initial_indent=f"    {flag:<15}", subsequent_indent=" " * 19))
    return "\n".join(lines)


MMVET_HELP = ("MM-Vet is graded by GPT-4 and cannot be scored offline: write its submission file with "
              "mmvet_submission(answers, path) (CLI: --submission OUT) and grade that with MM-Vet's evaluator")


def leave_one_out(prediction: str, humans: list[str], records: Optional[list] = None) -> float:
    """The VQA accuracy of one prediction: the mean over the leave-one-out subsets of min(1, matches / 3).

    `records[i]` stands for `humans[i]` when one is left out: every record equal to it leaves the subset. The
    default (each answer's position) leaves one answer out; vqaEval.py compares whole annotation records
    (answer, answer_id, answer_confidence), so records without distinct ids leave together."""
    records = list(range(len(humans))) if records is None else records
    accs = [min(1, float(sum(h == prediction for r, h in zip(records, humans) if r != out)) / 3) for out in records]
    return float(sum(accs)) / len(accs)


def vqav2_accuracy(text: str, humans: list[str], records: Optional[list[dict]] = None) -> float:
    """vqaEval.py's accuracy of the EvalAI-processed `text` against the human answers; `records`: the
    annotation's answer records (default: each answer distinct)."""
    prediction = vqa_whitespace(evalai_process(text))
    humans = [vqa_whitespace(h) for h in humans]
    if len(set(humans)) > 1:
        humans = [vqa_normalize(h) for h in humans]
        prediction = vqa_normalize(prediction)
    if records is not None:
        records = [dict(r, answer=h) for r, h in zip(records, humans)]
    return leave_one_out(prediction, humans, records)


def textvqa_accuracy(text: str, humans: list[str]) -> float:
    """MMF's TextVQAAccuracyEvaluator: the EvalAI processor on the prediction and on every human answer."""
    return leave_one_out(evalai_process(text), [evalai_process(h) for h in humans])


def _records(data, key: str, path: str, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ScoringError(f"{what} file {path}: want a JSON object with a list {key!r}")
    return data[key]


def _human_answers(entry: dict, where: str, as_dicts: bool) -> list[str]:
    humans = field(entry, "answers", where, (list,))
    if as_dicts:
        humans = [field(h, "answer", f"{where}, answers[{i}]") for i, h in enumerate(humans)]
    if not humans or not all(isinstance(h, str) for h in humans):
        raise ScoringError(f"{where}: 'answers' must be a non-empty list of " +
                           ("{'answer': str} objects" if as_dicts else "strings"))
    return humans


def _index(entries: list, path: str, as_dicts: bool) -> dict[str, dict]:
    index = {}
    for n, entry in enumerate(entries):
        qid = field(entry, "question_id", f"{path}: entry {n}", (int, str))
        where = f"{path}: question_id {qid!r}"
        if qid_key(qid) in index:
            raise ScoringError(f"{where} appears twice")
        index[qid_key(qid)] = dict(entry, answers=_human_answers(entry, where, as_dicts),
                                   answer_records=entry["answers"])
    return index


def score_vqav2(answers: list[dict], annotations: str, source: str = "answers") -> dict:
    index = _index(_records(load_json(annotations, "VQAv2 annotations"), "annotations", annotations, "VQAv2"),
                   annotations, as_dicts=True)
    accuracy = {qid: vqav2_accuracy(record["text"], index[qid]["answers"], index[qid]["answer_records"])
                for qid, record in pair_answers(answers, source, annotations, index)}
    # Summed in the annotation file's order, as vqaEval.py sums them, so the float aggregates equal its own.
    scores, by_type = [], {}
    for qid, entry in index.items():
        if qid in accuracy:
            scores.append(accuracy[qid])
            by_type.setdefault(str(entry.get("answer_type", "unknown")), []).append(accuracy[qid])
    return {"accuracy": percent(sum(scores), len(scores)), "count": len(scores),
            "per_answer_type": {t: percent(sum(v), len(v)) for t, v in sorted(by_type.items())},
            **coverage(len(scores), len(index))}


def _textvqa_question(prompt: str) -> Optional[str]:
    """The question inside a LLaVA TextVQA prompt (eval_textvqa.py's prompt_processor), lowercased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def score_textvqa(answers: list[dict], annotations: str, source: str = "answers") -> dict:
    """Answers name their question by TextVQA's question_id, or as LLaVA's llava_textvqa_val_v051_ocr.jsonl does:
    question_id = the image id, and the question inside `prompt`."""
    index = _index(_records(load_json(annotations, "TextVQA annotations"), "data", annotations, "TextVQA"),
                   annotations, as_dicts=False)
    by_image_question = {}
    for qid, entry in index.items():
        if isinstance(entry.get("image_id"), str) and isinstance(entry.get("question"), str):
            by_image_question.setdefault((entry["image_id"], entry["question"].lower()), qid)

    def key(record):
        prompt = record.get("prompt")
        if isinstance(prompt, str):
            found = by_image_question.get((qid_key(record["question_id"]), _textvqa_question(prompt)))
            if found is not None:
                return found
        return qid_key(record["question_id"])

    pairs = pair_answers(answers, source, annotations, index, key)
    scores = [textvqa_accuracy(r["text"], index[qid]["answers"]) for qid, r in pairs]
    # eval_textvqa.py prints 100 * (sum / count) to two decimals: the same float operations, in that order.
    return {"accuracy": round(100.0 * (sum(scores) / len(scores)), 2), "count": len(scores),
            **coverage(len(scores), len(index))}


def score_gqa(answers: list[dict], annotations: str, source: str = "answers") -> dict:
    """GQA's eval.py: accuracy over the questions whose `isBalanced` is true (every question where the file has no
    such field, as LLaVA's testdev_balanced subset is all balanced); answers to other questions of an
    all-questions file are left out and counted in `unbalanced_answered`. With the questions' `types`, also the
    accuracy of eval.py's binary (structural type other than "query") and open questions."""
    table = load_json(annotations, "GQA annotations")
    if not isinstance(table, dict) or not table:
        raise ScoringError(f"GQA annotations file {annotations}: want a JSON object {{question id: {{answer, ...}}}}")
    index, balanced, kind = {}, {}, {}
    for q, entry in table.items():
        where = f"{annotations}: question {q!r}"
        index[qid_key(q)] = field(entry, "answer", where)
        if "isBalanced" in entry:
            if not isinstance(entry["isBalanced"], bool):
                raise ScoringError(f"{where}: 'isBalanced' must be true or false, not {entry['isBalanced']!r}")
            balanced[qid_key(q)] = entry["isBalanced"]
        types = entry.get("types")
        if isinstance(types, dict) and isinstance(types.get("structural"), str):
            kind[qid_key(q)] = "open" if types["structural"] == "query" else "binary"
    pairs = pair_answers(answers, source, annotations, index)
    scored = [(qid, r["text"].rstrip(".").lower() == index[qid]) for qid, r in pairs if balanced.get(qid, True)]
    right = [ok for _, ok in scored]
    total = sum(balanced.get(qid, True) for qid in index)
    result = {"accuracy": percent(sum(right), len(right)), "count": len(right)}
    if kind:
        by_kind = {}
        for qid, ok in scored:
            by_kind.setdefault(kind.get(qid, "unknown"), []).append(ok)
        result["per_answer_type"] = {k: percent(sum(v), len(v)) for k, v in sorted(by_kind.items())}
    if len(scored) < len(pairs):
        result["unbalanced_answered"] = len(pairs) - len(scored)
    return {**result, **coverage(len(right), total)}


def score(benchmark: str, answers: list[dict], annotations: str, *, source: str = "answers",
          questions: Optional[str] = None) -> dict:
    """Metrics of `answers` (LLaVA answer records) against `annotations` (a path, in the benchmark's official
    format); `source` names the answers in error messages; `questions`: POPE only, LLaVA's question file, which
    pairs answers without `category` (LLaVA's answer files) with their labels. FORMATS says what each benchmark
    accepts."""
    if benchmark not in BENCHMARKS:
        raise ScoringError(f"benchmark {benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
    if benchmark == "mmvet":
        raise ScoringError(MMVET_HELP)
    answers = list(answers)
    if benchmark == "mmmu":
        return score_mmmu(answers, annotations, load_json(annotations, "MMMU annotations"), source)
    scorer = {"vqav2": score_vqav2, "gqa": score_gqa, "textvqa": score_textvqa, "pope": score_pope,
              "mme": score_mme}[benchmark]
    if questions is not None and benchmark != "pope":
        raise ScoringError(f"questions file {questions}: only POPE's scoring reads one, not {benchmark}'s")
    if benchmark == "pope":
        return score_pope(answers, annotations, source, questions)
    return scorer(answers, annotations, source)


# ----- submission files ---------------------------------------------------------------------------------------


def _submitted(answers: Iterable[dict], source: str) -> list[tuple[object, str]]:
    out, seen = [], set()
    for n, record in enumerate(answers, 1):
        qid = field(record, "question_id", f"{source}: answer {n}", (int, str))
        text = field(record, "text", f"{source}: answer {n} (question_id {qid!r})")
        if qid_key(qid) in seen:
            raise ScoringError(f"{source}: question_id {qid!r} is answered twice")
        seen.add(qid_key(qid))
        out.append((qid, text))
    if not out:
        raise ScoringError(f"{source}: no answers to submit")
    return out


def _int_id(qid, source: str) -> int:
    if isinstance(qid, int) or (isinstance(qid, str) and qid.strip().isdigit()):
        return int(qid)
    raise ScoringError(f"{source}: question_id {qid!r}: VQAv2 question ids are integers")


def vqav2_submission(answers: Iterable[dict], path: str, question_ids: Optional[Iterable] = None,
                     source: str = "answers") -> list[dict]:
    """Write the VQAv2 evaluation server's result file, `[{"question_id": int, "answer": str}]`, with every answer
    through the EvalAI processor. With `question_ids` (the test split's), unanswered ones get "" as LLaVA's
    convert_vqav2_for_submission.py gives them, since the server wants every question of the split."""
    entries = [{"question_id": _int_id(q, source), "answer": evalai_process(t)} for q, t in _submitted(answers, source)]
    if question_ids is not None:
        have = {e["question_id"] for e in entries}
        wanted = [_int_id(q, "question_ids") for q in question_ids]
        entries += [{"question_id": q, "answer": ""} for q in wanted if q not in have]
    write_json(path, entries, "VQAv2 submission")
    return entries


def mmvet_submission(answers: Iterable[dict], path: str, source: str = "answers") -> dict:
    """Write `{"v1_<question_id>": answer text}`, the file MM-Vet's GPT-4 grader reads (LLaVA's
    convert_mmvet_for_eval.py; question ids as in llava-mm-vet.jsonl: 0 to 217)."""
    entries = {}
    for qid, text in _submitted(answers, source):
        entries[qid if str(qid).startswith("v1_") else f"v1_{qid}"] = text
    write_json(path, entries, "MM-Vet submission", indent=2)
    return entries


# ----- command line -------------------------------------------------------------------------------------------


def summary(benchmark: str, result: dict) -> list[str]:
    """Human-readable lines (the CLI prints the result as JSON after them)."""
    lines = []
    value = headline(benchmark, result)
    if value is not None:
        lines.append(f"{benchmark}: {HEADLINE[benchmark]} {value}")
    for group in ("per_answer_type", "per_discipline", "splits", "subtasks"):
        for name, metrics in result.get(group, {}).items():
            shown = metrics if not isinstance(metrics, dict) else ", ".join(
                f"{k} {v}" for k, v in metrics.items() if k not in ("tp", "fp", "tn", "fn"))
            lines.append(f"  {name}: {shown}")
    if benchmark == "mme":
        lines.append(f"  cognition: {result['cognition']}")
    if "submission" in result:
        lines.append(f"{benchmark}: wrote the submission file {result['submission']} ({result['answered']} answers)")
    if result.get("unanswered"):
        lines.append(f"warning: {result['unanswered']} of {result['total']} annotated questions have no answer; "
                     f"only the {result['answered']} answered are scored")
    return lines


def score_main(argv=None) -> int:
    """`himix-eval score`: print a summary and, as the last line, the result as one JSON object."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="himix-eval score", description="Score a benchmark's answer JSONL.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=formats_help())
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--answers", required=True, help="LLaVA answer JSONL (question_id, text, ...): see below")
    p.add_argument("--annotations", help="the benchmark's official annotations (file or directory): see below")
    p.add_argument("--questions", help="pope: LLaVA's llava_pope_test.jsonl, for answer files without category")
    p.add_argument("--submission", help="vqav2 (test-dev) and mmvet: write the submission file here")
    args = p.parse_args(argv)
    try:
        result = _score_cli(args)
    except ScoringError as e:
        print(f"himix-eval score: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(args.benchmark, result)))
    print(json.dumps(result))
    return 0


def _score_cli(args) -> dict:
    if args.questions and args.benchmark != "pope":
        raise ScoringError(f"--questions: only pope's scoring reads a question file, not {args.benchmark}'s")
    if args.submission and args.benchmark not in ("vqav2", "mmvet"):
        raise ScoringError(f"--submission: only vqav2 and mmvet have submission files, not {args.benchmark}")
    answers = read_answer_file(args.answers)
    if args.benchmark == "mmvet":
        if not args.submission:
            raise ScoringError(MMVET_HELP)
        mmvet_submission(answers, args.submission, source=args.answers)
        return {"submission": args.submission, "answered": len(answers)}
    if args.annotations is None and not (args.benchmark == "vqav2" and args.submission):
        raise ScoringError(f"--annotations is needed to score {args.benchmark}" +
                           (" (or --submission OUT for test-dev)" if args.benchmark == "vqav2" else ""))
    result = {}
    if args.annotations is not None:
        result = score(args.benchmark, answers, args.annotations, source=args.answers, questions=args.questions)
    if args.submission:
        vqav2_submission(answers, args.submission, source=args.answers)
        result.update(submission=args.submission, answered=result.get("answered", len(answers)))
    return result
