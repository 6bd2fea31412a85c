"""Greedy answers to a benchmark's questions: batched, with a KV cache, split over ranks, resumable.

The model is the Hugging Face one: an export directory as is, or a megatron checkpoint (saved at any TP/PP)
exported once into the output directory by tools/convert_checkpoint.py's code (in a subprocess: the export
runs its own world of one). transformers' `generate` then does the decoding with its KV cache; for HiMix the
cache holds each layer's vision K/V after the prefill, so the image is encoded once per question.

Decoding is greedy (temperature 0, one beam) up to `max_new_tokens`, stopping at the template's end-of-turn
token. Prompts of a batch are left-padded; questions are sorted by prompt length first so batches pad little.

Resuming: each rank appends every answer to `<benchmark>_answers.rank<r>.jsonl` as soon as its batch is
decoded, and flushes it; a rerun (at any world size) reads every part and the merged file, and skips the
questions already answered (by question id and text: see Question.key). Rank 0 finally merges them into `<benchmark>_answers.jsonl` in the question
file's order.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from himix_megatron.data.image import ImageConfig, image_config_for
from himix_megatron.data.records import DataError
from himix_megatron.data.templates import END_TOKENS, TemplateConfig, resolve_prompt
from himix_megatron.eval.prompts import EvalError, Question, load_image, prompt_ids


@dataclass
class Model:
    model: torch.nn.Module
    arch: str  # "himix" or "vanilla"
    tokenizer: object  # himix_megatron.data.tokenizer.Tokenizer
    template: TemplateConfig
    image: ImageConfig
    image_tokens: int  # vanilla: copies of the image token the sequence holds per image
    stop_ids: list[int]
    device: torch.device


def hf_directory(path: str, work_dir: str, log: Callable[[str], None] = print,
                 baselines: Optional[dict] = None) -> str:
    """`path` if it is an HF model directory; else the HF export of the megatron checkpoint it names,
    written once to `work_dir` (rank 0 calls this before the others read it). `baselines`: FastV fields
    ({"fastv_k": 2, "fastv_r": 0.5}) the export of a vanilla checkpoint is made with."""
    if os.path.isfile(os.path.join(path, "config.json")):
        if baselines:
            raise EvalError(f"--model {path} is already exported: FastV is chosen at export (tools/convert_checkpoint.py "
                            "export --fastv-k K --fastv-r R), or pass the megatron checkpoint")
        return path
    from himix_megatron.checkpoint import resolve

    iter_dir = resolve(path)  # the newest complete checkpoint, verified
    tag = "".join(f"-{k.split('_')[-1]}{v}" for k, v in sorted((baselines or {}).items()))
    out = os.path.join(work_dir, "hf-export-" + os.path.basename(os.path.dirname(os.path.abspath(iter_dir)))
                       + "-" + os.path.basename(iter_dir) + tag)
    if not os.path.isdir(out):  # the export writes a temporary directory and renames it: complete or absent
        log(f"exporting {iter_dir} to {out}")
        code = "import json, sys; from himix_megatron.convert.hf_export import export_checkpoint; " \
               "export_checkpoint(sys.argv[1], sys.argv[2], baselines=json.loads(sys.argv[3]) or None)"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        subprocess.run([sys.executable, "-c", code, iter_dir, out, json.dumps(baselines or {})], check=True, env=env)
    return out


def load_model(directory: str, *, template: Optional[str], system_prompt: Optional[str] = None,
               aspect_ratio: str = "resize", dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None, log: Callable[[str], None] = print) -> Model:
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    from himix_megatron.data.tokenizer import load_tokenizer

    device = device or torch.device("cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    if config.model_type == "himix":
        arch, image_id = "himix", config.image_token_index
        vision = config.vision_config
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    elif config.model_type in ("llava", "llava_baselines"):  # llava_baselines: FastV / gamma-MoD remote code
        arch, image_id = "vanilla", config.image_token_id
        vision = config.vision_config
        model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype) if config.model_type == "llava" \
            else AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    else:
        raise EvalError(f"{directory}/config.json: model_type {config.model_type!r} is neither a HiMix export "
                        "('himix') nor a vanilla LLaVA export ('llava', 'llava_baselines')")
    recorded = getattr(config, "himix_template", None)
    if template is None and recorded is None:
        raise EvalError(f"{directory}: the export records no conversation template; pass --template "
                        "(the one the model was trained with)")
    tokenizer = load_tokenizer(directory)
    try:
        prompt = resolve_prompt(tokenizer, template, system_prompt, recorded_template=recorded,
                                recorded_system=getattr(config, "himix_system_prompt", None),
                                where=f"{directory}/config.json", warn=log)
    except DataError as e:
        raise EvalError(str(e)) from None
    name = prompt.name
    end = END_TOKENS[name]
    stop = [tokenizer.token_id(end)] if end is not None else []
    if tokenizer.eos_id is not None:
        stop.append(tokenizer.eos_id)
    if not stop:
        raise EvalError(f"{directory}: the tokenizer has no EOS token and template {name} no end-of-turn token: "
                        "generation could not stop")
    log(f"model {directory}: arch {arch}, template {name}, system prompt {prompt.system_prompt!r}, {dtype}"
        .replace("torch.", ""))
    return Model(model.to(device).eval(), arch, tokenizer,
                 TemplateConfig.for_arch(name, arch, system=prompt.system_prompt, image_token_index=image_id),
                 _image_config(vision, directory, aspect_ratio),
                 getattr(config, "image_seq_length", 0), sorted(set(stop)), device)


def _image_config(vision_config, directory: str, aspect_ratio: str) -> ImageConfig:
    """The preprocessing of the export's vision tower (an HF SiglipVisionConfig / CLIPVisionConfig), as training's."""
    from himix_megatron.convert.layout import vision_from_hf

    where = os.path.join(directory, "config.json") + " vision_config"
    return image_config_for(vision_from_hf(vision_config.to_dict(), "hf:" + os.path.basename(directory), where),
                            aspect_ratio)


def _ids(m: Model, question: Question) -> list[int]:
    """Training's prompt ids. Vanilla: the template's image="mark" ids, with the one image id (where training
    put it) expanded to the N image tokens, as LLaVA's processor expands `<image>` (model/vanilla.py)."""
    ids = prompt_ids(question, m.tokenizer, m.template)
    if m.arch != "vanilla":
        return ids
    image = m.template.image_token_index
    return [t for i in ids for t in ([image] * m.image_tokens if i == image else [i])]


@functools.lru_cache(maxsize=None)
def special_ids(directory: str) -> frozenset:
    """The ids of the export's special tokens (BOS, UNK, PAD, <image>, ...), which answers leave out, as LLaVA's
    model_vqa and lmms-eval decode them (skip_special_tokens=True)."""
    from transformers import AutoTokenizer

    return frozenset(AutoTokenizer.from_pretrained(directory).all_special_ids)


@torch.no_grad()
def answer_batch(m: Model, questions: list[Question], image_folder: Optional[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to questions that all have an image or all have none."""
    prompts = [_ids(m, q) for q in questions]
    width = max(map(len, prompts))
    pad = m.tokenizer.pad_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=m.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=m.device)
    kwargs = {}
    if questions[0].image is not None:
        pixels = [torch.from_numpy(load_image(q, image_folder, m.image)) for q in questions]
        kwargs["pixel_values"] = torch.stack(pixels).to(m.device, next(m.model.parameters()).dtype)
    out = m.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           do_sample=False, num_beams=1, eos_token_id=m.stop_ids, pad_token_id=pad, **kwargs)
    answers, special = [], special_ids(m.model.name_or_path)
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in m.stop_ids), len(row))
        text = m.tokenizer.decode([t for t in row[:cut] if t not in special]).strip()
        answers.append(text.split("\n")[0].strip() if m.template.name == "pretrain" else text)
    return answers


# --- answer files -------------------------------------------------------------------------------------------


def answers_path(output_dir: str, benchmark: str) -> str:
    return os.path.join(output_dir, f"{benchmark}_answers.jsonl")


def _part_paths(output_dir: str, benchmark: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, f"{benchmark}_answers.rank*.jsonl")))


def read_answers(path: str) -> dict:
    """(question_id, prompt) -> answer record (see Question.key). A line cut short by a kill (the last one)
    is dropped, as never answered."""
    found = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines):
                continue  # the unfinished last line of a killed run
            raise EvalError(f"{path}:{line_no}: not valid JSON") from None
        found[(record["question_id"], record["prompt"])] = record
    return found


def answered(output_dir: str, benchmark: str) -> dict:
    found = {}
    for path in [answers_path(output_dir, benchmark)] + _part_paths(output_dir, benchmark):
        if os.path.isfile(path):
            found.update(read_answers(path))
    return found


def answer_all(m: Model, questions: list[Question], *, image_folder: Optional[str], output_dir: str,
               benchmark: str, model_id: str, batch_size: int, max_new_tokens: int, rank: int = 0,
               world: int = 1, done: Optional[dict] = None, progress: bool = True) -> int:
    """Answer this rank's share of the questions not in `done` (default: `answered(...)` now); returns how
    many it answered. Every rank must pass the same `done`, read before any rank starts writing."""
    from tqdm import tqdm

    done = answered(output_dir, benchmark) if done is None else done
    todo = [q for q in questions if q.key not in done][rank::world]
    # Batches of one kind (with or without an image), similar lengths together.
    todo.sort(key=lambda q: (q.image is None, len(q.text)))
    batches, current = [], []
    for q in todo:
        if current and (len(current) == batch_size or (current[0].image is None) != (q.image is None)):
            batches.append(current)
            current = []
        current.append(q)
    if current:
        batches.append(current)
    part = os.path.join(output_dir, f"{benchmark}_answers.rank{rank}.jsonl")
    bar = tqdm(total=len(todo), desc=f"{benchmark} (rank {rank})", disable=not progress or rank != 0)
    with open(part, "a", encoding="utf-8") as f:
        for batch in batches:
            for q, text in zip(batch, answer_batch(m, batch, image_folder, max_new_tokens)):
                record = {"question_id": q.question_id, "prompt": q.text, "text": text, "model_id": model_id,
                          **q.extra}
                f.write(json.dumps(record) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    return len(todo)


def merge_answers(output_dir: str, benchmark: str, questions: list[Question]) -> tuple[str, int]:
    """Rank 0, after every rank has finished: one answer file in question order; (path, answers)."""
    done = answered(output_dir, benchmark)
    path = answers_path(output_dir, benchmark)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for q in questions:
            if q.key in done:
                f.write(json.dumps(done[q.key]) + "\n")
    os.replace(tmp, path)
    for part in _part_paths(output_dir, benchmark):
        os.remove(part)
    return path, sum(q.key in done for q in questions)
