"""Convert checkpoints between Hugging Face and himix_megatron (megatron-core dist checkpoints).

  import: an HF Llama/Qwen2 decoder + a SigLIP or CLIP vision tower -> a checkpoint at the given TP x PP
          (runs TP x PP gloo processes, each building and saving its own shard).
  export: a checkpoint of any TP/PP -> an HF directory.
  import-reference: a checkpoint trained by the authors' reference code (github.com/Xuange923/HiMix,
          TinyLLaVA style: pretrain layout language_model/ + vision_tower/, or a finetune model directory)
          -> a checkpoint at the given TP x PP, every weight from the reference (none newly initialised).

    python tools/convert_checkpoint.py import --hf-llm DIR --hf-vision DIR --arch himix \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --output ckpt/ [--template tinyllama]
    python tools/convert_checkpoint.py export --load ckpt/ --output hf_model/
    python tools/convert_checkpoint.py import-reference --reference DIR \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --output ckpt/ [--template qwen2_base]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPORT_LAYOUTS = """\
layouts:
  hf   arch himix: a trust_remote_code directory: config.json (model_type "himix", auto_map),
       configuration_himix.py + modeling_himix.py (HiMixForCausalLM), sharded safetensors with
       model.safetensors.index.json, the tokenizer with an <image> token, generation_config.json,
       and the tower's preprocessor_config.json (SiglipImageProcessor, or CLIPImageProcessor: shortest
       edge, centre crop, OpenAI mean / std; the loader's preprocessing), the tower a
       SiglipVisionModel or CLIPVisionModel as the checkpoint's encoder is. Loads in transformers with
       AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) and generates
       (pixel_values=...). AutoProcessor gives its HiMixProcessor, whose chat_template.jinja is the
       checkpoint's template with its recorded system prompt as the default, so lmms-eval (>= 0.7.1)
       runs it with no wrapper: --model huggingface --model_args pretrained=DIR,trust_remote_code=True
       (make test-lmms-eval checks prompts and answers against himix-eval's; docs/evaluation.md).
       VLMEvalKit has no HiMix entry: it needs a small model wrapper around that call.
       arch vanilla: transformers' own LlavaForConditionalGeneration (no remote code) with a
       LlavaProcessor, in the on-disk layout transformers 4 and 5 both read (that of the llava-hf
       releases); a SigLIP or CLIP vision_config, vision_feature_layer -2, strategy "default" (the
       first token dropped: SigLIP's first patch, CLIP's class token), and the training template as
       the processor's chat template. Serves transformers and lmms-eval's `llava_hf` model type
       directly (--model llava_hf --model_args pretrained=DIR, no --force_simple); VLMEvalKit needs a
       config entry pointing one of its LLaVA-HF model classes at the directory.
       With --fastv-k/--fastv-r: remote code instead (model_type "llava_baselines",
       modeling_llava_baselines.py), loaded with trust_remote_code=True; himix-eval reads it too.
  arch uniform / hierarchical (the paper's ablations) have no HF model and are refused.
  The HiMix reference repository's own layout (TinyLLaVA style) is not offered as an export layout;
  it can be imported (`import-reference`).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="Hugging Face -> megatron checkpoint")
    imp.add_argument("--hf-llm", required=True, help="LlamaForCausalLM / Qwen2ForCausalLM directory")
    imp.add_argument("--hf-vision", required=True,
                     help="SiglipVisionModel / CLIPVisionModel directory, or a SiglipModel / CLIPModel one (its tower)")
    imp.add_argument("--arch", required=True, choices=["himix", "vanilla", "uniform", "hierarchical"])
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--output", required=True, help="checkpoint save directory to create")
    imp.add_argument("--template", default=None,
                     help="conversation template recorded in the checkpoint, with its default system prompt "
                          "(pretrain, tinyllama, llama-3, qwen2_base, llama3_instruct, chatml)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the new (non-HF) parameters")

    ref = sub.add_parser("import-reference", help="HiMix reference-code (TinyLLaVA) checkpoint -> megatron checkpoint",
                         description="Import a checkpoint written by the authors' reference code. DIR is either "
                                     "the pretrain output (language_model/ + vision_tower/) or a finetune output / "
                                     "Trainer checkpoint-N directory (weights named language_model.* and "
                                     "vision_tower._vision_tower.*, with the TinyLLaVA config.json). The tokenizer "
                                     "is taken from DIR/language_model/ if it has one, else from DIR. See "
                                     "himix_megatron/convert/reference_import.py for what is checked and refused.")
    ref.add_argument("--reference", required=True, metavar="DIR", help="reference checkpoint directory")
    ref.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ref.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ref.add_argument("--output", required=True, help="checkpoint save directory to create")
    ref.add_argument("--template", default=None,
                     help="conversation template recorded in the checkpoint, with its default system prompt "
                          "(default: the authors' template for the decoder family, told by its tokenizer: "
                          "tinyllama, llama-3 or qwen2_base; the reference does not record its --conv_version)")

    exp = sub.add_parser("export", help="megatron checkpoint -> Hugging Face",
                         epilog=EXPORT_LAYOUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("--load", required=True, help="checkpoint save directory (follows `latest`) or iteration dir")
    exp.add_argument("--output", required=True, help="HF directory to create")
    exp.add_argument("--layout", default="hf", choices=["hf"], help="output layout (see below)")
    exp.add_argument("--hf-vision", default=None,
                     help="the SigLIP / CLIP directory imported, for the tensors our encoder does not hold (last "
                          "layer, post_layernorm, SigLIP's head) when the checkpoint lacks hf_vision_extra.safetensors")
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="tensor dtype on disk; auto = as stored in the checkpoint")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--fastv-k", type=int, default=None, metavar="K",
                     help="arch vanilla: export with FastV inference (remote code, trust_remote_code=True): layers K "
                          "and later see only the top round(N * (1 - R)) image tokens by layer K-1's attention")
    exp.add_argument("--fastv-r", type=float, default=None, metavar="R",
                     help="FastV: the fraction of image tokens pruned")
    exp.add_argument("--fastv-ranking", default="last_token", choices=["last_token", "all_tokens"],
                     help="FastV: rank by the last prompt token's attention (official) or by every token's")
    args = parser.parse_args(argv)
    baselines = None
    if args.command == "export" and (args.fastv_k is not None or args.fastv_r is not None):
        if args.fastv_k is None or args.fastv_r is None:
            parser.error("FastV needs both --fastv-k and --fastv-r")
        baselines = {"fastv_k": args.fastv_k, "fastv_r": args.fastv_r, "fastv_ranking": args.fastv_ranking}
    # megatron-core's notices about Transformer Engine / Apex (absent on CPU) and deprecations say nothing
    # about the conversion; the environment variable silences them in the spawned import ranks too.
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore::{c}" for c in ("UserWarning", "FutureWarning",
                                                                                "DeprecationWarning")))
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)

    from himix_megatron.checkpoint import CheckpointError
    from himix_megatron.config import ConfigError, ParallelConfig
    from himix_megatron.convert import ConversionError
    from himix_megatron.model.vision import HFWeightError

    try:
        if args.command == "import":
            from himix_megatron.convert.hf_import import import_checkpoint

            parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                      pipeline_model_parallel_size=args.pipeline_model_parallel_size)
            import_checkpoint(args.hf_llm, args.hf_vision, args.arch, parallel, args.output,
                              template=args.template, seed=args.seed)
        elif args.command == "import-reference":
            from himix_megatron.convert.reference_import import import_reference

            parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                      pipeline_model_parallel_size=args.pipeline_model_parallel_size)
            import_reference(args.reference, parallel, args.output, template=args.template)
        else:
            from himix_megatron.convert.hf_export import export_checkpoint

            export_checkpoint(args.load, args.output, hf_vision=args.hf_vision, dtype=args.dtype,
                              max_shard_size=args.max_shard_size, baselines=baselines)
    except (ConversionError, ConfigError, CheckpointError, HFWeightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
