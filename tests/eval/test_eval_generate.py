"""himix-eval's generation: a megatron checkpoint exported and answered greedily with the KV cache; batched
(left-padded) answers equal one-at-a-time answers and a cache-free greedy loop; ranks split the questions;
a rerun skips what is answered; bad question files are refused by file and line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from himix_megatron.checkpoint import ModelDescription, build_model, save_checkpoint
from himix_megatron.config import ParallelConfig
from himix_megatron.eval import generate
from himix_megatron.eval.prompts import EvalError, read_questions
from model_utils import TINY_LM, TINY_VISION, randomize


def _checkpoint(root, arch, tok):
    chunks, encoder = build_model(ModelDescription(arch, TINY_LM, TINY_VISION, "tinyllama"), ParallelConfig())
    randomize(chunks + [encoder], 0, scale=0.5)
    path = str(root / f"{arch}-ckpt")
    save_checkpoint(path, chunks, ModelDescription(arch, TINY_LM, TINY_VISION, "tinyllama"), iteration=5,
                    encoder=encoder, tokenizer_dir=tok)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_rank):
    """HF exports of a random tiny HiMix and vanilla checkpoint, through himix-eval's own export route."""
    from himix_megatron.data.synthetic import write_word_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tok = str(root / "tok")
    write_word_tokenizer(tok)
    ckpts = {arch: _checkpoint(root, arch, tok) for arch in ("himix", "vanilla")}
    exports = {arch: generate.hf_directory(path, str(root / "out"), log=lambda _: None) for arch, path in ckpts.items()}
    return {**exports, "himix-ckpt": ckpts["himix"], "vanilla-ckpt": ckpts["vanilla"]}


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("questions")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    lines = []
    words = ["what colour is the square", "how many circles", "is there a red circle", "what shape is it",
             "what colour is the circle on the left of the square"]
    for i, text in enumerate(words):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(root / "images" / name)
        lines.append({"question_id": i, "image": name, "text": text, "category": "demo"})
    lines.append({"question_id": "t0", "text": "what colour is the square"})  # text-only
    path = root / "q.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path), str(root / "images")


def _greedy_without_cache(m, question, folder, steps):
    ids = torch.tensor([generate._ids(m, question)])
    pixels = None
    if question.image is not None:
        from himix_megatron.eval.prompts import load_image

        pixels = torch.from_numpy(load_image(question, folder, m.image))[None]
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = m.model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0, -1]
        if hasattr(m.model.generation_config, "suppress_tokens") and m.model.generation_config.suppress_tokens:
            logits[m.model.generation_config.suppress_tokens] = -float("inf")
        token = int(logits.argmax())
        if token in m.stop_ids:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return m.tokenizer.decode([t for t in out if t not in generate.special_ids(m.model.name_or_path)]).strip()


@pytest.mark.parametrize("arch", ["himix", "vanilla"])
def test_batched_cached_answers_equal_single_and_cache_free_greedy(exported, questions, arch):
    path, folder = questions
    m = generate.load_model(exported[arch], template=None, system_prompt="", log=lambda _: None)
    assert m.template.name == "tinyllama"  # recorded by the checkpoint, carried by the export
    qs = [q for q in read_questions(path) if q.image is not None]
    batched = generate.answer_batch(m, qs, folder, max_new_tokens=6)
    single = [generate.answer_batch(m, [q], folder, max_new_tokens=6)[0] for q in qs]
    assert batched == single
    assert single == [_greedy_without_cache(m, q, folder, 6) for q in qs]
    assert any(single)  # a random model still says something


def test_ranks_split_the_questions_and_a_rerun_skips_answered_ones(exported, questions, tmp_path):
    path, folder = questions
    m = generate.load_model(exported["himix"], template=None, system_prompt="", log=lambda _: None)
    qs = read_questions(path)
    common = dict(image_folder=folder, output_dir=str(tmp_path), benchmark="demo", model_id="tiny", batch_size=4,
                  max_new_tokens=4, progress=False)
    before = generate.answered(str(tmp_path), "demo")  # what every rank reads before any of them writes
    assert generate.answer_all(m, qs, rank=0, world=2, done=before, **common) == 3
    part = tmp_path / "demo_answers.rank0.jsonl"
    with open(part, "a") as f:
        f.write('{"question_id": 99, "te')  # a kill in the middle of writing a line
    assert generate.answer_all(m, qs, rank=1, world=2, done=before, **common) == 3  # the other half
    assert generate.answer_all(m, qs, rank=0, world=1, **common) == 0  # a rerun: everything is answered
    merged, total = generate.merge_answers(str(tmp_path), "demo", qs)
    assert total == len(qs) and not list(tmp_path.glob("*.rank*.jsonl"))
    records = [json.loads(line) for line in open(merged)]
    assert [r["question_id"] for r in records] == [q.question_id for q in qs]  # the question file's order
    assert records[0]["category"] == "demo" and records[0]["model_id"] == "tiny"
    # the same answers as a single batched pass
    expected = generate.answer_batch(m, [q for q in qs if q.image is not None], folder, 4)
    assert [r["text"] for r in records[:-1]] == expected


@pytest.mark.parametrize("content, message", [
    ('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "a"}\n',
     r"q.jsonl:2: question_id 1 appears twice with the same text"),
    ('{"question_id": 1}\n', r"q.jsonl:1: no 'text' field"),
    ('not json\n', r"q.jsonl:1: not valid JSON"),
    ('', r"holds no questions"),
])
def test_bad_question_files_are_refused_by_line(tmp_path, content, message):
    (tmp_path / "q.jsonl").write_text(content)
    with pytest.raises(EvalError, match=message):
        read_questions(str(tmp_path / "q.jsonl"))


def test_a_missing_image_is_named(exported, tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question_id": 7, "image": "nope.png", "text": "what"}\n')
    m = generate.load_model(exported["himix"], template=None, system_prompt="", log=lambda _: None)
    with pytest.raises(EvalError, match=r"question 7: cannot read its image .*nope.png"):
        generate.answer_batch(m, read_questions(str(tmp_path / "q.jsonl")), str(tmp_path), 2)
    assert os.path.isdir(exported["himix"])


def test_cli_from_a_megatron_checkpoint_scores_and_resumes(exported, questions, tmp_path, capsys):
    """himix-eval on a megatron checkpoint: exported, answered, scored (GQA exact match against an
    annotation file where half the answers are the model's own), tabulated; a rerun answers nothing."""
    from himix_megatron.eval.cli import main

    path, folder = questions
    m = generate.load_model(exported["himix"], template=None, system_prompt="", log=lambda _: None)
    qs = [q for q in read_questions(path) if q.image is not None]
    own = generate.answer_batch(m, qs, folder, max_new_tokens=4)
    truth = {str(q.question_id): {"answer": text if i % 2 == 0 else "zebra"} for i, (q, text) in
             enumerate(zip(qs, own))}
    (tmp_path / "gqa.json").write_text(json.dumps(truth))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": str(q.question_id), "image": q.image,
                                                          "text": q.text}) + "\n" for q in qs))
    argv = ["--model", exported["himix-ckpt"], "--benchmark", "gqa", "--questions", str(tmp_path / "q.jsonl"),
            "--image-folder", folder, "--annotations", str(tmp_path / "gqa.json"), "--output-dir",
            str(tmp_path / "out"), "--system-prompt", "", "--max-new-tokens", "4", "--batch-size", "2",
            "--model-name", "tiny-himix", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    expected = 100.0 * sum(i % 2 == 0 or text == "zebra" for i, text in enumerate(own)) / len(own)
    assert result["accuracy"] == pytest.approx(expected)
    assert [json.loads(x)["text"] for x in open(tmp_path / "out" / "gqa_answers.jsonl")] == own
    assert "tiny-himix" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["gqa"]["accuracy"] == result["accuracy"]
    assert main(argv) == 0  # resumed: every question already answered
    assert "0 questions answered by rank 0 in this run" in capsys.readouterr().out


def test_cli_refuses_bad_flags(exported, questions, tmp_path, capsys):
    from himix_megatron.eval.cli import main

    path, folder = questions
    base = ["--model", exported["himix"], "--questions", path, "--output-dir", str(tmp_path)]
    assert main(base + ["--benchmark", "vqa-nope"]) == 2
    assert "--benchmark 'vqa-nope'" in capsys.readouterr().err
    assert main(base + ["--benchmark", "gqa", "--batch-size", "0"]) == 2
    assert "--batch-size 0 must be >= 1" in capsys.readouterr().err
    assert main(base + ["--benchmark", "gqa", "--annotations", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err


def test_textvqa_style_ids_shared_by_the_questions_of_one_image(tmp_path):
    """LLaVA's TextVQA file uses the image id as question_id: two questions of one image are two questions."""
    (tmp_path / "q.jsonl").write_text('{"question_id": "img7", "text": "what brand"}\n'
                                      '{"question_id": "img7", "text": "what year"}\n')
    qs = read_questions(str(tmp_path / "q.jsonl"))
    assert len({q.key for q in qs}) == 2
    (tmp_path / "demo_answers.jsonl").write_text("".join(
        json.dumps({"question_id": q.question_id, "prompt": q.text, "text": "x"}) + "\n" for q in qs[:1]))
    assert list(generate.answered(str(tmp_path), "demo")) == [qs[0].key]


def test_cli_fastv_on_a_vanilla_checkpoint(exported, questions, tmp_path, capsys):
    """--fastv-k/--fastv-r: the vanilla checkpoint is exported with FastV and answered by it; R = 0 gives the
    plain vanilla model's answers; an already exported model cannot take FastV flags."""
    from himix_megatron.eval.cli import main

    path, folder = questions
    answers = {}
    for r in (0.0, 0.75):
        out = tmp_path / f"r{r}"
        assert main(["--model", exported["vanilla-ckpt"], "--benchmark", "mmvet", "--questions", path,
                     "--image-folder", folder, "--output-dir", str(out), "--system-prompt", "", "--max-new-tokens",
                     "4", "--fastv-k", "2", "--fastv-r", str(r), "--no-progress"]) == 0
        assert json.loads((next(out.glob("hf-export-*")) / "config.json").read_text())["fastv_k"] == 2
        answers[r] = [json.loads(x)["text"] for x in open(out / "mmvet_answers.jsonl")]
    m = generate.load_model(exported["vanilla"], template=None, system_prompt="", log=lambda _: None)
    qs = read_questions(path)
    plain = generate.answer_batch(m, [q for q in qs if q.image is not None], folder, 4)
    assert answers[0.0][:-1] == plain
    assert main(["--model", exported["vanilla"], "--benchmark", "mmvet", "--questions", path, "--output-dir",
                 str(tmp_path / "x"), "--fastv-k", "2", "--fastv-r", "0.5"]) == 2
    assert "already exported" in capsys.readouterr().err


class _Scripted(torch.nn.Module):
    """A model whose `generate` appends fixed ids: what an answer makes of them, whatever a model says."""

    def __init__(self, directory, tail):
        super().__init__()
        self.name_or_path, self.tail, self.weight = directory, tail, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.tail] * len(input_ids))], dim=1)


def test_answers_leave_special_tokens_out_as_llava_decodes_them(tmp_path):
    """LLaVA's model_vqa and lmms-eval decode with skip_special_tokens=True: <unk>, <pad>, BOS never reach an
    answer; the first stop token ends it."""
    from transformers import AutoTokenizer

    from himix_megatron.data.image import ImageConfig
    from himix_megatron.data.synthetic import write_word_tokenizer
    from himix_megatron.data.templates import TemplateConfig
    from himix_megatron.data.tokenizer import load_tokenizer

    write_word_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    word = lambda w: hf.convert_tokens_to_ids(w)  # noqa: E731
    tail = [hf.unk_token_id, word("red"), hf.pad_token_id, hf.bos_token_id, word("circle"), hf.eos_token_id,
            word("square")]
    m = generate.Model(_Scripted(str(tmp_path), tail), "himix", tok, TemplateConfig(system=""), ImageConfig(), 0,
                       [hf.eos_token_id], torch.device("cpu"))
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "what colour"}\n')
    question = read_questions(str(tmp_path / "q.jsonl"))
    assert generate.answer_batch(m, question, None, max_new_tokens=len(tail)) == ["red circle"]
