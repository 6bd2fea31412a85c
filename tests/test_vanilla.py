"""The vanilla LLaVA baseline: hand check against GPTModel, shapes and parameter count.

Causality, vision reach and TP=2 equivalence are checked for both archs in test_model_semantics.py and
test_tensor_parallel.py."""

import pytest
import torch
import torch.nn.functional as F

from model_utils import TINY_LM, TINY_VISION, build_tiny, tiny_batch

pytestmark = pytest.mark.usefixtures("single_rank")


def build_tiny_vanilla():
    return build_tiny("vanilla")


def test_matches_gpt_model_on_explicit_connector_and_embeddings():
    from megatron.core.models.gpt import GPTModel

    model = build_tiny_vanilla().eval()
    tokens, positions, vision, labels = tiny_batch()
    n, m = vision.shape[0], tokens.shape[1]
    p = dict(model.named_parameters())
    with torch.no_grad():
        # The connector and the embedding lookup by hand.
        pre = "vision_projection.encoder."
        hidden = F.gelu(vision @ p[pre + "linear_fc1.weight"].T + p[pre + "linear_fc1.bias"])
        image = hidden @ p[pre + "linear_fc2.weight"].T + p[pre + "linear_fc2.bias"]
        text = p["embedding.word_embeddings.weight"][tokens].transpose(0, 1)
        decoder_input = torch.cat([image, text])
        causal = torch.ones(n + m, n + m, dtype=torch.bool).triu(1)[None, None]
        expected = GPTModel.forward(model, None, None, causal, decoder_input=decoder_input)  # [b, N+M, V]
        logits = model(tokens, positions, vision)
        loss = model(tokens, positions, vision, labels=labels)
    assert logits.shape == (2, m, model.vocab_size)
    torch.testing.assert_close(logits, expected[:, n:], atol=1e-5, rtol=1e-5)
    expected_loss = F.cross_entropy(expected[:, n:].reshape(-1, model.vocab_size), labels.reshape(-1),
                                    reduction="none").view(2, m)
    assert loss.shape == (2, m)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


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
    tokens, positions, vision, labels = tiny_batch()
    loss = model(tokens, positions, vision, labels=labels)
    assert loss.shape == labels.shape
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
