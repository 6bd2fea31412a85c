"""Process-group bootstrap: find rank and world from the launcher, start torch.distributed, and
build megatron-core's model-parallel groups.

Launchers, in the order they are recognised:
- torchrun (and anything else that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT);
- SLURM srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master = first host of SLURM_NODELIST);
- mpirun (mpi4py: rank and size from COMM_WORLD, rank 0 picks a free port and broadcasts it).
The CPU build of torch has no MPI backend, so MPI is used only for discovery; the collectives run
on NCCL with GPUs and on gloo without.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import torch

from himix_megatron import cpu_compat, optim_compat
from himix_megatron.config import ParallelConfig


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_launch(env) -> Launch:
    from mpi4py import MPI  # the `mpi` extra

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    addr, port = comm.bcast((socket.gethostname(), free_port()) if rank == 0 else None, root=0)
    local = int(env.get("MPI_LOCALRANKID", env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return Launch(rank, comm.Get_size(), local, env.get("MASTER_ADDR", addr), port, "mpi")


def discover_launch(env: Optional[dict] = None) -> Launch:
    """Rank, world size and rendezvous address from the launcher's environment."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
        )
    # mpirun inside an sbatch allocation inherits the batch step's SLURM_PROCID / SLURM_NTASKS; these
    # variables are set by Open MPI's and MPICH's own launchers only, never by srun.
    if "OMPI_COMM_WORLD_RANK" in env or "MPI_LOCALRANKID" in env:
        return _mpi_launch(env)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "SLURM_NODELIST" not in env and "MASTER_ADDR" not in env:
            raise RuntimeError("SLURM launch: neither SLURM_NODELIST nor MASTER_ADDR is set")
        addr = env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_NODELIST"])
        # A port derived from the job id, so concurrent jobs sharing a node do not collide.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return Launch(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
            addr, port, "slurm",
        )
    if "PMI_RANK" in env or "PMIX_RANK" in env:
        return _mpi_launch(env)
    return Launch(0, 1, 0, "127.0.0.1", free_port(), "single")


_use_gpu: Optional[bool] = None  # set by initialize(); None before it: whether CUDA is available


def gpu_enabled() -> bool:
    """Whether this process computes on its GPU (and so may use the Transformer Engine spec)."""
    return torch.cuda.is_available() if _use_gpu is None else _use_gpu


def initialize(
    parallel: ParallelConfig = ParallelConfig(),
    *,
    seed: int = 1234,
    timeout_minutes: int = 30,
    launch: Optional[Launch] = None,
    use_gpu: Optional[bool] = None,
) -> Launch:
    """Start torch.distributed and megatron-core's parallel state; idempotent per process.

    use_gpu: None uses the GPU when there is one (NCCL, the TE spec); False keeps this process on the CPU
    (gloo, local spec) even on a GPU node: the checkpoint converters, whose TP x PP ranks need not match the
    node's GPUs.
    """
    global _use_gpu
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.install()
    optim_compat.install_distrib_optimizer_fixes()
    tie_children_to_this_process()
    launch = launch or discover_launch()
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if launch.world_size % model_parallel:
        raise ValueError(
            f"world size {launch.world_size} is not a multiple of tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {model_parallel}"
        )
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available() and use_gpu is not False
        _use_gpu = cuda
        if cuda:
            torch.cuda.set_device(launch.local_rank)
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return launch


_fork_parent: Optional[int] = None
_tied = False


def _remember_parent() -> None:
    global _fork_parent
    _fork_parent = os.getpid()


def _die_with_parent() -> None:
    """Forked children of a rank (dist_checkpointing's writers, fork-started loader workers) get SIGKILL when
    their parent dies (Linux PR_SET_PDEATHSIG), so a killed rank leaves no orphan blocked on a dead queue."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != _fork_parent:  # the parent died before prctl took effect
        os._exit(1)


def tie_children_to_this_process() -> None:
    global _tied
    if not _tied and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_remember_parent, after_in_child=_die_with_parent)
        _tied = True


def device() -> torch.device:
    """Where this rank computes: its GPU (set by initialize from LOCAL_RANK), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if gpu_enabled() else torch.device("cpu")


def shutdown() -> None:
    global _use_gpu
    from megatron.core import parallel_state

    _use_gpu = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
