"""The probes behind docs/PERFORMANCE.md's "what each optimisation bought": one Adam step of the benchmark's
model with torch's per-tensor loop, foreach and fused implementations; one training step eager vs
torch.compile; and the token selection of one decoding step (beam search's top 2k of the beams' scores,
greedy's argmax) with torch.topk / argmax vs `generation.top_k`. Timings are interleaved and the median is
reported; prints a table, writes JSON with --out.

    python benchmarks/probes.py --size cpu --threads 2 --repeats 7 --out probes.json
    python benchmarks/probes.py --probes selection --repeats 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vaswani.benchmark.workloads import ADAM, LABEL_SMOOTHING, SIZES, size_batch
from vaswani.generation import top_k
from vaswani.models import Transformer
from vaswani.training.losses import label_smoothed_cross_entropy


def interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turns so that drift of the machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def adam_probe(model: Transformer, warmup: int, repeats: int) -> dict[str, float]:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"per-tensor loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    fns = {name: torch.optim.Adam(model.parameters(), **ADAM, **kw).step for name, kw in kinds.items()}
    return interleaved(fns, warmup, repeats)


def compile_probe(cfg, size, warmup: int, repeats: int) -> dict[str, float]:
    batch = size_batch(size, cfg)
    torch.manual_seed(0)
    eager = Transformer(cfg)
    compiled_model = Transformer(cfg)
    compiled_model.load_state_dict(eager.state_dict())
    forwards = {"eager": (eager, eager), "torch.compile": (compiled_model, torch.compile(compiled_model))}

    def step_of(model, forward):
        optimizer = torch.optim.Adam(model.parameters(), **ADAM, fused=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = forward(batch.src, batch.tgt_in)
            label_smoothed_cross_entropy(logits, batch.tgt_out, LABEL_SMOOTHING, cfg.pad_id).loss.backward()
            optimizer.step()

        return step

    return interleaved({name: step_of(*pair) for name, pair in forwards.items()}, warmup, repeats)


def selection_probe(size, warmup: int, repeats: int) -> dict[str, float]:
    """Picking the next tokens from the decoding batch's scores: beam (sentences, beam x vocab), top 2 x beam;
    greedy (sentences, vocab), the argmax."""
    g = torch.Generator().manual_seed(0)
    beams = torch.randn(size.decode_sentences, size.beam_size * size.vocab_size, generator=g)
    logits = torch.randn(size.decode_sentences, size.vocab_size, generator=g)
    k = 2 * size.beam_size
    fns = {
        "beam torch.topk": lambda: beams.topk(k, dim=-1),
        "beam top_k": lambda: top_k(beams, k),
        "greedy argmax": lambda: logits.argmax(dim=-1),
        "greedy top_k": lambda: top_k(logits, 1),
    }
    return interleaved(fns, warmup, repeats)


PROBES = ("adam", "compile", "selection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="the compiled step compiles during warm-up")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated: {', '.join(PROBES)}")
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args()
    chosen = args.probes.split(",")
    if unknown := sorted(set(chosen) - set(PROBES)):
        parser.error(f"unknown probe(s) {', '.join(unknown)}: choose from {', '.join(PROBES)}")
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    cfg = size.config()
    torch.manual_seed(0)
    results = {}
    if "adam" in chosen:
        results["adam_step"] = adam_probe(Transformer(cfg), args.warmup, args.repeats)
    if "compile" in chosen:
        results["train_step"] = compile_probe(cfg, size, args.warmup, args.repeats)
    if "selection" in chosen:
        results["selection"] = selection_probe(size, args.warmup, args.repeats)
    print(f"{'probe':<12} {'variant':<16} {'median ms':>10}")
    for probe, rows in results.items():
        for variant, seconds in rows.items():
            print(f"{probe:<12} {variant:<16} {seconds * 1e3:>10.3f}")
    if args.out:
        document = {"size": args.size, "threads": args.threads, "repeats": args.repeats, "seconds": results}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)


if __name__ == "__main__":
    main()
