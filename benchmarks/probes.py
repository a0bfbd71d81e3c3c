"""The probes behind docs/PERFORMANCE.md's "what each optimisation bought": one Adam step of the benchmark's
model with torch's per-tensor loop, foreach and fused implementations; one training step eager vs
torch.compile; and the token selection of one decoding step (beam search's top 2k of the beams' scores,
greedy's argmax) with torch.topk / argmax vs `generation.top_k`; and weights prepacked by oneMKL / oneDNN
against F.linear, for the decoding step's matmuls alone and for whole decoding (tried, not adopted).
Timings are interleaved and the median is reported; prints a table, writes JSON with --out.

    python benchmarks/probes.py --size cpu --threads 2 --repeats 7 --out probes.json
    python benchmarks/probes.py --probes selection --repeats 200
    python benchmarks/probes.py --probes prepack --repeats 41
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from vaswani.benchmark.workloads import ADAM, LABEL_SMOOTHING, SIZES, autocast, size_batch
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


@contextmanager
def packed_linears(rows: int):
    """An experiment, not library code: within the block every F.linear of `rows` rows without gradients
    multiplies by a copy of its weight packed once by oneMKL (fp32) or, under CPU bf16 autocast, oneDNN
    (bf16), as torch.compile's CPU backend does with frozen weights."""
    original, packs = F.linear, {}

    def linear(x, weight, bias=None):
        if torch.is_grad_enabled() or x.numel() != rows * x.size(-1):
            return original(x, weight, bias)
        bf16 = torch.is_autocast_enabled("cpu")
        key = (weight.data_ptr(), tuple(weight.shape), bf16)
        if key not in packs:
            if bf16:
                b = None if bias is None else bias.detach().bfloat16()
                packs[key] = (torch.ops.mkldnn._reorder_linear_weight(weight.detach().bfloat16(), rows), b)
            else:
                packs[key] = (torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows), None)
        packed, packed_bias = packs[key]
        if bf16:
            return torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, packed_bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original


def prepack_probe(cfg, size, warmup: int, repeats: int) -> dict[str, float]:
    """Prepacked weights (oneMKL / oneDNN) against F.linear: the decoding step's matmuls alone (one weight
    multiplied again and again), then whole greedy and beam decoding of the benchmark's batch."""
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        print("prepack: skipped, this torch has no oneMKL / oneDNN")
        return {}
    rows, d, f, v = size.decode_sentences, cfg.d_model, cfg.d_ff, cfg.target_vocab_size
    fns = {}
    for n_in, n_out in ((d, 3 * d), (d, f), (f, d), (d, v)):
        x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        fns[f"{rows}x{n_in}x{n_out} plain"] = lambda x=x, w=w: F.linear(x, w)
        fns[f"{rows}x{n_in}x{n_out} packed"] = lambda x=x, w=w, p=packed: torch.ops.mkl._mkl_linear(
            x, p, w, None, rows
        )
    results = interleaved(fns, warmup, 20 * repeats)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    src = size_batch(size, cfg).decode_src
    for precision in ("fp32", "bf16"):
        for beam in (1, size.beam_size):

            def run(packed: bool, beam=beam, precision=precision) -> None:
                context = packed_linears(rows * beam) if packed else contextlib.nullcontext()
                with context, autocast(precision, torch.device("cpu")):
                    model.generate(src, max_new_tokens=size.new_tokens, beam_size=beam)

            search = "greedy" if beam == 1 else f"beam {beam}"
            pair = {
                f"{search} {precision} packed": lambda run=run: run(True),
                f"{search} {precision} plain": lambda run=run: run(False),
            }
            results.update(interleaved(pair, warmup, repeats))
    return results


PROBES = ("adam", "compile", "selection", "prepack")


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
    if "prepack" in chosen:
        results["prepack"] = prepack_probe(cfg, size, args.warmup, args.repeats)
    print(f"{'probe':<12} {'variant':<22} {'median ms':>10}")
    for probe, rows in results.items():
        for variant, seconds in rows.items():
            print(f"{probe:<12} {variant:<22} {seconds * 1e3:>10.3f}")
    if args.out:
        document = {"size": args.size, "threads": args.threads, "repeats": args.repeats, "seconds": results}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)


if __name__ == "__main__":
    main()
