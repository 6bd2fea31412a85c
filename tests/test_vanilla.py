"""The vanilla LLaVA baseline: hand check against GPTModel with the image spliced at its id, per-sample image
places and text-only samples in one batch, shapes and parameter count.

Causality, vision reach and TP=2 equivalence are checked for both archs in test_model_semantics.py and
test_tensor_parallel.py."""

import pytest
import torch
import torch.nn.functional as F

from model_utils import TINY_LM, TINY_VISION, build_tiny, tiny_batch

pytestmark = pytest.mark.usefixtures("single_rank")


def build_tiny_vanilla():
    return build_tiny("vanilla")


def _by_hand(model, tokens, vision, slot):
    """GPTModel on [embed(text[:slot]) ; connector(X_v) ; embed(text[slot+1:])], causal: [b, M-1+N, V]."""
    from megatron.core.models.gpt import GPTModel

    p = dict(model.named_parameters())
    pre = "vision_projection.encoder."
    hidden = F.gelu(vision @ p[pre + "linear_fc1.weight"].T + p[pre + "linear_fc1.bias"])
    image = hidden @ p[pre + "linear_fc2.weight"].T + p[pre + "linear_fc2.bias"]
    text = p["embedding.word_embeddings.weight"][tokens.clamp(min=0)].transpose(0, 1)
    decoder_input = torch.cat([text[:slot], image, text[slot + 1:]])
    s = decoder_input.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    return GPTModel.forward(model, None, None, causal, decoder_input=decoder_input)


@pytest.mark.parametrize("slot", [0, 3])
def test_matches_gpt_model_on_the_image_spliced_at_its_id(slot):
    """Issue 22 item 8: the N image features replace the image id where the template put it (LLaVA's splice),
    RoPE positions run over the spliced sequence, and the text outputs are the decoder's at the text positions
    (the image id's own: the last image token's)."""
    model = build_tiny_vanilla().eval()
    tokens, positions, vision, labels = tiny_batch(image_slot=slot)
    n, m = vision.shape[0], tokens.shape[1]
    with torch.no_grad():
        expected = _by_hand(model, tokens, vision, slot)  # [b, M-1+N, V]
        logits = model(tokens, positions, vision)
        loss = model(tokens, positions, vision, labels=labels)
    at = [t + (n - 1) * (t >= slot) for t in range(m)]
    assert logits.shape == (2, m, model.vocab_size)
    torch.testing.assert_close(logits, expected[:, at], atol=1e-5, rtol=1e-5)
    expected_loss = F.cross_entropy(expected[:, at].reshape(-1, model.vocab_size), labels.reshape(-1),
                                    reduction="none").view(2, m)
    assert loss.shape == (2, m)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_each_sample_takes_its_image_at_its_own_slot_and_a_text_only_sample_none():
    """A micro-batch whose samples hold the image id at different places, and one without an image, equals each
    sample run alone (losses and logits): no mask needed, the unused image columns trail the text."""
    from himix_megatron.data.templates import IMAGE_TOKEN_INDEX

    model = build_tiny_vanilla().eval()
    tokens, positions, vision, labels = tiny_batch(batch=3, text_len=9)
    tokens[0, 1] = tokens[1, 6] = IMAGE_TOKEN_INDEX
    present = torch.tensor([True, True, False])
    with torch.no_grad():
        batch = model(tokens, positions, vision, labels=labels, image_present=present)
        batch_logits = model(tokens, positions, vision, image_present=present)
        for i in range(3):
            image = vision[:, i:i + 1] if present[i] else None
            alone = model(tokens[i:i + 1], positions[i:i + 1], image, labels=labels[i:i + 1])
            torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)
            alone = model(tokens[i:i + 1], positions[i:i + 1], image)
            torch.testing.assert_close(batch_logits[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        # The image reaches the text after its id only.
        other = model(tokens, positions, vision + 1.0, image_present=present)
    assert torch.equal(other[1, :6], batch_logits[1, :6]) and (other[1, 6:] - batch_logits[1, 6:]).abs().min() > 0
    assert torch.equal(other[2], batch_logits[2])


def test_image_ids_are_checked_against_the_images():
    model = build_tiny_vanilla()
    tokens, positions, vision, _ = tiny_batch()
    with pytest.raises(ValueError, match=r"hold \[0, 0\] image ids .* expected \[1, 1\]"):
        model(tokens, positions, vision)  # the image's place is not in the text
    slotted, *_ = tiny_batch(image_slot=2)
    with pytest.raises(ValueError, match=r"hold \[1, 1\] image ids .* expected \[1, 0\]"):
        model(slotted, positions, vision, image_present=[True, False])
    with pytest.raises(ValueError, match=r"expected \[0, 0\]"):
        model(slotted, positions, None)  # an image id without an image
    twice = slotted.clone()
    twice[:, 5] = slotted[0, 2]
    with pytest.raises(ValueError, match=r"hold \[2, 2\] image ids"):
        model(twice, positions, vision)


def test_shapes_and_parameter_count():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from himix_megatron.flops import decoder_cost

    model = build_tiny_vanilla()
    gpt = GPTModel(model.config, get_gpt_layer_local_spec(normalization="RMSNorm"), model.vocab_size,
                   TINY_LM.max_position_embeddings, position_embedding_type="rope")
    d, d_v = TINY_LM.hidden_size, TINY_VISION.hidden_size
    connector = d_v * d + d + d * d + d
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in gpt.parameters()) + connector
    cost = decoder_cost(TINY_LM, "vanilla", TINY_VISION.num_features, 8, d_v)
    assert count == cost.params + cost.connector_params  # tiny vocab 256 needs no padding
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith("vision_projection")}
    assert shapes == {
        "vision_projection.encoder.linear_fc1.weight": (d, d_v),
        "vision_projection.encoder.linear_fc1.bias": (d,),
        "vision_projection.encoder.linear_fc2.weight": (d, d),
        "vision_projection.encoder.linear_fc2.bias": (d,),
    }
    tokens, positions, vision, labels = tiny_batch(image_slot=2)
    loss = model(tokens, positions, vision, labels=labels)
    assert loss.shape == labels.shape
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
