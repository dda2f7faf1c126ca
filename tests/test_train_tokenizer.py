import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

import dataset
import train_tokenizer
from readers import DataError, expand_path
from train_tokenizer import REPORT_FILE, train_tokenizer as train_bpe

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(script, *argv, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bpe512(tmp_path_factory):
    """A 512-token tokenizer trained on the built-in corpus, by the function."""
    out = tmp_path_factory.mktemp("bpe") / "bpe512"
    tokenizer, report = train_bpe(dataset_name="builtin", vocab_size=512, out=out)
    return out, tokenizer, report


def unique_word(i: int) -> str:
    return "".join("qxzjkvwyfg"[int(d)] for d in f"{i:03d}")  # 3 letters no other text has together


@pytest.fixture(scope="module")
def tagged_corpus(tmp_path_factory):
    """40 JSONL documents, each with a word of its own said 6 times: a tokenizer that saw a document has that
    word as one token."""
    path = tmp_path_factory.mktemp("tagged") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Document {i}." + f" {unique_word(i)}" * 6 + " The end.\n"}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# The function and the folder it writes


def test_folder_loads_with_transformers_alone_and_encodes_like_the_trainer(bpe512):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    out, tokenizer, report = bpe512
    assert len(tokenizer) == report["vocab_size"] == 512
    text = "def f(x):\n    return x ** 2  # naïve — ünïcödé 🙂\r\n\t<|endoftext|>"
    for loaded in (AutoTokenizer.from_pretrained(out), GPT2TokenizerFast.from_pretrained(out)):
        assert len(loaded) == 512
        assert loaded.eos_token == loaded.bos_token == "<|endoftext|>" and loaded.eos_token_id == 0
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert sorted(p.name for p in out.iterdir()) == sorted(["tokenizer.json", "tokenizer_config.json", REPORT_FILE])
    assert json.loads((out / REPORT_FILE).read_text()) == report


def test_report_compares_bytes_per_token_with_gpt2_on_the_held_out_documents(bpe512):
    _, tokenizer, report = bpe512
    docs = [t for t in dataset.builtin_documents() if t]
    is_val = dataset.validation_documents(len(docs), 0.05, 42)
    held = [d for d, v in zip(docs, is_val) if v]
    h = report["held_out"]
    assert report["split"] == "documents" and h["documents"] == len(held) == is_val.sum()
    assert h["bytes"] == sum(len(d.encode()) for d in held)
    assert h["tokens"] == sum(len(tokenizer.encode(d)) for d in held)
    assert h["bytes_per_token"] == round(h["bytes"] / h["tokens"], 4)
    assert 1 < h["bytes_per_token"] < h["gpt2_bytes_per_token"]  # 512 tokens cannot match GPT-2's 50257
    assert report["trained"]["documents"] == len(docs) - len(held)
    assert report["trained"]["bytes"] == sum(len(d.encode()) for d, v in zip(docs, is_val) if not v)


def test_the_documents_train_py_holds_out_are_not_trained_on(tagged_corpus, tmp_path):
    # Every pair seen 6 times merged: the largest vocabulary this text fills, which the error message names.
    kwargs = dict(dataset_path=str(tagged_corpus), out=tmp_path / "tok", val_split=0.25, seed=3, min_frequency=6)
    with pytest.raises(DataError, match=r"use --vocab_size (\d+) or less") as error:
        train_bpe(vocab_size=1000, **kwargs)
    tokenizer, report = train_bpe(vocab_size=int(re.search(r"--vocab_size (\d+)", str(error.value))[1]), **kwargs)
    learned = {i for i in range(40) if len(tokenizer.encode(" " + unique_word(i))) == 1}
    # The documents dataset.py puts in validation with the same split and seed, read back from its blocks.
    _, _, val = dataset.get_dataset_and_tokenizer(dataset_path=str(tagged_corpus), val_split=0.25, seed=3, block_size=4,
                                                  tokenizer_name=str(tmp_path / "tok"), cache_dir=str(tmp_path / "c"))
    val_text = tokenizer.decode(np.concatenate([np.asarray(r) for r in val["input_ids"]]))
    in_val = {i for i in range(40) if f"Document {i}." in val_text}
    assert len(in_val) == 10 and report["held_out"]["documents"] == 10
    assert learned == set(range(40)) - in_val


def test_a_single_document_holds_out_its_end(tmp_path):
    text = "".join(f"Line {i}: the quick brown fox {unique_word(i % 300)}.\n" for i in range(3000))
    (tmp_path / "one.txt").write_text(text)
    _, report = train_bpe(dataset_path=str(tmp_path / "one.txt"), vocab_size=300, out=tmp_path / "tok", val_split=0.1)
    cut = int(len(text) * 0.9)
    assert report["split"] == "position"
    assert report["held_out"]["documents"] == 1 and report["held_out"]["bytes"] == len(text) - cut
    assert report["trained"]["bytes"] == cut


def test_a_large_single_document_is_streamed_not_held(tmp_path):
    import tracemalloc

    line = "".join(f"{unique_word(i)} the quick brown fox jumps over the lazy dog {i}\n" for i in range(1000))
    (tmp_path / "book.txt").write_text(line * 200)  # 10 MB, one document
    train_bpe(dataset_name="builtin", vocab_size=300, out=tmp_path / "warm")  # imports and GPT-2's BPE: not counted
    tracemalloc.start()
    try:
        _, report = train_bpe(dataset_path=str(tmp_path / "book.txt"), vocab_size=300, out=tmp_path / "tok", val_split=0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["trained"]["bytes"] == int(len(line) * 200 * 0.99) and report["held_out"]["documents"] == 1
    # Never the whole document at once (reading holds a 1 MB piece in a few forms; the trainer 256 small parts).
    assert peak < 8e6, f"{peak / 1e6:.1f} MB of Python objects at once for a 10 MB document"


def test_an_official_validation_split_is_the_held_out_text(tmp_path):
    for split, n in (("train", 30), ("valid", 7)):
        with open(tmp_path / f"small-117M.{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{split} document number {i}, some words to merge."}) + "\n")
    _, report = train_bpe(dataset_name="small", data_dir=str(tmp_path), vocab_size=280, out=tmp_path / "tok")
    assert report["split"] == "official valid split"
    assert report["trained"]["documents"] == 30 and report["held_out"]["documents"] == 7


def test_val_split_zero_trains_on_everything(tmp_path):
    _, report = train_bpe(dataset_name="builtin", vocab_size=300, out=tmp_path / "tok", val_split=0)
    assert report["trained"]["documents"] == len([d for d in dataset.builtin_documents() if d])
    assert report["held_out"] == {"documents": 0, "bytes": 0}


# ----------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("vocab_size", [0, 256, 65537])
def test_vocab_size_out_of_range(tmp_path, vocab_size):
    with pytest.raises(DataError, match=f"vocab_size={vocab_size}: must be from 257"):
        train_bpe(dataset_name="builtin", vocab_size=vocab_size, out=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_a_vocabulary_larger_than_the_corpus_can_fill(tmp_path):
    (tmp_path / "small.txt").write_text("hello world, hello world\n")
    with pytest.raises(DataError, match=r"small.txt only fills \d+ of 5000 tokens.*--vocab_size \d+ or less"):
        train_bpe(dataset_path=str(tmp_path / "small.txt"), vocab_size=5000, out=tmp_path / "tok")
    assert os.listdir(tmp_path) == ["small.txt"]


def test_an_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="contains no text"):
        train_bpe(dataset_path=str(tmp_path), vocab_size=300, out=tmp_path / "tok")


def test_bad_input_names_the_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"d.jsonl.*line 2"):
        train_bpe(dataset_path=str(tmp_path / "d.jsonl"), vocab_size=300, out=tmp_path / "tok")


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        train_bpe(dataset_name="builtin", vocab_size=300, out=out)
    assert (out / "mine.txt").read_text() == "keep me"
    tokenizer, _ = train_bpe(dataset_name="builtin", vocab_size=300, out=out, overwrite=True)
    assert not (out / "mine.txt").exists() and len(tokenizer) == 300
    assert sorted(os.listdir(tmp_path)) == ["tok"]  # no temporary folder left beside it


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["a_file", "under_a_file", "unwritable"])
def test_a_bad_out_is_refused_before_training_and_nothing_is_moved(tmp_path, monkeypatch, where, overwrite):
    import atomic
    import train_tokenizer

    (tmp_path / "a_file").write_text("the user's file")
    out = {"a_file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "tok", "unwritable": tmp_path / "ro" / "tok"}[where]
    if where == "unwritable":  # tests run as root, which writes into a chmod 555 folder: refuse the probe instead
        def read_only(dest, folder=False):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(atomic, "temp_beside", read_only)
    trained = []
    monkeypatch.setattr(train_tokenizer, "_train_bpe", lambda *a, **k: trained.append(1))
    match = "Read-only file system" if where == "unwritable" else ("already exists" if where == "a_file" and not overwrite
                                                                   else "is a file, not a folder")
    with pytest.raises(DataError, match=match):
        train_bpe(dataset_name="builtin", vocab_size=300, out=out, overwrite=overwrite)
    assert trained == []  # refused before the long work
    assert (tmp_path / "a_file").read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a_file"], ["a_file", "ro"])  # no hidden .old or .tmp


# ----------------------------------------------------------------------------------------------
# Round trip: every document comes back exactly


def test_round_trip_of_hard_text(bpe512):
    _, tokenizer, _ = bpe512
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(0, 0x250), *range(0x370, 0x3ff), *range(0x4e00, 0x4e40), 0x1F600, 0x1F9D1, 0x200D,
                                 0xFEFF, 0xFFFD, 0x10FFFF] if not 0xD800 <= c < 0xE000]
    texts = ["", " ", "\n\n\n", "  leading and trailing  ", "<|endoftext|>", "a<|endoftext|>b", "\r\n\r", "\x00\x01"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200))) for _ in range(300)]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)


def test_round_trip_of_every_document_of_the_shared_corpora(bpe512, shared_data):
    _, tokenizer, _ = bpe512
    args = dataset.DataArguments(dataset_path=str(shared_data))
    source = dataset.Source("files", expand_path(str(shared_data)))
    from tqdm import tqdm

    n_docs, doc = 0, []
    with tqdm(disable=True) as progress:
        pieces = list(dataset.iter_pieces(source, args, progress, str(shared_data)))
    for text, ends in pieces:
        doc.append(text)
        if ends:
            text = "".join(doc)
            assert tokenizer.decode(tokenizer.encode(text)) == text, f"document {n_docs} of the shared corpora"
            n_docs, doc = n_docs + 1, []
    assert n_docs > 2000  # the JSONL files alone hold 2,255 documents; Latin-1 and CRLF books included


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_trains_prints_the_report_and_errors_in_one_line(tmp_path):
    ok = run_cli("train_tokenizer.py", "--dataset_name", "builtin", "--vocab_size", 320, "--out", tmp_path / "tok")
    assert ok.returncode == 0, ok.stderr
    assert "| this one | 320 |" in ok.stdout and "| GPT-2 BPE | 50257 |" in ok.stdout
    assert f"--tokenizer_name {tmp_path / 'tok'}" in ok.stdout
    again = run_cli("train_tokenizer.py", "--dataset_name", "builtin", "--vocab_size", 320, "--out", tmp_path / "tok")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in again.stderr and "--overwrite" in again.stderr


def test_help_documents_every_flag():
    out = run_cli("train_tokenizer.py", "--help")
    assert out.returncode == 0
    for f in train_tokenizer.TokenizerArguments.__dataclass_fields__:
        assert f"--{f}" in out.stdout
    assert "byte-level BPE" in out.stdout


# ----------------------------------------------------------------------------------------------
# End to end: train_tokenizer -> train.py -> generate.py, quantize.py, the web API -> evaluation.py


@pytest.fixture(scope="module")
def trained_on_own_tokenizer(tmp_path_factory):
    """A tiny model trained by train.py on a 512-token tokenizer from train_tokenizer.py's CLI."""
    tmp = tmp_path_factory.mktemp("e2e")
    made = run_cli("train_tokenizer.py", "--dataset_name", "builtin", "--vocab_size", 512, "--out", tmp / "bpe512")
    assert made.returncode == 0, made.stderr
    trained = run_cli("train.py", "--dataset_name", "builtin", "--tokenizer_name", tmp / "bpe512", "--output_dir", tmp / "run",
                      "--cache_dir", tmp / "cache", "--n_layer", 2, "--n_embd", 32, "--n_head", 2, "--block_size", 32,
                      "--max_steps", 12, "--eval_steps", 6, "--save_steps", 6, "--learning_rate", 3e-3, "--warmup_steps", 2,
                      "--report_to", "none", "--sample_max_new_tokens", 8, "--disable_tqdm", "true")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    return tmp / "bpe512", tmp / "run" / "final_model", trained.stdout


def test_train_py_sizes_the_model_and_saves_the_tokenizer(trained_on_own_tokenizer):
    from transformers import AutoTokenizer

    tokenizer_dir, final, _ = trained_on_own_tokenizer
    config = json.loads((final / "config.json").read_text())
    assert config["vocab_size"] == 512  # already a multiple of 64
    assert config["eos_token_id"] == config["bos_token_id"] == 0
    saved, ours = AutoTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert saved.get_vocab() == ours.get_vocab() and len(saved) == 512


def test_train_py_reports_validation_bits_per_byte(trained_on_own_tokenizer):
    import generate
    from perplexity import evaluate_perplexity

    tokenizer_dir, final, log = trained_on_own_tokenizer
    results = json.loads((final / "eval_results.json").read_text())
    _, _, val = dataset.get_dataset_and_tokenizer(dataset_name="builtin", tokenizer_name=str(tokenizer_dir), block_size=32,
                                                  cache_dir=str(final.parent.parent / "cache"))
    tokenizer, model, _ = generate.load_model(final, device="cpu", dtype=None)
    scored = evaluate_perplexity(model, tokenizer, val, progress=False)
    assert results["eval_loss"] == pytest.approx(scored["loss"], rel=1e-4)
    assert results["eval_bits_per_byte"] == pytest.approx(scored["bits_per_byte"], rel=1e-4)
    assert f"{results['eval_bits_per_byte']:.4f} bits per byte" in log
    metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_bits_per_byte" in m for m in metrics) >= 2  # every evaluation, not only the last


def test_generate_py_samples_with_the_folder_tokenizer(trained_on_own_tokenizer):
    _, final, _ = trained_on_own_tokenizer
    out = run_cli("generate.py", "--model_path", final, "--prompt", "The module", "--length", 12, "--seed", 1, "--json")
    assert out.returncode == 0, out.stderr
    (line,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert line["completion"] and line["completion_tokens"] <= 12

    import generate

    tokenizer, model, device = generate.load_model(final, device="cpu")
    (c,) = generate.generate(tokenizer, model, device, "The module", max_new_tokens=12, seed=1)
    assert all(0 <= t < 512 for t in c.completion_ids)
    assert c.completion == line["completion"]


def test_quantized_model_keeps_the_tokenizer(trained_on_own_tokenizer, tmp_path):
    _, final, _ = trained_on_own_tokenizer
    q = run_cli("quantize.py", "--model_path", final, "--mode", "int8", "--out", tmp_path / "int8")
    assert q.returncode == 0, q.stderr
    out = run_cli("generate.py", "--model_path", tmp_path / "int8", "--prompt", "The module", "--length", 8, "--seed", 1)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "int8" / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert (tmp_path / "int8" / "tokenizer.json").read_bytes() == (final / "tokenizer.json").read_bytes()


def test_web_api_serves_the_model(trained_on_own_tokenizer):
    import generate
    import web_demo
    from test_web_demo import Server, call

    _, final, _ = trained_on_own_tokenizer
    loaded = generate.load_model(final, device="cpu")
    server = Server(web_demo.build_app(*loaded, web_demo.WebDemoArguments(model_path=str(final)), page=False))
    try:
        status, body = call(server, "/v1/completions", {"prompt": "The module", "max_tokens": 8, "temperature": 0})
    finally:
        server.stop()
    assert status == 200, body
    (expected,) = generate.generate(*loaded, "The module", max_new_tokens=8, temperature=0, top_k=0, top_p=1.0)
    assert body["choices"][0]["text"] == expected.completion


def test_evaluation_compares_bits_per_byte_across_tokenizers(trained_on_own_tokenizer, tiny_gpt2_dir, tmp_path):
    _, final, _ = trained_on_own_tokenizer
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(dataset.builtin_documents()[:3]))
    out_json = tmp_path / "r.json"
    r = run_cli("evaluation.py", "--model_path", final, tiny_gpt2_dir, "--dataset_path", text, "--output_json", out_json)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out_json.read_text())["models"]
    assert [row["vocab"] for row in rows] == [512, 50257]
    ours, gpt2 = (row["perplexity"] for row in rows)
    assert ours["bytes"] == gpt2["bytes"] == len(text.read_text().encode())  # the same text, whatever the tokens
    assert ours["tokens"] > gpt2["tokens"]
    assert ours["bits_per_byte"] < gpt2["bits_per_byte"]  # trained against random weights
    assert "| vocab |" in r.stdout and "compare bits/byte" in r.stdout
