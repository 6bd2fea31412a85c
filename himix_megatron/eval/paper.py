"""The paper's Table 3 (Regular Paradigm, SigLIP encoder) and a Markdown table that sets a model beside it."""

from __future__ import annotations

from typing import Optional

from himix_megatron.eval.scoring_io import ScoringError

# (benchmark, column title), in Table 3's order.
TABLE3_COLUMNS = (("vqav2", "VQAv2"), ("gqa", "GQA"), ("textvqa", "TextVQA"), ("mmvet", "MM-Vet"),
                  ("pope", "POPE"), ("mme", "MME"), ("mmmu", "MMMU"))

# The result field each benchmark's column shows (LLaVA-style papers report POPE as the F1 averaged over its
# three splits, MME as the perception score).
HEADLINE = {"vqav2": "accuracy", "gqa": "accuracy", "textvqa": "accuracy", "pope": "mean_f1", "mme": "perception",
            "mmmu": "accuracy", "mmvet": None}


def _row(*values: float) -> dict[str, float]:
    return dict(zip((b for b, _ in TABLE3_COLUMNS), values))


# Table 3 of the paper (reference 003). The text's header row is garbled by OCR ("VOA", "GOA", "MM Vot",
# "MMM1"), but the caption lists the columns in this order, Table 4 has the same header legibly, and Table 2's
# Llama3-1B row (76.8, 59.6, 52.7, 86.7, 1335.0) confirms it; every data row reads unambiguously, so all eight
# are here. The efficiency columns (decoder params, GFLOPs) are left out: they are not benchmark scores.
PAPER_TABLE3 = {
    "Qwen2-0.5B": _row(72.3, 55.8, 45.2, 19.5, 86.6, 1153.0, 29.7),
    "Qwen2-0.5B + HiMix": _row(72.6, 55.9, 44.2, 21.1, 84.9, 1039.7, 31.6),
    "TinyLlama-1.1B": _row(75.5, 58.6, 49.6, 23.5, 86.3, 1256.5, 28.3),
    "TinyLlama-1.1B + HiMix": _row(75.5, 59.2, 44.1, 24.5, 85.7, 1179.0, 29.0),
    "Llama-3.2-1B": _row(76.8, 59.6, 52.7, 27.8, 86.7, 1334.5, 30.6),
    "Llama-3.2-1B + HiMix": _row(76.2, 59.6, 50.5, 28.4, 86.6, 1198.6, 29.9),
    "Llama-3.2-3B": _row(78.6, 62.5, 55.3, 31.5, 86.9, 1449.3, 34.8),
    "Llama-3.2-3B + HiMix": _row(78.4, 61.4, 54.4, 30.2, 86.6, 1261.9, 35.6),
}


def headline(benchmark: str, result: dict) -> Optional[float]:
    """The one number Table 3 shows for the benchmark; None for MM-Vet (graded elsewhere) and for a result that
    lacks it (a submission file written instead of a score)."""
    if benchmark not in HEADLINE:
        raise ScoringError(f"benchmark {benchmark!r}: choose one of {', '.join(HEADLINE)}")
    key = HEADLINE[benchmark]
    return result.get(key) if key is not None and isinstance(result, dict) else None


def _cell(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1f}"


def markdown_table(results: dict[str, dict], model_name: str) -> str:
    """Table 3's layout: the paper's rows, then `model_name` with the headline of every benchmark in `results`
    (benchmark -> result of `score`); a benchmark not run, or MM-Vet, leaves its cell blank."""
    lines = ["| Decoder | " + " | ".join(title for _, title in TABLE3_COLUMNS) + " |",
             "|---|" + "---:|" * len(TABLE3_COLUMNS)]
    for name, row in PAPER_TABLE3.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[b]) for b, _ in TABLE3_COLUMNS) + " |")
    mine = [_cell(headline(b, results[b])) if b in results else "" for b, _ in TABLE3_COLUMNS]
    lines.append(f"| {model_name.replace('|', '/')} | " + " | ".join(mine) + " |")
    return "\n".join(lines)
