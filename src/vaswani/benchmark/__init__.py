"""The benchmark suite: the same workload, in one process and one run, on vaswani, `torch.nn.Transformer`
(completed into the same model) and Hugging Face's `MarianMTModel` (optional), with the same weights, batch,
dtype and threads.

    vaswani bench [--size tiny|cpu|base] [--device cpu|cuda] [--precision fp32,bf16] [--threads N]
                  [--warmup N] [--repeats N] [--impl vaswani,torch,hf] [--workloads train,greedy,beam]
                  [--no-memory] [--out results.json]

Modules: `peers` (the implementations and weight copying), `workloads` (sizes, batch, one iteration of
each workload), `flops` (FLOPs counted from the config, FlopCounterMode's cross-check, the matmul peak),
`memory` (peak memory, each in a fresh process), `core` (the run, the JSON results and the table).
docs/PERFORMANCE.md explains every column.
"""

from vaswani.benchmark.core import SCHEMA, BenchOptions, format_table, run_benchmark
from vaswani.benchmark.peers import IMPLEMENTATIONS, TRANSFORMERS_MISSING, TorchTransformer
from vaswani.benchmark.workloads import PRECISIONS, SIZES, WORKLOADS

__all__ = [
    "IMPLEMENTATIONS",
    "PRECISIONS",
    "SCHEMA",
    "SIZES",
    "TRANSFORMERS_MISSING",
    "WORKLOADS",
    "BenchOptions",
    "TorchTransformer",
    "format_table",
    "run_benchmark",
]
