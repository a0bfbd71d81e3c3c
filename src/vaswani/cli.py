"""The `vaswani` command: parses arguments, calls library functions, prints. No logic of its own.

    vaswani train CONFIG [--set key=value ...] [--run-dir DIR] [--resume]
    vaswani evaluate RUN_DIR [--split NAME | --src FILE --ref FILE]
    vaswani translate RUN_DIR [TEXT ...]          (or lines on stdin)
    vaswani classify RUN_DIR [TEXT ...]           (or lines on stdin; an image run takes .png/.npy paths)
    vaswani generate RUN_DIR --prompt TEXT
    vaswani average RUN_DIR --last N
    vaswani summarize RUN_DIR [RUN_DIR ...] [--split test]   (mean ± std over seeds)
    vaswani crossvalidate CONFIG --out DIR [--folds 5] [--fold K ...] [--set key=value ...]   (train + valid)
    vaswani attention RUN_DIR TEXT [TEXT ...] [--target TEXT] [--layer L --head H] [--html]
    vaswani attention RUN_DIR [IMAGE ...] [--image-index N ...] [--split NAME]     (an image run)
    vaswani plot {positional,masks,lr,label-smoothing,all} [--out DIR]
    vaswani bench [--size tiny|cpu|base] [--device cpu|cuda] [--precision fp32,bf16] [--out FILE] ...
    vaswani import-hf HF_DIR RUN_DIR              (a Hugging Face Marian or BERT-family checkpoint)
    vaswani embed RUN_DIR [TEXT ...]              (sentence embeddings of an imported encoder)
    vaswani export RUN_DIR --format onnx [--out DIR]
    vaswani serve RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 8000] [--max-inputs N ...]

Errors in the user's input (a bad recipe, a missing file, a corrupt checkpoint) print one line on stderr
and exit with status 2, without a traceback. `train` stopped by SIGINT or SIGTERM saves a checkpoint, prints
one line and exits with 130 or 143 (128 + the signal number). Under torchrun, `train` runs data-parallel
(see the README's "Distributed training").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vaswani.crossvalidation import crossvalidate, format_crossvalidation
from vaswani.data.images import read_image_file
from vaswani.data.paths import DataError
from vaswani.evaluation import format_confusion_matrix, plot_confusion_matrix, summarize_runs, write_json
from vaswani.interpret import (
    SANITY_PLOTS,
    attention_maps,
    image_attention_maps,
    output_dir_for,
    plot_image_attention,
    write_attention_files,
    write_sanity_plots,
)
from vaswani.recipes import RecipeError, load_recipe
from vaswani.runs import average_run, load_run
from vaswani.tasks import (
    ClassificationTask,
    EncoderTask,
    LanguageModelTask,
    MaskedLMTask,
    TranslationTask,
    make_task,
)
from vaswani.training.checkpoint import CheckpointError
from vaswani.training.faults import TrainingInterrupted
from vaswani.training.trainer import Trainer
from vaswani.vision_task import ImageClassificationTask

# ValueError covers bad recipes, data, checkpoints and tokenizers (their errors derive from it).
USER_ERRORS = (RecipeError, DataError, CheckpointError, ValueError, OSError, FloatingPointError)


def _read_inputs(texts: list[str]) -> list[str]:
    """The texts given on the command line, else the non-empty lines of standard input."""
    if texts:
        for number, text in enumerate(texts, 1):
            if not text.strip():
                raise ValueError(f"input {number} is empty")
        return texts
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no input: give texts as arguments or lines on standard input")
    lines = [line.rstrip("\n") for line in sys.stdin]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError("no input: standard input is empty")
    return lines


def _read_lines(path: str, what: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{what} file {path}: line {line} is not UTF-8 (byte {error.start})") from None
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


# ---------------------------------------------------------------------------------------- commands
def _recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, plus --data-dir as data.data_dir (train and crossvalidate)."""
    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.data_dir={json.dumps(args.data_dir)}")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, _recipe_overrides(args))
    run_dir = Path(args.run_dir or Path("runs") / recipe.name)
    task = make_task(recipe, run_dir)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one rank speaks for the job
    if main_rank:
        print(
            f"training {recipe.name} ({recipe.data.task}, {recipe.data.dataset}) into {run_dir}",
            file=sys.stderr,
        )
    trainer = Trainer(recipe, task, run_dir, resume=args.resume)
    try:
        state = trainer.fit()
    except TrainingInterrupted as stop:
        if main_rank:
            print(stop, file=sys.stderr)
        return stop.exit_code
    if not main_rank:
        return 0
    final = (run_dir / "FINAL").read_text().strip() if (run_dir / "FINAL").is_file() else "none"
    print(
        f"done: {state.step} steps, {state.tokens:,} tokens, {state.elapsed / 60:.1f} min. "
        f"Run directory {run_dir}: metrics.jsonl, plots/, checkpoints/; final weights: {final}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir, args.checkpoint, args.device)
    if args.data_dir:
        run.recipe.data.data_dir = args.data_dir
    task = run.task
    run_dir = Path(args.run_dir)
    if args.beam is not None:
        run.recipe.decode.beam_size = args.beam
    if (args.src is None) != (args.ref is None):
        raise ValueError("--src and --ref go together")
    split = args.split or "test"
    label = "files" if args.src else split
    if isinstance(task, TranslationTask):
        if args.src:
            sources, references = _read_lines(args.src, "--src"), _read_lines(args.ref, "--ref")
            if len(sources) != len(references):
                raise ValueError(f"--src has {len(sources)} lines but --ref has {len(references)}")
        else:
            corpus = task.corpus(split)
            sources, references = corpus.src, corpus.tgt
        hypotheses, results = task.evaluate(run.model, run.device, sources, references)
        (run_dir / f"hypotheses_{label}.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        results.update(split=label, checkpoint=str(run.checkpoint.relative_to(run_dir)))
        results["beam_size"], results["length_penalty"] = (
            run.recipe.decode.beam_size,
            run.recipe.decode.length_penalty,
        )
        print(f"BLEU = {results['bleu']['score']:.2f}   {results['bleu']['signature']}")
        print(f"chrF = {results['chrf']['score']:.2f}   {results['chrf']['signature']}")
        print(
            f"{results['sentences']} sentences, beam {results['beam_size']}, "
            f"checkpoint {results['checkpoint']}"
        )
    elif isinstance(task, (ClassificationTask, ImageClassificationTask)):
        if args.src:
            raise ValueError("--src/--ref are for translation runs; use --split for a classifier")
        data = task.data(split)
        inputs = data.unit_tensor() if isinstance(task, ImageClassificationTask) else data.texts
        _, report = task.evaluate(run.model, run.device, inputs, data.labels)
        results = {"split": split, "checkpoint": str(run.checkpoint.relative_to(run_dir)), **report.to_dict()}
        plot_confusion_matrix(report, run_dir / f"confusion_{split}.png")
        print(format_confusion_matrix(report))
        print(f"accuracy = {report.accuracy:.4f}   macro-F1 = {report.macro_f1:.4f}   ({len(data)} examples)")
    elif isinstance(task, EncoderTask):
        raise ValueError(f"{args.run_dir} is an imported encoder: it has no task to evaluate on")
    elif isinstance(task, MaskedLMTask):
        if args.src:
            raise ValueError("--src/--ref are for translation runs; use --split for a masked LM")
        metrics = task.score(run.model, task.encode(task.texts(split)), run.device)
        results = {"split": split, "checkpoint": str(run.checkpoint.relative_to(run_dir)), **metrics}
        print(
            f"masked tokens: nll = {metrics['valid_nll']:.4f}   accuracy = {metrics['valid_accuracy']:.4f}"
            f"   (the fixed validation masking of {split})"
        )
    else:
        assert isinstance(task, LanguageModelTask)
        metrics = task.validate(run.model, run.device)
        results = {"split": "valid", "checkpoint": str(run.checkpoint.relative_to(run_dir)), **metrics}
        label = "valid"
        print(f"nll = {metrics['valid_nll']:.4f} per token   bits per character = {metrics['valid_bpc']:.4f}")
    out = run_dir / f"results_{label}.json"
    write_json(out, results)
    print(f"results written to {out}")
    return 0


def _load_run_of(args: argparse.Namespace, task_class: type | tuple[type, ...], what: str):
    run = load_run(args.run_dir, args.checkpoint, args.device)
    if not isinstance(run.task, task_class):
        article = "an" if what[0] in "aeiou" else "a"
        raise ValueError(
            f"{args.run_dir} is a run of task {run.recipe.data.task!r}, not {article} {what} run"
        )
    return run


def cmd_translate(args: argparse.Namespace) -> int:
    run = _load_run_of(args, TranslationTask, "translation")
    texts = _read_inputs(args.texts)
    outputs = run.task.translate(
        run.model, texts, run.device, beam_size=args.beam, length_penalty=args.length_penalty
    )
    for text in outputs:
        print(text)
    return 0


def _read_images(paths: list[str], run) -> torch.Tensor:
    cfg = run.model.config
    return torch.stack([read_image_file(path, cfg.channels, cfg.image_size) for path in paths])


def cmd_classify(args: argparse.Namespace) -> int:
    run = _load_run_of(args, (ClassificationTask, ImageClassificationTask), "classification")
    texts = _read_inputs(args.texts)
    if isinstance(run.task, ImageClassificationTask):
        key, probs = "image", run.task.predict(run.model, _read_images(texts, run), run.device)
    else:
        key, probs = "text", run.task.predict(run.model, run.task.encode(texts), run.device)
    names = run.task.label_names
    for text, row in zip(texts, probs.tolist(), strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        if args.json:
            print(
                json.dumps(
                    {key: text, "label": names[best], "probabilities": dict(zip(names, row, strict=True))}
                )
            )
        else:
            print(f"{names[best]}\t{row[best]:.3f}\t{text}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    run = _load_run_of(args, LanguageModelTask, "language model")
    generator = torch.Generator(device=run.device).manual_seed(args.seed) if args.seed is not None else None
    text = run.task.generate(
        run.model,
        args.prompt,
        run.device,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
    )
    print(args.prompt + text)
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    path = average_run(args.run_dir, args.last)
    print(f"averaged the last {args.last} checkpoints into {path}")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    summaries = summarize_runs(args.run_dirs, args.split)
    if args.json:
        rows = {s.metric: {"values": s.values, "mean": s.mean, "std": s.std} for s in summaries}
        print(json.dumps({"split": args.split, "runs": [str(r) for r in args.run_dirs], "metrics": rows}))
        return 0
    print(f"{len(args.run_dirs)} runs, split {args.split}")
    for s in summaries:
        values = "  ".join(f"{v:.4f}" for v in s.values)
        print(f"{s.metric:<10} {s.mean:.4f} ± {s.std:.4f}   ({values})")
    return 0


def cmd_crossvalidate(args: argparse.Namespace) -> int:
    overrides = _recipe_overrides(args)
    cv = crossvalidate(
        lambda: load_recipe(args.config, overrides),
        Path(args.out),
        k=args.folds,
        seed=args.seed,
        only=args.fold or None,
        say=lambda message: print(message, file=sys.stderr),
    )
    print(format_crossvalidation(cv))
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaswani", description="Train, evaluate and use Transformers (Vaswani et al., 2017)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `vaswani train`")
        p.add_argument("--checkpoint", help="final (default), best, averaged, last, or step_NNNNNNN")
        p.add_argument("--device", help="cpu, cuda, cuda:N (default: the recipe's, auto)")

    p = sub.add_parser(
        "train", help="train a model from a recipe", description="Train a model from a TOML recipe."
    )
    p.add_argument("config", metavar="CONFIG", help="a recipe file, e.g. configs/multi30k_en_de_cpu.toml")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=100"
    )
    p.add_argument("--run-dir", help="where to write the run (default: runs/<recipe name>)")
    p.add_argument(
        "--data-dir", help="where the datasets are (default: $VASWANI_DATA, ../shared/data, the user cache)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a run on a test split or files", description="Evaluate a run.")
    run_options(p)
    p.add_argument("--split", help="dataset split (default: test)")
    p.add_argument("--src", help="translation: source file, one sentence a line")
    p.add_argument("--ref", help="translation: reference file aligned with --src")
    p.add_argument("--beam", type=int, help="beam size (default: the recipe's)")
    p.add_argument("--data-dir", help="where the datasets are (default: as for train)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "translate", help="translate text", description="Translate texts (arguments or stdin lines)."
    )
    run_options(p)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--beam", type=int, help="beam size (default: the recipe's, 4)")
    p.add_argument("--length-penalty", type=float, help="alpha of the length penalty (default: 0.6)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser(
        "classify", help="classify text", description="Classify texts (arguments or stdin lines)."
    )
    run_options(p)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--json", action="store_true", help="one JSON object per input, with all probabilities")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("generate", help="continue a prompt with a language model", description="Sample text.")
    run_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="default: the recipe's, else 200; past the training window (block_size) the model reads its "
        "last window",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the recipe's)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "average", help="average the last N checkpoints", description="Checkpoint averaging (§6.1)."
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--last", type=int, required=True, metavar="N")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser(
        "summarize",
        help="mean ± std of evaluated runs (seeds)",
        description="Mean and sample standard deviation of the results of several evaluated runs.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--split", default="test", help="the results_<split>.json to read (default: test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser(
        "crossvalidate",
        help="k-fold cross-validation of a classification recipe on train + valid",
        description="Train one run per fold of train + valid (stratified) and report held-out accuracy "
        "and NLL per fold and as mean ± std. The test split is never read. Finished folds in --out are kept.",
    )
    p.add_argument("config", metavar="CONFIG", help="a classification or image-classification recipe")
    p.add_argument("--out", required=True, help="directory for the fold runs and crossvalidation.json")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument(
        "--fold", type=int, action="append", default=[], metavar="K", help="train only fold K (repeatable)"
    )
    p.add_argument("--seed", type=int, default=123, help="seed of the fold assignment (default 123)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.dropout=0.3"
    )
    p.add_argument("--data-dir", help="where the datasets are (default: as for train)")
    p.set_defaults(func=cmd_crossvalidate)
    add_interpret_commands(sub, run_options)
    add_bench_command(sub)
    add_pretrained_commands(sub, run_options)
    add_serve_command(sub)
    return parser


# ---------------------------------------------------------------------------------------- interpretability
def cmd_attention(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir, args.checkpoint, args.device)
    if isinstance(run.task, ImageClassificationTask):
        return _image_attention(run, args)
    if args.image_index or args.split:
        raise ValueError(f"--image-index/--split are for image runs; this is a {run.recipe.data.task} run")
    if not args.texts:
        raise ValueError("no input: give one or more texts")
    targets = args.target or []
    if targets and len(targets) != len(args.texts):
        raise ValueError(f"{len(args.texts)} texts but {len(targets)} --target: give one --target per text")
    out = Path(args.out) if args.out else Path(args.run_dir) / "attention"
    all_maps = [
        attention_maps(run, text, targets[i] if targets else None) for i, text in enumerate(args.texts)
    ]
    taken: set[str] = set()
    for maps in all_maps:
        directory = output_dir_for(out, maps.text, taken)
        for path in write_attention_files(maps, directory, args.layer, args.head, args.html):
            print(path)
    return 0


def _image_attention(run, args: argparse.Namespace) -> int:
    """`vaswani attention` on an image run: image files and/or --image-index N of the --split."""
    if args.target:
        raise ValueError("--target is for translation runs")
    if not args.texts and not args.image_index:
        raise ValueError("no input: give image files (.png, .npy) or --image-index N")
    images = _read_images(args.texts, run) if args.texts else []
    inputs = [(Path(path).stem, image, None) for path, image in zip(args.texts, images, strict=True)]
    if args.image_index:
        split = args.split or "test"
        data = run.task.data(split)
        for index in args.image_index:
            if not 0 <= index < len(data):
                raise ValueError(f"--image-index {index}: the {split} split has images 0 to {len(data) - 1}")
            label = data.label_names[data.labels[index]]
            inputs.append((f"{split} image {index}", data.unit_tensor([index])[0], label))
    out = Path(args.out) if args.out else Path(args.run_dir) / "attention"
    taken: set[str] = set()
    for name, image, label in inputs:
        attention = image_attention_maps(run, image, name, label)
        directory = output_dir_for(out, name, taken)
        print(plot_image_attention(attention, directory / "cls_overlay.png"))
        for path in write_attention_files(attention.maps, directory, args.layer, args.head, args.html):
            print(path)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    names = list(SANITY_PLOTS) if args.which == "all" else [args.which]
    for path in write_sanity_plots(args.out, names):
        print(path)
    return 0


def add_interpret_commands(
    sub: argparse._SubParsersAction, run_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add `vaswani attention` and `vaswani plot` (vaswani.interpret) to the subcommands `sub`."""
    p = sub.add_parser(
        "attention",
        help="draw a model's attention for some inputs",
        description="Attention maps of a trained run: per input, a grid of heads per layer and attention "
        "kind, one head at full size, the [CLS] attention of a classifier, and with --html one "
        "self-contained page to browse them. For an image run, the inputs are image files (.png, .npy) "
        "or --image-index N, and cls_overlay.png draws the [CLS] attention over the image, per layer. "
        "Layers and heads count from 1.",
    )
    run_options(p)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts, or image files for an image run")
    p.add_argument(
        "--image-index",
        type=int,
        action="append",
        metavar="N",
        help="image run: image N of --split (repeatable)",
    )
    p.add_argument("--split", help="image run: the split --image-index reads (default: test)")
    p.add_argument(
        "--target",
        action="append",
        metavar="TEXT",
        help="translation: the target to force-feed (one per TEXT); default: the model's own translation",
    )
    p.add_argument("--out", help="output directory (default: RUN_DIR/attention)")
    p.add_argument("--layer", type=int, metavar="L", help="layer drawn at full size (default: the last)")
    p.add_argument("--head", type=int, default=1, metavar="H", help="head drawn at full size (default: 1)")
    p.add_argument("--html", action="store_true", help="also write attention.html, an interactive page")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser(
        "plot",
        help="sanity plots: positional encoding, masks, learning rate, label smoothing",
        description="The Annotated Transformer's sanity plots, drawn from the library's own functions.",
    )
    p.add_argument("which", choices=[*SANITY_PLOTS, "all"])
    p.add_argument("--out", default="plots", help="output directory (default: plots)")
    p.set_defaults(func=cmd_plot)


# ---------------------------------------------------------------------------------------- benchmark
def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from vaswani.benchmark import BenchOptions, format_table, run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = BenchOptions(
        size=args.size or ("base" if device == "cuda" else "cpu"),
        device=device,
        precisions=_names(args.precision),
        implementations=_names(args.impl),
        workloads=_names(args.workloads),
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        memory=args.memory,
        seed=args.seed,
        out=args.out,
        overrides={} if args.dropout is None else {"dropout": args.dropout},
    )
    results = run_benchmark(options)
    print(format_table(results))
    if args.out:
        print(f"results written to {args.out}")
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Add `vaswani bench` (vaswani.benchmark) to the subcommands `sub`."""
    p = sub.add_parser(
        "bench",
        help="benchmark vaswani against torch.nn.Transformer and Hugging Face Marian",
        description="Time one training step (fp32 and bf16 autocast), greedy decoding and beam search on "
        "vaswani, torch.nn.Transformer and Hugging Face MarianMTModel (skipped without transformers): the "
        "same model, weights, batch, dtype and threads, in one process. Reports tokens/s, model FLOP/s "
        "against the measured matmul peak, peak memory and every ratio. See docs/PERFORMANCE.md.",
    )
    p.add_argument(
        "--size", choices=["tiny", "cpu", "base"], help="model and batch (default: cpu; base on cuda)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: both)")
    p.add_argument(
        "--impl", default="vaswani,torch,hf", help="comma-separated: vaswani, torch, hf (default: all)"
    )
    p.add_argument(
        "--workloads", default="train,greedy,beam", help="comma-separated: train, greedy, beam (default: all)"
    )
    p.add_argument("--threads", type=int, help="torch threads for every implementation (default: torch's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default: 2)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed iterations; the median is reported (default: 5)"
    )
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory measurements (each one runs in a fresh process)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the token ids (default: 0)")
    p.add_argument(
        "--dropout",
        type=float,
        metavar="P",
        help="residual and embedding dropout of every implementation (default: the size's; the paper: 0.1)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------------------------------- pretrained models
def cmd_import_hf(args: argparse.Namespace) -> int:
    from vaswani.hub import import_hf

    imported = import_hf(args.hf_dir, args.run_dir)
    print(
        f"imported a {imported.family} checkpoint ({imported.parameters:,} parameters) "
        f"into {imported.run_dir} (task: {imported.task})"
    )
    if imported.unused:
        print(f"not imported (no place in vaswani): {', '.join(imported.unused)}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    run = _load_run_of(args, EncoderTask, "encoder")
    texts = _read_inputs(args.texts)
    vectors = run.task.embed(run.model, texts, run.device)
    for text, vector in zip(texts, vectors.tolist(), strict=True):
        print(json.dumps({"text": text, "embedding": [round(v, 6) for v in vector]}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vaswani.export import export_run

    info = export_run(args.run_dir, args.out, args.format)
    print(
        f"exported the {info['kind']} model to {info['directory']}: {', '.join(info['files'])} "
        f"(onnxruntime vs PyTorch: max abs difference {info['max_error']:.1e})"
    )
    return 0


def add_pretrained_commands(
    sub: argparse._SubParsersAction, run_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add `vaswani import-hf`, `embed` and `export` (vaswani.hub, vaswani.export)."""
    p = sub.add_parser(
        "import-hf",
        help="import a Hugging Face Marian or BERT-family checkpoint as a run directory",
        description="Read a Hugging Face checkpoint directory (config.json, model.safetensors or "
        "pytorch_model.bin, tokenizer files; or pkg:MODULE/DIR inside an installed package) and write a "
        "vaswani run directory: Marian -> a translation run, a BERT-family encoder -> an encoder run.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser(
        "embed",
        help="sentence embeddings of an imported encoder",
        description="Mean of the token states, L2-normalised (sentence-transformers' pooling), one JSON "
        "line per input.",
    )
    run_options(p)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "export",
        help="export a run's model to ONNX",
        description="Export a classifier, an encoder, or an encoder-decoder (encoder + one decoder step "
        "with a KV cache) with dynamic batch and sequence axes; checked against PyTorch with onnxruntime.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", help="onnx (the only format)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/onnx)")
    p.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------------------------- serving
def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from vaswani.serving import ServeLimits, serve
    except ImportError as error:
        hint = "pip install 'vaswani[serve]'"
        raise ValueError(f"vaswani serve needs the serve extra ({hint}): {error}") from None

    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes,
        max_inputs=args.max_inputs,
        max_new_tokens=args.max_new_tokens,
        max_batch_size=1 if args.no_batching else args.max_batch_size,
        max_wait_ms=args.batch_wait_ms,
    )
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    serve(args.run_dirs, args.host, args.port, limits, args.device, args.checkpoint, args.log_level)
    return 0


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Add `vaswani serve` (vaswani.serving)."""
    p = sub.add_parser(
        "serve",
        help="serve runs over HTTP, with a web playground",
        description="Serve trained runs (translation, classification, language model) over HTTP: "
        "POST /v1/translate, /v1/classify, /v1/generate, /v1/attention; GET /v1/models, /health; the "
        "playground at /, API docs at /docs. Concurrent requests are batched dynamically. Needs the serve "
        "extra. See docs/SERVING.md.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, named after their folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--checkpoint", help="final (default), best, averaged, last, or step_NNNNNNN")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: each recipe's, auto)")
    p.add_argument("--threads", type=int, help="torch threads for inference (default: torch's)")
    p.add_argument("--max-body-bytes", type=int, default=65536, help="larger bodies get 413 (default: 65536)")
    p.add_argument("--max-inputs", type=int, default=32, help="texts in one request (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_new_tokens (default: 256)")
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="inputs that share one forward pass (default: 32)"
    )
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more inputs (default: 5)"
    )
    p.add_argument("--no-batching", action="store_true", help="run every input alone (max batch size 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling TEXT... at the first option; texts after options arrive here.
    if extra and hasattr(args, "texts") and not any(e.startswith("-") for e in extra):
        args.texts += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
