"""himix-eval: answer a benchmark's questions with a model, then score them the official way.

    himix-eval --model CKPT_OR_HF_DIR --benchmark gqa --questions llava_gqa_testdev_balanced.jsonl \\
        --image-folder gqa/images --annotations testdev_balanced_questions.json --output-dir eval/
    torchrun --nproc-per-node 8 -m himix_megatron.eval.cli ...      # questions split over the ranks
    himix-eval score --benchmark vqav2 --answers eval/vqav2_answers.jsonl --annotations v2_..._annotations.json

Writes to --output-dir: `<benchmark>_answers.jsonl` (LLaVA's answer format), `<benchmark>_results.json`,
`results.json` (every benchmark scored there so far) and `results.md`, a Markdown table laid out like the
paper's Table 3 with the paper's rows above this model's. VQAv2 test-dev (no annotations) and MM-Vet (graded by
GPT-4 on its server) get their submission files instead. The last line printed is the results as one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="himix-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="a megatron checkpoint (save dir or iter dir) or an HF export")
    p.add_argument("--benchmark", required=True, help="vqav2, gqa, textvqa, pope, mme, mmmu or mmvet")
    p.add_argument("--questions", required=True, help="the benchmark's LLaVA-style question JSONL")
    p.add_argument("--image-folder", help="the folder the questions' `image` paths are relative to")
    p.add_argument("--annotations", help="the benchmark's official annotations (omit for VQAv2 test-dev, MM-Vet); "
                   "`himix-eval score --help` lists each benchmark's answer and annotation formats")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--template", help="conversation template (default: the one the checkpoint records)")
    p.add_argument("--system-prompt", help="the system prompt (default: the one the checkpoint records, as training "
                   "rendered it; '' for none)")
    p.add_argument("--image-aspect-ratio", default="resize", choices=("resize", "pad"),
                   help="image preprocessing; training's default is resize")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, help="only the first N questions (a quick look)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--model-name", help="the name of this model's row in results.md (default: the model path)")
    p.add_argument("--fastv-k", type=int, help="FastV (vanilla megatron checkpoints): prune image tokens after "
                   "layer K-1 (exported with FastV, hf/modeling_llava_baselines.py)")
    p.add_argument("--fastv-r", type=float, help="FastV: the fraction of image tokens pruned")
    p.add_argument("--fastv-ranking", choices=("last_token", "all_tokens"), default="last_token")
    p.add_argument("--no-progress", action="store_true")
    return p


def _distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # barriers only: every rank decodes on its own
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _check(args) -> None:
    from himix_megatron.eval.prompts import EvalError
    from himix_megatron.eval.scoring import BENCHMARKS

    if args.benchmark not in BENCHMARKS:
        raise EvalError(f"--benchmark {args.benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
    for flag in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    if (args.fastv_k is None) != (args.fastv_r is None):
        raise EvalError("--fastv-k and --fastv-r go together")
    if not os.path.exists(args.model):
        raise EvalError(f"--model {args.model}: no such file or directory")
    if args.annotations is not None and not os.path.exists(args.annotations):
        raise EvalError(f"--annotations {args.annotations}: no such file or directory")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        raise EvalError(f"--image-folder {args.image_folder}: no such directory")


def report(benchmark: str, answers_file: str, annotations: Optional[str], output_dir: str, model_name: str) -> dict:
    """Score (or write the submission file), update results.json / results.md; returns this benchmark's result."""
    from himix_megatron.eval import scoring
    from himix_megatron.eval.generate import read_answers

    answers = list(read_answers(answers_file).values())
    if benchmark == "mmvet" or (benchmark == "vqav2" and annotations is None):
        path = os.path.join(output_dir, f"{benchmark}_submission.json")
        (scoring.mmvet_submission if benchmark == "mmvet" else scoring.vqav2_submission)(answers, path,
                                                                                         source=answers_file)
        result = {"submission": path, "answered": len(answers)}
    elif annotations is None:
        raise scoring.ScoringError(f"--annotations is needed to score {benchmark}")
    else:
        result = scoring.score(benchmark, answers, annotations, source=answers_file)
    with open(os.path.join(output_dir, f"{benchmark}_results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    everything_path = os.path.join(output_dir, "results.json")
    everything = json.load(open(everything_path, encoding="utf-8")) if os.path.isfile(everything_path) else {}
    everything[benchmark] = result
    with open(everything_path, "w", encoding="utf-8") as f:
        json.dump(everything, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(scoring.markdown_table(everything, model_name) + "\n")
    return result


def run(argv=None) -> int:
    from himix_megatron.eval import generate
    from himix_megatron.eval.prompts import read_questions

    args = build_parser().parse_args(argv)
    _check(args)
    rank, world, device = _distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    os.makedirs(args.output_dir, exist_ok=True)
    questions = read_questions(args.questions, args.limit)
    baselines = None if args.fastv_k is None else {"fastv_k": args.fastv_k, "fastv_r": args.fastv_r,
                                                    "fastv_ranking": args.fastv_ranking}
    if rank == 0:
        directory = generate.hf_directory(args.model, args.output_dir, log, baselines)
    _barrier(world)
    if rank != 0:
        directory = generate.hf_directory(args.model, args.output_dir, log, baselines)  # exported by rank 0 by now
    model = generate.load_model(directory, template=args.template, system_prompt=args.system_prompt,
                                aspect_ratio=args.image_aspect_ratio,
                                dtype=DTYPES[args.dtype] if args.dtype else None, device=device, log=log)
    name = args.model_name or os.path.normpath(args.model)
    done = generate.answered(args.output_dir, args.benchmark)  # the same on every rank: nobody writes yet
    _barrier(world)
    count = generate.answer_all(model, questions, image_folder=args.image_folder, output_dir=args.output_dir,
                                benchmark=args.benchmark, model_id=name, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, rank=rank, world=world, done=done,
                                progress=not args.no_progress)
    _barrier(world)
    if rank != 0:
        return 0
    path, total = generate.merge_answers(args.output_dir, args.benchmark, questions)
    log(f"{args.benchmark}: {count} questions answered by rank 0 in this run, {total} of {len(questions)} in {path}")
    result = report(args.benchmark, path, args.annotations, args.output_dir, name)
    print(open(os.path.join(args.output_dir, "results.md"), encoding="utf-8").read())
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    from himix_megatron.eval.prompts import EvalError
    from himix_megatron.eval.scoring import ScoringError, score_main

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    try:
        return run(argv)
    except (EvalError, ScoringError) as e:
        print(f"himix-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
