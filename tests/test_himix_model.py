"""The HiMix decoder against a hand-written reference and against megatron-core's GPTModel."""

import pytest
import torch

from model_utils import TINY_LM, build_tiny_himix, tiny_batch
from reference_himix import himix_logits

pytestmark = pytest.mark.usefixtures("single_rank")


def _weights(model):
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_matches_hand_written_reference(with_image):
    model = build_tiny_himix().eval()
    tokens, positions, vision, _ = tiny_batch()
    vision = vision if with_image else None
    with torch.no_grad():
        logits = model(tokens, positions, vision)
    expected = himix_logits(_weights(model), TINY_LM, tokens, vision)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_vision_keys_have_no_position():
    model = build_tiny_himix().eval()
    tokens, positions, vision, _ = tiny_batch()
    permutation = torch.randperm(vision.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions, vision[permutation]), model(tokens, positions, vision),
                                   atol=1e-5, rtol=1e-5)


def test_without_image_equals_megatron_gpt_model():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    himix = build_tiny_himix().eval()
    gpt = GPTModel(himix.config, get_gpt_layer_local_spec(normalization="RMSNorm"), himix.vocab_size,
                   TINY_LM.max_position_embeddings, position_embedding_type="rope",
                   rotary_base=TINY_LM.rotary_base).eval()
    missing, unexpected = himix.load_state_dict(gpt.state_dict(), strict=False)
    assert not unexpected
    assert missing and all("vision" in name for name in missing), missing  # only HiMix's own parameters
    tokens, positions, _, labels = tiny_batch()
    causal = torch.ones(1, 1, 8, 8, dtype=torch.bool).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(himix(tokens, positions, None, labels=labels),
                                   gpt(tokens, positions, causal, labels=labels), atol=1e-5, rtol=1e-5)
