"""Run megatron-core 0.16.1 on a CPU-only torch build, so tests exercise the production code paths.

Installed once per process by `install()`, before megatron-core builds anything. It does nothing when
CUDA is available. Every patch below targets a known site of the pinned release; `install()` refuses
any other megatron-core version, because a silent mismatch here means silently wrong training.

What it handles (numbered as in DESIGN.md section 4):
1. `torch.cuda` calls that megatron-core makes unconditionally (current_device, streams, events,
   synchronize, RNG state) become CPU equivalents or no-ops.
2. Hard-coded CUDA devices (`device="cuda"`, `.cuda()`, `.to("cuda")`, `pin_memory`) are rewritten
   to CPU by one global TorchFunctionMode, which also covers sites added by later edits. The
   optimizer's `grad.type() == 'torch.cuda.FloatTensor'` checks see CUDA type names.
3. RNG: megatron's tracker stores CUDA generator states and swaps them through `torch.cuda._lazy_call`,
   which on a CPU build queues the swap forever, so `fork()` would silently never switch state and
   TP-region dropout would be identical on every TP rank. The tracker here swaps the CPU generator.
4. Gloo matches isend/irecv by (peer, tag) in posting order. With interleaved PP=2 the previous and
   the next stage are the same rank, so the batched p2p path, which tags everything 0, swaps
   activations and gradients of equal shape without an error. Batched p2p here tags each direction.
Also (not a bug, a missing kernel): megatron-core's `gradient_accumulation_fusion` accumulates each
weight gradient straight into DDP's main_grad buffer inside the wgrad GEMM, through apex's CUDA
extension `fused_weight_gradient_mlp_cuda`. The same in-place accumulation is one `addmm_` on CPU, so
the extension is provided here; without it every micro-batch materialises and re-adds each gradient.

5. Distributed-optimizer checkpoint load with torch.optim (no TE/apex) is not CPU-specific and
   lives in `himix_megatron.optim_compat`; `platform.initialize` installs both.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

PINNED_MEGATRON_CORE = "0.16.1"
_CPU = torch.device("cpu")
_installed = False


def install() -> bool:
    """Make megatron-core usable on this process's CPU; returns True if patches were applied."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    found = importlib.metadata.version("megatron-core")
    if found != PINNED_MEGATRON_CORE:
        raise RuntimeError(
            f"himix_megatron.cpu_compat targets megatron-core=={PINNED_MEGATRON_CORE}, found {found}; "
            "reinstall the pinned version (pip install -e .)"
        )
    _stub_torch_cuda()
    _CudaToCpu().__enter__()  # process-wide, deliberately never exited
    _patch_rng_tracker()
    _patch_batched_p2p()
    _provide_wgrad_accumulation()
    _installed = True
    return True


# --- 1. torch.cuda -----------------------------------------------------------------------------


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None  # wait_stream, record, synchronize, record_stream, ...

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, and would recurse if aliased.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0


# --- 2. hard-coded CUDA devices ------------------------------------------------------------------


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal to torch; megatron passes current_device() results around.
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_type_name(name: str) -> str:
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and "dtype" not in kwargs:  # query: report what a GPU run would
                return _cuda_type_name(func(*args, **kwargs))
            target = kwargs.pop("dtype", args[1] if len(args) > 1 else None)
            if isinstance(target, str):
                target = target.replace("torch.cuda.", "torch.")
            return func(args[0], target, **{k: v for k, v in kwargs.items() if k != "non_blocking"})
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args[:2]) + tuple(args[2:])
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


# --- 3. RNG tracker ------------------------------------------------------------------------------


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker, keeping named states of the CPU generator and really swapping them."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            # Nested forks (e.g. attention dropout inside a sequence-parallel block) must continue
            # the outer named stream, not restart from its stale stored state.
            outer_name, outer_state = self._current_state_name, torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(self.states_[outer_name] if outer_name != "default-rng" else outer_state)
                self._current_state_name = outer_name

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recompute saves and restores "the CUDA state" around the recomputed forward.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


# --- 4. gloo p2p tags ----------------------------------------------------------------------------

_TAG_TOWARD_NEXT = 1  # activations: sent to the next stage, received from the previous one
_TAG_TOWARD_PREV = 2  # gradients: sent to the previous stage, received from the next one


def _patch_batched_p2p() -> None:
    from megatron.core.pipeline_parallel import p2p_communication

    def batched_p2p_ops(
        *, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group,
        prev_pipeline_rank, next_pipeline_rank,
    ):
        dist = torch.distributed
        planned = [
            (dist.isend, tensor_send_prev, prev_pipeline_rank, _TAG_TOWARD_PREV),
            (dist.irecv, tensor_recv_prev, prev_pipeline_rank, _TAG_TOWARD_NEXT),
            (dist.isend, tensor_send_next, next_pipeline_rank, _TAG_TOWARD_NEXT),
            (dist.irecv, tensor_recv_next, next_pipeline_rank, _TAG_TOWARD_PREV),
        ]
        ops = [dist.P2POp(op, t, peer, group, tag) for op, t, peer, tag in planned if t is not None]
        return dist.batch_isend_irecv(ops) if ops else []

    p2p_communication._batched_p2p_ops = batched_p2p_ops


# --- gradient accumulation fusion ----------------------------------------------------------------


def _wgrad_gemm_accum(total_input, grad_output, main_grad):
    """main_grad += grad_output^T @ total_input, in place (BLAS beta = 1): no gradient tensor is made.

    Computed in main_grad's dtype: with bf16 activations megatron keeps fp32 main grads.
    """
    main_grad.addmm_(grad_output.reshape(-1, grad_output.shape[-1]).t().to(main_grad.dtype),
                     total_input.reshape(-1, total_input.shape[-1]).to(main_grad.dtype))


def _provide_wgrad_accumulation() -> None:
    from megatron.core.tensor_parallel import layers

    kernel = types.ModuleType("fused_weight_gradient_mlp_cuda")
    kernel.wgrad_gemm_accum_fp32 = _wgrad_gemm_accum
    kernel.wgrad_gemm_accum_fp16 = _wgrad_gemm_accum
    sys.modules.setdefault("fused_weight_gradient_mlp_cuda", kernel)
    layers.fused_weight_gradient_mlp_cuda = kernel
    layers._grad_accum_fusion_available = True
