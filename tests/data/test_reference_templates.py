"""Our templates against the HiMix authors' own code: ids and label masks that `tinyllava/data/template` (commit
417fac3, transformers 4.44) produced for the conversations of tests/fixtures/reference_templates, with the
tokenizers stored there (sentencepiece legacy and not, byte-level BPE with and without BOS). See that folder's
README for how the fixture was made and how to regenerate it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from himix_megatron.data import TemplateConfig, encode_conversation, load_tokenizer, parse_conversation
from himix_megatron.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "reference_templates"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CASES = {c["name"]: c for c in json.loads((FIXTURE / "cases.json").read_text())["cases"]}
RUNS = [(r["template"], r["tokenizer"], name) for r in EXPECTED["results"] for name in r["cases"]]
# The reference finds answers by splitting the rendered text at " ASSISTANT: "; an answer holding that string
# trains nothing there (its "tokenization mismatch" path). Ours trains the answers (templates.py docstring).
REFERENCE_BUG = {"answer_contains_separator"}


def _reference(template: str, kind: str, name: str) -> dict:
    return next(r for r in EXPECTED["results"] if (r["template"], r["tokenizer"]) == (template, kind))["cases"][name]


def _ours(template: str, kind: str, name: str, image: str, max_tokens=None):
    tok = load_tokenizer(str(FIXTURE / EXPECTED["tokenizers"][kind]["path"]))
    case = CASES[name]
    conv = parse_conversation(case["conversations"], has_image=case["has_image"])
    enc = encode_conversation(conv, tok, TemplateConfig(template, image=image), max_tokens=max_tokens)
    return enc.ids, [i if t else IGNORE_INDEX for i, t in zip(enc.ids, enc.targets)]


def _vanilla_view(ids, labels, has_image: bool):
    """The reference's sequence as our vanilla model sees it: image ids carry no label, a sample with an image has
    one, a text-only sample none (the reference's pretrain template writes one anyway, for a zero image)."""
    labels = [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else x for i, x in zip(ids, labels)]
    images = [k for k, i in enumerate(ids) if i == IMAGE_TOKEN_INDEX]
    keep = [k for k in range(len(ids)) if k not in images[1 if has_image else 0:]]
    return [ids[k] for k in keep], [labels[k] for k in keep]


@pytest.mark.parametrize("template,kind,name", RUNS)
def test_himix_ids_and_labels_equal_the_reference(template, kind, name):
    ref = _reference(template, kind, name)
    ids, labels = _ours(template, kind, name, "remove")
    assert ids == ref["himix"]["input_ids"]
    if ref["mismatch_warning"]:
        assert name in REFERENCE_BUG and set(ref["himix"]["labels"]) == {IGNORE_INDEX}
        assert any(x != IGNORE_INDEX for x in labels)  # ours trains the answers
    else:
        assert labels == ref["himix"]["labels"]


@pytest.mark.parametrize("template,kind,name", RUNS)
def test_vanilla_ids_and_labels_equal_the_reference(template, kind, name):
    ref = _reference(template, kind, name)
    ids, labels = _ours(template, kind, name, "mark")
    ref_ids, ref_labels = _vanilla_view(ref["input_ids"], ref["labels"], CASES[name]["has_image"])
    assert ids == ref_ids
    if not ref["mismatch_warning"]:
        assert labels == ref_labels


@pytest.mark.parametrize("template,kind,name", [r for r in RUNS if _reference(*r).get("truncated")])
def test_truncation_keeps_what_the_reference_keeps(template, kind, name):
    """--seq-length is the reference's model_max_length: the image id counts as one of its tokens."""
    for cut in _reference(template, kind, name)["truncated"]:
        ids, labels = _ours(template, kind, name, "remove", max_tokens=cut["model_max_length"])
        assert ids == cut["himix"]["input_ids"], cut["model_max_length"]
        if not cut["mismatch_warning"]:
            assert labels == cut["himix"]["labels"], cut["model_max_length"]
