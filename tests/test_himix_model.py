"""The HiMix decoder against a hand-written reference and against megatron-core's GPTModel."""

import pytest
import torch

from model_utils import TINY_LM, TINY_VISION, build_tiny_himix, tiny_batch
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


def test_text_token_sees_no_later_text_and_every_vision_token():
    model = build_tiny_himix().eval()
    tokens, positions, vision, _ = tiny_batch(batch=1, text_len=10)
    with torch.no_grad():
        base = model(tokens, positions, vision)
        for k in range(1, 10):
            changed = tokens.clone()
            changed[0, k] = (changed[0, k] + 1) % TINY_LM.vocab_size
            out = model(changed, positions, vision)
            # Positions before k are untouched, position k itself changes.
            torch.testing.assert_close(out[:, :k], base[:, :k], atol=0, rtol=0)
            assert not torch.allclose(out[:, k], base[:, k])
        for n in range(TINY_VISION.num_features):
            changed = vision.clone()
            changed[n] += 1.0
            out = model(tokens, positions, changed)
            # Every text position, the first included, attends to every vision token.
            per_position_change = (out - base).abs().amax(dim=-1)[0]
            assert (per_position_change > 1e-6).all(), f"vision token {n} did not reach every text position"


def test_vision_keys_have_no_position():
    model = build_tiny_himix().eval()
    tokens, positions, vision, _ = tiny_batch()
    permutation = torch.randperm(vision.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions, vision[permutation]), model(tokens, positions, vision),
                                   atol=1e-5, rtol=1e-5)


def test_imageless_sample_in_mixed_batch_equals_text_only_run():
    model = build_tiny_himix().eval()
    tokens, positions, vision, _ = tiny_batch()
    with torch.no_grad():
        mixed = model(tokens, positions, vision, image_present=torch.tensor([True, False]))
        text_only = model(tokens, positions, None)
        with_image = model(tokens, positions, vision)
    torch.testing.assert_close(mixed[1], text_only[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], with_image[0], atol=1e-5, rtol=1e-5)


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


def test_vision_features_shape_is_checked():
    model = build_tiny_himix()
    tokens, positions, vision, _ = tiny_batch()
    with pytest.raises(ValueError, match="vision_features must be"):
        model(tokens, positions, vision[..., :-1])
    with pytest.raises(ValueError, match="sequence-first"):
        model(tokens, positions, vision.transpose(0, 1))
