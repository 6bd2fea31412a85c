"""A gamma-MoD checkpoint exports as the remote-code LLaVA baselines model, and its logits equal the megatron
model's evaluation forward (routing by the recorded threshold, whole-layer skips)."""

from __future__ import annotations

import pytest
import torch

from himix_megatron.checkpoint import ModelDescription, build_model, save_checkpoint
from himix_megatron.config import ParallelConfig
from himix_megatron.data.templates import IMAGE_TOKEN_INDEX
from model_utils import TINY_LM, TINY_VISION, randomize

DESCRIPTION = ModelDescription("vanilla", TINY_LM, TINY_VISION, "tinyllama")


def _random(chunks, encoder, router_scale):
    randomize(chunks + [encoder], 0, scale=0.3)
    with torch.no_grad():
        chunks[0].mod_router.weight.mul_(router_scale)  # probabilities near 0 or 1: some tokens are skipped


@pytest.mark.usefixtures("single_rank")
def test_gamma_mod_export_equals_the_megatron_eval_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    from himix_megatron.convert.hf_export import export_checkpoint
    from himix_megatron.data.synthetic import write_word_tokenizer
    from himix_megatron.model.gamma_mod import checkpoint_record, config_overrides

    tok = str(tmp_path / "tok")
    write_word_tokenizer(tok)
    overrides = config_overrides({"mod_layers": [1, 2], "mod_skip": "layer"})
    chunks, encoder = build_model(DESCRIPTION, ParallelConfig(), **overrides)
    _random(chunks, encoder, router_scale=60.0)
    record = checkpoint_record(chunks[0].config)
    save_checkpoint(str(tmp_path / "ckpt"), chunks, DESCRIPTION, iteration=3, encoder=encoder, tokenizer_dir=tok,
                    train_state={"gamma_mod": record})
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), log=lambda _: None)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(hf).__name__ == "LlavaBaselinesForConditionalGeneration"
    assert list(hf.config.mod_layers) == [1, 2] and hf.config.mod_skip == "layer"

    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, TINY_VISION.image_size, TINY_VISION.image_size, generator=g)
    tokens = torch.randint(4, TINY_LM.vocab_size, (2, 7), generator=g)
    tokens[:, 2] = IMAGE_TOKEN_INDEX  # the image after two text tokens (the system header routes with it)
    n = TINY_VISION.num_features
    model = chunks[0].eval()
    with torch.no_grad():
        features = encoder(pixels)
        ours = model(tokens, torch.arange(7).expand(2, 7), features)[..., :TINY_LM.vocab_size]
        image = torch.full((2, n), hf.config.image_token_id)
        ids = torch.cat([tokens[:, :2], image, tokens[:, 3:]], 1)
        at = [t + (n - 1) * (t >= 2) for t in range(7)]
        theirs = hf(input_ids=ids, pixel_values=pixels).logits[:, at, :TINY_LM.vocab_size]
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=2e-4)
        model.mod_router.weight.zero_()  # p = 0.5 everywhere: nothing is skipped
        dense = model(tokens, torch.arange(7).expand(2, 7), features)[..., :TINY_LM.vocab_size]
    assert (dense - ours).abs().max() > 1e-2  # the routed model really skipped tokens
