"""Rank discovery for torchrun, SLURM and mpirun, and a real mpirun launch through mpi4py + mpich."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from himix_megatron.platform import discover_launch, first_slurm_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_environment():
    launch = discover_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                              "MASTER_ADDR": "node7", "MASTER_PORT": "6000"})
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("node7", 6000, "torchrun")


def test_slurm_environment():
    launch = discover_launch({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                              "SLURM_NODELIST": "gpu[012-013,020]", "SLURM_JOB_ID": "4242"})
    assert (launch.rank, launch.world_size, launch.local_rank) == (9, 16, 1)
    assert launch.master_addr == "gpu012" and launch.launcher == "slurm"
    assert launch.master_port == 20000 + 4242


def test_mpirun_inside_an_sbatch_allocation_is_mpi_not_slurm():
    # The batch step's SLURM_PROCID=0 / SLURM_NTASKS would give every mpirun rank rank 0.
    launch = discover_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NODELIST": "gpu1",
                              "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (launch.launcher, launch.world_size) == ("mpi", 1)  # mpi4py's singleton in this process


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5]", "a3"), ("gpu[07,09],cpu1", "gpu07"),
                                            ("x-y[010-011]", "x-y010")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_no_launcher_is_a_single_process():
    launch = discover_launch({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


MPI_SCRIPT = """
import torch
from himix_megatron import platform
from himix_megatron.config import ParallelConfig
from megatron.core import parallel_state
launch = platform.initialize(ParallelConfig(tensor_model_parallel_size=2))
t = torch.tensor([launch.rank + 1.0])
torch.distributed.all_reduce(t)
print(f"rank={launch.rank} world={launch.world_size} launcher={launch.launcher} sum={t.item()} "
      f"tp_rank={parallel_state.get_tensor_model_parallel_rank()}", flush=True)
platform.shutdown()
"""


@pytest.mark.slow
def test_mpirun_launch():
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.path.exists(mpirun):
        mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install the `mpi` extra (mpi4py + mpich)"
    result = subprocess.run([mpirun, "-np", "2", sys.executable, "-c", MPI_SCRIPT], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # mpirun interleaves the ranks' output, possibly mid-line.
    reports = sorted(re.findall(r"rank=\d+ world=\d+ launcher=\w+ sum=[\d.]+ tp_rank=\d+", result.stdout))
    assert reports == [
        "rank=0 world=2 launcher=mpi sum=3.0 tp_rank=0",
        "rank=1 world=2 launcher=mpi sum=3.0 tp_rank=1",
    ]
