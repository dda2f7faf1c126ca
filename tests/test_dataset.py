import csv
import gzip
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset
from dataset import DataError, dataset_info, get_dataset_and_tokenizer

DOCS = [f"Document {i} says hello to doc{i} number {i}.\nSecond line of doc{i}!" for i in range(40)]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def all_tokens(ds):
    return [t for row in ds["input_ids"] for t in row]


def expected_count(tokenizer, docs):
    return sum(len(tokenizer.encode(d)) + 1 for d in docs)


def assert_nothing_lost(ds_list, info, n_expected, block_size):
    kept = sum(len(d) for d in ds_list if d is not None) * block_size
    dropped = info["train"]["dropped_tokens"] + info.get("val", {}).get("dropped_tokens", 0)
    assert kept + dropped == n_expected
    assert info["train"]["dropped_tokens"] < block_size


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": 1, field: d}) + "\n")


def test_signature_defaults_and_columns(tmp_path, cache, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    tok, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=16, cache_dir=cache)
    assert tok.encode("Hello world") == [15496, 995]
    assert train.column_names == ["input_ids", "labels"]
    assert all(len(r) == 16 for r in train["input_ids"]) and train["input_ids"] == train["labels"]
    assert len(val) > 0
    assert_nothing_lost([train, val], dataset_info(train), expected_count(tokenizer, DOCS), 16)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "jsonl.gz", "csv.gz", "parquet.gz"])
def test_every_format_keeps_every_token(tmp_path, cache, tokenizer, fmt):
    path = tmp_path / f"docs.{fmt}"
    base = fmt.removesuffix(".gz")
    plain = tmp_path / f"plain.{base}"
    if base == "jsonl":
        write_jsonl(plain, DOCS)
    elif base == "json":
        plain.write_text(json.dumps([{"text": d} for d in DOCS]))
    elif base == "csv":
        with open(plain, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            w.writerows([[i, d] for i, d in enumerate(DOCS)])
    else:
        pq.write_table(pa.table({"text": DOCS}), plain)
    if fmt.endswith(".gz"):
        path.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        plain.rename(path)
    _, train, val = get_dataset_and_tokenizer(dataset_path=str(path), block_size=8, cache_dir=cache, val_split=0.1)
    info = dataset_info(train)
    assert info["tokenized"]["train"]["documents"] == len(DOCS)
    assert_nothing_lost([train, val], info, expected_count(tokenizer, DOCS), 8)


def test_txt_file_is_one_document_tokenized_exactly(tmp_path, cache, tokenizer, monkeypatch):
    # Small read chunks force many seams; the ids must equal tokenizing the whole text at once.
    monkeypatch.setattr(dataset, "TXT_CHUNK_BYTES", 300)
    text = "".join(f"Line {i}:  some words, ünïcode and   spaces\n\n  indented {i}\n" for i in range(200))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "book.txt"), block_size=32,
                                              val_split=0.0, cache_dir=cache)
    assert val is None
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    assert all_tokens(train) == ids[: len(ids) // 32 * 32]


def test_folder_and_glob_and_crlf(tmp_path, cache, tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"first file\r\nwith CRLF\r\n")
    (folder / "sub" / "b.txt").write_text("second file\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(folder), block_size=2, val_split=0, cache_dir=cache)
    assert dataset_info(train)["tokenized"]["train"]["documents"] == 2
    text = tokenizer.decode(all_tokens(train))
    assert "\r" not in text and text.startswith("first file\nwith CRLF\n<|endoftext|>second file")
    _, train2, _ = get_dataset_and_tokenizer(dataset_path=str(folder / "**" / "*.txt"), block_size=2, val_split=0,
                                             cache_dir=cache)
    assert len(train2) == len(train)


def test_split_by_document_is_disjoint_and_seeded(tmp_path, cache, tokenizer):
    docs = [f"unique{i} " * 20 for i in range(100)]
    write_jsonl(tmp_path / "d.jsonl", docs)

    def doc_ids(ds):
        return set(int(w[6:]) for w in tokenizer.decode(all_tokens(ds)).split() if w.startswith("unique"))

    _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=4, val_split=0.1,
                                              cache_dir=cache, seed=1)
    assert dataset_info(train)["split_method"] == "documents"
    train_ids, val_ids = doc_ids(train), doc_ids(val)
    assert len(val_ids) == 10 and not (train_ids & val_ids)
    _, _, val_again = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=4, val_split=0.1,
                                                cache_dir=str(tmp_path / "other_cache"), seed=1)
    assert doc_ids(val_again) == val_ids
    _, _, val_other = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=4, val_split=0.1,
                                                cache_dir=cache, seed=2)
    assert doc_ids(val_other) != val_ids


def test_single_document_splits_by_position(tmp_path, cache, tokenizer):
    (tmp_path / "one.txt").write_text("word " * 2000)
    _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "one.txt"), block_size=10, cache_dir=cache)
    assert dataset_info(train)["split_method"] == "position"
    assert len(val) == pytest.approx(0.05 * (len(train) + len(val)), abs=2)


def test_cache_hit_is_fast_and_changed_file_invalidates(tmp_path, cache, monkeypatch):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, DOCS * 20)
    start = time.perf_counter()
    get_dataset_and_tokenizer(dataset_path=str(path), block_size=16, cache_dir=cache)
    first = time.perf_counter() - start

    calls = []
    real = dataset.tokenize_source
    monkeypatch.setattr(dataset, "tokenize_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    start = time.perf_counter()
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(path), block_size=16, cache_dir=cache)
    assert calls == [] and time.perf_counter() - start < first

    _, train32, _ = get_dataset_and_tokenizer(dataset_path=str(path), block_size=32, cache_dir=cache)
    assert calls == [] and len(train32[0]["input_ids"]) == 32  # new block size reuses the tokens

    write_jsonl(path, DOCS * 20 + ["one more document"])
    _, train_new, _ = get_dataset_and_tokenizer(dataset_path=str(path), block_size=16, cache_dir=cache)
    assert calls == [1]
    assert dataset_info(train_new)["fingerprint"] != dataset_info(train)["fingerprint"]


def test_hf_tokenizer_path_matches_tiktoken_path(tmp_path, cache, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    _, fast, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=8, val_split=0, cache_dir=cache)
    import gpt2_tokenizer

    monkeypatch.setattr(gpt2_tokenizer, "is_official_gpt2", lambda tok: False)
    monkeypatch.setattr(dataset, "PIPELINE_VERSION", -1)  # a different cache key
    _, slow, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=8, val_split=0, cache_dir=cache)
    assert slow["input_ids"] == fast["input_ids"]


def test_malformed_json_names_file_and_line(tmp_path, cache, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok one"}\n{"text": broken\n{"text": "ok two"}\n' + '{"text": "filler words"}\n' * 30)
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON.*skip_bad_lines"):
        get_dataset_and_tokenizer(dataset_path=str(path), block_size=4, cache_dir=cache)
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(path), block_size=4, cache_dir=cache, skip_bad_lines=True)
    assert dataset_info(train)["tokenized"]["train"]["skipped_bad_lines"] == 1
    assert "Skipped 1 malformed line" in capsys.readouterr().out


def test_missing_text_field_names_fields_found(tmp_path, cache):
    write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    with pytest.raises(DataError, match=r"d.jsonl, line 1: no field 'text' \(found: id, body\)"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), cache_dir=cache)
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), text_field="body", block_size=8,
                                            cache_dir=cache)
    assert len(train) > 0


def test_empty_corpus_and_missing_path(tmp_path, cache):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="contains no text"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "empty.jsonl"), cache_dir=cache)
    with pytest.raises(DataError, match="no such file"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "nope.txt"), cache_dir=cache)


def test_non_utf8_is_replaced_with_warning(tmp_path, cache, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait, C\xe6sar\n".encode("latin-1") * 50)
    with pytest.warns(UserWarning, match=r"latin1.txt: 100 byte sequence\(s\) are not valid UTF-8"):
        _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "latin1.txt"), block_size=8, val_split=0,
                                                cache_dir=cache)
    assert "Caf\ufffd au lait" in tokenizer.decode(all_tokens(train))


def test_block_size_and_val_split_checks(tmp_path, cache):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(DataError, match=r"block_size=2048 .*context length \(1024 tokens\)"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=2048, cache_dir=cache)
    with pytest.raises(DataError, match=r"fewer than one block .* --block_size"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=1024, cache_dir=cache)


def test_gpt2_output_names_use_official_valid_split(tmp_path, cache, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "webtext.train.jsonl", DOCS)
    write_jsonl(data / "webtext.valid.jsonl", DOCS[:5])
    _, train, val = get_dataset_and_tokenizer(dataset_name="webtext", data_dir=str(data), block_size=4, cache_dir=cache)
    info = dataset_info(train)
    assert info["split_method"] == "official valid split"
    assert len(val) * 4 + info["val"]["dropped_tokens"] == expected_count(tokenizer, DOCS[:5])
    with pytest.raises(DataError, match=r"medium-345M.train.jsonl not found: run `python download_dataset.py"):
        get_dataset_and_tokenizer(dataset_name="medium", data_dir=str(data), cache_dir=cache)


def test_default_falls_back_to_builtin_corpus(tmp_path, cache, capsys):
    _, train, val = get_dataset_and_tokenizer(data_dir=str(tmp_path / "no_data"), cache_dir=cache)
    info = dataset_info(train)
    assert info["source"] == "the built-in corpus"
    assert info["tokenized"]["train"]["tokens"] > 100_000 and len(val) > 10
    assert "built-in corpus" in capsys.readouterr().out


def test_hub_dataset_by_name_on_a_local_dataset(tmp_path, cache, tokenizer):
    repo = tmp_path / "my_hub_dataset"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", DOCS)
    write_jsonl(repo / "data" / "validation.jsonl", DOCS[:4])
    _, train, val = get_dataset_and_tokenizer(dataset_name=str(repo), block_size=4, cache_dir=cache)
    info = dataset_info(train)
    assert info["tokenized"]["train"]["documents"] == len(DOCS)
    assert len(val) * 4 + info["val"]["dropped_tokens"] == expected_count(tokenizer, DOCS[:4])
    with pytest.raises(DataError, match="not a file, a gpt-2-output-dataset name"):
        get_dataset_and_tokenizer(dataset_name=str(tmp_path / "no_such_dataset"), cache_dir=cache)


def test_cli_reports_and_errors_without_traceback(tmp_path, cache):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    ok = subprocess.run([sys.executable, "dataset.py", "--dataset_path", str(tmp_path / "d.jsonl"), "--block_size", "8",
                         "--cache_dir", cache], capture_output=True, text=True, cwd=dataset.REPO_DIR)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tokenized"]["train"]["documents"] == len(DOCS)
    bad = subprocess.run([sys.executable, "dataset.py", "--dataset_path", str(tmp_path / "none.txt")],
                         capture_output=True, text=True, cwd=dataset.REPO_DIR)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_real_corpus_token_count(shared_data, cache, tokenizer):
    path = shared_data / "gpt2-output" / "webtext.train.head1408.jsonl"
    _, train, val = get_dataset_and_tokenizer(dataset_path=str(path), cache_dir=cache)
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    n = sum(len(ids) + 1 for ids in tokenizer(texts)["input_ids"])
    info = dataset_info(train)
    assert info["tokenized"]["train"]["documents"] == 1408
    assert_nothing_lost([train, val], info, n, 128)


def test_real_latin1_and_crlf_books(shared_data, cache):
    with pytest.warns(UserWarning, match=r"chesterton-ball.txt: 5 byte sequence"):
        _, train, _ = get_dataset_and_tokenizer(dataset_path=str(shared_data / "gutenberg-nltk" / "original" / "*.txt"),
                                                cache_dir=cache)
    info = dataset_info(train)
    assert info["tokenized"]["train"]["documents"] == 13 and info["split_method"] == "documents"
    assert np.all(np.asarray(train[:5]["input_ids"]) < 50257)
