"""Make megatron-core 0.16.1's DistributedOptimizer resume correctly with plain torch.optim Adam.

Without Transformer Engine or apex, megatron-core falls back to `torch.optim.Adam`/`AdamW`
(`distrib_optimizer.HAVE_APEX_OR_TE is False`). That path has three bugs in
`megatron/core/optimizer/distrib_optimizer.py` of 0.16.1. None is CPU-specific; on GPU without
TE/apex they fire the same way. DESIGN.md section 4, point 5.

1. `DistributedOptimizer.state_dict` (reached first thing from `sharded_state_dict`, also with
   `is_loading=True`) reads the iteration count from every per-param Adam state
   (`steps = {s["step"] ...}; assert len(steps) == 1`). torch Adam creates that state lazily, at its
   first `step()`, so a freshly built optimizer (the normal case when loading a checkpoint) has
   none: AssertionError on an empty list (a KeyError if `init_state_fn` filled only exp_avg/sq).
   Fix: before `state_dict`, materialise each param's Adam state as torch Adam would on its first
   step (`step = 0`, zero exp_avg and exp_avg_sq). This changes no numbers: Adam's first update
   from that state is the one it makes from a lazily created state.

2. `DistributedOptimizer._set_main_param_and_optimizer_states` (non precision-aware branch) copies
   every key of the destination state from the loaded tensors. The destination holds `step`
   (put there by `load_state_dict` from param_groups), but the loaded tensors do not: the
   fully_sharded_model_space / fully_reshardable loaders drop it on purpose, and dp_zero never had
   it -> KeyError 'step'. In dp_reshardable it is present but stale: the step tensor of the
   fresh optimizer, captured when the sharded state dict was built, so copying it would reset
   the restored step to 0 (measured: resumed losses off by up to 0.11, silently). Also, for fp32
   params the main param is `model_param.view(-1)[a:b]`, a view of a leaf that requires grad, and
   the dp_reshardable and dp_zero loaders are not under `no_grad` -> RuntimeError on the copy.
   Fix: replace that branch: copy param, exp_avg and exp_avg_sq (never `step`, which is owned by
   the param_groups path) under `torch.no_grad()`.

3. `DistributedOptimizer.load_state_dict` builds ONE `step` tensor and assigns it to every
   param's state; `torch.optim.Optimizer.load_state_dict` keeps `step` tensors as they are (no
   copy). Adam then does `step += 1` in place once per param, so after resume the shared counter
   advances by the number of params per iteration and the bias correction is wrong. Silent: the
   resumed loss drifts (by 0.02 to 0.09 on toy models). Fix: after `load_state_dict`, give each param a
   clone of its `step`.

`install_distrib_optimizer_fixes()` applies the three fixes to the class, once; it is a no-op when
TE or apex fused Adam is in use (their step lives in param_groups and is not affected).
"""

from __future__ import annotations

import functools
import importlib.metadata

import torch

from himix_megatron.cpu_compat import PINNED_MEGATRON_CORE

_MARK = "_himix_optim_compat"


def install_distrib_optimizer_fixes() -> bool:
    """Patch megatron-core's DistributedOptimizer; returns True if the torch.optim fixes are active."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False  # TE/apex FusedAdam: step is a param-group scalar, none of the bugs apply
    cls = distrib_optimizer.DistributedOptimizer
    if getattr(cls, _MARK, False):
        return True
    found = importlib.metadata.version("megatron-core")
    if found != PINNED_MEGATRON_CORE:
        raise RuntimeError(
            f"himix_megatron.optim_compat patches megatron-core=={PINNED_MEGATRON_CORE} internals, "
            f"found {found}; check whether the distributed-optimizer 'step' bugs are still present "
            "and update or drop the patches"
        )
    cls.state_dict = _materialise_state_first(cls.state_dict)
    cls._set_main_param_and_optimizer_states = _set_states_without_step(
        cls._set_main_param_and_optimizer_states
    )
    cls.load_state_dict = _unshare_steps_after(cls.load_state_dict)
    setattr(cls, _MARK, True)
    return True


def _uses_torch_adam(dist_opt) -> bool:
    """Only the plain torch Adam/AdamW path with main params held by megatron is affected."""
    return (
        isinstance(dist_opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        and not dist_opt.ddp_config.use_megatron_fsdp
        and not dist_opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
    )


def _materialise_state_first(state_dict):  # bug 1
    @functools.wraps(state_dict)
    def wrapper(self):
        if _uses_torch_adam(self):
            adam = self.optimizer
            for group in adam.param_groups:
                for param in group["params"]:
                    state = adam.state[param]  # what torch Adam creates at its first step()
                    state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key not in state:
                            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state_dict(self)

    return wrapper


def _set_states_without_step(set_states):  # bug 2
    @functools.wraps(set_states)
    def wrapper(self, model_param, tensors):
        if not _uses_torch_adam(self):
            return set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        with torch.no_grad():
            main_param.copy_(tensors["param"])
            for key, value in self.optimizer.state[main_param].items():
                if key != "step":  # restored from param_groups by load_state_dict
                    value.copy_(tensors[key])

    return wrapper


def _unshare_steps_after(load_state_dict):  # bug 3
    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict):
        result = load_state_dict(self, state_dict)
        if _uses_torch_adam(self):
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        return result

    return wrapper
