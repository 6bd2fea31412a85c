"""Answer normalisation of the VQA benchmarks, rule for rule as their official tools apply it today.

Two tools are reproduced:

* `vqa_process_punctuation` / `vqa_process_digit_article` (and `vqa_normalize`, the two after vqaEval's
  whitespace step): the official VQA evaluation code, `vqaEval.py` of GT-Vision-Lab/VQA at a013f00 (2021-03-11,
  the newest revision; the VQAv2 evaluation server scores with these rules). Its punctuation list and
  contraction table have been EvalAI's since 2015-2016, so both tools share `PUNCTUATION` and `CONTRACTIONS`.
  Its first 2015 revision, which this module used to follow, differed on every one of these points: it also
  stripped ':' and "'", kept '-', '!', '{' and '}', and expanded contractions with a typographic apostrophe
  ("dont" -> "don\u2019t"), none of which today's code or EvalAI does. What it does with the ten human answers
  (processed only when they are not all equal) is scoring.py's `vqav2_accuracy`.
* `evalai_process`: the EvalAI answer processor (MMF's `EvalAIAnswerProcessor`, vendored as LLaVA's
  `m4c_evaluator.EvalAIAnswerProcessor` and lmms-eval's `vqa_eval_metric.EvalAIAnswerProcessor`): vqaEval's
  rules after a tokenising step. LLaVA runs it over every prediction before a VQAv2 submission, and TextVQA's
  evaluator runs it over predictions and human answers alike.

tests/eval/test_vqa_golden.py checks both against the official code's own output on a few thousand randomized
answers (tests/fixtures/vqa_golden.json, made by running that code). The quirks of the originals are kept on
purpose, since they change scores: see the comments below. One difference between running vqaEval.py under
Python 2 (as written) and Python 3 exists, and only for non-ASCII digits: Python 3's `\\d` matches them, Python
2's pattern (compiled without re.UNICODE) does not. This module behaves as the code does under Python 3.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")

# Both tools write this as "(?!<=\d)(\.)(?!\d)": the first group is a lookahead for the text "<=" and a digit,
# which can never precede a period, so in effect every period not followed by a digit goes.
_PERIOD = re.compile(r"\.(?!\d)")
# ... and both pass re.UNICODE where re.sub takes its count, so only the first 32 such periods go.
_PERIOD_COUNT = int(re.UNICODE)
# vqaEval's "(\d)(\,)(\d)". EvalAI's "(?<=\d)(\,)+(?=\d)" would also find "1,,2", but EvalAI deletes every comma
# before it searches, so there it never finds anything.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The contracted forms the tools restore. A form with one apostrophe is looked up without it ("dont");
# a form with several is looked up with any one of them missing ("couldnt've", "couldn'tve"), not with all.
# The lookup happens after lowercasing, so the forms with a capital ("Im", "Id've") never match.
_SINGLE = """ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll
how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't
should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's
there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's
what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't
y'all you'd you'll you're you've""".split()
_MULTIPLE = """couldn't've hadn't've he'd've I'd've it'd've mightn't've she'd've shouldn't've somebody'd've
someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've y'all'll 'ow's'at
y'all'd've""".split()


def _contractions() -> dict[str, str]:
    table = {}
    for form in _SINGLE:
        table[form.replace("'", "")] = form
    for form in _MULTIPLE:
        marks = [i for i, c in enumerate(form) if c == "'"]
        for drop in marks:
            table[form[:drop] + form[drop + 1:]] = form
    # Entries of the originals that follow no pattern; "somebody'd" even maps backwards.
    table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
    return table


CONTRACTIONS = _contractions()


def _punctuation(text: str) -> str:
    # A mark touching a space, or any mark at all once "1,000"-style digits appear, is deleted; any other
    # mark becomes a space ("black-and-white" -> "black and white"). Both tests look at the input text.
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if glue or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_whitespace(text: str) -> str:
    """What vqaEval.py does to every answer, human or predicted: tabs and newlines to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation."""
    return _punctuation(text)


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lowercase, number words to digits, articles out, contractions fixed."""
    return _digit_article(text)


def vqa_normalize(text: str) -> str:
    """What vqaEval.py does to an answer when the ten human answers are not all equal: whitespace, punctuation,
    digits/articles."""
    return vqa_process_digit_article(vqa_process_punctuation(vqa_whitespace(text)))


def evalai_process(text: str) -> str:
    """The EvalAI answer processor: "Two dogs." -> "2 dogs", "1,000" -> "1000", "It's a cat" -> "it 's cat"."""
    # Its tokenising step: commas and question marks go before the punctuation rules see the text (so the
    # digit-comma-digit test there never fires), and "'s" is split off as a word of its own.
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digit_article(_punctuation(vqa_whitespace(text)))
