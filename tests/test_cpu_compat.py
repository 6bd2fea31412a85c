"""Each part of himix_megatron.cpu_compat (DESIGN.md section 4, points 1-4) does its job on CPU."""

import pytest
import torch

from himix_megatron import cpu_compat
from himix_megatron.config import ParallelConfig
from model_utils import build_tiny_himix, tiny_batch
from multiprocess import run_world

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")


@pytest.fixture(autouse=True, scope="module")
def installed():
    assert cpu_compat.install()


def test_refuses_other_megatron_versions(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_installed", False)
    monkeypatch.setattr(cpu_compat.importlib.metadata, "version", lambda name: "0.17.0")
    with pytest.raises(RuntimeError, match="targets megatron-core==0.16.1, found 0.17.0"):
        cpu_compat.install()


def test_cuda_runtime_calls_become_cpu_equivalents():  # point 1
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.set_device(0)
    torch.cuda.synchronize()
    stream, event = torch.cuda.Stream(), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        event.record()
    stream.wait_stream(torch.cuda.current_stream())
    # "CUDA" seeding and RNG state are the CPU generator's, and torch.manual_seed does not recurse.
    torch.manual_seed(0)
    torch.cuda.manual_seed(5)
    first = torch.rand(4)
    torch.default_generator.manual_seed(5)
    assert torch.equal(first, torch.rand(4))
    state = torch.cuda.get_rng_state()
    second = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(second, torch.rand(4))


def test_hard_coded_cuda_devices_land_on_cpu():  # point 2
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.arange(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t and t.pin_memory() is t
    assert t.to("cuda").device.type == "cpu" and t.to("cuda:0", torch.float64).dtype == torch.float64
    # megatron's optimizer and clip_grads compare type names of GPU tensors.
    assert t.type() == "torch.cuda.FloatTensor"
    assert t.type("torch.cuda.HalfTensor").dtype == torch.float16
    assert t.type(torch.float64).dtype == torch.float64


def _dropout_masks():
    from megatron.core import parallel_state, tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        inside = torch.nn.functional.dropout(torch.ones(256), 0.5)
    outside = torch.nn.functional.dropout(torch.ones(256), 0.5)
    with tracker.fork():
        with tracker.fork():  # nested, as attention dropout inside a sequence-parallel block
            nested = torch.nn.functional.dropout(torch.ones(256), 0.5)
    return parallel_state.get_tensor_model_parallel_rank(), inside, outside, nested


@pytest.mark.slow
def test_rng_tracker_forks_per_tensor_parallel_rank():  # point 3
    (_, inside0, outside0, nested0), (_, inside1, outside1, nested1) = run_world(
        2, ParallelConfig(tensor_model_parallel_size=2), _dropout_masks
    )
    assert not torch.equal(inside0, inside1), "TP ranks drew the same dropout mask inside fork()"
    assert torch.equal(outside0, outside1), "TP ranks must share the default (data-parallel) stream"
    assert not torch.equal(nested0, inside0), "a nested fork restarted the stream instead of continuing it"


def _train_step_with_dropout(recompute: bool):
    overrides = dict(hidden_dropout=0.2, attention_dropout=0.2)
    if recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_tiny_himix(seed=7, **overrides)
    tokens, positions, vision, labels = tiny_batch()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(11)  # same dropout streams for both runs
    loss = model(tokens, positions, vision, labels=labels).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _recompute_matches():
    return _train_step_with_dropout(False), _train_step_with_dropout(True)


@pytest.mark.slow
def test_activation_recompute_reproduces_dropout():  # point 3
    [((loss, grads), (loss_rc, grads_rc))] = run_world(1, ParallelConfig(), _recompute_matches)
    assert torch.equal(loss, loss_rc)
    for name in grads:
        # Bit-exact except RMSNorm_v: under full recompute megatron's checkpoint hands X_v to the
        # layer as a tensor requiring grad, so vision_kv.can_fuse takes the unfused path there, whose
        # norm-weight gradient differs from the fused one by rounding (4e-9 seen). A wrong dropout
        # mask changes gradients by orders of magnitude more.
        exact = "vision_norm" not in name
        torch.testing.assert_close(grads_rc[name], grads[name], atol=0 if exact else 1e-7, rtol=0, msg=name)


def _exchange_with_the_same_peer():
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    rank = torch.distributed.get_rank()
    config = ModelParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                                 batch_p2p_comm=True, pipeline_dtype=torch.float32)
    comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), config)
    activation = torch.full((2, 3), 100.0 + rank)
    gradient = torch.full((2, 3), 200.0 + rank)
    received_activation, received_gradient = comm.send_forward_backward_recv_forward_backward(
        activation, gradient, recv_prev=True, recv_next=True, tensor_shape=(2, 3)
    )
    return received_activation, received_gradient


@pytest.mark.slow
def test_batched_p2p_keeps_directions_apart():  # point 4
    results = run_world(2, ParallelConfig(pipeline_model_parallel_size=2), _exchange_with_the_same_peer)
    for rank, (activation, gradient) in enumerate(results):
        peer = 1 - rank
        assert torch.equal(activation, torch.full((2, 3), 100.0 + peer)), "received a gradient as activation"
        assert torch.equal(gradient, torch.full((2, 3), 200.0 + peer)), "received an activation as gradient"


def _main_grads(fuse: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = build_tiny_himix(seed=3, gradient_accumulation_fusion=fuse)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp.zero_grad_buffer()
    for seed in (1, 2):  # two accumulated micro-batches
        tokens, positions, vision, labels = tiny_batch(seed=seed)
        ddp(tokens, positions, vision, labels=labels).mean().backward()
    return {n: p.main_grad.clone() for n, p in model.named_parameters()}, [p.grad for p in model.parameters()]


@pytest.mark.usefixtures("single_rank")
def test_gradient_accumulation_fusion_accumulates_into_main_grad():
    reference, _ = _main_grads(fuse=False)
    fused, grads = _main_grads(fuse=True)
    assert all(g is None for g in grads)  # nothing materialised besides main_grad
    for name, grad in reference.items():
        torch.testing.assert_close(fused[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_wgrad_accumulation_with_bf16_activations_and_fp32_main_grad():
    main_grad = torch.ones(3, 4)
    x = torch.randn(2, 5, 4).to(torch.bfloat16)  # [s, b, in], as megatron may pass it
    dy = torch.randn(2, 5, 3).to(torch.bfloat16)
    cpu_compat._wgrad_gemm_accum(x, dy, main_grad)
    expected = 1 + dy.reshape(-1, 3).float().t() @ x.reshape(-1, 4).float()
    torch.testing.assert_close(main_grad, expected)
    assert main_grad.dtype == torch.float32
