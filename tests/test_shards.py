"""shards.py: one worker equals many byte for byte, cuts keep every token, kill -9 resumes, one process prepares."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset
import shards
from dataset import DataError, dataset_info, get_dataset_and_tokenizer
from readers import file_state

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def doc(i: int, lines: int = 3) -> str:
    return "\n".join(f"Doc {i} line {j}: " + " ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(9)) for j in range(lines))


@pytest.fixture
def corpus(tmp_path):
    """Every kind of shard: a .jsonl and a .txt file cut at lines, Parquet row groups, small files grouped (.gz,
    .csv, .json), and two byte-identical big .txt files (one document each, cut into parts)."""
    root = tmp_path / "corpus"
    root.mkdir()
    with open(root / "a.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": doc(i)}) + "\n")
    book = "\n".join(doc(1000 + i, 5) for i in range(40)) + "\n  indented last line\n"
    (root / "b_book.txt").write_text(book)
    (root / "b_book_copy.txt").write_text(book)
    pq.write_table(pa.table({"text": [doc(2000 + i) for i in range(120)]}), root / "c.parquet", row_group_size=10)
    with gzip.open(root / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": doc(3000 + i)}) + "\n" for i in range(20)))
    (root / "e.csv").write_text("text\n" + "".join(f'"{doc(4000 + i)}"\n' for i in range(10)))
    (root / "f.json").write_text(json.dumps([{"text": doc(5000 + i)} for i in range(10)]))
    return root


def prepare(path, cache, num_proc, monkeypatch, shard_bytes=2048, **kw):
    monkeypatch.setattr(shards, "SHARD_BYTES", shard_bytes)
    return get_dataset_and_tokenizer(dataset_path=str(path), block_size=32, cache_dir=str(cache), num_proc=num_proc, **kw)


def cache_files(cache) -> dict:
    """name -> bytes of every token and block file of a cache (meta.json records the num_proc asked for)."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in Path(cache).glob("*/*") if p.name != "meta.json"}


def tokens(ds) -> list:
    return [t for row in ds["input_ids"] for t in row]


def test_plan_cuts_big_files_at_line_starts_and_groups_small_ones(corpus, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", 8192)
    paths = sorted(str(p) for p in corpus.iterdir())
    plan = shards.plan_files(paths, {p: file_state(p) for p in paths})
    parts = [part for shard in plan for part in shard.parts]
    for path in paths:  # every byte (row group) of every file, once, in order
        mine = [p for p in parts if p.path == path]
        if len(mine) > 1 and not path.endswith(".parquet"):
            assert mine[0].start == 0 and mine[-1].end == os.path.getsize(path)
            assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
            data = Path(path).read_bytes()
            assert all(data[p.start - 1:p.start] == b"\n" for p in mine[1:])  # each part starts a line
            if path.endswith(".txt"):  # ... one that starts with a visible character (a pre-token boundary)
                assert all(0x21 <= data[p.start] <= 0x7E for p in mine[1:])
    groups = [(p.start, p.end) for p in parts if p.path.endswith(".parquet")]
    assert len(groups) > 1 and groups[0][0] == 0 and groups[-1][1] == 12  # runs of its 12 row groups, in order
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    small = [s for s in plan if len(s.parts) > 1]
    assert small and all(p.end is None for s in small for p in s.parts)  # small whole files share a shard


def test_one_worker_equals_many_byte_for_byte_and_equals_no_cuts(corpus, tmp_path, monkeypatch, capsys):
    one = prepare(corpus, tmp_path / "one", 1, monkeypatch)
    many = prepare(corpus, tmp_path / "many", 3, monkeypatch)
    whole = prepare(corpus, tmp_path / "whole", 1, monkeypatch, shard_bytes=1 << 30)
    info = dataset_info(one[1])
    assert info["tokenized"]["train"]["documents"] == 300 + 2 + 120 + 20 + 10 + 10
    assert len(list((tmp_path / "one").glob("tokens-*/train-*.tokens"))) > 10  # it was cut
    assert cache_files(tmp_path / "one") == cache_files(tmp_path / "many")
    for a, b in ((one, whole), (many, whole)):  # the cuts change no token, and no document's split
        assert tokens(a[1]) == tokens(b[1]) and tokens(a[2]) == tokens(b[2])
    assert dataset_info(many[1])["val"] == dataset_info(whole[1])["val"]
    # The two copies of the book are one text: found as copies though each is cut into parts.
    assert "2 documents of" in capsys.readouterr().out


def test_one_document_cut_into_shards_is_split_by_position_as_before(tmp_path, monkeypatch):
    book = tmp_path / "book.txt"
    book.write_text("\r\n".join(doc(i, 4) for i in range(60)))
    one = prepare(book, tmp_path / "one", 2, monkeypatch)
    whole = prepare(book, tmp_path / "whole", 1, monkeypatch, shard_bytes=1 << 30)
    assert dataset_info(one[1])["split_method"] == "position"
    assert tokens(one[1]) == tokens(whole[1]) and tokens(one[2]) == tokens(whole[2])
    assert one[0].decode(tokens(one[1])).startswith(doc(0, 4).replace("\r\n", "\n"))


def test_a_bad_line_in_a_later_shard_is_named_by_its_line_in_the_file(tmp_path, monkeypatch):
    lines = [json.dumps({"text": doc(i)}) for i in range(400)]
    lines[349] = '{"text": "cut short'
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 350: invalid JSON"):
        prepare(tmp_path / "d.jsonl", tmp_path / "cache", 2, monkeypatch)
    assert not list((tmp_path / "cache").glob(".*partial"))  # bad input: nothing kept to resume from


FAULTY_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
import dataset, shards
shards.SHARD_BYTES = 2048
write = shards.write_atomic
def dying(path, data):  # kill -9 once shard 5's tokens are written, before its record
    if str(path).endswith("train-00005.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)
shards.write_atomic = dying
dataset.get_dataset_and_tokenizer(dataset_path={path!r}, block_size=32, cache_dir={cache!r}, num_proc=1)
"""


def test_kill_9_mid_preparation_resumes_from_the_finished_shards(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    script = FAULTY_RUN.format(root=str(ROOT), path=str(corpus), cache=str(cache))
    rc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300).returncode
    assert rc == -signal.SIGKILL
    partial = next(cache.glob(".tokens-*.partial"))
    assert sorted(p.name for p in partial.glob("train-*.json")) == [f"train-0000{i}.json" for i in range(5)]
    assert (partial / "train-00005.tokens").exists()  # written, but without its record: done again
    done = []
    real = shards.tokenize_shard
    monkeypatch.setattr(shards, "tokenize_shard", lambda shard, *a, **k: done.append(shard.index) or real(shard, *a, **k))
    prepare(corpus, cache, 1, monkeypatch)
    assert min(done) == 5  # shards 0-4 were kept
    prepare(corpus, tmp_path / "uninterrupted", 2, monkeypatch)
    assert cache_files(cache) == cache_files(tmp_path / "uninterrupted")
    assert not list(cache.glob(".*"))  # no partial folder, no lock file left


def test_a_finished_shard_whose_files_changed_is_done_again(tmp_path):
    job = shards.Job("train", str(tmp_path), 50256, "uint16")
    shard = shards.Shard(0, texts=["one document", "another"], size=2)
    record = shards.tokenize_shard(shard, job, shards.encoder(__import__("gpt2_tokenizer").load_tokenizer(), 1))
    assert shards.finished(job, shard) == record
    assert shards.finished(job, shards.Shard(0, texts=["other text"], size=1)) is None  # another plan
    with open(tmp_path / "train-00000.tokens", "ab") as f:
        f.write(b"\0\0")
    assert shards.finished(job, shard) is None


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import shards
with shards.exclusive(Path({lock!r}), "the data", timeout=60):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), lock=str(lock))],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "RANK": "0"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_stalled_preparer_makes_the_others_stop_with_an_error(tmp_path, capsys):
    proc = hold_lock(tmp_path / ".x.lock")
    try:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"waited 1 s for rank 0 \(pid \d+ on .*\) to prepare the data, and it made "
                                            r"no progress.*python dataset.py.*--prepare_timeout"):
            with shards.exclusive(tmp_path / ".x.lock", "the data", timeout=1):
                pass
        assert time.monotonic() - start < 10
        assert "waiting for rank 0" in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()


def test_a_preparer_that_dies_hands_the_work_over(tmp_path):
    proc = hold_lock(tmp_path / ".x.lock")
    threading = __import__("threading")
    threading.Timer(1.0, lambda: os.kill(proc.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with shards.exclusive(tmp_path / ".x.lock", "the data", timeout=60) as heartbeat:
        heartbeat()
        assert 0.9 < time.monotonic() - start < 30
    proc.wait()
    assert not (tmp_path / ".x.lock").exists()


RANK_RUN = """
import sys, json
sys.path.insert(0, {root!r})
import dataset, shards
shards.SHARD_BYTES = 2048
done, real = [], shards.tokenize_shard
shards.tokenize_shard = lambda shard, *a, **k: done.append(shard.index) or real(shard, *a, **k)
_, train, val = dataset.get_dataset_and_tokenizer(dataset_path={path!r}, block_size=32, cache_dir={cache!r}, num_proc=1)
print("RESULT", len(train), len(val))
print("TOKENIZED", len(done))
"""


def test_ranks_started_together_tokenize_once(corpus, tmp_path):
    script = RANK_RUN.format(root=str(ROOT), path=str(corpus), cache=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank)}) for rank in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = {line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")}
    assert len(results) == 1  # the same data for every rank
    tokenized = [int(line.split()[1]) for out, _ in outs for line in out.splitlines() if line.startswith("TOKENIZED")]
    assert sum(tokenized) == len(list((tmp_path / "cache").glob("tokens-*/train-*.json"))) > 1  # each shard once
    assert any("waiting for rank" in out for out, _ in outs)


def test_parquet_row_groups_and_a_streamed_hub_dataset_give_the_files_tokens(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    pq.write_table(pa.table({"text": [doc(i) for i in range(200)]}), folder / "train.parquet", row_group_size=8)
    files = prepare(folder, tmp_path / "files", 2, monkeypatch)
    monkeypatch.setattr(shards, "FED_SHARD_CHARS", 3000)  # many shards handed over from the stream
    streamed = get_dataset_and_tokenizer(dataset_name=str(folder), streaming=True, block_size=32,
                                         cache_dir=str(tmp_path / "stream"), num_proc=2)
    assert tokens(streamed[1]) == tokens(files[1]) and tokens(streamed[2]) == tokens(files[2])
    assert dataset_info(streamed[1])["tokenized"]["train"]["documents"] == 200
    assert len(list((tmp_path / "stream").glob("tokens-*/train-*.tokens"))) > 5


def test_labels_are_the_input_ids_mapped_once_and_a_pickle_stays_small(corpus, tmp_path, monkeypatch):
    _, train, _ = prepare(corpus, tmp_path / "c", 2, monkeypatch)
    assert train.column_names == ["input_ids", "labels"] and train["input_ids"] == train["labels"]
    blob = __import__("pickle").dumps(train)
    assert len(blob) < 50_000  # the files' names and two renames, not the data
    assert __import__("pickle").loads(blob)[5] == train[5]
    arrow = sum(p.stat().st_size for p in (tmp_path / "c").glob("blocks-*/*.arrow"))
    assert arrow < 4.5 * len(train) * 32 + 100_000  # int32 input_ids once, not twice


def test_bad_settings_are_errors(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(DataError, match="num_proc=0 must be at least 1"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"), num_proc=0)
    with pytest.raises(DataError, match="prepare_timeout=0 must be"):
        get_dataset_and_tokenizer(dataset_path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"), prepare_timeout=0)


def test_the_cli_prepares_with_workers(corpus, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "--dataset_path", str(corpus), "--num_proc", "2",
                          "--cache_dir", str(tmp_path / "c"), "--block_size", "32"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[out.stdout.index("{"):])["tokenized"]["train"]["documents"] == 462
    assert dataset.PIPELINE_VERSION >= 3


def test_a_warm_call_trusts_recorded_digests_but_not_a_file_rewritten_in_place(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(50)))
    first = prepare(path, tmp_path / "c", 1, monkeypatch)
    assert json.loads((tmp_path / "c" / "file-digests.json").read_text())[str(path)][-1]
    import readers

    readers._DIGEST_MEMO.clear()  # a new process
    hashed = []
    real = readers.xxhash.xxh3_128
    monkeypatch.setattr(readers.xxhash, "xxh3_128", lambda: hashed.append(1) or real())
    assert tokens(prepare(path, tmp_path / "c", 1, monkeypatch)[1]) == tokens(first[1]) and hashed == []
    st = path.stat()  # the same size and modification time, other bytes (a tool that restores mtime)
    path.write_text(path.read_text().replace("alpha", "ALPHA"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    readers._DIGEST_MEMO.clear()
    again = prepare(path, tmp_path / "c", 1, monkeypatch)
    assert hashed and tokens(again[1]) != tokens(first[1])


def dies_on_shard_6(shard, job):  # at module level: a worker's task is pickled by name
    if shard.index == 6:
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's way
    return REAL_WORKER_TASK(shard, job)


REAL_WORKER_TASK = shards._tokenize_in_worker


def test_a_worker_killed_is_an_error_that_keeps_the_finished_shards(corpus, tmp_path, monkeypatch):
    real = shards._tokenize_in_worker
    monkeypatch.setattr(shards, "_tokenize_in_worker", dies_on_shard_6)
    with pytest.raises(DataError, match="A worker process died while tokenizing the train split.*rerun"):
        prepare(corpus, tmp_path / "c", 2, monkeypatch)
    partial = next((tmp_path / "c").glob(".tokens-*.partial"))
    assert list(partial.glob("train-*.json"))  # kept for the rerun
    monkeypatch.setattr(shards, "_tokenize_in_worker", real)
    assert tokens(prepare(corpus, tmp_path / "c", 2, monkeypatch)[1]) == tokens(prepare(corpus, tmp_path / "d", 1, monkeypatch)[1])
