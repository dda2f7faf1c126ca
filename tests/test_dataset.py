import csv
import gzip
import json
import subprocess
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset
import readers
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
    monkeypatch.setattr(readers, "TXT_CHUNK_BYTES", 300)
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


def test_copies_of_a_document_across_files_stay_out_of_validation(tmp_path, cache, tokenizer, capsys):
    copies = [f"copied{i} " * 20 for i in range(10)]
    write_jsonl(tmp_path / "a.jsonl", [f"unique{i} " * 20 for i in range(50)] + copies)
    write_jsonl(tmp_path / "b.jsonl", copies + [f"unique{i} " * 20 for i in range(50, 70)])

    def words(ds, prefix):
        return {w for w in tokenizer.decode(all_tokens(ds)).split() if w.startswith(prefix)}

    _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "*.jsonl"), block_size=4, val_split=0.2,
                                              cache_dir=cache, seed=1)
    assert len(words(val, "unique")) == 18 and not words(val, "copied")  # 90 documents, 18 held out, no copy among them
    assert len(words(train, "copied")) == 10 and not words(train, "unique") & words(val, "unique")
    out = capsys.readouterr().out
    assert out.count("20 documents of") == 1 and "byte-identical to another one: every copy stays in training" in out
    get_dataset_and_tokenizer(dataset_path=str(tmp_path / "*.jsonl"), block_size=4, val_split=0.2, cache_dir=cache, seed=1)
    assert "byte-identical" not in capsys.readouterr().out  # said once, when the split is made


def test_without_copies_the_held_out_documents_are_the_same():
    hashes = np.arange(100, dtype=np.uint64)
    assert (dataset.validation_documents(100, 0.1, 5, hashes) == dataset.validation_documents(100, 0.1, 5)).all()
    hashes[[3, 50]] = 7  # documents 3 and 50 are one text
    is_val = dataset.validation_documents(100, 0.1, 5, hashes)
    assert is_val.sum() == 10 and not is_val[[3, 7, 50]].any()


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
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


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


# ----------------------------------------------------------------------------------------------
# Issue 13: bad inputs and faults give one DataError naming the file (and line), never a traceback


def documents(train):
    return dataset_info(train)["tokenized"]["train"]["documents"]


def test_links_read_each_file_once_and_say_what_was_skipped(tmp_path, cache):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        (d / f"f{i}.txt").write_text(f"file {i} " * 30)
    (d / "sub" / "loop").symlink_to("..")  # a link back into the tree: followed, it repeats every file 41 times
    (d / "same.txt").symlink_to("f0.txt")  # two names of one file
    (d / "also_same.txt").symlink_to(d / "f0.txt")
    (d / "dangling.txt").symlink_to("no_such_file.txt")
    with pytest.warns(UserWarning, match=r"skipped .*sub/loop \(a link to a folder read already\).*"
                                         r"same.txt \(the same file as .*f0.txt\).*dangling.txt \(a link to nothing\)"):
        _, train, val = get_dataset_and_tokenizer(dataset_path=str(d), block_size=4, val_split=0, cache_dir=cache)
    assert documents(train) == 3
    for pattern in ("**/*.txt", "[fs]*.txt"):  # a recursive glob through the loop; a glob that names f0 twice
        with pytest.warns(UserWarning, match=r"skipped .*same.txt \(the same file as"):
            _, train, _ = get_dataset_and_tokenizer(dataset_path=str(d / pattern), block_size=4, val_split=0,
                                                    cache_dir=cache)
        assert documents(train) == 3


def test_recursive_glob_matches_like_glob(tmp_path):
    d = tmp_path / "g"
    (d / "a" / "b").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for p in ("top.txt", "a/x.jsonl", "a/b/y.txt", "a/b/z.csv", ".hidden/h.txt", "a/.h.txt"):
        (d / p).write_text("x")
    for pattern in ("**/*.txt", "**", "a/**/*.txt", "**/b/*", "a/**/b/**/*.csv", "**/*.[jt]*"):
        assert readers.expand_path(str(d / pattern)) == sorted(
            p for p in __import__("glob").glob(str(d / pattern), recursive=True) if readers.file_format(p))


def test_unreadable_subfolder_is_an_error_not_skipped(tmp_path, cache, monkeypatch):
    (tmp_path / "d" / "locked").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("readable " * 20)
    (tmp_path / "d" / "locked" / "b.txt").write_text("not readable " * 20)
    real_scandir = readers.os.scandir

    def scandir(path="."):  # root can read any folder: simulate chmod 000
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(readers.os, "scandir", scandir)
    with pytest.raises(DataError, match=r"locked: cannot read this folder \(Permission denied\)"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d"), cache_dir=cache)


def stray_quote_csv(path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write("id,text\n1,first row\n2,\"a stray quote opens here\n")
        f.writelines(f"{i},row {i} would vanish into row 2\n" for i in range(3, 200))


def test_csv_stray_quote_names_the_line(tmp_path, cache):
    stray_quote_csv(tmp_path / "q.csv")
    with pytest.raises(DataError, match=r"q.csv, line 3: a quoted field opens here and never closes.*\.txt or \.jsonl"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "q.csv"), block_size=4, cache_dir=cache)
    (tmp_path / "q2.csv").write_text('id,text\n1,"closed" then text\n2,fine\n')
    with pytest.raises(DataError, match=r"q2.csv, line 2: text follows a closing quote"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "q2.csv"), block_size=4, cache_dir=cache)


def test_csv_row_with_extra_fields_is_not_cut(tmp_path, cache):
    (tmp_path / "c.csv").write_text("id,text\n" + "".join(f'{i},"row {i}, quoted"\n' for i in range(30))
                                    + "30,unquoted, the rest would be dropped\n31,\n")
    with pytest.raises(DataError, match=r"c.csv, line 32: 3 fields where the header has 2. Quote a field"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "c.csv"), block_size=4, cache_dir=cache)
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "c.csv"), block_size=4, cache_dir=cache,
                                            skip_bad_lines=True)
    assert documents(train) == 30 and dataset_info(train)["tokenized"]["train"]["skipped_bad_lines"] == 1


@pytest.mark.parametrize("name,data,encoding", [
    ("bom16.txt", "Hello world, this is UTF-16 text.\n" * 20, "utf-16"),
    ("le16.txt", "Hello world, this is UTF-16 text.\n" * 20, "utf-16-le"),
    ("bom32.jsonl", json.dumps({"text": "hello"}) + "\n", "utf-32"),
    ("be16.csv.gz", "text\nhello world\n", "utf-16-be"),
])
def test_utf16_and_utf32_files_are_refused(tmp_path, cache, name, data, encoding):
    raw = data.encode(encoding)
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(DataError, match=rf"{name} is not UTF-8 text: .*UTF-(16|32).*iconv -f UTF-"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / name), block_size=4, cache_dir=cache)


def test_utf8_bom_is_skipped_in_every_text_format(tmp_path, cache, tokenizer):
    bom = b"\xef\xbb\xbf"
    text = "Hello world, a text with a byte-order mark.\n" * 10
    (tmp_path / "b.txt").write_bytes(bom + text.encode())
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "b.txt"), block_size=4, val_split=0, cache_dir=cache)
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    assert all_tokens(train) == ids[: len(ids) // 4 * 4]
    docs = [f"document {i} with some words" for i in range(20)]
    (tmp_path / "b.jsonl").write_bytes(bom + "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    (tmp_path / "b.json").write_bytes(bom + json.dumps([{"text": d} for d in docs]).encode())
    (tmp_path / "b.csv").write_bytes(bom + ("text\n" + "\n".join(docs) + "\n").encode())
    for name in ("b.jsonl", "b.json", "b.csv"):
        _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / name), block_size=4, cache_dir=cache)
        assert documents(train) == 20
        assert_nothing_lost([train, val], dataset_info(train), expected_count(tokenizer, docs), 4)


def test_pretty_printed_json_is_one_document_or_one_per_item(tmp_path, cache, tokenizer):
    doc = "One pretty-printed record.\nIt spans lines."
    (tmp_path / "one.json").write_text(json.dumps({"id": 7, "text": doc}, indent=2))
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "one.json"), block_size=2, val_split=0, cache_dir=cache)
    assert documents(train) == 1 and tokenizer.decode(all_tokens(train)).startswith(doc)
    (tmp_path / "items.json").write_text("\n\n" + json.dumps(DOCS, indent=2))
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "items.json"), block_size=2, cache_dir=cache)
    assert documents(train) == len(DOCS)
    write_jsonl(tmp_path / "lines.json", DOCS)  # JSON lines in a .json file still stream line by line
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "lines.json"), block_size=2, cache_dir=cache)
    assert documents(train) == len(DOCS)
    (tmp_path / "bad.json").write_text('{\n  "text": "unterminated\n}\n')
    with pytest.raises(DataError, match=r"bad.json, line 2: invalid JSON"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "bad.json"), cache_dir=cache)
    (tmp_path / "badfirst.json").write_text('{"text": broken\n' + '{"text": "fine words here"}\n' * 20)
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "badfirst.json"), block_size=2, cache_dir=cache,
                                            skip_bad_lines=True)
    assert documents(train) == 20 and dataset_info(train)["tokenized"]["train"]["skipped_bad_lines"] == 1


def _jsonl_bytes():
    return "".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(50)).encode()


def _corrupt_gzip():
    data = bytearray(gzip.compress(_jsonl_bytes()))
    data[30:50] = b"\xff" * 20
    return bytes(data)


@pytest.mark.parametrize("name,content,message", [
    ("cut.jsonl.gz", lambda: gzip.compress(_jsonl_bytes())[:-30], "gzip data is truncated or corrupt"),
    ("bad.jsonl.gz", _corrupt_gzip, "gzip data is truncated or corrupt"),
    ("plain.txt.gz", lambda: b"plain text, not gzip " * 20, r"is not gzip-compressed.*rename it without \.gz"),
    ("empty.parquet", lambda: b"", r"is not a readable Parquet file"),
    ("junk.parquet", lambda: b"not parquet " * 20, r"is not a readable Parquet file"),
    ("ints.parquet", lambda: _parquet_bytes(pa.table({"text": list(range(20))})), r"column 'text' holds int64, not text"),
    ("nul.txt", lambda: b"\x00\x01\x02binary\x00\x00" * 30, r"is not UTF-8 text: \d+ of its first \d+ bytes are NUL"),
])
def test_corrupt_files_raise_one_data_error(tmp_path, cache, name, content, message):
    (tmp_path / name).write_bytes(content())
    with pytest.raises(DataError, match=rf"{name}:? .*{message}"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / name), block_size=4, cache_dir=cache)


def _parquet_bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_unreadable_file_names_it(tmp_path, cache, monkeypatch):
    (tmp_path / "locked.txt").write_text("some words " * 20)

    def locked_open(path, *args, **kwargs):  # tests run as root, where chmod 000 does not stop reading
        if str(path).endswith("locked.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(readers, "open", locked_open, raising=False)
    with pytest.raises(DataError, match=r"locked.txt: cannot read it \(Permission denied\)"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "locked.txt"), cache_dir=cache)


def test_cache_dir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        with pytest.raises(DataError, match=rf"cache_dir {bad}: cannot write the token cache there.*--cache_dir"):
            get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), cache_dir=str(bad))

    def read_only(*args, **kwargs):  # tests run as root, which may write into a chmod 555 folder
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(dataset, "temp_beside", read_only)
    with pytest.raises(DataError, match=r"cannot write the token cache there \(Read-only file system\)"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "ro"))


def test_disk_full_while_caching_names_the_cache_and_leaves_no_entry(tmp_path, cache, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", DOCS)
    real = dataset.split_and_pack

    def full_disk(tok_dir, tok_meta, out_dir, *args):
        real(tok_dir, tok_meta, out_dir, *args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset, "split_and_pack", full_disk)
    with pytest.raises(DataError, match=rf"disk holding cache_dir {cache} is full.*--cache_dir"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=8, cache_dir=cache)
    entries = [p.name for p in (tmp_path / "cache").iterdir() if p.name != "file-digests.json"]
    assert len(entries) == 1 and entries[0].startswith("tokens-")  # the tokens are complete; no partial blocks entry
    monkeypatch.setattr(dataset, "split_and_pack", real)
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=8, cache_dir=cache)
    assert documents(train) == len(DOCS)


def test_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, cache, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", DOCS * 5)
    _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=8, cache_dir=cache)
    n_train, n_val = len(train), len(val)
    arrow = train.cache_files[0]["filename"]
    del train, val
    with open(arrow, "r+b") as f:  # a copy cut short, or a crash before the data reached the disk
        f.truncate(__import__("os").path.getsize(arrow) // 2)
    with pytest.warns(UserWarning, match=r"is damaged \(train-00000.arrow has \d+ bytes, not \d+\): rebuilding it"):
        _, train, val = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "d.jsonl"), block_size=8, cache_dir=cache)
    assert (len(train), len(val)) == (n_train, n_val)


def test_split_error_names_the_file_passed_not_a_cached_copy(tmp_path, cache):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "small.txt").write_text("tiny text")
    (tmp_path / "B" / "small.txt").write_text("tiny text")
    with pytest.raises(DataError, match=r"A/small.txt has \d+ tokens"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "A" / "small.txt"), block_size=512, cache_dir=cache)
    with pytest.raises(DataError, match=r"B/small.txt has \d+ tokens"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "B" / "small.txt"), block_size=512, cache_dir=cache)


def test_non_utf8_file_name(tmp_path, cache):
    import os

    folder = tmp_path / "names"
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:  # a Latin-1 name on a UTF-8 system
        f.write(b"words in a file with a Latin-1 name " * 10)
    _, train, _ = get_dataset_and_tokenizer(dataset_path=str(folder), block_size=4, val_split=0, cache_dir=cache)
    assert documents(train) == 1


def test_file_changed_while_read_is_an_error(tmp_path, cache, monkeypatch):
    path = tmp_path / "growing.txt"
    path.write_text("first words of a log still being written\n" * 20)
    real = readers.read_txt

    def read_then_append(stream):
        yield from real(stream)
        with open(path, "a") as f:  # another program appends while we tokenize
            f.write("a late line\n")

    monkeypatch.setattr(readers, "read_txt", read_then_append)
    with pytest.raises(DataError, match=r"growing.txt changed while it was read"):
        get_dataset_and_tokenizer(dataset_path=str(path), block_size=4, cache_dir=cache)
    assert [p.name for p in (tmp_path / "cache").iterdir()] in ([], ["file-digests.json"])


def test_huge_line_is_cut_between_characters(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(readers, "TXT_CHUNK_BYTES", 300)  # a run with no newline is cut every 16 chunks (4800 bytes)
    # 3-byte characters, where a cut at 4796 bytes falls inside one; a CRLF where that cut falls between \r and \n
    for i, text in enumerate(["中" * 3000 + "文" * 2000, "a" * 4795 + "\r\n" + "字" * 2000]):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8", newline="")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "byte sequences replaced" warning: nothing was broken
            tok, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / f"{i}.txt"), block_size=2,
                                                      val_split=0, cache_dir=cache)
        assert tok.decode(all_tokens(train)).startswith(text.replace("\r\n", "\n"))


@pytest.mark.parametrize("official", [True, False])
def test_lone_surrogate_escape_in_json_is_replaced_and_counted(tmp_path, cache, tokenizer, monkeypatch, official):
    import gpt2_tokenizer

    if not official:  # the Hugging Face tokenizer raised a TypeError on it; tiktoken dropped it in silence
        monkeypatch.setattr(gpt2_tokenizer, "is_official_gpt2", lambda tok: False)
        monkeypatch.setattr(dataset, "PIPELINE_VERSION", -1)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": f"doc {i} caf\u00e9 \ud800 end"}) + "\n" for i in range(20)))
    with pytest.warns(UserWarning, match=r"s.jsonl: 20 byte sequence\(s\) are not valid UTF-8"):
        _, train, _ = get_dataset_and_tokenizer(dataset_path=str(tmp_path / "s.jsonl"), block_size=4, val_split=0,
                                                cache_dir=cache)
    assert tokenizer.decode(all_tokens(train)).startswith("doc 0 caf\u00e9 \ufffd end<|endoftext|>doc 1")


def test_reader_stopped_early_lets_go_of_the_file(tmp_path, monkeypatch):
    import gc

    from tqdm.auto import tqdm

    (tmp_path / "c.csv").write_text("text\n" + "a row\n" * 100)
    errors = []
    monkeypatch.setattr(sys, "unraisablehook", errors.append)
    pieces = dataset.iter_pieces(dataset.Source("files", [str(tmp_path / "c.csv")]), dataset.DataArguments(),
                                 tqdm(disable=True), str(tmp_path))
    assert next(pieces) == ("a row", True)
    pieces.close()  # as evaluation.py does after --max_documents
    del pieces
    gc.collect()
    assert errors == []
