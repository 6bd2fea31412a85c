"""himix-eval without installing the package: `python tools/evaluate.py ...` (see himix_megatron/eval/cli.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from himix_megatron.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
