"""The benchmarks' question files, and the prompts and images the model sees for them.

Question files are LLaVA's evaluation layout, which TinyLLaVA and the HiMix reference repository share: a
JSONL file of `{"question_id", "image", "text", ...}` per benchmark (e.g. `llava_vqav2_mscoco_test-dev2015.jsonl`,
`llava_gqa_testdev_balanced.jsonl`, `llava_textvqa_val_v051_ocr.jsonl`, `llava_pope_test.jsonl`, `llava_mme.jsonl`,
`llava-mm-vet.jsonl`) plus an image folder that `image` is relative to. `text` already carries the benchmark's
instruction ("Answer the question using a single word or phrase."), as LLaVA's files do; the prompt around it is
the conversation template the model was trained with (data/templates.py), so evaluation sees exactly the
tokens training did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from himix_megatron.data.image import ImageConfig, load_and_preprocess
from himix_megatron.data.templates import TemplateConfig, generation_prompt
from himix_megatron.eval.scoring_io import jsonl_records


class EvalError(ValueError):
    """A question file, image or flag that cannot be evaluated; the message names the file and field."""


@dataclass(frozen=True)
class Question:
    question_id: object  # int or str, as the benchmark's file has it (answers keep it as it is)
    text: str
    image: Optional[str]  # path relative to the image folder; None for a text-only question
    extra: dict = field(default_factory=dict)  # every other field (category, options, ...): copied into the answer

    @property
    def key(self) -> tuple:
        """What identifies a question: LLaVA's TextVQA file uses the image id as `question_id`, shared by
        the questions of one image, so the id alone is not enough."""
        return (self.question_id, self.text)


def read_questions(path: str, limit: Optional[int] = None) -> list[Question]:
    if not os.path.isfile(path):
        raise EvalError(f"--questions {path}: no such file")
    questions, seen = [], set()
    for where, record in jsonl_records(path, "a question", EvalError):
        for key in ("question_id", "text"):
            if key not in record:
                raise EvalError(f"{where}: no {key!r} field")
        qid = record.pop("question_id")
        text, image = record.pop("text"), record.pop("image", None)
        if not isinstance(text, str) or not text.strip():
            raise EvalError(f"{where}: 'text' must be a non-empty string")
        if (qid, text) in seen:
            raise EvalError(f"{where}: question_id {qid!r} appears twice with the same text")
        seen.add((qid, text))
        questions.append(Question(qid, text, image, record))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise EvalError(f"--questions {path}: holds no questions")
    return questions


def load_image(question: Question, image_folder: Optional[str], cfg: ImageConfig) -> np.ndarray:
    """[3, size, size] float32, preprocessed as training preprocesses (data/image.py)."""
    if image_folder is None:
        raise EvalError(f"question {question.question_id!r} has an image ({question.image}) but no --image-folder "
                        "was given")
    path = os.path.join(image_folder, question.image)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EvalError(f"question {question.question_id!r}: cannot read its image {path}: {e}") from None
    return load_and_preprocess(data, cfg, what=path, normalized=True)


def prompt_ids(question: Question, tokenizer, template: TemplateConfig) -> list[int]:
    """The template's generation prompt for one question. With `template.image == "mark"` one
    `template.image_token_index` stands where the image goes; with "remove", the image is not in the ids."""
    return generation_prompt([question.text], [], tokenizer, template, has_image=question.image is not None)
