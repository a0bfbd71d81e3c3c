"""Peak memory of one workload iteration, each measured in a fresh Python process.

A fresh process per measurement, because both the CPU allocator (glibc keeps freed memory for reuse) and
`resource.getrusage`'s ru_maxrss (the maximum over the process's whole life) make a peak measured after
other work in the same process meaningless. The child process:

1. imports everything, builds the batch, and runs the workload twice on a miniature model of the same
   implementation (so that modules imported lazily on first use, such as torch._dynamo on Adam's first
   step, thread pools and library handles are not counted), then takes the baseline:
   `torch.cuda.memory_allocated` on a GPU, the resident set size (VmRSS of /proc/self/status) on the CPU;
2. builds the implementation (its own random weights), runs the workload once as warm-up (this allocates
   Adam's state, the caches and workspaces), and resets the peak: `torch.cuda.reset_peak_memory_stats`, or
   writing 5 to /proc/self/clear_refs, which resets the kernel's resident high-water mark (VmHWM) to the
   current RSS (Linux 4.0+);
3. runs the workload once more and reports peak - baseline: `torch.cuda.max_memory_allocated` (bytes of
   live tensors) or VmHWM (resident pages, so it includes what the allocator keeps cached).

Either way the number includes the weights, gradients and optimizer state, not the input ids. On a CPU
without /proc (not Linux) it is not measured.

The child runs `vaswani.benchmark.memory.main` with the spec (JSON) as its argument and prints one JSON
line.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated during one iteration after a warm-up one, minus the "
CUDA_METHOD += "allocated bytes before the model was built (fresh process)"
CPU_METHOD = "peak resident set size (VmHWM, reset via /proc/self/clear_refs after a warm-up iteration) "
CPU_METHOD += "during one iteration, minus the RSS before the model was built (fresh process)"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# Not `python -m vaswani.benchmark.memory`: the package imports this module first, which runpy warns about.
CHILD = "import sys; from vaswani.benchmark.memory import main; sys.exit(main())"


def cpu_peak_supported() -> bool:
    return _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK)


def probe(spec: dict) -> dict:
    """Measure one (implementation, workload, precision) as described above; `spec` as `probe_spec` makes."""
    from vaswani.benchmark.peers import build_runner, import_transformers
    from vaswani.benchmark.workloads import make_batch, workload_fn
    from vaswani.config import TransformerConfig

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = TransformerConfig.from_dict(spec["config"])
    b = spec["batch"]
    batch = make_batch(cfg, *b["train"], *b["decode"], seed=spec["seed"]).to(device)
    transformers = import_transformers() if spec["impl"] == "hf" else None
    # A throwaway run of a miniature model of the same implementation and workload first: the modules that
    # torch and transformers import lazily (torch._dynamo on Adam's first step, say: tens of MiB), thread
    # pools and library handles are then part of the baseline, not of the model's memory.
    mini = TransformerConfig(
        vocab_size=16,
        d_model=2 * cfg.n_heads,
        n_heads=cfg.n_heads,
        d_ff=8,
        n_encoder_layers=1,
        n_decoder_layers=1,
        dropout=cfg.dropout,
        max_len=16,
        positional=cfg.positional,
    )
    mini_batch = make_batch(mini, 2, 4, 4, 2, 4, seed=spec["seed"]).to(device)
    mini_runner = build_runner(spec["impl"], mini, None, transformers)
    mini_runner.model.to(device)
    mini_fn = workload_fn(
        spec["workload"], mini_runner, mini_batch, spec["precision"], device, mini.pad_id, 2, 2
    )
    mini_fn()
    mini_fn()
    del mini_fn, mini_runner, mini_batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        if not cpu_peak_supported():
            return {"bytes": None, "method": "not measured: needs Linux's /proc/self/status and clear_refs"}
        baseline = _status_kib("VmRSS") * 1024
    torch.manual_seed(spec["seed"])
    runner = build_runner(spec["impl"], cfg, None, transformers)
    runner.model.to(device)
    fn = workload_fn(
        spec["workload"],
        runner,
        batch,
        spec["precision"],
        device,
        cfg.pad_id,
        spec["new_tokens"],
        spec["beam"],
    )
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"bytes": torch.cuda.max_memory_allocated(device) - baseline, "method": CUDA_METHOD}
    if not _reset_peak_rss():
        return {"bytes": None, "method": "not measured: /proc/self/clear_refs is not writable"}
    fn()
    return {"bytes": _status_kib("VmHWM") * 1024 - baseline, "method": CPU_METHOD}


def probe_spec(
    cfg, train_shape, decode_shape, seed, impl, workload, precision, device, threads, new_tokens, beam
) -> dict:
    return {
        "config": cfg.to_dict(),
        "batch": {"train": list(train_shape), "decode": list(decode_shape)},
        "seed": seed,
        "impl": impl,
        "workload": workload,
        "precision": precision,
        "device": str(device),
        "threads": threads,
        "new_tokens": new_tokens,
        "beam": beam,
    }


def measure_in_subprocess(spec: dict, timeout: float = 1800) -> dict:
    """Run `probe(spec)` in a fresh interpreter; on failure, {"bytes": None, "method": "error: ..."}."""
    package_root = str(Path(__file__).resolve().parents[2])  # the directory that holds vaswani/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"bytes": None, "method": f"error: the measurement took over {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"bytes": None, "method": f"error: {last}"}
    return json.loads(lines[-1])


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(probe(json.loads(sys.argv[1]))))
    return 0
