"""Exports in the real lmms-eval (`make test-lmms-eval`: its own venv with the newest release), not a replay.

A tiny HiMix export runs in lmms-eval's `huggingface` model and a tiny vanilla export in its `llava_hf` model,
through lmms-eval's own classes: a local YAML task (written here, with images made here) is loaded by its
TaskManager, which builds the `generate_until` requests as for any task; the model answers them; and the same
task runs once through `python -m lmms_eval`. Every prompt (the token ids the export's processor makes of
lmms-eval's chat-templated text) and every answer must equal himix-eval's for the same question and checkpoint.

lmms-eval reports the chat-templated text of each request through its cache hook (`add_partial`), which is how
these tests read the prompts. lmms-eval's `huggingface` model loads in bfloat16 (hard-coded), so himix-eval
runs in bfloat16 there; `llava_hf` takes `dtype`, float32 here.

Skipped where lmms-eval is not installed (the main venv): it cannot install beside the lock (the Makefile's
test-lmms-eval says why; docs/evaluation.md, "With lmms-eval").
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval")


def _import_datasets():
    """datasets imports the `multiprocess` package, which tests/multiprocess.py (a helper of the other tests,
    on sys.path through conftest.py) shadows: import them with the tests folder off the path."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        for name in ("multiprocess.pool", "datasets"):
            importlib.import_module(name)
    finally:
        sys.path[:] = saved


_import_datasets()

from himix_megatron.checkpoint import ModelDescription, build_model, save_checkpoint  # noqa: E402
from himix_megatron.config import ParallelConfig  # noqa: E402
from himix_megatron.data.templates import TemplateConfig  # noqa: E402
from himix_megatron.eval import generate  # noqa: E402
from himix_megatron.eval.prompts import read_questions  # noqa: E402
from model_utils import TINY_LM, TINY_VISION, randomize  # noqa: E402

TASK = "himix_tiny"
MAX_NEW_TOKENS = 6
QUESTIONS = ["what colour is the square", "how many circles", "is there a red circle",
             "what colour is the circle on the left of the square"]

TASK_YAML = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


class Prompts:
    """lmms-eval's CacheHook interface: every (chat-templated text, generation kwargs) -> answer it reports."""

    def __init__(self):
        self.seen = []

    def add_partial(self, attr, req, res):
        self.seen.append((attr, req[0], res))


def write_task(folder, docs):
    """A local lmms-eval task in `folder`: its YAML, utils.py and JSONL data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(data=folder / "data.jsonl"))
    (folder / "utils.py").write_text(TASK_UTILS)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images, the task (folder tasks/) and the same questions as himix-eval's question file."""
    root = tmp_path_factory.mktemp("task")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    docs, questions = [], []
    for i, text in enumerate(QUESTIONS):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(root / "images" / name)
        docs.append({"question_id": i, "image": str(root / "images" / name), "question": text, "answer": "red"})
        questions.append({"question_id": i, "image": name, "text": text})
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    write_task(root / "tasks", docs)
    return root


# The checkpoints: HiMix with the template's default system prompt, HiMix trained with another one (recorded in
# the checkpoint; lmms-eval sends no system message, so the export's chat template must carry it), and vanilla.
CHECKPOINTS = {"himix": ("himix", None), "himix-own-system": ("himix", "a red square is on the left"),
               "vanilla": ("vanilla", None)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, single_rank):
    """name -> HF export of a random tiny checkpoint (CHECKPOINTS), made by himix-eval's own export route, with
    the word-level tokenizer of the demo data."""
    from himix_megatron.data.synthetic import write_word_tokenizer

    root = tmp_path_factory.mktemp("exports")
    tok = str(root / "tok")
    write_word_tokenizer(tok)
    built = {}

    def get(name):
        if name not in built:
            arch, system = CHECKPOINTS[name]
            description = ModelDescription(arch, TINY_LM, TINY_VISION, TemplateConfig().name, system_prompt=system)
            chunks, encoder = build_model(description, ParallelConfig())
            randomize(chunks + [encoder], 2, scale=1.0)  # a seed whose greedy answers are not all empty
            path = str(root / f"{name}-ckpt")
            save_checkpoint(path, chunks, description, iteration=1, encoder=encoder, tokenizer_dir=tok)
            built[name] = generate.hf_directory(path, str(root / "out"), log=lambda _: None)
        return built[name]

    return get


def himix_eval(directory, data, dtype):
    """himix-eval's prompt ids and answers for the task's questions, one question at a time."""
    m = generate.load_model(directory, template=None, dtype=dtype, log=lambda _: None)
    qs = read_questions(str(data / "questions.jsonl"))
    return m, [generate._ids(m, q) for q in qs], \
        [generate.answer_batch(m, [q], str(data / "images"), MAX_NEW_TOKENS)[0] for q in qs]


def task_requests(data, lm):
    """The task's generate_until requests, built by lmms-eval's TaskManager as for any of its tasks."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([TASK], TaskManager(include_path=str(data / "tasks")), "chat")[TASK]
    task.build_all_requests(rank=0, world_size=1)
    lm.task_dict = {TASK: task.dataset}
    requests = sorted(task.instances, key=lambda r: r.doc_id)
    assert [r.request_type for r in requests] == ["generate_until"] * len(QUESTIONS)
    return requests


def lmms_eval_run(lm, requests):
    """(prompt ids, answers) of lmms-eval's own generate_until."""
    hook = Prompts()
    lm.set_cache_hook(hook)
    results = lm.generate_until(requests)
    answers = [getattr(r, "text", r) for r in results]
    assert [res for _, _, res in hook.seen] == answers
    return [text for _, text, _ in hook.seen], answers


def _images(data):
    return [Image.open(data / "images" / f"img{i}.png").convert("RGB") for i in range(len(QUESTIONS))]


@pytest.mark.parametrize("name", ["himix", "himix-own-system"])
def test_huggingface_model_on_a_himix_export(exports, data, name):
    from lmms_eval.models.chat.huggingface import Huggingface

    lm = Huggingface(pretrained=exports(name), trust_remote_code=True, device="cpu", device_map="cpu", batch_size=1)
    assert type(lm.model).__name__ == "HiMixForCausalLM" and type(lm.processor).__name__ == "HiMixProcessor"
    texts, answers = lmms_eval_run(lm, task_requests(data, lm))
    m, ids, expected = himix_eval(exports(name), data, torch.bfloat16)
    if CHECKPOINTS[name][1] is not None:
        assert m.template.system == CHECKPOINTS[name][1] and all(CHECKPOINTS[name][1] in t for t in texts)
    prompts = [lm.processor(text=[t], images=[im])["input_ids"][0] for t, im in zip(texts, _images(data))]
    assert [list(p) for p in prompts] == ids
    assert answers == expected and any(answers)


def test_llava_hf_model_on_a_vanilla_export(exports, data):
    from lmms_eval.models.chat.llava_hf import LlavaHf

    lm = LlavaHf(pretrained=exports("vanilla"), device="cpu", device_map="cpu", dtype="float32", batch_size=1)
    texts, answers = lmms_eval_run(lm, task_requests(data, lm))
    _, ids, expected = himix_eval(exports("vanilla"), data, torch.float32)
    processor = lm._image_processor
    prompts = [processor(images=[im], text=t)["input_ids"][0] for t, im in zip(texts, _images(data))]
    assert [list(map(int, p)) for p in prompts] == ids
    assert answers == expected and any(answers)


def test_cli_runs_the_local_task_on_the_himix_export(exports, data, tmp_path):
    """`python -m lmms_eval` on the task, its answers as the targets: the samples it logs are himix-eval's
    answers, and its exact_match is 1."""
    _, _, expected = himix_eval(exports("himix"), data, torch.bfloat16)
    docs = [json.loads(line) for line in open(data / "tasks" / "data.jsonl")]
    tasks = write_task(tmp_path / "tasks", [dict(d, answer=a) for d, a in zip(docs, expected)])
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "huggingface", "--model_args",
           f"pretrained={exports('himix')},trust_remote_code=True,device=cpu,device_map=cpu", "--tasks", TASK,
           "--include_path", str(tasks), "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = {}
    for path in out.rglob(f"*_samples_{TASK}.jsonl"):
        samples.update((s["doc_id"], s) for s in map(json.loads, open(path)))
    assert sorted(samples) == list(range(len(QUESTIONS))), run.stdout[-3000:]
    answers = [samples[i]["filtered_resps"] for i in range(len(QUESTIONS))]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    assert answers == expected and any(answers)
    assert [samples[i]["input"] for i in range(len(QUESTIONS))] == QUESTIONS
    (results,) = [json.load(open(p)) for p in out.rglob("*_results.json")]
    assert results["results"][TASK]["exact_match,none"] == 1.0
