"""himix-eval's scorers on hand-worked cases: the VQA answer normalisation and leave-one-out accuracy, GQA,
POPE, MME, MMMU, the submission files, Table 3, the `score` CLI, and the errors every malformed input gets."""

from __future__ import annotations

import json
import random
import re

import pytest

from himix_megatron.eval import mmmu, pope, scoring
from himix_megatron.eval.scoring import ScoringError
from himix_megatron.eval.vqa_normalize import evalai_process, vqa_normalize


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def ans(qid, text, **more) -> dict:
    return {"question_id": qid, "text": text, **more}


# ----- answer normalisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, processed", [
    ("Two dogs.", "2 dogs"),
    ("It's a cat", "it 's cat"),  # "'s" is split off, not expanded
    ("dont", "don't"), ("Isnt it?", "isn't it"),
    ("the man", "man"), ("An apple", "apple"), ("Ten", "10"), ("none", "0"),
    ("1,000", "1000"),  # commas go before the punctuation rules
    ("3.5", "3.5"), ("3.5.", "3.5"),  # a period before a digit stays, any other goes
    ("black-and-white", "black and white"), ("black - white", "black white"),  # mark inside a word -> space
    ("yes!", "yes"), ("  A\tdog\nrunning ", "dog running"),
])
def test_evalai_processor(raw, processed):
    assert evalai_process(raw) == processed


def test_period_quirk_only_32_periods_go():
    assert evalai_process("." * 40) == "." * 8  # the originals pass re.UNICODE (32) as re.sub's count


@pytest.mark.parametrize("raw, normalized", [
    ("1,000", "1000"),  # a digit-comma-digit deletes every mark
    ("the man's hat.", "man's hat"),  # "'" and ":" are not marks (they were in vqaEval.py's 2015 revision)
    ("10:30", "10:30"),
    ("dont", "don't"), ("Isnt", "isn't"),  # contractions with a straight apostrophe
    ("two", "2"), ("X-Y", "x y"), ("T-shirt!", "t shirt"), ("{x}", "x"),  # "-", "!", "{", "}" are marks
])
def test_vqa_eval_normalisation(raw, normalized):
    assert vqa_normalize(raw) == normalized


# ----- VQAv2 and TextVQA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("matches, value", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_values(matches, value):
    assert scoring.leave_one_out("cat", ["cat"] * matches + ["dog"] * (10 - matches)) == value


def test_vqav2_prediction_goes_through_both_processors():
    assert scoring.vqav2_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == 0.9
    assert scoring.vqav2_accuracy("The Dog", ["dog"] * 10) == 1.0


@pytest.mark.parametrize("prediction, humans, accuracy", [
    ("T-shirt", ["t-shirt"] * 6 + ["shirt"] * 4, 1.0),  # "-" goes from both
    ("McDonald's", ["mcdonald's"] * 7 + ["mcdonalds"] * 3, 0.0),  # EvalAI makes it "mcdonald 's"
    ("Don't", ["dont"] * 5 + ["no"] * 5, 1.0),  # "dont" -> "don't", straight apostrophe
    ("10:30", ["10:30"] * 10, 1.0),  # ten equal: compared as they are (the 2015 rules made it "10 30")
    ("10-30", ["10-30"] * 10, 0.0),  # ... so "10-30" stays, while EvalAI made the prediction "10 30"
    ("10-30", ["10-30"] * 9 + ["10 30"], 1.0),  # not all equal: every human answer gets the rules
    ("." * 40, ["." * 8] * 10, 1.0),  # EvalAI leaves 8 of 40 periods; vqaEval's rules are not applied again
])
def test_vqav2_cases_where_the_2015_vqaeval_differs(prediction, humans, accuracy):
    assert scoring.vqav2_accuracy(prediction, humans) == accuracy


def test_vqav2_answer_records_without_ids_leave_together():
    # vqaEval.py leaves a human answer out by comparing whole records: ten equal ones without answer_id all go.
    assert scoring.vqav2_accuracy("dog", ["dog"] * 10, [{"answer": "dog"}] * 10) == 0.0
    records = [{"answer": "dog", "answer_id": i} for i in range(10)]
    assert scoring.vqav2_accuracy("dog", ["dog"] * 10, records) == 1.0
    mixed = [{"answer": "dog"}] * 4 + [{"answer": "cat", "answer_id": i} for i in range(6)]
    assert scoring.vqav2_accuracy("dog", ["dog"] * 4 + ["cat"] * 6, mixed) == 0.6  # 1.0 with ids


def vqav2_annotations(tmp_path):
    humans = lambda n, a, other: [{"answer": a, "answer_id": i + 1} for i in range(n)] + \
        [{"answer": other, "answer_id": i + 1} for i in range(n, 10)]  # noqa: E731
    return write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": humans(1, "2", "3")},
        {"question_id": 2, "answer_type": "number", "answers": humans(2, "2", "3")},
        {"question_id": 3, "answer_type": "other", "answers": humans(3, "red", "blue")},
        {"question_id": 4, "answer_type": "other", "answers": humans(4, "red", "blue")},
    ]})


def test_vqav2_accuracy_per_answer_type(tmp_path):
    answers = [ans(1, "Two"), ans(2, "2"), ans(3, "Red."), ans(4, "red")]
    result = scoring.score("vqav2", answers, vqav2_annotations(tmp_path))
    assert result["accuracy"] == 70.0  # (0.3 + 0.6 + 0.9 + 1.0) / 4
    assert result["per_answer_type"] == {"number": 45.0, "other": 95.0}
    assert (result["count"], result["answered"], result["total"], result["unanswered"]) == (4, 4, 4, 0)


def test_unanswered_questions_are_counted_and_left_out(tmp_path):
    result = scoring.score("vqav2", [ans(4, "red")], vqav2_annotations(tmp_path))
    assert result["accuracy"] == 100.0
    assert (result["answered"], result["total"], result["unanswered"]) == (1, 4, 3)


def test_textvqa_by_question_id_and_by_llava_image_id_and_prompt(tmp_path):
    path = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what brand is the camera?",
         "answers": ["Sony."] * 2 + ["canon"] * 8},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "what number is shown?",
         "answers": ["one"] * 3 + ["7"] * 7},
    ]})
    llava = ans("003a8ae2ef43b901", "SONY", prompt="What brand is the camera?\nReference OCR token: Sony, "
                "a7\nAnswer the question using a single word or phrase.")
    result = scoring.score("textvqa", [llava, ans(34603, "1")], path)
    assert result["accuracy"] == 75.0  # (0.6 + 0.9) / 2: human answers go through the EvalAI processor too
    assert result["answered"] == result["total"] == 2


# ----- GQA ----------------------------------------------------------------------------------------------------


def test_gqa_exact_match_after_llava_normalisation(tmp_path):
    path = write_json(tmp_path / "testdev_balanced_questions.json",
                      {"201": {"answer": "yes"}, "202": {"answer": "left"}, "203": {"answer": "table"}})
    result = scoring.score("gqa", [ans("201", "Yes."), ans(202, "Left"), ans("203", "chair")], path)
    assert result == {"accuracy": 66.67, "count": 3, "answered": 3, "total": 3, "unanswered": 0}


def gqa_all_questions(tmp_path):
    """An all-questions file: isBalanced on each, and the structural types eval.py splits binary/open by."""
    q = lambda answer, balanced, structural: {"answer": answer, "isBalanced": balanced,  # noqa: E731
                                              "types": {"structural": structural, "semantic": "rel"}}
    return write_json(tmp_path / "testdev_all_questions.json", {
        "1": q("yes", True, "verify"), "2": q("left", True, "query"), "3": q("table", True, "query"),
        "4": q("no", False, "logical"), "5": q("red", False, "query")})


def test_gqa_all_questions_file_scores_only_balanced_ones(tmp_path):
    answers = [ans("1", "Yes"), ans("2", "left."), ans("3", "chair"), ans("4", "no"), ans("5", "red")]
    result = scoring.score("gqa", answers, gqa_all_questions(tmp_path))
    # 2 of the 3 balanced right; the 2 unbalanced answers (both right) count nowhere.
    assert result == {"accuracy": 66.67, "count": 3, "per_answer_type": {"binary": 100.0, "open": 50.0},
                      "unbalanced_answered": 2, "answered": 3, "total": 3, "unanswered": 0}
    only_unbalanced_wrong = scoring.score("gqa", [ans("1", "yes"), ans("4", "yes")], gqa_all_questions(tmp_path))
    assert (only_unbalanced_wrong["accuracy"], only_unbalanced_wrong["unanswered"]) == (100.0, 2)


def test_gqa_balanced_must_be_a_boolean(tmp_path):
    path = write_json(tmp_path / "q.json", {"7": {"answer": "yes", "isBalanced": "true"}})
    with pytest.raises(ScoringError, match=r"q.json: question '7': 'isBalanced' must be true or false, not 'true'"):
        scoring.score("gqa", [ans("7", "yes")], path)


# ----- POPE ---------------------------------------------------------------------------------------------------

POPE_SPLITS = {  # split -> [(label, reply)]
    "random": [("yes", "Yes, there is a dog."), ("yes", "No."), ("no", "No, there is not."), ("no", "Yes")],
    "popular": [("yes", "Yes"), ("yes", "yes"), ("yes", "no"), ("no", "There is no cat.")],
    "adversarial": [("no", "There is not a cat"), ("no", "I see no cat"), ("yes", "Yes"),
                    ("yes", "There is a cat. No doubt.")],  # only the first sentence counts
}


def pope_dir(tmp_path):
    folder = tmp_path / "coco"
    folder.mkdir(exist_ok=True)
    for split, rows in POPE_SPLITS.items():
        write_jsonl(folder / f"coco_pope_{split}.json",
                    [{"question_id": i + 1, "image": f"{i}.jpg", "text": "Is there a dog in the image?", "label": lab}
                     for i, (lab, _) in enumerate(rows)])
    return str(folder)


def pope_answers():
    return [ans(i + 1, reply, category=split) for split, rows in POPE_SPLITS.items()
            for i, (_, reply) in enumerate(rows)]


def test_pope_metrics_per_split_and_mean_f1(tmp_path):
    result = scoring.score("pope", pope_answers(), pope_dir(tmp_path))
    random_, popular, adversarial = (result["splits"][s] for s in pope.SPLITS)
    assert (random_["tp"], random_["fp"], random_["tn"], random_["fn"]) == (1, 1, 1, 1)
    assert random_ == {**random_, "accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0}
    assert (popular["tp"], popular["fp"], popular["tn"], popular["fn"]) == (2, 0, 1, 1)
    assert popular == {**popular, "accuracy": 75.0, "precision": 100.0, "recall": 66.67, "f1": 80.0,
                       "yes_ratio": 50.0}
    assert adversarial == {**adversarial, "accuracy": 100.0, "f1": 100.0}
    assert result["mean_f1"] == 76.67  # (50 + 80 + 100) / 3
    assert scoring.headline("pope", result) == 76.67


def llava_pope_questions(tmp_path):
    """LLaVA's llava_pope_test.jsonl: every split's questions with ids of its own (here 100 + n), in the order of
    the split files, and the split in `category`."""
    rows, n = [], 0
    for split, labels in POPE_SPLITS.items():
        for i in range(len(labels)):
            rows.append({"question_id": 100 + n, "image": f"{i}.jpg", "text": "Is there a dog in the image?\nAnswer "
                         "the question using a single word or phrase.", "category": split})
            n += 1
    return write_jsonl(tmp_path / "llava_pope_test.jsonl", rows), rows


def test_pope_llava_answer_files_pair_by_position_in_the_question_file(tmp_path):
    questions, rows = llava_pope_questions(tmp_path)
    replies = [reply for split_rows in POPE_SPLITS.values() for _, reply in split_rows]
    # model_vqa_loader's records: question_id, prompt, text, answer_id, model_id, metadata; no category.
    llava = [{"question_id": r["question_id"], "prompt": r["text"], "text": reply, "answer_id": "x",
              "model_id": "m", "metadata": {}} for r, reply in zip(rows, replies)]
    ours = scoring.score("pope", pope_answers(), pope_dir(tmp_path))
    theirs = scoring.score("pope", llava, pope_dir(tmp_path), questions=questions)
    assert theirs == ours and theirs["mean_f1"] == 76.67
    # Any order pairs the same; a missing answer is unanswered, not a shift of the later pairs.
    assert scoring.score("pope", llava[::-1], pope_dir(tmp_path), questions=questions) == ours
    partial = scoring.score("pope", llava[1:], pope_dir(tmp_path), questions=questions)
    assert partial["splits"]["popular"] == ours["splits"]["popular"] and partial["unanswered"] == 1
    # Both kinds in one file.
    mixed = pope_answers()[:4] + llava[4:]
    assert scoring.score("pope", mixed, pope_dir(tmp_path), questions=questions) == ours


def test_pope_llava_answers_need_the_question_file_and_a_matching_one(tmp_path):
    questions, rows = llava_pope_questions(tmp_path)
    llava = [ans(r["question_id"], "yes") for r in rows]
    with pytest.raises(ScoringError, match=r"answers without 'category' .* \(--questions llava_pope_test.jsonl\)"):
        scoring.score("pope", llava, pope_dir(tmp_path))
    rows[5]["image"] = "other.jpg"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ScoringError, match=r"bad.jsonl:6: image 'other.jpg', but the popular label at the same "
                                           r"position \(.*coco_pope_popular.json:2\) is for '1.jpg'"):
        scoring.score("pope", llava, pope_dir(tmp_path), questions=bad)
    extra = write_jsonl(tmp_path / "extra.jsonl", rows[:4] + [dict(rows[0], question_id=999)])
    with pytest.raises(ScoringError, match=r"extra.jsonl:5: question 5 of split 'random', but coco_pope_random"):
        scoring.score("pope", llava, pope_dir(tmp_path), questions=extra)
    with pytest.raises(ScoringError, match=r"answer 1 \(question_id 555\) has no annotation"):
        scoring.score("pope", [ans(555, "yes")], pope_dir(tmp_path), questions=questions)
    with pytest.raises(ScoringError, match="questions file .*: only POPE's scoring reads one"):
        scoring.score("gqa", [ans(1, "yes")], str(tmp_path), questions=questions)


def test_pope_split_without_yes_divides_by_nothing(tmp_path):
    # Every reply "no": no predicted yes (eval_pope.py divides by zero for precision).
    all_no = [ans(i + 1, "No", category=split) for split, rows in POPE_SPLITS.items() for i in range(len(rows))]
    result = scoring.score("pope", all_no, pope_dir(tmp_path))
    for split in pope.SPLITS:
        assert result["splits"][split]["precision"] == result["splits"][split]["f1"] == 0.0
        assert result["splits"][split]["yes_ratio"] == 0.0
    assert result["mean_f1"] == 0.0 and result["mean_accuracy"] == 41.67  # 2, 1 and 2 of 4 labels are "no"
    # A split whose labels hold no "yes" (recall undefined): answer only random's two "no" questions.
    only_no = scoring.score("pope", [ans(3, "Yes", category="random"), ans(4, "No", category="random")],
                            pope_dir(tmp_path))
    assert only_no["splits"]["random"] == {**only_no["splits"]["random"], "recall": 0.0, "f1": 0.0,
                                           "accuracy": 50.0, "tp": 0, "fn": 0}


@pytest.mark.parametrize("reply, yes", [("No", False), ("no.", False), ("It is not.", False), ("Nope", True),
                                        ("Not sure", True), ("Yes. No.", True)])
def test_pope_reply_parsing_is_llavas_word_test(reply, yes):
    assert pope.says_yes(reply) is yes


# ----- MME ----------------------------------------------------------------------------------------------------

Q_DOG = "Is there a dog in this image? Please answer yes or no."
Q_CAT = "Is there a cat in this image?  Please answer yes or no."  # MME's files do have double spaces


def mme_dir(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    flat = root / "existence"  # images and question files side by side
    flat.mkdir(parents=True)
    for stem in ("0001", "0002"):
        (flat / f"{stem}.png").write_bytes(b"")
        (flat / f"{stem}.txt").write_text(f"{Q_DOG}\tYes\n{Q_CAT}\tNo\n")
    nested = root / "artwork"  # images/ and questions_answers_YN/
    (nested / "images").mkdir(parents=True)
    (nested / "questions_answers_YN").mkdir()
    (nested / "questions_answers_YN" / "10002.txt").write_text("Is this artwork by Monet? Please answer yes or "
                                                               "no.\tNo\nIs this artwork by Manet? Please answer "
                                                               "yes or no.\tYes\n")
    return str(root)


def mme_answer(qid, question, text):
    return ans(qid, text, prompt=question + "\nAnswer the question using a single word or phrase.",
               category=qid.split("/")[0])


def mme_answers():
    return [mme_answer("existence/0001.png", "Is there a dog in this image?", "Yes"),
            mme_answer("existence/0001.png", "Is there a cat in this image?", "No, there is no cat."),
            mme_answer("existence/0002.png", "Is there a dog in this image?", "Yes, a brown one."),
            mme_answer("existence/0002.png", "Is there a cat in this image?", "maybe"),  # neither: wrong
            mme_answer("artwork/10002.jpg", "Is this artwork by Monet? Please answer yes or no.", "No"),
            mme_answer("artwork/10002.jpg", "Is this artwork by Manet?", "yes")]


def test_mme_acc_acc_plus_and_totals(tmp_path):
    result = scoring.score("mme", mme_answers(), mme_dir(tmp_path))
    assert result["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4,
                                               "images": 2}
    assert result["subtasks"]["artwork"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "questions": 2,
                                             "images": 1}
    assert (result["perception"], result["cognition"]) == (325.0, 0.0)
    assert scoring.headline("mme", result) == 325.0
    assert "code_reasoning" in result["missing_subtasks"]


def test_mme_image_answered_in_part_is_left_out_of_acc_plus(tmp_path):
    result = scoring.score("mme", mme_answers()[1:], mme_dir(tmp_path))
    assert result["subtasks"]["existence"] == {"acc": 66.67, "acc_plus": 0.0, "score": 66.67, "questions": 3,
                                               "images": 1}
    assert (result["answered"], result["total"]) == (5, 6)


def test_mme_tabs_and_newlines(tmp_path):
    # Ground truth with CRLF line ends and a blank line; replies and prompts with tabs and newlines.
    root = mme_dir(tmp_path)
    (tmp_path / "MME_Benchmark_release_version" / "existence" / "0001.txt").write_bytes(
        f"{Q_DOG}\tYes\r\n\r\n{Q_CAT}\tNo\r\n".encode())
    answers = [mme_answer("existence/0001.png", "Is there a dog\nin this image?", "Yes\tit is"),
               mme_answer("existence/0001.png", "Is there a cat in this image?", "no\n\nno cat")]
    result = scoring.score("mme", answers, root)
    assert result["subtasks"]["existence"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "questions": 2,
                                               "images": 1}


def test_mme_malformed_ground_truth_line(tmp_path):
    root = mme_dir(tmp_path)
    (tmp_path / "MME_Benchmark_release_version" / "existence" / "0002.txt").write_text("no tab here\n")
    with pytest.raises(ScoringError, match=r"0002\.txt:1: want 'question<TAB>yes\|no'"):
        scoring.score("mme", mme_answers(), root)


# ----- MMMU ---------------------------------------------------------------------------------------------------

OPTIONS = ["Baroque", "Rococo", "Gothic", "Romanesque"]


@pytest.mark.parametrize("reply, letter", [
    ("The answer is (B)", "B"), ("B", "B"), ("B.", "B"), ("(A) is wrong, so (C) is right", "C"),
    ("I think it is C because of the arches", "C"),
    ("This painting is clearly in the Rococo style", "B"),  # no letter: an option's text, in a long reply
])
def test_mmmu_multiple_choice_parsing(reply, letter):
    assert mmmu.parse_multi_choice(reply, OPTIONS, random.Random(42)) == letter


@pytest.mark.parametrize("reply, gold, correct", [
    ("The answer is 1,000", "1000", True), ("x = 3.14159", "3.14", True), ("It is Paris.", "Paris", True),
    ("The result is 1.06 m", "1.06", True), ("The answer is 12", "1.2", False), ("42", ["41", "42"], True),
])
def test_mmmu_open_answers(reply, gold, correct):
    assert mmmu.eval_open(gold, mmmu.parse_open(reply)) is correct


def test_mmmu_accuracy_per_discipline(tmp_path):
    path = write_json(tmp_path / "answer_dict_val.json", {
        "validation_Art_1": {"question_type": "multiple-choice", "ground_truth": "B", "options": OPTIONS},
        "validation_Math_2": {"question_type": "open", "ground_truth": "1.06"},
        "validation_Physics_3": {"question_type": "multiple-choice", "ground_truth": "A", "options": str(OPTIONS)},
        "validation_History_4": {"question_type": "multiple-choice", "ground_truth": "A"},
    })
    answers = [ans("validation_Art_1", "(B)"), ans("validation_Math_2", "The result is 1.06 m"),
               ans("validation_Physics_3", "C"), ans("validation_History_4", "A", options=OPTIONS)]
    result = scoring.score("mmmu", answers, path)
    assert result["accuracy"] == 75.0
    assert result["per_discipline"] == {"Art & Design": 100.0, "Science": 50.0, "Humanities & Social Science": 100.0}
    with pytest.raises(ScoringError, match="validation_History_4: a multiple-choice question needs 'options'"):
        scoring.score("mmmu", [ans("validation_History_4", "A")], path)


# ----- submissions, Table 3 -----------------------------------------------------------------------------------


def test_mmvet_submission_and_no_offline_score(tmp_path):
    answers = [ans(0, "A cat on a mat."), ans(1, "42")]
    with pytest.raises(ScoringError, match=r"mmvet_submission\(answers, path\)"):
        scoring.score("mmvet", answers, str(tmp_path / "nothing"))
    assert list(tmp_path.iterdir()) == []
    scoring.mmvet_submission(answers, str(tmp_path / "mmvet.json"))
    assert json.loads((tmp_path / "mmvet.json").read_text()) == {"v1_0": "A cat on a mat.", "v1_1": "42"}
    assert scoring.headline("mmvet", {"submission": "mmvet.json"}) is None


def test_vqav2_submission(tmp_path):
    out = str(tmp_path / "sub.json")
    scoring.vqav2_submission([ans("5", "Two dogs."), ans(7, "Yes")], out, question_ids=[5, 6, 7])
    assert json.loads(open(out).read()) == [{"question_id": 5, "answer": "2 dogs"},
                                            {"question_id": 7, "answer": "yes"}, {"question_id": 6, "answer": ""}]


def test_markdown_table_is_table3_with_the_model_last():
    table = scoring.markdown_table({"gqa": {"accuracy": 61.234}, "mme": {"perception": 1200.04},
                                    "mmvet": {"submission": "x.json"}}, "my|model").split("\n")
    assert table[0] == "| Decoder | VQAv2 | GQA | TextVQA | MM-Vet | POPE | MME | MMMU |"
    assert table[2] == "| Qwen2-0.5B | 72.3 | 55.8 | 45.2 | 19.5 | 86.6 | 1153.0 | 29.7 |"
    assert table[9] == "| Llama-3.2-3B + HiMix | 78.4 | 61.4 | 54.4 | 30.2 | 86.6 | 1261.9 | 35.6 |"
    assert table[10] == "| my/model |  | 61.2 |  |  |  | 1200.0 |  |"
    assert len(table) == 11 and len(scoring.PAPER_TABLE3) == 8


# ----- the CLI ------------------------------------------------------------------------------------------------


def test_cli_prints_the_result_json_last(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", [ans(1, "Two"), ans(2, "2"), ans(3, "Red."), ans(4, "red")])
    assert scoring.score_main(["score", "--benchmark", "vqav2", "--answers", answers,
                               "--annotations", vqav2_annotations(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0] == "vqav2: accuracy 70.0"
    assert json.loads(lines[-1])["accuracy"] == 70.0


def test_cli_submissions(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "a.jsonl", [ans(0, "Two dogs.")])
    assert scoring.score_main(["--benchmark", "vqav2", "--answers", answers, "--submission", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s").read_text()) == [{"question_id": 0, "answer": "2 dogs"}]
    assert scoring.score_main(["--benchmark", "mmvet", "--answers", answers, "--submission", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out.strip().split("\n")[-1]) == {"submission": str(tmp_path / "m"),
                                                                          "answered": 1}
    assert scoring.score_main(["--benchmark", "mmvet", "--answers", answers]) == 2
    assert "GPT-4" in capsys.readouterr().err


def test_cli_help_names_every_benchmarks_formats(capsys):
    with pytest.raises(SystemExit):
        scoring.score_main(["score", "--help"])
    out = capsys.readouterr().out
    for benchmark in scoring.BENCHMARKS:
        section = re.split(r"\n  \w+:\n", out.split(f"\n  {benchmark}:\n")[1])[0]
        assert section.lstrip().startswith("--answers") and "\n    --annotations " in section, benchmark
    for name in ("v2_mscoco_val2014_annotations.json", "isBalanced", "TextVQA_0.5.1_val.json",
                 "llava_pope_test.jsonl", "coco_pope_", "MME_Benchmark_release_version", "answer_dict_val.json"):
        assert name in out.replace("\n                   ", " "), name


def test_cli_pope_with_llavas_question_file(tmp_path, capsys):
    questions, rows = llava_pope_questions(tmp_path)
    answers = write_jsonl(tmp_path / "merge.jsonl", [ans(r["question_id"], "Yes") for r in rows])
    assert scoring.score_main(["--benchmark", "pope", "--answers", answers, "--annotations", pope_dir(tmp_path),
                               "--questions", questions]) == 0
    result = json.loads(capsys.readouterr().out.strip().split("\n")[-1])
    assert result["splits"]["random"]["yes_ratio"] == 100.0 and result["answered"] == 12
    assert scoring.score_main(["--benchmark", "gqa", "--answers", answers, "--annotations", questions,
                               "--questions", questions]) == 2
    assert "--questions: only pope's scoring reads a question file" in capsys.readouterr().err


def test_cli_bad_json_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ans(1, "yes")) + "\n{not json\n")
    assert scoring.score_main(["--benchmark", "gqa", "--answers", str(path), "--annotations", "x.json"]) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err


# ----- errors -------------------------------------------------------------------------------------------------


def test_answer_without_annotation(tmp_path):
    path = vqav2_annotations(tmp_path)
    with pytest.raises(ScoringError, match=rf"answers.jsonl: answer 2 \(question_id 99\) has no annotation in {path}"):
        scoring.score("vqav2", [ans(1, "2"), ans(99, "red")], path, source="answers.jsonl")


def test_missing_annotation_file(tmp_path):
    for benchmark, what in (("vqav2", "file"), ("gqa", "file"), ("textvqa", "file"), ("mmmu", "file"),
                            ("pope", "directory"), ("mme", "directory")):
        with pytest.raises(ScoringError, match=f"{tmp_path}/missing: no such {what}"):
            scoring.score(benchmark, [ans(1, "yes")], str(tmp_path / "missing"))
    with pytest.raises(ScoringError, match=r"coco_pope_random.json: no such file"):
        scoring.score("pope", pope_answers(), str(tmp_path))


def test_duplicate_question_ids(tmp_path):
    with pytest.raises(ScoringError, match=r"question_id '1' is answered twice \(answers 1 and 2\)"):
        scoring.score("vqav2", [ans(1, "2"), ans("1", "3")], vqav2_annotations(tmp_path))
    path = write_json(tmp_path / "dup.json", {"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}] * 2})
    with pytest.raises(ScoringError, match=r"dup.json: question_id 1 appears twice"):
        scoring.score("vqav2", [ans(1, "a")], path)
    with pytest.raises(ScoringError, match="answered twice"):
        scoring.mmvet_submission([ans(0, "a"), ans(0, "b")], str(tmp_path / "m.json"))


def test_malformed_records(tmp_path):
    path = vqav2_annotations(tmp_path)
    with pytest.raises(ScoringError, match=r"answer 1 \(question_id 1\): no 'text' field"):
        scoring.score("vqav2", [{"question_id": 1}], path)
    with pytest.raises(ScoringError, match=r"answer 1: no 'question_id' field"):
        scoring.score("vqav2", [{"text": "a"}], path)
    with pytest.raises(ScoringError, match="no answers to score"):
        scoring.score("vqav2", [], path)
    with pytest.raises(ScoringError, match=r"want a JSON object with a list 'annotations'"):
        scoring.score("vqav2", [ans(1, "a")], write_json(tmp_path / "bad.json", [1, 2]))
    with pytest.raises(ScoringError, match="benchmark 'vizwiz'"):
        scoring.score("vizwiz", [ans(1, "a")], path)


def test_pope_answer_without_split(tmp_path):
    with pytest.raises(ScoringError, match=r"question_id 1\) has no annotation .* names its split in 'category'"):
        scoring.score("pope", [ans(1, "yes", category="rare")], pope_dir(tmp_path))


def test_unwritable_submission_path(tmp_path):
    with pytest.raises(ScoringError, match=r"MM-Vet submission file .*/no/such/dir/m.json: cannot write it"):
        scoring.mmvet_submission([ans(0, "a")], str(tmp_path / "no" / "such" / "dir" / "m.json"))
