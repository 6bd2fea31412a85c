"""Properties both decoders must have, whatever carries the image: causal text, every vision token reaches
every text position, imageless samples in a mixed batch see no image, bad X_v shapes are refused."""

import pytest
import torch

from model_utils import TINY_LM, TINY_VISION, build_tiny, tiny_batch, vanilla_slot

pytestmark = [pytest.mark.usefixtures("single_rank"), pytest.mark.parametrize("arch", ["himix", "vanilla", "uniform", "hierarchical"])]


def test_text_token_sees_no_later_text_and_every_vision_token(arch):
    model = build_tiny(arch).eval()
    # Vanilla: the image id first, so that every text position comes after the image.
    tokens, positions, vision, _ = tiny_batch(batch=1, text_len=10, image_slot=vanilla_slot(arch, 0))
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


def test_imageless_sample_in_mixed_batch_equals_text_only_run(arch):
    model = build_tiny(arch).eval()
    tokens, positions, vision, _ = tiny_batch(image_slot=vanilla_slot(arch))
    text = tiny_batch()[0][1:]  # vanilla: a sample without an image holds no image id
    tokens = torch.cat([tokens[:1], text])
    with torch.no_grad():
        mixed = model(tokens, positions, vision, image_present=torch.tensor([True, False]))
        text_only = model(text, positions[1:], None)
        with_image = model(tokens[:1], positions[:1], vision[:, :1])
    torch.testing.assert_close(mixed[1], text_only[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], with_image[0], atol=1e-5, rtol=1e-5)


def test_vision_features_shape_is_checked(arch):
    model = build_tiny(arch)
    tokens, positions, vision, _ = tiny_batch(image_slot=vanilla_slot(arch))
    with pytest.raises(ValueError, match="vision_features must be"):
        model(tokens, positions, vision[..., :-1])
    with pytest.raises(ValueError, match="sequence-first"):
        model(tokens, positions, vision.transpose(0, 1))
