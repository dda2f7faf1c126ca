"""Tokenize a corpus on every core, in shards that a crash does not lose, prepared once for all processes.

    shards = plan_files(paths, states)                  # or fed_shards(documents) for a stream
    records = run_shards(shards, job, encoder_spec(tokenizer), num_proc)
    starts, hashes = merge(records, job)

The inputs are cut into shards of about SHARD_BYTES, the same whatever the number of workers: byte ranges of an
uncompressed .jsonl or .txt file cut at line starts, runs of a Parquet file's row groups, whole files where they
cannot be cut (compressed, .json, .csv; small ones grouped), or runs of documents handed over from a stream (a Hub
dataset, the built-in corpus). A worker process reads, parses, normalises and tokenizes one shard and writes
`{split}-{index}.tokens` (flat ids), `.starts.npy` (where each document starts), `.hashes.npy` (a hash of each
document's text) and, last, its record `.json`. A finished shard is reused by the next run after a crash; a partial
one has no record and is done again. Taken in shard order, the output is the same bytes with 1 worker or 64.

`exclusive` lets one process prepare while the others (every rank of a torchrun job) wait for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from atomic import fsync_tree, write_atomic
from readers import _STATS, DataError, Part, file_format, normalise, parquet_row_groups, read_part, warn_replaced

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; each process prepares on its own, as before
    fcntl = None

SHARD_BYTES = 32 << 20  # input per shard: a few seconds of one core's work, the unit a crash can lose
FED_SHARD_CHARS = 8 << 20  # text per shard handed over from a stream: the parent holds a few of these at once
BATCH_CHARS = 4 << 20  # text handed to the tokenizer at once
CUT_SEARCH_BYTES = 16 << 20  # how far past a nominal cut a .txt file is searched for a line start to cut at


@dataclass
class Shard:
    """One unit of work: parts of files, or documents handed over (`texts`). `size` is for the progress bar."""

    index: int
    parts: tuple = ()
    texts: Optional[list] = None
    size: int = 0

    def plan(self) -> list:
        """What the shard covers, kept in its record: a finished shard is reused only for the same plan."""
        if self.texts is not None:
            return [len(self.texts), sum(len(t or "") for t in self.texts)]
        return [[p.path, p.start, p.end] for p in self.parts]


@dataclass(frozen=True)
class Job:
    """What every shard of one split shares."""

    split: str
    work_dir: str
    eot: int
    dtype: str
    text_field: str = "text"
    skip_bad_lines: bool = False


# ----------------------------------------------------------------------------------------------
# Planning: files -> shards, independent of the number of workers


def plan_files(paths: list, states: dict) -> list[Shard]:
    """Shards covering every file in order: big files cut into parts, small whole files grouped."""
    shards: list[Shard] = []
    group: list[Part] = []
    group_bytes = 0

    def close_group():
        nonlocal group, group_bytes
        if group:
            shards.append(Shard(len(shards), tuple(group), size=group_bytes))
        group, group_bytes = [], 0

    for path in paths:
        state = states.get(path)
        size = state[0] if state else os.path.getsize(path)
        parts = _cut(path, size, state)
        if len(parts) == 1 and size < SHARD_BYTES:
            if group_bytes + size > SHARD_BYTES:
                close_group()
            group.append(parts[0])
            group_bytes += size
            continue
        close_group()
        for part in parts:
            span = (part.end if part.end is not None else size) - part.start
            shards.append(Shard(len(shards), (part,), size=size if file_format(path) == ".parquet" else span))
        if file_format(path) == ".parquet" and len(parts) > 1:  # row groups: the bytes are shared out evenly
            for shard in shards[-len(parts):]:
                shard.size = size // len(parts)
    close_group()
    return shards


def _cut(path: str, size: int, state) -> list[Part]:
    fmt = file_format(path)
    if path.lower().endswith(".gz") or size <= SHARD_BYTES:
        return [Part(path, state=state)]
    if fmt == ".parquet":
        groups = parquet_row_groups(path)
        per = max(1, round(groups * SHARD_BYTES / size))  # row groups per shard
        bounds = list(range(0, groups, per)) + [groups]
        return [Part(path, a, b, state) for a, b in zip(bounds, bounds[1:])]
    if fmt not in (".jsonl", ".txt"):  # a .json array or a .csv with quoted newlines cannot be cut at a line
        return [Part(path, state=state)]
    cuts = [0]
    with open(path, "rb") as f:
        for nominal in range(SHARD_BYTES, size, SHARD_BYTES):
            if nominal <= cuts[-1]:
                continue
            cut = _line_start(f, nominal, size, txt=fmt == ".txt")
            if cut is not None and cut < size:
                cuts.append(cut)
    cuts.append(size)
    return [Part(path, a, b, state) for a, b in zip(cuts, cuts[1:])]


def _line_start(f, nominal: int, size: int, txt: bool) -> Optional[int]:
    """The first line start at or after `nominal`. In a .txt file, one whose line begins with a visible ASCII
    character: GPT-2's pre-tokenizer always cuts there, so the tokens on both sides are those of the whole text."""
    pos = nominal - 1
    f.seek(pos)
    buf = b""
    while pos + len(buf) < size and len(buf) < CUT_SEARCH_BYTES:
        buf += f.read(1 << 20)
        at = 0
        while (at := buf.find(b"\n", at)) >= 0 and at + 1 < len(buf):
            if not txt or 0x21 <= buf[at + 1] <= 0x7E:
                return pos + at + 1
            at += 1
        if not txt and at >= 0:  # a newline in the last byte read: the line starts after it
            return pos + at + 1
    return None if txt else size


def fed_shards(documents: Iterable[str], chars: Optional[int] = None) -> Iterator[Shard]:
    """Shards of documents from a stream, each of about `chars` characters, cut where the text says (not by
    worker count). Its documents are read even for shards that are skipped (finished), to stay in step."""
    chars = chars or FED_SHARD_CHARS
    texts, n, index = [], 0, 0
    for text in documents:
        texts.append(text)
        n += len(text)
        if n >= chars:
            yield Shard(index, texts=texts, size=len(texts))
            texts, n, index = [], 0, index + 1
    if texts or index == 0:
        yield Shard(index, texts=texts, size=len(texts))


# ----------------------------------------------------------------------------------------------
# Tokenizing one shard (in a worker process, or in this one)


def encoder_spec(tokenizer) -> tuple:
    """How a worker process rebuilds the tokenizer: tiktoken for the official GPT-2 BPE (same ids, tested, several
    times faster), a Hugging Face `tokenizers` JSON, or the object itself (a slow tokenizer: no workers)."""
    import gpt2_tokenizer

    if gpt2_tokenizer.is_official_gpt2(tokenizer):
        return ("tiktoken", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return ("tokenizers", backend.to_str())
    return ("python", tokenizer)


def make_encoder(spec: tuple, threads: int) -> Callable[[list], list]:
    """list[str] -> list[list[int]] on `threads` threads."""
    kind, value = spec
    if kind == "tiktoken":
        import gpt2_tokenizer

        enc = gpt2_tokenizer.tiktoken_encoding()
        if threads <= 1:
            return lambda texts: [enc.encode_ordinary(t) for t in texts]
        return lambda texts: enc.encode_ordinary_batch(texts, num_threads=threads)
    if kind == "tokenizers":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(value)
        return lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: [value.encode(t, add_special_tokens=False) for t in texts]


def encoder(tokenizer, threads: Optional[int] = None) -> Callable[[list], list]:
    """list[str] -> list[list[int]] for `tokenizer`, no special tokens added, on `threads` threads (default: all)."""
    return make_encoder(encoder_spec(tokenizer), threads or default_workers())


class DocumentHash:
    """A 64-bit hash of a document's text, fed piece by piece: equal for byte-identical documents."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=8)

    def update(self, text: str) -> None:
        self._hash.update(text.encode("utf-8", "surrogatepass"))

    def value(self) -> int:
        return int.from_bytes(self._hash.digest(), "little")


def _pieces(shard: Shard, job: Job, progress) -> Iterator[tuple[str, bool]]:
    if shard.texts is not None:
        for text in shard.texts:
            yield normalise(text or ""), True
        return
    for part in shard.parts:
        replaced_before = _STATS.replaced
        yield from read_part(part, job.text_field, job.skip_bad_lines, job.work_dir, progress)
        _REPLACED[part.path] = _REPLACED.get(part.path, 0) + _STATS.replaced - replaced_before


_REPLACED: dict = {}  # path -> undecodable byte sequences replaced while tokenizing the shard


def shard_name(job: Job, index: int) -> str:
    return os.path.join(job.work_dir, f"{job.split}-{index:05d}")


def tokenize_shard(shard: Shard, job: Job, encode: Callable, progress=None) -> dict:
    """Write the shard's tokens, document starts and hashes, then its record (returned)."""
    name = shard_name(job, shard.index)
    _REPLACED.clear()
    bad_before, empty_before = _STATS.bad_lines, _STATS.empty_docs
    dtype = np.dtype(job.dtype)
    # A .txt file cut into parts is one document: a part after its first continues it.
    continued = len(shard.parts) == 1 and not shard.parts[0].first and file_format(shard.parts[0].path) == ".txt"
    starts: list[int] = []
    hashes: list[int] = []
    n_tokens = n_chars = 0
    doc_has_text, doc_hash = continued, DocumentHash()
    batch: list[str] = []
    ends_list: list[bool] = []
    with open(name + ".tokens", "wb") as out:

        def flush():
            nonlocal n_tokens, doc_has_text, doc_hash
            flat: list[int] = []
            for ids, ends, text in zip(encode(batch), ends_list, batch):
                doc_hash.update(text)
                if ids and not doc_has_text:
                    starts.append(n_tokens + len(flat))
                    doc_has_text = True
                flat += ids
                if ends:
                    if doc_has_text:
                        flat.append(job.eot)
                        hashes.append(doc_hash.value())
                    else:
                        _STATS.empty_docs += 1
                    doc_has_text, doc_hash = False, DocumentHash()
            out.write(np.asarray(flat, dtype=dtype).tobytes())
            n_tokens += len(flat)
            batch.clear()
            ends_list.clear()

        batch_chars = 0
        for text, ends in _pieces(shard, job, progress):
            batch.append(text)
            ends_list.append(ends)
            batch_chars += len(text)
            n_chars += len(text)
            if batch_chars >= BATCH_CHARS or len(batch) >= 16384:
                flush()
                batch_chars = 0
        flush()
        still_open = doc_has_text  # a document that goes on in the next shard (a .txt file cut into parts)
        if still_open:
            hashes.append(doc_hash.value())  # the hash of its part here; merge() combines the parts
    np.save(name + ".starts.npy", np.asarray(starts, dtype=np.int64))
    np.save(name + ".hashes.npy", np.asarray(hashes, dtype=np.uint64))
    files = [name + suffix for suffix in (".tokens", ".starts.npy", ".hashes.npy")]
    record = {"index": shard.index, "plan": shard.plan(), "size": shard.size, "tokens": n_tokens, "documents": len(starts), "characters": n_chars,
              "bad_lines": _STATS.bad_lines - bad_before, "empty_documents": _STATS.empty_docs - empty_before,
              "replaced": {p: n for p, n in _REPLACED.items() if n}, "continued": continued, "open": still_open,
              "files": {os.path.basename(f): os.path.getsize(f) for f in files}}
    for f in files:
        fsync_tree(Path(f))
    write_atomic(name + ".json", json.dumps(record))  # last: a shard with a record is complete
    return record


def finished(job: Job, shard: Shard) -> Optional[dict]:
    """The record of the shard if an earlier run finished it: same plan, its files all there at their sizes."""
    name = shard_name(job, shard.index)
    try:
        record = json.loads(Path(name + ".json").read_text())
        if record["plan"] == shard.plan() and all(os.path.getsize(os.path.join(job.work_dir, f)) == n for f, n in record["files"].items()):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ----------------------------------------------------------------------------------------------
# Running shards on every core


_WORKER: dict = {}  # per worker process: its encoder


def _init_worker(spec: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _WORKER["encode"] = make_encoder(spec, threads=1)


def _tokenize_in_worker(shard: Shard, job: Job) -> dict:
    return tokenize_shard(shard, job, _WORKER["encode"])


def _pool_context():
    # fork: workers start at once and inherit the imported modules (spawn would re-import the calling script,
    # train.py with torch, in each); a worker touches no thread, lock or GPU state of the parent.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform == "linux" else "spawn")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_shards(shards: Iterable[Shard], job: Job, spec: tuple, num_proc: int,
               progress: Callable[[int], None] = lambda n: None, heartbeat: Callable[[], None] = lambda: None) -> list[dict]:
    """Every shard's record in shard order: finished ones read back, the others tokenized by num_proc workers
    (in this process when one worker, or one shard, is all there is to do)."""
    records: dict[int, dict] = {}

    def todo() -> Iterator[Shard]:
        for shard in shards:
            record = finished(job, shard)
            if record is None:
                yield shard
            else:
                records[shard.index] = record
                progress(shard.size)

    pending = todo()
    head = list(itertools.islice(pending, 2))
    if num_proc <= 1 or len(head) <= 1 or spec[0] == "python":
        encode = make_encoder(spec, threads=num_proc)
        for shard in itertools.chain(head, pending):
            records[shard.index] = tokenize_shard(shard, job, encode, lambda n: (progress(n), heartbeat()))
            _report(records[shard.index])
            if shard.texts is not None:  # documents handed over: counted when done (files: by bytes, as read)
                progress(shard.size)
                heartbeat()
    else:
        for record in run_tasks(_tokenize_in_worker, ((s, job) for s in itertools.chain(head, pending)), num_proc,
                                initializer=_init_worker, initargs=(spec,), what=f"tokenizing the {job.split} split"):
            records[record["index"]] = record
            _report(record)
            progress(record["size"])
            heartbeat()
    return [records[i] for i in sorted(records)]


def _report(record: dict) -> None:
    for path, n in record["replaced"].items():
        warn_replaced(path, n)


def run_tasks(fn: Callable, tasks: Iterable[tuple], num_proc: int, initializer=None, initargs=(),
              what: str = "preparing the data") -> Iterator:
    """fn(*task) for each task on num_proc worker processes, results as they finish. At most num_proc + 1 tasks
    are handed out at once (a task may carry text). The first error stops the rest and is raised here."""
    ctx = _pool_context()
    tasks = iter(tasks)
    with cf.ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        running: set = set()
        try:
            while True:
                for task in itertools.islice(tasks, num_proc + 1 - len(running)):
                    running.add(pool.submit(fn, *task))
                if not running:
                    return
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    try:
                        result = future.result()
                    except cf.process.BrokenProcessPool:
                        error = DataError(f"A worker process died while {what} (killed, or out of memory?). The "
                                          "shards finished so far are kept: rerun to go on from them, with fewer "
                                          "workers (--num_proc) if memory is short.")
                        error.resumable = True  # not the input's fault: the work folder is kept for the rerun
                        raise error from None
                    yield result
        finally:
            for future in running:
                future.cancel()


def merge(records: list[dict], job: Job) -> tuple[np.ndarray, np.ndarray]:
    """Every document's global start and hash, in order, from the shards' files. A document that runs across
    shards (a .txt file cut into parts) gets the hash of its parts' hashes."""
    starts, hashes, offset, parts = [], [], 0, []
    for record in records:
        name = shard_name(job, record["index"])
        starts.append(np.load(name + ".starts.npy") + offset)
        h = list(np.load(name + ".hashes.npy"))
        if record["continued"]:
            parts.append(h.pop(0))
            if not (record["open"] and not h):  # the document ends in this shard
                hashes.append(np.asarray([_combine(parts)], dtype=np.uint64))
                parts = []
        if record["open"] and h:  # a document starts here and goes on in the next shard
            parts = [h.pop()]
        hashes.append(np.asarray(h, dtype=np.uint64))
        offset += record["tokens"]
    if parts:  # a document without an end (cannot happen with files: their last part ends it)
        hashes.append(np.asarray([_combine(parts)], dtype=np.uint64))
    return np.concatenate(starts or [np.zeros(0, np.int64)]), np.concatenate(hashes or [np.zeros(0, np.uint64)])


def _combine(parts: list) -> int:
    if len(parts) == 1:
        return int(parts[0])
    return int.from_bytes(hashlib.blake2b(np.asarray(parts, dtype="<u8").tobytes(), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------------------------
# One process prepares, the others wait


def who() -> str:
    rank = os.environ.get("RANK")
    return f"rank {rank}" if rank is not None else f"process {os.getpid()}"


@contextmanager
def exclusive(lock_path: Path, what: str, timeout: float) -> Iterator[Callable[[], None]]:
    """Hold the lock on lock_path while preparing `what`; yields heartbeat(), to call as the work progresses.

    Another process holding it is waited for; one that dies lets go of the lock (the kernel releases it), and the
    waiter takes over from its finished shards. One that shows no progress for `timeout` seconds is an error."""
    if fcntl is None:
        yield lambda: None
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    said, last_seen, last_change = False, None, time.monotonic()
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            st = os.fstat(fd)
            seen, now = (st.st_ino, st.st_mtime_ns, st.st_size), time.monotonic()
            if seen != last_seen:
                last_seen, last_change = seen, now
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if not said:
                print(f"{who()}: waiting for {holder} to prepare {what}.", flush=True)
                said = True
            if now - last_change > timeout:
                raise DataError(
                    f"{who()} waited {timeout:.0f} s for {holder} to prepare {what}, and it made no progress. If that "
                    f"process is stuck, stop it (its finished shards are kept); to prepare the data once before a "
                    f"distributed run, run `python dataset.py` with the same data arguments; or allow a longer wait "
                    f"with --prepare_timeout.")
            time.sleep(0.2)
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break  # locked, and still the lock file: its holder before us did not remove it meanwhile
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{who()} (pid {os.getpid()} on {socket.gethostname()})".encode(), 0)
        last_beat = [0.0]

        def heartbeat():
            if time.monotonic() - last_beat[0] > 1:
                os.utime(fd)
                last_beat[0] = time.monotonic()

        yield heartbeat
    finally:
        lock_path.unlink(missing_ok=True)  # before letting go: a waiter that then locks the removed file retries
        os.close(fd)
