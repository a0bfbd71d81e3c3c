"""The benchmark run: build the implementations with the same weights, count FLOPs, measure the matmul peak,
time every workload (interleaving the implementations), measure peak memory, and assemble the results."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vaswani.benchmark import flops as F
from vaswani.benchmark.memory import measure_in_subprocess, probe_spec
from vaswani.benchmark.peers import (
    IMPLEMENTATIONS,
    LABELS,
    TRANSFORMERS_MISSING,
    Runner,
    build_runner,
    import_transformers,
)
from vaswani.benchmark.workloads import (
    ADAM,
    LABEL_SMOOTHING,
    PRECISIONS,
    SIZES,
    WORKLOADS,
    Batch,
    Size,
    size_batch,
    training_loss,
    workload_fn,
)
from vaswani.models import Transformer

SCHEMA = "vaswani-bench/1"
UNITS = {"train": "tokens/s", "greedy": "generated tokens/s", "beam": "generated tokens/s"}
# The paper's base model: 100,000 steps of batches of about 25,000 source + 25,000 target tokens, trained in
# 12 hours on 8 NVIDIA P100 GPUs (§5.2).
PAPER_STEPS, PAPER_TOKENS_PER_STEP, PAPER_HOURS = 100_000, 50_000, 12.0


@dataclass
class BenchOptions:
    size: str = "cpu"
    device: str = "cpu"
    precisions: Sequence[str] = PRECISIONS
    implementations: Sequence[str] = IMPLEMENTATIONS
    workloads: Sequence[str] = WORKLOADS
    threads: int | None = None  # None: torch's current number of threads
    warmup: int = 2
    repeats: int = 5
    memory: bool = True
    seed: int = 0
    out: str | None = None
    overrides: dict = field(default_factory=dict)  # Size fields to change (tests use smaller batches)

    def validate(self) -> None:
        """Raise ValueError with a one-line message for a value that cannot work."""

        def check_list(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
            if not values:
                raise ValueError(f"--{name} needs at least one of {', '.join(allowed)}")
            for value in values:
                if value not in allowed:
                    raise ValueError(f"--{name} {value!r}: choose from {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} names {', '.join(values)}: each at most once")

        if self.size not in SIZES:
            raise ValueError(f"--size {self.size!r}: choose from {', '.join(SIZES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        check_list("precision", self.precisions, PRECISIONS)
        check_list("impl", self.implementations, IMPLEMENTATIONS)
        check_list("workloads", self.workloads, WORKLOADS)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads {self.threads}: must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"--warmup {self.warmup}: must be >= 0")
        if self.repeats < 1:
            raise ValueError(f"--repeats {self.repeats}: must be >= 1")
        dropout = self.overrides.get("dropout", 0.0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"--dropout {dropout}: must be in [0, 1)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _environment(device: torch.device, threads: int, transformers) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": getattr(transformers, "__version__", None),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _count_workload_flops(name: str, runner: Runner, batch: Batch, size: Size, pad_id: int) -> int | None:
    """FlopCounterMode's count of one iteration (fp32, no optimizer step); None if it cannot count it."""
    if name == "train":

        def fn() -> None:
            runner.model.train()
            training_loss(runner, batch, pad_id).backward()

    elif name == "greedy":

        def fn() -> None:
            runner.greedy(batch.decode_src, size.new_tokens)

    else:
        if runner.beam is None:
            return None
        beam = runner.beam

        def fn() -> None:
            beam(batch.decode_src, size.new_tokens, size.beam_size)

    try:
        return F.count_flops(fn)
    finally:
        runner.model.zero_grad(set_to_none=True)


def _model_flops(size: Size, cfg, workload: str) -> int:
    if workload == "train":
        return F.train_step_flops(cfg, size.sentences, size.src_len, size.tgt_len)
    beams = size.beam_size if workload == "beam" else 1
    return F.decode_flops(cfg, size.decode_sentences, size.decode_src_len, size.new_tokens, beams)


def _time_interleaved(
    fns: dict[str, Callable[[], torch.Tensor]], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Warm every implementation up, then time one iteration of each in turn, `repeats` rounds.

    Interleaving spreads a slow period of a shared machine over all implementations instead of one.
    Returns the times, the first and last outputs, and an error message for each implementation that failed.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    first: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                out = fn()
                first.setdefault(name, out)
            _synchronize(device)
        except Exception as error:  # one failing implementation must not lose the others' numbers
            errors[name] = _first_line(error)
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                _synchronize(device)
                start = time.perf_counter()
                out = fn()
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
                first.setdefault(name, out)
                last[name] = out
            except Exception as error:
                errors[name] = _first_line(error)
    return times, first, last, errors


def _agreement(outputs: dict[str, torch.Tensor], name: str) -> float | None:
    """Fraction of sentences whose generated ids equal vaswani's (same weights; fp32 should give 1.0)."""
    if name == "vaswani" or "vaswani" not in outputs or name not in outputs:
        return None
    mine, reference = outputs[name].cpu(), outputs["vaswani"].cpu()
    if mine.shape != reference.shape:
        return 0.0
    return float((mine == reference).all(dim=1).float().mean())


def run_benchmark(options: BenchOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark described by `options`; return the results (the JSON document) and write them to
    `options.out` if given. `log` receives progress lines (default: standard error)."""
    options.validate()
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    size = SIZES[options.size]
    if options.overrides:
        size = dataclasses.replace(size, **options.overrides)
    previous_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        results = _run(options, size, say)
    finally:
        torch.set_num_threads(previous_threads)
    if options.out:
        out = Path(options.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _run(options: BenchOptions, size: Size, say: Callable[[str], None]) -> dict:
    threads = torch.get_num_threads()
    device = torch.device(options.device)
    cfg = size.config()
    names = list(options.implementations)
    implementations: dict[str, dict] = {}
    transformers = None
    if "hf" in names:
        transformers = import_transformers()
        if transformers is None:
            say(TRANSFORMERS_MISSING)
            implementations["hf"] = {
                "label": LABELS["hf"],
                "available": False,
                "reason": TRANSFORMERS_MISSING,
            }
            names.remove("hf")

    say(f"vaswani bench: size {size.name}, {device}, {threads} threads, {', '.join(options.precisions)}")
    batch = size_batch(size, cfg, options.seed).to(device)
    runners = _build_runners(names, cfg, device, transformers, options.seed)
    for name, runner in runners.items():
        params = sum(p.numel() for p in {id(p): p for p in runner.model.parameters()}.values())
        implementations[name] = {"label": runner.label, "available": True, "parameters": params}
        implementations[name].update(runner.details)
    counts = {"train": batch.train_tokens(cfg.pad_id), "decode": size.decode_sentences * size.new_tokens}

    peaks = _matmul_peaks(options, size, device, say)
    flops = _count_flops(options.workloads, runners, batch, size, cfg, counts, say)
    rows = _time_workloads(options, runners, batch, size, cfg, device, counts, flops, peaks, say)
    memory_method = "not measured (--no-memory)"
    if options.memory:
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()
        measured = _measure_memory(rows, options, size, cfg, device, threads, say)
        memory_method = measured or "not measured: see each row's memory_note"
    _add_ratios(rows)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "environment": _environment(device, threads, transformers),
        "settings": {
            "size": size.name,
            "device": str(device),
            "precisions": list(options.precisions),
            "workloads": list(options.workloads),
            "threads": threads,
            "warmup": options.warmup,
            "repeats": options.repeats,
            "seed": options.seed,
            "statistic": "median over repeats of the time of one iteration",
            "label_smoothing": LABEL_SMOOTHING,
            "optimizer": f"torch.optim.Adam(lr={ADAM['lr']}, betas={ADAM['betas']}, eps={ADAM['eps']}); "
            "fused or not per implementation (implementations.*.optimizer)",
        },
        "size": size.to_dict(),
        "config": cfg.to_dict(),
        "batch": {
            "train": {
                "sentences": size.sentences,
                "src_len": size.src_len,
                "tgt_len": size.tgt_len,
                "tokens": counts["train"],
                "tokens_counted": "source + target tokens that are not padding (there is no padding)",
            },
            "decode": {
                "sentences": size.decode_sentences,
                "src_len": size.decode_src_len,
                "new_tokens": size.new_tokens,
                "beam_size": size.beam_size,
                "generated_tokens": counts["decode"],
                "tokens_counted": "sentences * new_tokens (one translation per sentence, beam search too)",
            },
        },
        "implementations": implementations,
        "matmul_peak": peaks,
        "flops": flops,
        "memory_method": memory_method,
        "results": rows,
        "projection": _projection(rows, size, device),
    }


def _build_runners(names, cfg, device: torch.device, transformers, seed: int) -> dict[str, Runner]:
    """Every implementation with the weights of one vaswani model (each its own copy), on `device`."""
    torch.manual_seed(seed)
    reference = Transformer(cfg)
    runners = {}
    for name in names:
        own = copy.deepcopy(reference) if name == "vaswani" else reference
        runners[name] = build_runner(name, cfg, own, transformers)
        runners[name].model.to(device)
    return runners


def _matmul_peaks(options: BenchOptions, size: Size, device: torch.device, say) -> dict:
    """The measured matmul rate of each precision run (and of bf16 on a GPU, for the MFU)."""
    wanted = set(options.precisions) | ({"bf16"} if device.type == "cuda" else set())
    peaks = {}
    for precision in sorted(wanted, key=PRECISIONS.index):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peaks[precision] = F.matmul_peak(device, dtype, size.matmul_n)
        rate = peaks[precision]["flops_per_s"]
        say(f"matmul peak {precision}: {rate / 1e9:,.1f} GFLOP/s (n={size.matmul_n})")
    return peaks


def _count_flops(workloads, runners, batch: Batch, size: Size, cfg, counts: dict, say) -> dict:
    """Per workload: the model FLOPs of one iteration from the config, and FlopCounterMode's count of each
    implementation (on the untouched weights: no optimizer step is taken)."""
    flops: dict[str, dict] = {}
    for workload in workloads:
        model_flops = _model_flops(size, cfg, workload)
        per = counts["train" if workload == "train" else "decode"]
        counted = {}
        for name, runner in runners.items():
            try:
                counted[name] = _count_workload_flops(workload, runner, batch, size, cfg.pad_id)
            except Exception as error:
                counted[name] = None
                say(f"FlopCounterMode could not count {workload} of {runner.label}: {_first_line(error)}")
        check = counted.get("vaswani")
        flops[workload] = {
            "model_flops": model_flops,
            "per_token": model_flops / per,
            "flop_counter": counted,
            "flop_counter_over_model": None if not check else check / model_flops,
        }
        say(f"{workload}: {model_flops / per / 1e6:,.2f} MFLOP per token (counted from the config)")
    return flops


def _time_workloads(options, runners, batch, size, cfg, device, counts, flops, peaks, say) -> list[dict]:
    """One row per workload, precision and implementation. Decoding runs first, on the copied weights, so
    that the implementations' outputs can be compared; every training precision starts from them again."""
    pristine = {name: copy.deepcopy(r.model.state_dict()) for name, r in runners.items()}
    rows: list[dict] = []
    for workload in [w for w in ("greedy", "beam", "train") if w in options.workloads]:
        count = counts["train" if workload == "train" else "decode"]
        for precision in options.precisions:
            fns, statuses = {}, {}
            for name, runner in runners.items():
                if workload == "beam" and runner.beam is None:
                    statuses[name] = ("n/a", f"{runner.label} has no beam search")
                    continue
                if workload == "train":
                    runner.model.load_state_dict(pristine[name])
                fns[name] = workload_fn(
                    workload, runner, batch, precision, device, cfg.pad_id, size.new_tokens, size.beam_size
                )
            say(f"timing {workload} {precision}: {', '.join(runners[n].label for n in fns)}")
            times, first, last, errors = _time_interleaved(fns, options.warmup, options.repeats, device)
            for name in runners:
                row = {"workload": workload, "precision": precision, "impl": name, "label": LABELS[name]}
                row["unit"] = UNITS[workload]
                if name in statuses:
                    row["status"], row["note"] = statuses[name]
                elif name in errors:
                    row["status"], row["note"] = "error", errors[name]
                    say(f"  {runners[name].label} failed: {errors[name]}")
                else:
                    seconds = statistics.median(times[name])
                    row.update(status="ok", seconds=seconds, times=times[name], rate=count / seconds)
                    row["flops_per_s"] = flops[workload]["model_flops"] / seconds
                    row["peak_fraction"] = row["flops_per_s"] / peaks[precision]["flops_per_s"]
                    if device.type == "cuda":
                        row["mfu"] = row["flops_per_s"] / peaks["bf16"]["flops_per_s"]
                    if workload == "train":
                        row["first_loss"] = float(first[name])
                    else:
                        row["agreement_with_vaswani"] = _agreement(last, name)
                rows.append(row)
            del fns, first, last  # the optimizers and outputs of this round
            if workload == "train":
                for runner in runners.values():
                    runner.model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _measure_memory(rows, options, size, cfg, device, threads, say) -> str | None:
    """Add `memory_bytes` to every timed row, each measured in a fresh process (see memory.py); return how."""
    method = None
    for row in rows:
        if row["status"] != "ok":
            continue
        say(f"memory: {row['workload']} {row['precision']} {row['label']} (fresh process)")
        spec = probe_spec(
            cfg,
            (size.sentences, size.src_len, size.tgt_len),
            (size.decode_sentences, size.decode_src_len),
            options.seed,
            row["impl"],
            row["workload"],
            row["precision"],
            device,
            threads,
            size.new_tokens,
            size.beam_size,
        )
        measured = measure_in_subprocess(spec)
        row["memory_bytes"] = measured["bytes"]
        if measured["bytes"] is None:
            row["memory_note"] = measured["method"]
        else:
            method = measured["method"]
    return method


def _add_ratios(rows: list[dict]) -> None:
    """Each timed row gets `ratios`: its rate divided by every peer's rate on the same workload and
    precision (> 1: faster than that peer)."""
    for row in rows:
        if row["status"] != "ok":
            continue
        row["ratios"] = {
            peer["impl"]: row["rate"] / peer["rate"]
            for peer in rows
            if peer is not row
            and peer["status"] == "ok"
            and peer["workload"] == row["workload"]
            and peer["precision"] == row["precision"]
        }


def _projection(rows: list[dict], size: Size, device: torch.device) -> dict | None:
    """Hours to train the paper's base model at the measured training rate (GPU, base size only)."""
    if device.type != "cuda" or size.name != "base":
        return None
    train = [r for r in rows if r["workload"] == "train" and r["status"] == "ok"]
    hours = {}
    for precision in ("bf16", "fp32"):
        for row in train:
            if row["precision"] == precision and row["impl"] not in hours:
                hours[row["impl"]] = {
                    "precision": precision,
                    "hours": PAPER_STEPS * PAPER_TOKENS_PER_STEP / row["rate"] / 3600,
                }
    return {
        "steps": PAPER_STEPS,
        "tokens_per_step": PAPER_TOKENS_PER_STEP,
        "paper": f"{PAPER_HOURS:g} hours on 8 NVIDIA P100 GPUs (§5.2)",
        "device": torch.cuda.get_device_name(device),
        "hours": hours,
    }


# ---------------------------------------------------------------------------------------- the table
def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def format_table(results: dict) -> str:
    """The results as a plain-text table, one row per workload, precision and implementation, then the
    FLOP counts, the matmul peaks and (GPU, base size) the projected training time."""
    names = [n for n in IMPLEMENTATIONS if results["implementations"].get(n, {}).get("available")]
    header = ["workload", "prec", "implementation", "rate", "ms/iter", "FLOP/s", "of peak", "peak mem"]
    header += [f"vs {n}" for n in names]
    lines, notes = [header], []
    for row in results["results"]:
        cells = [row["workload"], row["precision"], row["label"]]
        if row["status"] != "ok":
            cells += [row["status"]] + ["-"] * (len(header) - 4)
            notes.append(
                f"{row['workload']} {row['precision']} {row['label']}: {row['status']}: {row['note']}"
            )
            lines.append(cells)
            continue
        unit = "tok/s" if row["workload"] == "train" else "gen tok/s"
        memory = row.get("memory_bytes")
        cells += [
            f"{row['rate']:,.0f} {unit}",
            f"{row['seconds'] * 1e3:,.1f}",
            _si(row["flops_per_s"]) if "flops_per_s" in row else "-",
            f"{row['peak_fraction']:.1%}" if row.get("peak_fraction") is not None else "-",
            f"{memory / 2**20:,.0f} MiB" if memory is not None else "-",
        ]
        ratios = row.get("ratios", {})
        cells += [f"{ratios[n]:.2f}x" if n in ratios else "-" for n in names]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    footer = []
    for workload, info in results["flops"].items():
        check = info.get("flop_counter_over_model")
        check_text = f" (FlopCounterMode on vaswani: {check:.4f} of it)" if check else ""
        footer.append(
            f"{workload}: {info['per_token'] / 1e6:,.2f} MFLOP per token counted from the config{check_text}"
        )
    for precision, peak in results["matmul_peak"].items():
        footer.append(f"matmul peak {precision}: {_si(peak['flops_per_s'], 'FLOP/s')} (n={peak['n']})")
    projection = results.get("projection")
    if projection:
        for name, p in projection["hours"].items():
            footer.append(
                f"base model, {projection['steps']:,} steps x {projection['tokens_per_step']:,} tokens: "
                f"{p['hours']:.1f} h on one {projection['device']} with {LABELS[name]} ({p['precision']}); "
                f"paper: {projection['paper']}"
            )
    return "\n".join(text + notes + [""] + footer)
