"""Benchmark vaswani against torch.nn.Transformer and Hugging Face MarianMTModel.

The same as `vaswani bench` (the logic lives in `vaswani.benchmark`); runs from a checkout without
installing the package:

    python benchmarks/bench.py --size cpu --threads 2 --out results.json

See docs/PERFORMANCE.md for the options, the columns and how FLOPs, peak and memory are measured.
"""

import sys
from pathlib import Path

try:
    import vaswani  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vaswani.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
