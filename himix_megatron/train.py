"""`himix-train` / `python -m himix_megatron.train`: the training entry point (see --help).

Launch with torchrun, mpirun or srun; the platform module reads whichever environment it finds.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from himix_megatron.checkpoint import CheckpointError
    from himix_megatron.config import ConfigError
    from himix_megatron.data import DataError
    from himix_megatron.training.config import parse_args

    try:
        cfg = parse_args(argv)
        from himix_megatron import platform
        from himix_megatron.training.trainer import train

        try:
            train(cfg)
        finally:
            platform.shutdown()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"himix-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns helper processes: the guard is required
    sys.exit(main())
