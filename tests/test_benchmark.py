"""The benchmark suite (vaswani.benchmark): its peers compute the same function as vaswani, its FLOP formula
is what FlopCounterMode counts, its JSON has the documented schema, and `vaswani bench` runs end to end."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vaswani
from vaswani.benchmark import SCHEMA, SIZES, TRANSFORMERS_MISSING, BenchOptions, run_benchmark
from vaswani.benchmark import flops as F
from vaswani.benchmark.memory import cpu_peak_supported, measure_in_subprocess, probe_spec
from vaswani.benchmark.peers import (
    TorchTransformer,
    build_runner,
    copy_into_torch,
    import_transformers,
)
from vaswani.benchmark.workloads import Batch, training_loss
from vaswani.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
V = 50


def config(**overrides) -> vaswani.TransformerConfig:
    values = dict(
        vocab_size=V,
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=3,
        dropout=0.0,
        max_len=64,
        positional="sinusoidal_concat",
    )
    return vaswani.TransformerConfig(**{**values, **overrides})


def ids(rows, length, seed):
    return torch.randint(5, V, (rows, length), generator=torch.Generator().manual_seed(seed))


def padded_source():
    src = ids(3, 7, seed=1)
    src[1, 4:] = 0  # a shorter sentence: padding is masked as keys
    return src


def reference(cfg=None) -> vaswani.Transformer:
    torch.manual_seed(0)
    return vaswani.Transformer(cfg or config())


@pytest.fixture(scope="module")
def transformers():
    module = import_transformers()
    if module is None:
        pytest.skip(TRANSFORMERS_MISSING)
    return module


# ---------------------------------------------------------------------------------------- same function
def test_torch_wrapper_is_nn_transformer_with_the_same_parameters():
    cfg = config()
    wrapper = TorchTransformer(cfg)
    assert isinstance(wrapper.transformer, nn.Transformer)
    assert wrapper.transformer.encoder.norm is None and wrapper.transformer.decoder.norm is None
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wrapper) == count(vaswani.Transformer(cfg))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_wrapper_with_copied_weights_gives_vaswanis_logits(mode):
    model = reference()
    wrapper = copy_into_torch(model, TorchTransformer(model.config))
    model.train(mode == "train")
    wrapper.train(mode == "train")
    src, tgt = padded_source(), ids(3, 5, seed=2)
    torch.testing.assert_close(wrapper(src, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)


def test_marian_with_copied_weights_gives_vaswanis_logits(transformers):
    model = reference()
    marian = build_runner("hf", model.config, model, transformers)
    src, tgt = padded_source(), ids(3, 5, seed=2)
    torch.testing.assert_close(marian.logits(src, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)


def test_the_decoders_generate_the_same_tokens_of_the_requested_length(transformers):
    model = reference()
    runners = [build_runner(name, model.config, model, transformers) for name in ("vaswani", "torch", "hf")]
    src = ids(3, 6, seed=3)
    greedy = [r.greedy(src, 9) for r in runners]
    beam = [r.beam(src, 9, 3) for r in runners if r.beam is not None]
    for out in greedy + beam:
        assert out.shape == (3, 9)
        assert not torch.isin(out, torch.tensor([0, 1, 2])).any()  # no padding, BOS or EOS
    assert all(torch.equal(out, greedy[0]) for out in greedy)
    assert len(beam) == 2 and torch.equal(beam[0], beam[1])


# ---------------------------------------------------------------------------------------- FLOPs
def test_flop_formula_matches_flop_counter_mode():
    cfg = config()
    runner = build_runner("vaswani", cfg, reference(cfg))
    src, tgt = ids(3, 7, seed=1), ids(3, 5, seed=2)
    batch = Batch(src=src, tgt_in=tgt, tgt_out=tgt, decode_src=src)
    assert F.count_flops(lambda: runner.model(src, tgt)) == pytest.approx(
        F.forward_flops(cfg, 3, 7, 5), rel=0.01
    )
    counted = F.count_flops(lambda: training_loss(runner, batch, cfg.pad_id).backward())
    assert counted == pytest.approx(F.train_step_flops(cfg, 3, 7, 5), rel=0.02)
    counted = F.count_flops(lambda: runner.greedy(src, 6))
    assert counted == pytest.approx(F.decode_flops(cfg, 3, 7, 6), rel=0.02)
    counted = F.count_flops(lambda: runner.beam(src, 6, 2))
    assert counted == pytest.approx(F.decode_flops(cfg, 3, 7, 6, beam_size=2), rel=0.02)


def test_flop_formula_is_six_n_plus_attention_for_one_layer_pair():
    """The count of a training step: 6 · (matmul parameters each token meets) + the attention terms."""
    cfg = config(n_encoder_layers=1, n_decoder_layers=1)
    d, f, v, s, t = cfg.d_model, cfg.d_ff, V, 7, 5
    encoder_params, decoder_params = 4 * d * d + 2 * d * f, 6 * d * d + 2 * d * f + d * v
    cross_kv_params = 2 * d * d  # applied to every source token
    six_n = 6 * (s * (encoder_params + cross_kv_params) + t * decoder_params)
    attention = 3 * (4 * s * s * d + 4 * t * t * d + 4 * t * s * d)
    assert F.train_step_flops(cfg, 1, s, t) == six_n + attention


# ------------------------------------------------------------------------------------- the run and its JSON
def tiny_options(tmp_path, **changes) -> BenchOptions:
    values = dict(
        size="tiny",
        device="cpu",
        precisions=("fp32",),
        warmup=0,
        repeats=2,
        memory=False,
        out=str(tmp_path / "results.json"),
        overrides={"sentences": 4, "decode_sentences": 2, "new_tokens": 4, "matmul_n": 128},
    )
    return BenchOptions(**{**values, **changes})


def test_results_follow_the_schema_and_ratios_divide_the_rates(tmp_path, transformers):
    results = run_benchmark(tiny_options(tmp_path), log=lambda line: None)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["schema"] == SCHEMA
    for key in ("environment", "settings", "size", "config", "batch", "implementations", "matmul_peak"):
        assert key in results
    assert set(results["flops"]) == {"train", "greedy", "beam"}
    for info in results["flops"].values():
        assert info["flop_counter_over_model"] == pytest.approx(1.0, rel=0.02)
    batch = results["batch"]["train"]
    assert batch["tokens"] == batch["sentences"] * (batch["src_len"] + batch["tgt_len"])

    rows = {(r["workload"], r["precision"], r["impl"]): r for r in results["results"]}
    assert len(rows) == 9
    assert rows[("beam", "fp32", "torch")]["status"] == "n/a"
    ok = [r for r in results["results"] if r["status"] == "ok"]
    assert len(ok) == 8
    for row in ok:
        assert len(row["times"]) == 2 and row["seconds"] == pytest.approx(statistics.median(row["times"]))
        count = (
            batch["tokens"] if row["workload"] == "train" else results["batch"]["decode"]["generated_tokens"]
        )
        assert row["rate"] == pytest.approx(count / row["seconds"])
        peers = [r for r in ok if r is not row and r["workload"] == row["workload"]]
        assert set(row["ratios"]) == {p["impl"] for p in peers}
        for peer in peers:
            assert row["ratios"][peer["impl"]] == pytest.approx(row["rate"] / peer["rate"])
        assert row["flops_per_s"] == pytest.approx(
            results["flops"][row["workload"]]["model_flops"] / row["seconds"]
        )
        assert row["peak_fraction"] == pytest.approx(
            row["flops_per_s"] / results["matmul_peak"]["fp32"]["flops_per_s"]
        )
    losses = [rows[("train", "fp32", name)]["first_loss"] for name in ("vaswani", "torch", "hf")]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)  # same weights, same batch, no dropout
    assert results["projection"] is None  # only for the base model on a GPU


def test_missing_transformers_is_skipped_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    lines = []
    results = run_benchmark(tiny_options(tmp_path, workloads=("train",)), log=lines.append)
    assert TRANSFORMERS_MISSING in lines
    assert results["implementations"]["hf"] == {
        "label": "HF MarianMTModel",
        "available": False,
        "reason": TRANSFORMERS_MISSING,
    }
    assert {r["impl"] for r in results["results"]} == {"vaswani", "torch"}


@pytest.mark.slow
@pytest.mark.skipif(not cpu_peak_supported(), reason="peak RSS needs Linux's /proc/self/clear_refs")
def test_peak_memory_is_measured_in_a_fresh_process():
    size = SIZES["tiny"]
    spec = probe_spec(
        size.config(), (4, 8, 8), (2, 8), 0, "vaswani", "train", "fp32", "cpu", 1, 4, size.beam_size
    )
    measured = measure_in_subprocess(spec, timeout=120)
    assert measured["bytes"] is not None and measured["bytes"] > 0, measured
    assert "VmHWM" in measured["method"]


def test_vaswani_bench_tiny_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--size", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "0", "--repeats", "1"]
    assert main([*argv, "--no-memory", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "vaswani" in printed and "torch.nn.Transformer" in printed and f"results written to {out}" in printed
    )
    results = json.loads(out.read_text())
    assert results["settings"]["precisions"] == ["fp32", "bf16"]
    assert {r["workload"] for r in results["results"]} == {"train", "greedy", "beam"}
    assert all(r["status"] in ("ok", "n/a") for r in results["results"]), results["results"]


def test_bench_dropout_reaches_every_model_and_the_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--size", "tiny", "--device", "cpu", "--threads", "1", "--warmup", "0", "--repeats", "1"]
    argv += ["--precision", "fp32", "--workloads", "train", "--impl", "vaswani,torch", "--dropout", "0.1"]
    assert main([*argv, "--no-memory", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["size"]["dropout"] == results["config"]["dropout"] == 0.1
    assert all(r["status"] == "ok" for r in results["results"]), results["results"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp16"], "--precision 'fp16'"),
        (["--impl", "vaswani,jax"], "--impl 'jax'"),
        (["--repeats", "0"], "--repeats 0"),
        (["--dropout", "1.5"], "--dropout 1.5"),
    ],
)
def test_bad_bench_options_are_one_line_errors(args, message, capsys):
    assert main(["bench", "--size", "tiny", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_cuda_without_cuda_is_a_one_line_error(capsys):
    assert main(["bench", "--size", "tiny", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_probes_script_prints_and_writes_each_chosen_probe(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "probes.py"
    out = tmp_path / "probes.json"
    args = ["--size", "tiny", "--threads", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--probes", "adam,selection,prepack"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    seconds = json.loads(out.read_text())["seconds"]
    assert set(seconds) == {"adam_step", "selection", "prepack"}
    assert all(v > 0 for v in seconds["selection"].values())
    if torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available():
        assert "beam 4 bf16 packed" in seconds["prepack"] and "4x64x1000 packed" in seconds["prepack"]
    assert "beam top_k" in done.stdout and "fused" in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--probes", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown probe(s) nope" in bad.stderr


def test_the_curve_comparison_script_reports_the_relative_difference(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_curves.py"
    runs = []
    for name, scale in (("fp32", 1.0), ("bf16", 1.02)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "loss": scale * (10.0 - s / 100)} for s in (1, 50, 100)]
        lines.append({"step": 100, "split": "valid", "valid_nll": scale * 3.0})
        run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        runs.append(str(run))
    out, data = tmp_path / "curves.png", tmp_path / "curves.json"
    args = [
        sys.executable,
        str(script),
        *runs,
        "--labels",
        "fp32",
        "bf16",
        "--out",
        str(out),
        "--json",
        str(data),
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (
        "bf16 against fp32: 2.00%" in result.stdout and "valid_nll at step 100: fp32 3.0000" in result.stdout
    )
    assert out.stat().st_size > 0
    assert json.loads(data.read_text())["largest_relative_difference"]["bf16"] == pytest.approx(0.02)
    missing = subprocess.run(
        [sys.executable, str(script), runs[0], str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert (
        missing.returncode != 0
        and missing.stderr.strip().startswith("error:")
        and "Traceback" not in missing.stderr
    )


def _cnn_baseline():
    """benchmarks/cnn_baseline.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cnn_baseline.py"
    spec = importlib.util.spec_from_file_location("cnn_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cnn_baseline_keeps_kims_max_norm_and_pools_over_time():
    cnn = _cnn_baseline()
    torch.manual_seed(0)
    model = cnn.CNNRand(vocab_size=20, n_classes=3, dim=8, maps=4)
    with torch.no_grad():
        model.out.weight.copy_(torch.tensor([[10.0] * 12, [0.1] * 12, [-4.0] + [0.0] * 11]))
    small = model.out.weight[1].clone()
    model.clip_output_norms(3.0)
    norms = model.out.weight.detach().norm(dim=1).tolist()
    assert norms[0] == pytest.approx(3.0) and norms[2] == pytest.approx(3.0)
    assert torch.equal(model.out.weight[1], small)  # a row within the bound is left alone
    model.eval()
    ids = cnn.pad([[3, 4, 5, 6], [7, 8]])
    assert model(ids).shape == (2, 3) and ids[1].tolist() == [7, 8, cnn.PAD, cnn.PAD]
    assert cnn.encode(["A b zzz", ""], cnn.build_vocab(["a B c"])) == [[2, 3, cnn.UNK], [cnn.UNK]]


def test_the_cnn_baseline_scores_test_at_the_best_validation_epoch_and_is_seeded(tmp_path):
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (shared / "trec").is_dir():
        pytest.skip(f"real datasets not found at {shared}")
    cnn = _cnn_baseline()
    first = cnn.run("trec", seed=3, epochs=2, data_dir=str(shared), limit=150)
    again = cnn.run("trec", seed=3, epochs=2, data_dir=str(shared), limit=150)
    assert {k: v for k, v in first.items() if k != "minutes"} == {
        k: v for k, v in again.items() if k != "minutes"
    }
    assert len(first["valid_curve"]) == 2 and first["valid_accuracy"] == max(first["valid_curve"])
    assert first["valid_curve"][first["epoch"] - 1] == first["valid_accuracy"]
    assert 0.0 <= first["test_accuracy"] <= 100.0 and first["train_examples"] == 150
    out = tmp_path / "cnn.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "cnn_baseline.py"
    args = ["--seeds", "1", "--epochs", "1", "--limit-train", "100", "--data-dir", str(shared)]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["runs"][0]["epoch"] == 1 and record["summary"]["test_accuracy"]["std"] == 0.0
    bad = subprocess.run([sys.executable, str(script), "--dataset", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown classification dataset")
    assert "Traceback" not in bad.stderr
