"""The CPU demo (`make demo`): HiMix learns a vision question-answering task on 2 cores.

    python examples/cpu_demo.py [--output demo-run] [--pretrain-iters N] [--finetune-iters N]

1. Builds synthetic shards: images of one coloured shape, questions whose answer (colour, shape or
   position) is only in the image, so a text-only model scores at most the printed chance.
2. Trains a tiny HiMix model with `himix-train` under torchrun at TP=2: the pretrain stage (vision
   K/V only), then the finetune stage from its checkpoint.
3. Evaluates greedy answer accuracy on held-out samples (exact match of the answer and end token).
4. Exports the checkpoint to a Hugging Face directory and answers one held-out image with
   transformers' `generate()`.
5. Trains the vanilla LLaVA baseline for the same steps, for accuracy and time side by side.

The last line is `demo accuracy: X (chance: Y)`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 112  # the "tiny-112" vision preset
VALIDATION = re.compile(r"validation at iteration (\d+) \| loss ([\d.]+) \| accuracy ([\d.]+) over (\d+) samples")


def run(cmd: list[str], log_path: str) -> str:
    """Run a command, echo the lines that matter, keep the full log; raise with the log's tail on failure."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if line.startswith(("himix-train:", "iteration", "validation", "loaded", "saved")):
                print("    " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            tail = "".join(lines[-30:])
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}\nfull log: {log_path}")
    return "".join(lines)


def train(arch: str, stage: str, iters: int, lr: float, out: str, data: str, load: str | None, workers: int) -> tuple:
    save = os.path.join(out, arch, stage)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "himix_megatron.train",
           "--arch", arch, "--model", "tiny", "--vision-model", "tiny-112", "--stage", stage,
           "--tensor-model-parallel-size", "2",
           "--data-path", os.path.join(data, "train"), "--valid-data-path", os.path.join(data, "valid"),
           "--tokenizer-model", os.path.join(data, "tokenizer"), "--template", "vicuna_v1", "--system-prompt", "",
           "--seq-length", "24", "--micro-batch-size", "32", "--train-iters", str(iters), "--lr", str(lr),
           "--lr-warmup-fraction", "0.03", "--clip-grad", "1.0", "--log-interval", str(max(iters // 4, 1)),
           "--num-workers", str(workers), "--save", save, "--no-progress", "--seed", "1234"]
    if load:
        cmd += ["--load", load]
    start = time.perf_counter()
    output = run(cmd, os.path.join(out, f"{arch}-{stage}.log"))
    seconds = time.perf_counter() - start
    found = VALIDATION.findall(output)
    if not found:
        raise SystemExit(f"{arch} {stage}: no validation line in the output")
    return save, float(found[-1][2]), seconds


def answer_one_image(checkpoint: str, out: str, data: str) -> str:
    """Export to Hugging Face, then generate an answer for the first held-out sample with transformers."""
    hf_dir = os.path.join(out, "himix-hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "export", "--load", checkpoint,
         "--output", hf_dir], os.path.join(out, "export.log"))
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from himix_megatron.data import load_tokenizer, TemplateConfig, generation_prompt, ImageConfig
from himix_megatron.data.shards import ShardDirectory, ShardReader
from himix_megatron.data.image import load_and_preprocess
model = AutoModelForCausalLM.from_pretrained({hf_dir!r}, trust_remote_code=True).eval()
tok = load_tokenizer({hf_dir!r})
sample = ShardReader().read(ShardDirectory.open({os.path.join(data, 'valid')!r}).shards[0], 0)
question = sample.record["conversations"][0]["value"].replace("<image>", "").strip()
ids = generation_prompt([question], [], tok, TemplateConfig("vicuna_v1", system=""), has_image=True)
pixels = torch.as_tensor(load_and_preprocess(sample.image, ImageConfig(size={IMAGE_SIZE}), what="image", normalized=True))[None]
out = model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=4, do_sample=False)
answer = tok.decode(out[0, len(ids):].tolist())
print(json.dumps({{"question": question, "expected": sample.record["conversations"][1]["value"], "answer": answer}}))
"""
    output = run([sys.executable, "-c", script], os.path.join(out, "generate.log"))
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(REPO, "demo-run"))
    # 9000 samples give each question type 3000 images; with 3000 in all, the shape answers were
    # learnt from too few images and held-out accuracy stalled at 0.89.
    p.add_argument("--samples", type=int, default=9000)
    # The decoder starts from random weights, so pretraining (vision K/V only, LM frozen) can do
    # little here; it runs briefly to exercise the stage and the weights-only hand-over.
    p.add_argument("--pretrain-iters", type=int, default=20)
    p.add_argument("--finetune-iters", type=int, default=800)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--skip-vanilla", action="store_true")
    args = p.parse_args()

    shutil.rmtree(args.output, ignore_errors=True)
    data = os.path.join(args.output, "data")
    from himix_megatron.data.synthetic import SyntheticConfig, generate, write_word_tokenizer

    print("1. synthetic shards", flush=True)
    generate(SyntheticConfig(num_samples=args.samples, image_size=IMAGE_SIZE, seed=0, shape_radius=0.25), os.path.join(data, "train"))
    report = generate(SyntheticConfig(num_samples=600, image_size=IMAGE_SIZE, seed=1, shape_radius=0.25), os.path.join(data, "valid"))
    write_word_tokenizer(os.path.join(data, "tokenizer"))
    chance = report.text_only_chance_accuracy

    results = {}
    for arch in ("himix",) if args.skip_vanilla else ("himix", "vanilla"):
        print(f"2. {arch}: pretrain ({args.pretrain_iters} iterations), then finetune ({args.finetune_iters})",
              flush=True)
        pre, _, t_pre = train(arch, "pretrain", args.pretrain_iters, 1e-2, args.output, data, None, args.num_workers)
        fin, accuracy, t_fin = train(arch, "finetune", args.finetune_iters, 5e-3, args.output, data, pre,
                                     args.num_workers)
        results[arch] = (fin, accuracy, t_pre + t_fin)
        print(f"   {arch}: held-out accuracy {accuracy:.4f}, training time {t_pre + t_fin:.0f} s", flush=True)

    print("3. export to Hugging Face and answer one held-out image with transformers", flush=True)
    qa = answer_one_image(results["himix"][0], args.output, data)
    print(f"   Q: {qa['question']}  expected: {qa['expected']}  generated: {qa['answer']!r}", flush=True)

    himix_acc, himix_time = results["himix"][1], results["himix"][2]
    if "vanilla" in results:
        print(f"vanilla LLaVA accuracy: {results['vanilla'][1]:.4f} in {results['vanilla'][2]:.0f} s "
              f"(HiMix: {himix_time:.0f} s for the same steps)")
    print(f"demo accuracy: {himix_acc:.4f} (chance: {chance:.4f})")


if __name__ == "__main__":
    main()
