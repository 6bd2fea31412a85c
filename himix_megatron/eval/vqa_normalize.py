"""Answer normalisation of the VQA benchmarks, rule for rule as their official tools apply it.

Two rule sets exist, and both are needed to reproduce the published numbers:

* `evalai_process`: the EvalAI answer processor (MMF's `EvalAIAnswerProcessor`, vendored as LLaVA's
  `m4c_evaluator.EvalAIAnswerProcessor` and lmms-eval's `vqa_eval_metric.EvalAIAnswerProcessor`). LLaVA runs it
  over every prediction before a VQAv2 submission, and TextVQA's evaluator runs it over predictions and human
  answers alike.
* `vqa_process_punctuation` / `vqa_process_digit_article`: the official VQA evaluation code (`vqaEval.py`
  of GT-Vision-Lab/VQA, which the VQAv2 evaluation server runs). Its punctuation list differs from EvalAI's
  (it has ':' and "'", lacks '-', '!', '{' and '}') and its contractions mostly carry typographic apostrophes.

The quirks of the originals are kept on purpose, since they change scores: see the comments below.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))

EVALAI_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                      ",", "?", "!")
VQA_PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")

# Both tools write this as "(?!<=\d)(\.)(?!\d)": the first group is a lookahead for the text "<=" and a digit,
# which can never precede a period, so in effect every period not followed by a digit goes.
_PERIOD = re.compile(r"\.(?!\d)")
# ... and both pass re.UNICODE where re.sub takes its count, so only the first 32 such periods go.
_PERIOD_COUNT = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The contracted forms the tools restore. A form with one apostrophe is looked up without it ("dont");
# a form with several is looked up with any one of them missing ("couldnt've", "couldn'tve"), not with all.
_SINGLE = """ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll
how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't
should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's
there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's
what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't
y'all you'd you'll you're you've""".split()
_MULTIPLE = """couldn't've hadn't've he'd've I'd've it'd've mightn't've she'd've shouldn't've somebody'd've
someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've y'all'll 'ow's'at
y'all'd've""".split()


def _contractions(apostrophe: str) -> dict[str, str]:
    table = {}
    for form in _SINGLE:
        table[form.replace("'", "")] = form.replace("'", apostrophe)
    for form in _MULTIPLE:
        marks = [i for i, c in enumerate(form) if c == "'"]
        for drop in marks:
            key = "".join(apostrophe if i in marks else c for i, c in enumerate(form) if i != drop)
            table[key] = form.replace("'", apostrophe)
    # Entries of the originals that follow no pattern; "somebody'd" even maps backwards.
    table[f"let{apostrophe}s"] = f"let{apostrophe}s"
    table[f"she{apostrophe}s"] = f"she{apostrophe}s"
    table[f"somebody{apostrophe}d"] = "somebodyd"
    return table


EVALAI_CONTRACTIONS = _contractions("'")
VQA_CONTRACTIONS = _contractions("\u2019")
# vqaEval.py's table mixes the two apostrophes in a few entries.
for _typographic in ("couldn\u2019tve", "hadn\u2019tve"):
    VQA_CONTRACTIONS[_typographic.replace("\u2019", "'")] = VQA_CONTRACTIONS.pop(_typographic)
VQA_CONTRACTIONS.update({k: EVALAI_CONTRACTIONS[k] for k in ("aint", "arent", "cant", "couldve", "couldnt", "weve",
                                                            "wheres", "whove")})


def _punctuation(text: str, marks: tuple[str, ...]) -> str:
    # A mark touching a space, or any mark at all once "1,000"-style digits appear, is deleted; any other
    # mark becomes a space ("black-and-white" -> "black and white"). Both tests look at the input text.
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in marks:
        out = out.replace(mark, "" if glue or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digit_article(text: str, contractions: dict[str, str]) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in ARTICLES)


def vqa_process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation."""
    return _punctuation(text, VQA_PUNCTUATION)


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lowercase, number words to digits, articles out, contractions fixed."""
    return _digit_article(text, VQA_CONTRACTIONS)


def vqa_normalize(text: str) -> str:
    """What vqaEval.py does to an answer: tabs and newlines to spaces, strip, punctuation, digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def evalai_process(text: str) -> str:
    """The EvalAI answer processor: "Two dogs." -> "2 dogs", "1,000" -> "1000", "It's a cat" -> "it 's cat"."""
    # Its tokenising step: commas and question marks go before the punctuation rules see the text (so the
    # digit-comma-digit test there never fires), and "'s" is split off as a word of its own.
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digit_article(_punctuation(text, EVALAI_PUNCTUATION), EVALAI_CONTRACTIONS)
