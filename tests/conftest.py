import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import these helper modules by name


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core initialised in this process as a world of one (TP=PP=1) for in-process model tests."""
    from himix_megatron import platform
    from himix_megatron.config import ParallelConfig

    platform.initialize(ParallelConfig())
    yield
