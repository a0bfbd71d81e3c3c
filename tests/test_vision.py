"""The Vision Transformer (Dosovitskiy et al., 2020) on the library's encoder: patches, position
embeddings and their interpolation, the image datasets and their downloads (against a local server), the
augmentation, recipes, and the command line end to end on scikit-learn's digits."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vaswani
from vaswani.cli import main
from vaswani.data import images as image_data
from vaswani.data.download import RemoteFile
from vaswani.data.images import (
    load_cifar10,
    load_digits,
    load_mnist,
    random_crop_flip,
    read_image_file,
)
from vaswani.data.paths import DataError
from vaswani.interpret import attention_maps
from vaswani.recipes import RecipeError, load_recipe
from vaswani.runs import load_run
from vaswani.vision import PatchEmbedding, patchify, resize_position_embeddings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def small(**overrides) -> vaswani.VisionConfig:
    values = dict(
        image_size=8, patch_size=2, n_classes=10, channels=1, d_model=32, n_heads=4, d_ff=64,
        n_encoder_layers=2, dropout=0.0,
    )  # fmt: skip
    return vaswani.VisionConfig(**{**values, **overrides})


def random_images(batch=3, channels=1, size=8, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def trained_like(model: vaswani.VisionTransformer) -> vaswani.VisionTransformer:
    """The head starts at zero (as in the paper's code), which would make every output equal: give it
    weights so that outputs depend on the input."""
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


# patches -------------------------------------------------------------------------------------------


def test_each_patch_lands_in_its_own_token_in_row_major_order():
    images = torch.arange(2 * 3 * 6 * 4, dtype=torch.float32).reshape(2, 3, 6, 4)  # value = pixel index
    tokens = patchify(images, 2)
    assert tokens.shape == (2, 3 * 2, 3 * 2 * 2)  # grid 3 x 2, each token C * P * P values
    for i in range(3):
        for j in range(2):
            patch = images[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # (B, C, P, P)
            torch.testing.assert_close(tokens[:, i * 2 + j], patch.reshape(2, -1))


def test_patch_embedding_shape_and_a_patch_reaches_only_its_token():
    torch.manual_seed(0)
    embed = PatchEmbedding(channels=3, patch_size=4, d_model=16)
    images = torch.zeros(1, 3, 12, 8)
    images[0, :, 4:8, 4:8] = 1.0  # the patch in row 1, column 1 of a 3 x 2 grid: token 3
    out = embed(images)
    assert out.shape == (1, 6, 16)
    changed = (out - embed.bias).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, False, False, True, False, False]


def test_linear_and_convolutional_patch_embeddings_are_the_same_function():
    torch.manual_seed(0)
    conv, linear = PatchEmbedding(3, 4, 16, mode="conv"), PatchEmbedding(3, 4, 16, mode="linear")
    linear.load_state_dict(conv.state_dict())
    images = random_images(2, channels=3, size=16)
    torch.testing.assert_close(conv(images), linear(images), atol=1e-5, rtol=1e-5)
    # The same holds for whole models, which share one checkpoint layout.
    a = trained_like(vaswani.VisionTransformer(small(patch_embedding="conv")))
    b = vaswani.VisionTransformer(small(patch_embedding="linear")).eval()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(random_images()), b(random_images()), atol=1e-5, rtol=1e-5)


def test_no_padding_every_pixel_reaches_exactly_one_token():
    torch.manual_seed(0)
    embed = PatchEmbedding(1, 2, 8)
    images = torch.rand(1, 1, 6, 6, requires_grad=True)
    out = embed(images)
    reached = torch.zeros(6, 6, dtype=torch.long)
    for token in range(out.size(1)):
        (grad,) = torch.autograd.grad(out[0, token].sum(), images, retain_graph=True)
        touched = grad[0, 0] != 0
        i, j = divmod(token, 3)
        expected = torch.zeros(6, 6, dtype=torch.bool)
        expected[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = True
        assert torch.equal(touched, expected)
        reached += touched
    assert torch.equal(reached, torch.ones(6, 6, dtype=torch.long))  # no pixel dropped, none shared
    for mode in ("conv", "linear"):
        with pytest.raises(ValueError, match="without padding"):
            PatchEmbedding(1, 4, 8, mode=mode)(torch.rand(1, 1, 6, 8))
    with pytest.raises(ValueError, match=r"VisionConfig\.patch_size=3: must divide image_size=8"):
        small(patch_size=3)


@pytest.mark.parametrize("overrides", [{}, {"norm_first": False}, {"pooling": "mean"}])
def test_changing_one_patch_changes_the_output(overrides):
    torch.manual_seed(0)
    model = trained_like(vaswani.VisionTransformer(small(**overrides)))
    images = random_images(1)
    changed = images.clone()
    changed[0, 0, 4:6, 2:4] += 1.0  # one 2x2 patch
    assert (model(images) - model(changed)).abs().max() > 1e-4
    # Only that patch's token changes before the encoder mixes tokens.
    difference = (model.patch_embed(images) - model.patch_embed(changed)).abs().sum(-1)[0]
    assert (difference > 0).nonzero().flatten().tolist() == [2 * 4 + 1]


def test_pre_ln_by_default_with_a_final_layer_norm_and_post_ln_as_an_option():
    assert vaswani.VisionTransformer(small()).encoder.final_norm is not None
    post = vaswani.VisionTransformer(small(norm_first=False))
    assert post.encoder.final_norm is None and post.config.encoder_config().norm_first is False


def test_return_attention_gives_cls_and_patch_maps_per_layer():
    torch.manual_seed(0)
    model = trained_like(vaswani.VisionTransformer(small(attention_impl="sdpa")))
    images = random_images(2)
    logits, attention = model(images, return_attention=True)
    torch.testing.assert_close(logits, model(images))
    assert len(attention["encoder"]) == 2
    for weights in attention["encoder"]:
        assert weights.shape == (2, 4, 17, 17)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 17))


def test_vit_base_16_has_the_published_parameter_count():
    with torch.device("meta"):  # shapes only: no 86M parameters to initialise
        model = vaswani.VisionTransformer(vaswani.VisionConfig.base(224, 16, 1000))
    assert sum(p.numel() for p in model.parameters()) == 86_567_656  # ViT-B/16: "86M" (Table 1)


def test_bad_images_get_clear_errors():
    model = vaswani.VisionTransformer(small())
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="3 channels; the model takes 1"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"12x12; the model takes 8x8 \(resize_image"):
        model(torch.zeros(1, 1, 12, 12))


# position embeddings -------------------------------------------------------------------------------


def test_interpolating_to_the_same_grid_keeps_the_predictions():
    torch.manual_seed(0)
    model = trained_like(vaswani.VisionTransformer(small()))
    table = model.position.detach().clone()
    torch.testing.assert_close(resize_position_embeddings(table, 4), table, atol=1e-6, rtol=0)
    images = random_images()
    before = model(images)
    model.resize_image(8)
    torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)


def test_interpolation_to_a_new_size_keeps_cls_and_the_layout():
    torch.manual_seed(0)
    model = trained_like(vaswani.VisionTransformer(small()))
    cls_row = model.position[0].detach().clone()
    model.resize_image(12)
    assert model.config.image_size == 12 and model.position.shape == (1 + 36, 32)
    torch.testing.assert_close(model.position[0], cls_row)
    logits, attention = model(random_images(2, size=12), return_attention=True)
    assert logits.shape == (2, 10) and attention["encoder"][0].shape == (2, 4, 37, 37)
    # A table that grows from left to right and is constant down the columns keeps both properties.
    ramp = torch.arange(4.0).repeat(4)[:, None].expand(16, 3)
    table = torch.cat((torch.full((1, 3), 9.0), ramp))
    grid = resize_position_embeddings(table, 8)[1:, 0].reshape(8, 8)
    assert torch.allclose(grid, grid[:1].expand(8, 8)) and (grid[0].diff() >= 0).all()
    assert grid[0, 0] < 0.5 and grid[0, -1] > 2.5
    with pytest.raises(ValueError, match="must divide image_size=13"):
        model.resize_image(13)


# data ----------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint():
    pytest.importorskip("sklearn")
    parts = {split: load_digits(split) for split in ("train", "valid", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 1259, "valid": 179, "test": 359}
    for data in parts.values():
        assert data.images.shape[1:] == (1, 8, 8) and data.images.dtype == np.uint8
        assert data.pixel_max == 16 and int(data.images.max()) == 16
        assert set(data.labels) == set(range(10))
    rows = {
        split: {d.tobytes() + bytes([y]) for d, y in zip(v.images, v.labels, strict=True)}
        for split, v in parts.items()
    }
    assert len(rows["valid"] & rows["test"]) == 0
    assert load_digits("val").labels == parts["valid"].labels  # fixed: the same every time


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _serve(server, monkeypatch, registry: dict, key: str, route: str, body: bytes, md5: str | None = None):
    server.routes[route] = (200, body, None)
    monkeypatch.setitem(
        registry, key, RemoteFile(server.url + route, md5=md5 or hashlib.md5(body).hexdigest())
    )


def test_mnist_is_downloaded_checked_and_parsed_from_idx_files(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (100, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(100) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(10)[::-1],
    }
    for name, array in arrays.items():
        _serve(server, monkeypatch, image_data.MNIST_FILES, name, f"/mnist/{name}", _idx(array))
    test = load_mnist("test", data_dir=tmp_path)
    assert test.images.shape == (10, 1, 28, 28) and test.labels == list(range(9, -1, -1))
    assert np.array_equal(test.images[:, 0], arrays["t10k-images-idx3-ubyte.gz"])
    train, valid = load_mnist("train", data_dir=tmp_path), load_mnist("valid", data_dir=tmp_path)
    assert (len(train), len(valid)) == (90, 10) and sorted(valid.labels) == list(range(10))
    assert (tmp_path / "cache" / "vaswani" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert len(server.requests) == 4  # each file fetched once, then verified from the cache


def test_mnist_checksum_mismatch_is_refused_and_nothing_is_kept(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name = "t10k-images-idx3-ubyte.gz"
    _serve(
        server,
        monkeypatch,
        image_data.MNIST_FILES,
        name,
        f"/{name}",
        _idx(np.zeros((2, 28, 28))),
        md5="0" * 32,
    )
    with pytest.raises(DataError, match=rf"checksum mismatch for http://127\.0\.0\.1:\d+/{name}: md5 is"):
        load_mnist("test", data_dir=tmp_path)
    assert not (tmp_path / "cache" / "vaswani" / "data" / "mnist" / name).exists()


def test_malformed_idx_file_is_a_data_error(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(np.zeros((2, 28, 28)))[:-8])
    with pytest.raises(DataError, match=r"cannot read|bytes, but an IDX array"):
        load_mnist("test", data_dir=tmp_path)


def _cifar_archive(batches: dict[str, np.ndarray]) -> bytes:
    """A cifar-10-binary.tar.gz whose batches hold the given (N, 3073) records."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, records in batches.items():
            data = records.astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _cifar_records(labels: list[int]) -> np.ndarray:
    """Records whose red plane is 10 + label, green 20, blue a ramp over the pixel's column."""
    records = np.zeros((len(labels), 3073), dtype=np.uint8)
    records[:, 0] = labels
    records[:, 1:1025] = 10 + np.array(labels)[:, None]
    records[:, 1025:2049] = 20
    records[:, 2049:] = np.tile(np.arange(32), 32)
    return records


def test_cifar10_binary_batches_are_downloaded_checked_and_parsed(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    batches = {f"data_batch_{i}.bin": _cifar_records([(i + k) % 10 for k in range(10)]) for i in range(1, 6)}
    batches["test_batch.bin"] = _cifar_records([3, 1, 4])
    body = _cifar_archive(batches)
    server.routes["/cifar.tar.gz"] = (200, body, None)
    monkeypatch.setattr(
        image_data,
        "CIFAR10_FILE",
        RemoteFile(f"{server.url}/cifar.tar.gz", md5=hashlib.md5(body).hexdigest()),
    )
    test = load_cifar10("test", data_dir=tmp_path)
    assert test.images.shape == (3, 3, 32, 32) and test.labels == [3, 1, 4]
    assert test.label_names[3] == "cat"
    assert (test.images[:, 0] == (10 + np.array([3, 1, 4]))[:, None, None]).all()  # red plane
    assert (test.images[:, 1] == 20).all() and (test.images[0, 2, 5] == np.arange(32)).all()  # rows of blue
    train, valid = load_cifar10("train", data_dir=tmp_path), load_cifar10("valid", data_dir=tmp_path)
    assert (len(train), len(valid)) == (40, 10) and sorted(valid.labels) == list(range(10))  # stratified
    assert server.requests == ["/cifar.tar.gz"]


def test_cifar10_checksum_mismatch_and_broken_batch_are_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    body = _cifar_archive({"test_batch.bin": _cifar_records([1])})
    server.routes["/c.tar.gz"] = (200, body, None)
    monkeypatch.setattr(image_data, "CIFAR10_FILE", RemoteFile(f"{server.url}/c.tar.gz", md5="0" * 32))
    with pytest.raises(DataError, match=r"checksum mismatch.*md5 is"):
        load_cifar10("test", data_dir=tmp_path)
    assert not list((tmp_path / "cache").rglob("*.tar.gz"))
    (tmp_path / "cifar10").mkdir()
    broken = _cifar_archive({"test_batch.bin": _cifar_records([1])[:, :-1]})
    (tmp_path / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(broken)
    with pytest.raises(DataError, match="not whole 3073-byte records"):
        load_cifar10("test", data_dir=tmp_path)


def test_random_crop_flip_is_seeded_and_only_moves_pixels():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    first = random_crop_flip(images, 2, torch.Generator().manual_seed(1))
    assert torch.equal(first, random_crop_flip(images, 2, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, random_crop_flip(images, 2, torch.Generator().manual_seed(2)))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):  # each output is a window of the zero-padded image, flipped or not
        windows = [padded[i, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(first[i], w) or torch.equal(first[i], w.flip(-1)) for w in windows)


def test_image_files_are_read_at_the_model_size_or_refused(tmp_path):
    from PIL import Image

    pixels = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    torch.testing.assert_close(
        read_image_file(tmp_path / "a.png", 1, 8)[0], torch.from_numpy(pixels / 255.0).float()
    )
    np.save(tmp_path / "b.npy", np.full((8, 8), 0.5, dtype=np.float32))
    assert read_image_file(tmp_path / "b.npy", 1, 8).shape == (1, 8, 8)
    with pytest.raises(DataError, match=r"a.png: the image is 8x8; the model takes 28x28"):
        read_image_file(tmp_path / "a.png", 1, 28)
    np.save(tmp_path / "c.npy", np.full((8, 8), 3.0))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        read_image_file(tmp_path / "c.npy", 1, 8)


# recipes and the command line ----------------------------------------------------------------------


def test_image_recipes_load_with_their_datasets_shapes():
    expected = {"digits_vit.toml": (8, 1), "mnist_vit.toml": (28, 1), "cifar10_vit.toml": (32, 3)}
    for name, (size, channels) in expected.items():
        recipe = load_recipe(ROOT / "configs" / name)
        assert recipe.data.task == "image_classification"
        spec = image_data.IMAGE_DATASETS[recipe.data.dataset]
        cfg = recipe.vision_config(image_size=spec.image_size, channels=spec.channels, n_classes=10)
        assert (cfg.image_size, cfg.channels, cfg.n_classes) == (size, channels, 10)
    assert load_recipe(ROOT / "configs" / "cifar10_vit.toml").data.augment == "crop_flip"
    with pytest.raises(RecipeError, match=r"VisionConfig: use vision_config\(\)"):
        recipe.model_config(vocab_size=100)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.patch_size=3", "patch_size=3: must divide image_size=8"),
        ("model.image_size=16", "image_size: set from the tokenizer and data"),
        ("model.vocab_size=16", "vocab_size: unknown key"),
        ("model.preset='small'", "takes one of ('base', 'large', 'huge')"),
        ("data.augment='rotate'", "augment = 'rotate'"),
        ("data.dataset='imagenet'", "dataset = 'imagenet'"),
    ],
)
def test_bad_image_recipes_are_refused_in_one_line(override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(ROOT / "configs" / "digits_vit.toml", [override])


@pytest.mark.slow
def test_digits_end_to_end_loss_falls_and_every_command_works(tmp_path, capsys):
    pytest.importorskip("sklearn")
    run = tmp_path / "digits"
    settings = [
        "train.max_steps=100",  # the recipe's post-LN layers need a few more steps than pre-LN ones
        "train.eval_every=50",
        "train.save_every=50",
        "train.log_every=5",
        "train.warmup_steps=5",
        "train.lr_schedule='constant'",
        "train.lr=3e-3",
        "train.progress=false",
        "model.n_encoder_layers=2",
        "model.d_model=32",
        "model.d_ff=64",
        "model.dropout=0.1",
    ]
    args = ["train", str(ROOT / "configs" / "digits_vit.toml"), "--run-dir", str(run)]
    assert main(args + [a for s in settings for a in ("--set", s)]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "split" not in r]
    assert losses[-1] < 0.7 * losses[0]
    assert not (run / "tokenizer.json").exists()
    capsys.readouterr()

    assert main(["evaluate", str(run), "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert "accuracy = " in out and "macro-F1" in out and "(179 examples)" in out
    results = json.loads((run / "results_valid.json").read_text())
    assert sum(map(sum, results["confusion"])) == 179 and (run / "confusion_valid.png").is_file()

    np.save(tmp_path / "seven.npy", load_digits("test").unit_tensor([0])[0].numpy())
    assert main(["classify", str(run), "--json", str(tmp_path / "seven.npy")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in row["probabilities"] and sum(row["probabilities"].values()) == pytest.approx(1.0)

    assert main(["attention", str(run), "--image-index", "3", "--out", str(tmp_path / "att")]) == 0
    written = capsys.readouterr().out.split()
    assert str(tmp_path / "att" / "test-image-3" / "cls_overlay.png") in written
    assert (
        all(Path(p).is_file() for p in written) and len(written) == 1 + 2 + 1 + 1
    )  # overlay, layers, head, cls
    assert main(["attention", str(run), "--image-index", "400"]) == 2
    assert "the test split has images 0 to 358" in capsys.readouterr().err
    assert main(["attention", str(run)]) == 2
    assert "no input" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"takes vaswani\.interpret\.image_attention_maps"):
        attention_maps(load_run(run), "a text")


def test_cli_bad_image_input_gives_one_line_and_exit_2():
    args = ["train", "configs/digits_vit.toml", "--set", "model.patch_size=3"]
    result = subprocess.run(
        [sys.executable, "-m", "vaswani.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: [model] VisionConfig.patch_size=3: must divide image_size=8: images are never padded"
    ]
