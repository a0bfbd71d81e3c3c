"""Dataset loaders on the real files (counts from each SOURCE.md), data-directory resolution, users' own
files, and the download path against a local HTTP server (never the real network)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import socket
from pathlib import Path

import pytest

from vaswani.data import datasets, download, paths
from vaswani.data.datasets import (
    AG_NEWS_FILES,
    CLASSIFICATION_DATASETS,
    clean_ag_news_text,
    load_ag_news,
    load_bbc_news,
    load_classification,
    load_fine_labels,
    load_labeled_file,
    load_multi30k,
    load_parallel_files,
    load_sst,
    load_tiny_shakespeare,
    load_translation,
    load_trec,
)
from vaswani.data.download import RemoteFile, ensure_file
from vaswani.data.paths import DataError, resolve_data_dir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (CI keeps them beside the checkout)")
    return SHARED_DATA


# real datasets ---------------------------------------------------------------------------------------


def test_multi30k_splits_have_published_sizes_and_stay_aligned(data_dir):
    train = load_multi30k("train", data_dir=data_dir)
    assert (len(train), train.src_lang, train.tgt_lang) == (29_000, "en", "de")
    assert train.src[0] == "Two young, White males are outside near many bushes."
    assert train.tgt[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert train.src[-1].startswith("A man in shorts and a Hawaiian shirt leans over the rail")
    assert train.tgt[-1].startswith("Ein Mann in Shorts und Hawaiihemd lehnt sich über das Geländer")
    # The TAB line is one sentence, kept as published.
    assert train.tgt[7365] == '"Zwei männliche und eine weibliche Person spielen in einer \tWasserfontäne."'
    assert train.src[7365] == "Two males and one female playing in a fountain of water."

    val = load_multi30k("valid", data_dir=data_dir)
    assert len(val) == 1_014 and val.src[0] == "A group of men are loading cotton onto a truck"
    test = load_multi30k("test", src_lang="de", tgt_lang="en", data_dir=data_dir)
    assert len(test) == 1_000 and test.src_lang == "de"
    assert test.src[-1] == "Ein Mädchen an einer Küste mit einem Berg im Hintergrund."
    assert test.tgt[-1] == "A girl at the shore of a beach with a mountain in the distance."
    assert load_translation("multi30k", "test_2016_flickr", "en", "de", data_dir=data_dir).src == test.tgt


def test_multi30k_rejects_unknown_split_and_language(data_dir):
    with pytest.raises(DataError, match="choose from train, val, valid, test_2016_flickr, test"):
        load_multi30k("dev", data_dir=data_dir)
    with pytest.raises(DataError, match="got en-fr"):
        load_multi30k("train", tgt_lang="fr", data_dir=data_dir)


def test_trec_official_sets_have_published_class_counts(data_dir):
    full = load_trec("train_full", data_dir=data_dir)
    assert len(full) == 5_452 and full.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    counts = collections.Counter(full.label_names[y] for y in full.labels)
    assert counts == {"ENTY": 1250, "HUM": 1223, "DESC": 1162, "NUM": 896, "LOC": 835, "ABBR": 86}
    test = load_trec("test", data_dir=data_dir)
    counts = collections.Counter(test.label_names[y] for y in test.labels)
    assert counts == {"DESC": 138, "NUM": 113, "ENTY": 94, "LOC": 81, "HUM": 65, "ABBR": 9}

    fine_test = load_trec("test", fine=True, data_dir=data_dir)
    assert len(fine_test.label_names) == 50 and fine_test.label_names == sorted(fine_test.label_names)
    assert len(set(fine_test.labels)) == 42
    assert fine_test.label_names[fine_test.labels[0]].startswith(test.label_names[test.labels[0]] + ":")
    # Line 66 holds the one bare Latin-1 byte.
    assert full.texts[65] == "Which city has the oldest relationship as a sisterðcity with Los Angeles ?"


def test_trec_valid_is_a_fixed_stratified_tenth_of_the_training_set(data_dir):
    full = load_trec("train_full", fine=True, data_dir=data_dir)
    train, valid = load_trec("train", fine=True, data_dir=data_dir), load_trec("valid", data_dir=data_dir)
    assert (len(train), len(valid)) == (4_905, 547)
    assert sorted(train.texts + valid.texts) == sorted(full.texts)
    assert load_trec("val", fine=True, data_dir=data_dir).texts == valid.texts  # coarse and fine agree
    assert load_trec("valid", data_dir=data_dir) == valid
    full_counts, valid_counts = (
        collections.Counter(full.labels),
        collections.Counter(load_trec("valid", fine=True, data_dir=data_dir).labels),
    )
    for label, n in full_counts.items():
        assert valid_counts[label] == int(0.1 * n + 0.5)


def test_sst_has_kims_split_sizes_and_label_counts(data_dir):
    sizes = {split: len(load_sst(split, data_dir=data_dir)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 6_920, "dev": 872, "test": 1_821}
    sizes = {
        split: len(load_sst(split, fine=True, data_dir=data_dir)) for split in ("train", "valid", "test")
    }
    assert sizes == {"train": 8_544, "valid": 1_101, "test": 2_210}
    binary = load_sst("train", data_dir=data_dir)
    assert binary.label_names == ["negative", "positive"]
    assert collections.Counter(binary.labels) == {0: 3_310, 1: 3_610}
    assert collections.Counter(load_sst("dev", data_dir=data_dir).labels) == {0: 428, 1: 444}
    fine = load_classification("sst5", "train", data_dir=data_dir)
    assert fine.label_names[0] == "very negative" and fine.label_names[4] == "very positive"
    assert [collections.Counter(fine.labels)[k] for k in range(5)] == [1_092, 2_218, 1_624, 2_322, 1_288]
    assert fine.texts[0].startswith("a stirring , funny and finally transporting re-imagining")


def test_bbc_news_is_deduplicated_then_split_stratified_and_fixed(data_dir):
    splits = {split: load_bbc_news(split, data_dir=data_dir) for split in ("train", "valid", "test")}
    assert {split: len(data) for split, data in splits.items()} == {"train": 1_701, "valid": 212, "test": 212}
    texts = [text for data in splits.values() for text in data.texts]
    # 2,225 files - 98 exact duplicates - 2 that differ only in whitespace.
    assert len({" ".join(text.split()) for text in texts}) == len(texts) == 2_125
    labels = [label for data in splits.values() for label in data.labels]
    assert collections.Counter(labels) == {0: 503, 1: 369, 2: 403, 3: 503, 4: 347}
    for label, n in collections.Counter(splits["valid"].labels).items():
        assert (
            n == collections.Counter(splits["test"].labels)[label] == int(0.1 * (labels.count(label)) + 0.5)
        )
    assert load_bbc_news("test", data_dir=data_dir) == splits["test"]
    assert splits["train"].label_names == ["business", "entertainment", "politics", "sport", "tech"]
    assert splits["train"].texts[0].startswith("Ad sales boost Time Warner profit\nQuarterly profits")
    assert any("£15.8m" in text for text in texts)  # sport/199.txt, the one Latin-1 file
    assert not any("Â£" in text or "\ufffd" in text for text in texts)


def test_ag_news_test_split_is_balanced_and_cleaned(data_dir):
    test = load_ag_news("test", data_dir=data_dir)
    assert len(test) == 7_600 and collections.Counter(test.labels) == {k: 1_900 for k in range(4)}
    assert test.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert not any(
        "\\" in text or " #39;" in text or "&lt;" in text or "&quot;" in text for text in test.texts
    )
    assert test.texts[0] == (
        "Fears for T N pension after talks. Unions representing workers at Turner Newall say they are "
        "'disappointed' after talks with stricken parent firm Federal Mogul."
    )
    assert "A second team of rocketeers competing for the $10 million Ansari X Prize" in test.texts[1]


def test_clean_ag_news_text_repairs_entities_breaks_and_markup():
    assert clean_ag_news_text("Wall Street #39;s \\$50 bid") == "Wall Street's $50 bid"
    assert clean_ag_news_text("a second\\team. \\\\New paragraph") == "a second team. New paragraph"
    assert clean_ag_news_text("it  #151; and  #36;10 &quot;x&quot;") == 'it — and $10 "x"'
    assert clean_ag_news_text('Inc. &lt;A HREF="http://x"&gt;SPLS.O&lt;/A&gt;, Dell &lt;DELL.O&gt;') == (
        "Inc. SPLS.O , Dell <DELL.O>"
    )


def test_tiny_shakespeare_split_is_nanogpt_90_10(data_dir):
    train, valid = load_tiny_shakespeare("train", data_dir=data_dir), load_tiny_shakespeare("val", data_dir)
    assert (len(train), len(valid)) == (1_003_854, 111_540)
    assert len(train) + len(valid) == 1_115_394
    assert train.startswith("First Citizen:\n") and len(set(train + valid)) == 65


def test_registry_loads_by_name_and_lists_valid_names(data_dir):
    assert len(load_classification("trec-fine", "test", data_dir=data_dir).label_names) == 50
    assert len(load_classification("trec_fine", "test", data_dir=data_dir).label_names) == 50
    assert len(load_classification("trec", "test", data_dir=data_dir, fine=True).label_names) == 50
    with pytest.raises(DataError, match="choose from trec, trec-fine, sst2, sst5, bbc_news, ag_news"):
        load_classification("imdb", "train", data_dir=data_dir)
    with pytest.raises(DataError, match="unknown split 'dev2' for sst; choose from train, dev, valid"):
        load_classification("sst2", "dev2", data_dir=data_dir)
    with pytest.raises(DataError, match="takes no option 'fine'"):
        load_classification("bbc_news", "train", data_dir=data_dir, fine=True)
    with pytest.raises(DataError, match="unknown translation dataset 'wmt14'; choose from multi30k"):
        load_translation("wmt14", "train")
    assert set(CLASSIFICATION_DATASETS) >= {"trec", "sst2", "sst5", "bbc_news", "ag_news"}


@pytest.mark.parametrize("name", ["trec", "sst2"])
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_fine_labels_hold_every_example_under_its_class(data_dir, name, split):
    coarse = load_classification(name, split, data_dir=data_dir)
    fine, names, class_of_fine = load_fine_labels(name, split, data_dir=data_dir)
    assert names == coarse.label_names and len(class_of_fine) == len(fine.label_names)
    # Each coarse example is there, and its fine class is under its class (duplicated texts agree too).
    classes = collections.defaultdict(set)
    for text, label in zip(fine.texts, fine.labels, strict=True):
        classes[text].add(class_of_fine[label])
    assert all(classes[text] == {label} for text, label in zip(coarse.texts, coarse.labels, strict=True))
    unlabelled = sum(class_of_fine[label] < 0 for label in fine.labels)
    assert len(fine) - unlabelled == len(coarse)  # the rest have no class (SST-5's neutral sentences)
    if name == "trec":
        assert fine.texts == coarse.texts and len(fine.label_names) == 50 and -1 not in class_of_fine
    else:
        assert class_of_fine == [0, 0, -1, 1, 1] and unlabelled > 0


def test_fine_labels_of_joined_splits_and_of_a_dataset_without_them(data_dir):
    joined, _, _ = load_fine_labels("trec", "train+valid", data_dir=data_dir)
    assert len(joined) == len(load_classification("trec", "train_full", data_dir=data_dir))
    with pytest.raises(DataError, match="dataset 'bbc_news' has no finer labels; those that do: trec, sst2"):
        load_fine_labels("bbc_news", "train", data_dir=data_dir)


# data directory resolution -------------------------------------------------------------------------------


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """A working directory with no ../shared/data, no VASWANI_DATA, no repository fallback, and a
    temporary cache; returns the tmp root."""
    cwd = tmp_path / "work" / "main"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "_package_repo_root", lambda: None)
    return tmp_path


def test_data_dir_resolution_order(isolated_dirs, monkeypatch):
    root = isolated_dirs
    cache = root / "cache" / "vaswani" / "data"
    assert resolve_data_dir() == cache and cache.is_dir()

    repo = root / "checkout" / "repo"
    (repo.parent / "shared" / "data").mkdir(parents=True)
    monkeypatch.setattr(paths, "_package_repo_root", lambda: repo)
    assert resolve_data_dir() == repo.parent / "shared" / "data"

    (root / "work" / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir() == Path.cwd().parent / "shared" / "data"

    from_env = root / "env_data"
    from_env.mkdir()
    monkeypatch.setenv(paths.ENV_VAR, str(from_env))
    assert resolve_data_dir() == from_env

    explicit = root / "explicit"
    explicit.mkdir()
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(str(explicit)) == explicit


def test_missing_explicit_or_env_data_dir_is_an_error(isolated_dirs, monkeypatch):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist"):
        resolve_data_dir(isolated_dirs / "nowhere")
    monkeypatch.setenv(paths.ENV_VAR, str(isolated_dirs / "elsewhere"))
    with pytest.raises(DataError, match=r"elsewhere \(from \$VASWANI_DATA\) does not exist"):
        resolve_data_dir()


def test_cache_dir_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.user_cache_dir() == tmp_path / ".cache" / "vaswani" / "data"


def test_repository_root_is_found_for_the_source_checkout():
    assert paths._package_repo_root() == Path(__file__).resolve().parents[1]


# users' own files ---------------------------------------------------------------------------------------


def test_labeled_tsv_with_string_labels_maps_to_sorted_names(tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text('label\ttext\npos\tgreat "fun"\nneg\tdull, slow\npos\tfine\n', encoding="utf-8")
    data = load_labeled_file(path)
    assert data.texts == ['great "fun"', "dull, slow", "fine"]
    assert (data.labels, data.label_names) == ([1, 0, 1], ["neg", "pos"])
    ordered = load_labeled_file(path, label_names=["pos", "neg"])
    assert (ordered.labels, ordered.label_names) == ([0, 1, 0], ["pos", "neg"])


def test_labeled_csv_with_integer_labels_and_custom_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('id,sentence,y\n1,"a, b",2\n2,"say ""hi""",0\n', encoding="utf-8")
    data = load_labeled_file(path, text_column="sentence", label_column="y")
    assert data.texts == ["a, b", 'say "hi"'] and data.labels == [2, 0]
    assert data.label_names == ["0", "1", "2"]
    named = load_labeled_file(path, text_column="sentence", label_column="y", label_names=["a", "b", "c"])
    assert named.labels == [2, 0] and named.label_names == ["a", "b", "c"]


def test_labeled_jsonl_with_integer_or_string_labels(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('{"text": "one", "label": 1}\n\n{"text": "zero", "label": 0}\n', encoding="utf-8")
    data = load_labeled_file(path, file_format="jsonl")
    assert (data.texts, data.labels, data.label_names) == (["one", "zero"], [1, 0], ["0", "1"])
    path = tmp_path / "names.jsonl"
    path.write_text('{"text": "x", "label": "sport"}\n{"text": "y", "label": "arts"}\n', encoding="utf-8")
    assert load_labeled_file(path).labels == [1, 0]


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("a.tsv", "", {}, r"a.tsv: file is empty"),
        ("a.tsv", "text\tlabel\n", {}, r"a.tsv: file has no examples"),
        ("a.tsv", "text\tclass\nhi\tx\n", {}, r"a.tsv: line 1 \(header\) has no column 'label'"),
        ("a.tsv", "text\tlabel\nhi\tx\nho\n", {}, r"a.tsv: line 3 has 1 fields"),
        (
            "a.csv",
            "text,label\nhi,pos\nho,meh\n",
            {"label_names": ["neg", "pos"]},
            r"line 3: unknown label 'meh'",
        ),
        ("a.csv", "text,label\nhi,5\n", {"label_names": ["neg", "pos"]}, r"a.csv: line 2: unknown label '5'"),
        (
            "a.jsonl",
            '{"text": "hi", "label": 0}\n{"text": "ho"}\n',
            {},
            r"a.jsonl: line 2 has no 'label' field",
        ),
        ("a.jsonl", '{"text": "hi", "label": 0}\n{oops\n', {}, r"a.jsonl: line 2 is not valid JSON"),
        (
            "a.jsonl",
            '{"text": "hi", "label": 1.5}\n',
            {},
            r"line 1: label 1.5 is neither a name nor an integer",
        ),
        ("a.jsonl", '{"text": 3, "label": 1}\n', {}, r"line 1: 'text' is 3, not text"),
        ("a.txt", "text\tlabel\n", {}, r"a.txt: unknown format"),
    ],
)
def test_labeled_file_errors_name_the_file_and_line(tmp_path, name, content, options, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_labeled_file(path, **options)


def test_labeled_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes(b"text\tlabel\nok\t0\ncaf\xe9\t1\n")
    with pytest.raises(DataError, match=r"a.tsv: line 3 is not valid UTF-8 \(byte 0xe9\)"):
        load_labeled_file(path)


def test_parallel_files_plain_and_gzip(tmp_path):
    src, tgt = tmp_path / "train.en", tmp_path / "train.de.gz"
    src.write_text("Hello .\r\nA\tB\n", encoding="utf-8")
    tgt.write_bytes(gzip.compress("Hallo .\nÄ B".encode()))
    corpus = load_parallel_files(src, tgt, "en", "de")
    assert (corpus.src, corpus.tgt, len(corpus)) == (["Hello .", "A\tB"], ["Hallo .", "Ä B"], 2)
    assert (corpus.src_lang, corpus.tgt_lang) == ("en", "de")


def test_parallel_files_errors(tmp_path):
    src, tgt, empty = tmp_path / "s.txt", tmp_path / "t.txt", tmp_path / "e.txt"
    src.write_text("a\nb\nc\n", encoding="utf-8")
    tgt.write_text("x\ny\n", encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"t.txt: ends at line 2 but .*s.txt has 3 lines"):
        load_parallel_files(src, tgt)
    with pytest.raises(DataError, match=r"e.txt: file is empty"):
        load_parallel_files(src, empty)
    tgt.write_bytes(b"x\ny\n\xff\n")
    with pytest.raises(DataError, match=r"t.txt: line 3 is not valid UTF-8"):
        load_parallel_files(src, tgt)
    with pytest.raises(DataError, match=r"missing.txt: file not found"):
        load_parallel_files(src, tmp_path / "missing.txt")


# downloads, against a local server --------------------------------------------------------------------


BODY = b"line one\nline two\n" * 1000


def test_download_verifies_and_places_the_file(server, tmp_path):
    server.routes["/good.txt"] = (200, BODY, None)
    dest = tmp_path / "sub" / "good.txt"
    sha256, md5 = hashlib.sha256(BODY).hexdigest(), hashlib.md5(BODY).hexdigest()
    assert download.download(f"{server.url}/good.txt", dest, sha256=sha256, md5=md5, progress=False) == dest
    assert dest.read_bytes() == BODY
    assert [p.name for p in dest.parent.iterdir()] == ["good.txt"]


def test_existing_good_file_is_not_downloaded_again_but_a_bad_one_is(server, tmp_path):
    server.routes["/good.txt"] = (200, BODY, None)
    dest = tmp_path / "good.txt"
    dest.write_bytes(BODY)
    download.download(f"{server.url}/good.txt", dest, md5=hashlib.md5(BODY).hexdigest(), progress=False)
    assert server.requests == []
    dest.write_bytes(b"stale")
    download.download(f"{server.url}/good.txt", dest, md5=hashlib.md5(BODY).hexdigest(), progress=False)
    assert server.requests == ["/good.txt"] and dest.read_bytes() == BODY


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ((200, BODY, None), r"checksum mismatch for http://127\.0\.0\.1:\d+/f\.txt: sha256 is [0-9a-f]{64}"),
        ((200, BODY[:100], len(BODY)), r"/f\.txt was truncated: got 100 of 18000 bytes"),
        ((404, b"", None), r"download of http://127\.0\.0\.1:\d+/f\.txt failed: HTTP 404"),
    ],
    ids=["wrong-checksum", "truncated", "not-found"],
)
def test_failed_download_leaves_nothing_behind(server, tmp_path, route, message):
    server.routes["/f.txt"] = route
    dest = tmp_path / "f.txt"
    with pytest.raises(DataError, match=message):
        download.download(f"{server.url}/f.txt", dest, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_network_error_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 5.0)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError, match=rf"download of http://127\.0\.0\.1:{port}/x failed"):
        download.download(f"http://127.0.0.1:{port}/x", tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_file_prefers_the_data_dir_and_downloads_into_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    server.routes["/a.txt"] = (200, BODY, None)
    remote = RemoteFile(f"{server.url}/a.txt", sha256=hashlib.sha256(BODY).hexdigest())
    (tmp_path / "data" / "set").mkdir(parents=True)
    (tmp_path / "data" / "set" / "local.txt").write_text("mine")
    assert ensure_file(tmp_path / "data", "set/local.txt", remote) == tmp_path / "data" / "set" / "local.txt"
    fetched = ensure_file(tmp_path / "data", "set/a.txt", remote, progress=False)
    assert (
        fetched == tmp_path / "cache" / "vaswani" / "data" / "set" / "a.txt" and fetched.read_bytes() == BODY
    )


def test_missing_ag_news_train_is_downloaded_to_the_cache_and_loaded(server, tmp_path, monkeypatch):
    rows = []
    for i in range(80):
        label = i % 4 + 1
        rows.append(f'"{label}","Title {i}","Line one\\line two of story {i} #39;s \\$5 ""quoted"""\n')
    body = "".join(rows).encode()
    server.routes["/ag/train.csv"] = (200, body, None)
    monkeypatch.setitem(
        AG_NEWS_FILES,
        "train.csv",
        RemoteFile(f"{server.url}/ag/train.csv", md5=hashlib.md5(body).hexdigest()),
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    (data / "ag_news").mkdir(parents=True)
    (data / "ag_news" / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")

    train = load_ag_news("train", data_dir=data)
    assert (tmp_path / "cache" / "vaswani" / "data" / "ag_news" / "train.csv").read_bytes() == body
    assert server.requests == ["/ag/train.csv"]
    valid = datasets.load_ag_news("valid", data_dir=data)
    assert server.requests == ["/ag/train.csv"]  # the cached copy is verified and reused
    assert (len(train), len(valid)) == (76, 4) and sorted(valid.labels) == [0, 1, 2, 3]
    assert train.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert train.texts[0] == 'Title 0. Line one line two of story 0\'s $5 "quoted"'
    assert not (data / "ag_news" / "train.csv").exists()


def test_multi30k_file_missing_everywhere_reports_the_url(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("val.en.gz", "val.de.gz"):
        monkeypatch.setitem(
            datasets.MULTI30K_FILES, name, RemoteFile(f"{server.url}/{name}", sha256="0" * 64)
        )
    with pytest.raises(DataError, match=r"/val\.en\.gz failed: HTTP 404"):
        load_multi30k("val", data_dir=tmp_path)
    assert not (tmp_path / "cache" / "vaswani" / "data" / "multi30k" / "raw" / "val.en.gz").exists()


def test_jsonl_labels_survive_roundtrip(tmp_path):
    path = tmp_path / "x.jsonl"
    records = [{"text": f"t{i}", "label": ["b", "a"][i % 2]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data = load_labeled_file(path)
    assert [data.label_names[y] for y in data.labels] == [r["label"] for r in records]
