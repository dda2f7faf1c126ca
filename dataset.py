"""Load, tokenize and pack text into fixed-length blocks for GPT-2 training.

    tokenizer, train, val = get_dataset_and_tokenizer(dataset_path="my_texts/", block_size=128)

Where the text comes from (first match wins):
  - `dataset_path`: a file, folder or glob of .txt/.json/.jsonl/.csv/.parquet files, each optionally .gz;
  - `dataset_name`: a gpt-2-output-dataset name ("webtext", "small-117M", ... or the short "small",
    "medium", "large", "xl") found in `data/` (see download_dataset.py), with its official valid split
    when present; "builtin" for the built-in corpus; otherwise a Hugging Face Hub dataset name;
  - nothing downloaded and nothing given: the built-in corpus, the English documentation text that
    ships with every Python (`pydoc_data.topics`), so the toolkit runs with no network and no files.

Nothing is lost: every document is tokenized in full and followed by <|endoftext|>; packing drops at
most one final partial block per split. A .txt file is one document. Train and validation are split by
document with a fixed seed; a corpus with too few documents for that is split by position instead
(the last `val_split` of its tokens), as nanoGPT does.

Tokens are cached on disk keyed by the data's content, the tokenizer and the text field; blocks by
those plus block size, split and seed. A repeated call memory-maps the cache. Preparing runs on every core
in shards (shards.py) that an interrupted run keeps, and one process prepares while others asking for the
same data (the ranks of a torchrun job) wait for it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

import download_dataset
import shards
from atomic import fsync_tree, install, remove, temp_beside, write_atomic
from errors import run_main
from gpt2_tokenizer import load_tokenizer
from readers import DataError, expand_path, file_digest, file_state, normalise, read_files, shown

PIPELINE_VERSION = 3  # bump when the tokens or blocks written for the same inputs would change
REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = Path(os.environ.get("GPT2_CACHE_DIR", REPO_DIR / ".cache" / "datasets"))
GPT2_OUTPUT_ALIASES = {"small": "small-117M", "medium": "medium-345M", "large": "large-762M", "xl": "xl-1542M"}
GPT2_OUTPUT_NAMES = download_dataset.DATASETS
DEFAULT_DATASET_NAME = "small"
BUILTIN_NAME = "builtin"


@dataclass
class DataArguments:
    """What to train on: `get_dataset_and_tokenizer`'s arguments but its `seed`, which train.py shares with the Trainer."""

    dataset_name: str = field(
        default=DEFAULT_DATASET_NAME,
        metadata={"help": "gpt-2-output-dataset name in --data_dir (webtext, small-117M, ..., or small/medium/large/xl), "
                  "'builtin' (Python's own documentation text), or a Hugging Face Hub dataset name. The default "
                  "'small' falls back to the built-in corpus when data/small-117M.train.jsonl is not downloaded."},
    )
    dataset_path: Optional[str] = field(
        default=None,
        metadata={"help": "File, folder or glob of .txt/.json/.jsonl/.csv/.parquet (optionally .gz). Overrides --dataset_name."},
    )
    val_split: float = field(
        default=0.05, metadata={"help": "Share of documents held out for validation (ignored when an official valid split exists)."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training example; at most the model's context."})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Hugging Face tokenizer folder or Hub name (default: the official GPT-2 tokenizer in ./gpt2_tokenizer); "
                                   "train_tokenizer.py makes one fitted to your text."}
    )
    text_field: str = field(default="text", metadata={"help": "JSON field, CSV/Parquet column or Hub dataset column holding the text."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    data_dir: str = field(default="data", metadata={"help": "Folder where download_dataset.py puts gpt-2-output-dataset files."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": f"Token cache folder (default {DEFAULT_CACHE_DIR}, or $GPT2_CACHE_DIR)."})
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "Skip malformed JSON/JSONL lines and CSV rows (and count them) instead of stopping "
                                 "with an error."}
    )
    num_proc: Optional[int] = field(
        default=None, metadata={"help": "Worker processes that read, tokenize and pack the data (default: every core "
                                "this process may use). The result is the same with any number."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Read a Hugging Face Hub dataset as a stream, tokenized as it arrives, instead of "
                                 "downloading all of it first."}
    )
    prepare_timeout: float = field(
        default=1800.0, metadata={"help": "Seconds a process waits, with no progress seen, while another one prepares the "
                                  "same data (the other ranks of a torchrun job) before it stops with an error."}
    )


# ----------------------------------------------------------------------------------------------
# Sources: where documents come from, and a fingerprint of their content


@dataclass
class Source:
    """One split's worth of input: files, a Hub dataset split, or the built-in corpus."""

    kind: str  # "files" | "hub" | "builtin"
    files: list = field(default_factory=list)
    hub_dataset: object = None
    states: dict = field(default_factory=dict)  # path -> file_state when fingerprinted: a later change is an error
    stream_key: Optional[str] = None  # a streamed Hub dataset's content key (it has no fingerprint)

    def fingerprint(self, known_digests: Optional[dict] = None) -> str:
        h = hashlib.sha256(self.kind.encode())
        if self.kind == "files":
            for path in self.files:
                self.states[path] = file_state(path)
                h.update(os.fsencode(os.path.basename(path)) + b"\0" + file_digest(path, known_digests).encode())
        elif self.kind == "hub":
            h.update((self.stream_key or self.hub_dataset._fingerprint).encode())
        else:
            h.update(builtin_text_digest().encode())
        return h.hexdigest()

    def total(self) -> tuple[int, str]:
        """Size for the progress bar: (amount, unit)."""
        if self.kind == "files":
            return sum(os.path.getsize(p) for p in self.files), "B"
        if self.kind == "hub":
            return getattr(self.hub_dataset, "num_rows", None), "doc"  # None: a stream of unknown length
        return len(builtin_documents()), "doc"

    def describe(self) -> str:
        if self.kind == "files":
            first = shown(self.files[0])
            return first if len(self.files) == 1 else f"{len(self.files)} files ({first}, ...)"
        return "the built-in corpus" if self.kind == "builtin" else f"Hub dataset {self.hub_dataset.info.dataset_name}"


def builtin_documents() -> list[str]:
    """Python's own documentation topics: ~0.5 MB of English text on every machine with Python."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def builtin_text_digest() -> str:
    return hashlib.sha256("\0".join(builtin_documents()).encode()).hexdigest()


def resolve_sources(args: DataArguments) -> tuple[Source, Optional[Source]]:
    """The train source and, when the data has one, its official validation source."""
    if args.dataset_path:
        return Source("files", expand_path(args.dataset_path)), None
    name = GPT2_OUTPUT_ALIASES.get(args.dataset_name, args.dataset_name)
    if name == BUILTIN_NAME:
        return Source("builtin"), None
    if name in GPT2_OUTPUT_NAMES:
        train_file = os.path.join(args.data_dir, f"{name}.train.jsonl")
        valid_file = os.path.join(args.data_dir, f"{name}.valid.jsonl")
        if os.path.isfile(train_file):
            valid = Source("files", [valid_file]) if os.path.isfile(valid_file) else None
            return Source("files", [train_file]), valid
        if args.dataset_name == DEFAULT_DATASET_NAME:
            print(f"{train_file} is not downloaded: training on the built-in corpus (Python's documentation text). "
                  f"Run `python download_dataset.py --datasets {name}` for real data.")
            return Source("builtin"), None
        raise DataError(f"{train_file} not found: run `python download_dataset.py --datasets {name} "
                        f"--out_dir {args.data_dir}` first, or pass --dataset_path.")
    return resolve_hub(args)


def resolve_hub(args: DataArguments) -> tuple[Source, Optional[Source]]:
    splits = load_hub(args)
    if "train" not in splits:
        raise DataError(f"Hub dataset {args.dataset_name} has no 'train' split (it has {', '.join(splits)}).")
    val_name = next((s for s in ("validation", "valid") if s in splits), None)
    def source(split: str) -> Source:
        return Source("hub", hub_dataset=splits[split], stream_key=stream_key(args, split) if args.streaming else None)

    return source("train"), source(val_name) if val_name else None


def load_hub(args: DataArguments, split: Optional[str] = None):
    """The Hub dataset `args.dataset_name` (all its splits, or only `split`), its text field checked."""
    import datasets

    try:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config, split=split, streaming=args.streaming)
    except Exception as e:  # the library's errors for a bad name are long; say what was tried instead
        raise DataError(
            f"'{args.dataset_name}' is not a file, a gpt-2-output-dataset name ({', '.join(GPT2_OUTPUT_NAMES)}), "
            f"'{BUILTIN_NAME}', nor a loadable Hugging Face dataset{f' with a {split!r} split' if split else ''}: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ) from None
    for ds in ([loaded] if split else loaded.values()):
        if ds.column_names is not None and args.text_field not in ds.column_names:  # a stream may not know its own
            raise DataError(f"Hub dataset {args.dataset_name} has no column '{args.text_field}'; columns: "
                            f"{', '.join(ds.column_names)}. Choose one with --text_field.")
    return loaded


def stream_key(args: DataArguments, split: str) -> str:
    """The content key of a streamed Hub dataset split, which has no fingerprint of its own: its name, configuration,
    split and datasets' hash of its builder (which follows the data files' revision, or their modification times)."""
    import datasets

    builder = datasets.load_dataset_builder(args.dataset_name, args.dataset_config)
    return json.dumps([args.dataset_name, args.dataset_config, split, builder.hash])


def resolve_split(args: DataArguments, split: str) -> Source:
    """The Source of one named split (evaluation.py's "test"): the files of dataset_path, the built-in
    corpus, the gpt-2-output-dataset file {data_dir}/{name}.{split}.jsonl, or a Hub dataset's split."""
    if args.dataset_path:
        return Source("files", expand_path(args.dataset_path))
    name = GPT2_OUTPUT_ALIASES.get(args.dataset_name, args.dataset_name)
    if name == BUILTIN_NAME:
        return Source("builtin")
    if name in GPT2_OUTPUT_NAMES:
        path = os.path.join(args.data_dir, f"{name}.{split}.jsonl")
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: run `python download_dataset.py --datasets {name} --splits {split} "
                            f"--out_dir {args.data_dir}` first, or pass --dataset_path.")
        return Source("files", [path])
    return Source("hub", hub_dataset=load_hub(args, split), stream_key=stream_key(args, split) if args.streaming else None)


def iter_pieces(source: Source, args: DataArguments, progress: tqdm, tmp_dir: str) -> Iterator[tuple[str, bool]]:
    if source.kind == "builtin":
        for doc in builtin_documents():
            progress.update(1)
            yield normalise(doc), True
        return
    if source.kind == "hub":
        for batch in source.hub_dataset.iter(batch_size=1000):
            progress.update(len(batch[args.text_field]))
            for text in batch[args.text_field]:
                yield normalise(text or ""), True
        return
    yield from read_files(source.files, args.text_field, args.skip_bad_lines, progress, tmp_dir, source.states)


# ----------------------------------------------------------------------------------------------
# Tokenizing: documents -> token shards, document starts and hashes (shards.py does the work on every core)


def token_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32


def source_shards(source: Source, args: DataArguments):
    """The source's shards: planned from its files, or cut from its stream of documents."""
    if source.kind == "files":
        return shards.plan_files(source.files, source.states)
    if source.kind == "builtin":
        return shards.fed_shards(builtin_documents())
    return shards.fed_shards(text for batch in source.hub_dataset.iter(batch_size=1000) for text in batch[args.text_field])


def tokenize_source(source: Source, args: DataArguments, tokenizer, out_dir: str, split: str,
                    heartbeat=lambda: None) -> dict:
    """Tokenize a source into out_dir on args.num_proc workers: `{split}-NNNNN.tokens` per shard (flat ids),
    `{split}.docs.npy` (where each document starts) and `{split}.hashes.npy` (a 64-bit hash of each document's
    text, to find byte-identical copies). Shards finished by an earlier, interrupted run are kept."""
    eot = tokenizer.eos_token_id
    if eot is None:
        raise DataError(f"Tokenizer {tokenizer.name_or_path} has no EOS token to separate documents.")
    job = shards.Job(split, out_dir, eot, np.dtype(token_dtype(tokenizer)).name, args.text_field, args.skip_bad_lines)
    total, unit = source.total()
    workers = args.num_proc or shards.default_workers()
    with tqdm(total=total, unit=unit, unit_scale=True, disable=None,
              desc=f"Tokenizing {split} ({source.describe()}, {workers} worker{'s' * (workers > 1)})") as progress:
        records = shards.run_shards(source_shards(source, args), job, shards.encoder_spec(tokenizer), workers,
                                    progress.update, heartbeat)
    starts, hashes = shards.merge(records, job)
    np.save(os.path.join(out_dir, f"{split}.docs.npy"), starts)
    np.save(os.path.join(out_dir, f"{split}.hashes.npy"), hashes)
    bad_lines = sum(r["bad_lines"] for r in records)
    if bad_lines:
        print(f"Skipped {bad_lines} malformed line(s) in {source.describe()} (skip_bad_lines=True).")
    return {"documents": len(starts), "tokens": sum(r["tokens"] for r in records),
            "characters": sum(r["characters"] for r in records), "skipped_bad_lines": bad_lines,
            "empty_documents": sum(r["empty_documents"] for r in records), "shard_tokens": [r["tokens"] for r in records]}


# ----------------------------------------------------------------------------------------------
# Packing: token streams -> Arrow files of fixed-length blocks


class BlockWriter:
    """Streams tokens into an Arrow file of `block_size` rows; only the final partial block is dropped. It holds
    `input_ids` only: `labels`, the same tokens, is added when the file is loaded (_load_split) without a copy."""

    def __init__(self, path: str, block_size: int):
        import pyarrow as pa

        self.pa, self.block_size = pa, block_size
        row = pa.list_(pa.int32(), block_size)
        self.schema = pa.schema([("input_ids", row)])
        self.sink = pa.OSFile(path, "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.buf = np.empty(CHUNK_TOKENS + block_size, dtype=np.int32)  # reused: fresh big arrays cost page faults
        self.fill = 0  # tokens in buf not yet written (less than a block between calls)
        self.blocks = 0

    def add(self, tokens: np.ndarray):
        while len(tokens):
            take = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill, tokens = self.fill + take, tokens[take:]
            n = self.fill // self.block_size * self.block_size
            if n:
                flat = self.pa.Array.from_buffers(self.pa.int32(), n, [None, self.pa.py_buffer(self.buf[:n])])
                rows = self.pa.FixedSizeListArray.from_arrays(flat, self.block_size)
                self.writer.write_batch(self.pa.record_batch([rows], schema=self.schema))  # written before buf is reused
                self.blocks += n // self.block_size
                self.buf[:self.fill - n] = self.buf[n:self.fill]
                self.fill -= n

    def close(self) -> int:
        """Finish the file; returns the number of tokens dropped (less than one block)."""
        self.writer.close()
        self.sink.close()
        return self.fill


CHUNK_TOKENS = 1 << 22  # tokens moved at a time while splitting and packing: bounds memory


@dataclass(frozen=True)
class Segment:
    """The tokens of one token shard that go to one split: all of them, those in a range of positions of the whole
    stream, or those of the documents the validation mask picks (want_val)."""

    path: str
    offset: int  # position of the shard's first token in its split's stream
    tokens: int  # tokens in the shard
    count: int  # tokens of the shard that go to this split
    select: tuple  # ("all",) | ("range", lo, hi) | ("docs", want_val)


def split_and_pack(tok_dir: str, tok_meta: dict, out_dir: str, args: DataArguments, seed: int,
                   heartbeat=lambda: None) -> dict:
    """Assign documents to train/val and pack each split into blocks: one Arrow file per token shard where a block
    starts, written by args.num_proc workers; together, in order, they are one stream of blocks."""
    def segments(split: str, select: tuple, count) -> list[Segment]:
        out, offset = [], 0
        for i, n in enumerate(tok_meta["shard_tokens"][split]):
            out.append(Segment(os.path.join(tok_dir, f"{split}-{i:05d}.tokens"), offset, n, count(offset, n), select))
            offset += n
        return out

    n_tokens = tok_meta["tokenized"]["train"]["tokens"]
    everything = segments("train", ("all",), lambda o, n: n)
    if "valid" in tok_meta["tokenized"]:
        method, streams = "official valid split", {"train": everything, "val": segments("valid", ("all",), lambda o, n: n)}
    elif args.val_split <= 0:
        method, streams = "none", {"train": everything}
    elif (is_val := validation_documents(n_docs := len(starts := np.load(os.path.join(tok_dir, "train.docs.npy"))),
                                         args.val_split, seed, hashes := np.load(os.path.join(tok_dir, "train.hashes.npy")))) is not None:
        method = "documents"
        copied = copied_documents(hashes)
        if copied.any():
            held = int((copied & is_val).sum())
            print(f"{int(copied.sum())} documents of {tok_meta['source']} are byte-identical to another one: "
                  + ("every copy stays in training, none in validation (it would score text the model was trained on)."
                     if not held else f"too few are unique to hold out {int(is_val.sum())} without copies, so {held} "
                                      "copies are in validation too."))
        np.save(os.path.join(out_dir, "val_documents.npy"), is_val)
        lengths = np.diff(np.append(starts, n_tokens))
        val_before = np.concatenate([[0], np.cumsum(lengths * is_val)])  # validation tokens before each document

        def val_tokens(a: int, b: int) -> int:  # in positions [a, b)
            def upto(p):
                d = min(np.searchsorted(starts, p, "right") - 1, n_docs - 1)
                return int(val_before[d] + min(p - starts[d], lengths[d]) * is_val[d])
            return upto(b) - upto(a)

        streams = {"train": segments("train", ("docs", False), lambda o, n: n - val_tokens(o, o + n)),
                   "val": segments("train", ("docs", True), lambda o, n: val_tokens(o, o + n))}
    else:  # too few documents to hold some out whole: the last val_split of the tokens, as nanoGPT does
        method, cut = "position", int(n_tokens * (1 - args.val_split))
        overlap = lambda lo, hi: (lambda o, n: max(0, min(o + n, hi) - max(o, lo)))  # noqa: E731
        streams = {"train": segments("train", ("range", 0, cut), overlap(0, cut)),
                   "val": segments("train", ("range", cut, n_tokens), overlap(cut, n_tokens))}
    job = (out_dir, tok_dir, tok_meta["dtype"], n_tokens, args.block_size)
    tasks = [(split, k, stream, *job) for split, stream in streams.items() for k in range(len(stream))
             if _block_span(stream, k, args.block_size) is not None]
    workers = min(args.num_proc or shards.default_workers(), len(tasks))
    blocks = dict.fromkeys(streams, 0)
    with tqdm(total=len(tasks), unit="shard", desc=f"Packing blocks of {args.block_size}", disable=None) as progress:
        results = (shards.run_tasks(pack_segment, tasks, workers, what="packing blocks") if workers > 1
                   else (pack_segment(*task) for task in tasks))
        for split, n in results:
            blocks[split] += n
            progress.update(1)
            heartbeat()
    info = {"split_method": method}
    for split, stream in streams.items():
        total = sum(s.count for s in stream)
        info[split] = {"blocks": blocks[split], "dropped_tokens": total - total // args.block_size * args.block_size}
    return info


def _block_span(stream: list[Segment], k: int, block: int) -> Optional[tuple[int, int]]:
    """[first, end): the stream positions of the blocks that start in segment k (the last may run into the
    following segments), or None when none does. Only the stream's final partial block is dropped."""
    offset = sum(s.count for s in stream[:k])
    count, total = stream[k].count, sum(s.count for s in stream)
    first = -(-offset // block) * block
    end = min((offset + count - 1) // block * block + block, total // block * block)
    return (first - offset, end - first) if count and first < offset + count and end > first else None


def pack_segment(split: str, k: int, stream: list[Segment], out_dir: str, tok_dir: str, dtype: str, n_tokens: int,
                 block: int) -> tuple[str, int]:
    """Write `{split}-{k}.arrow`: the blocks that start in segment k of the split's stream."""
    skip, need = _block_span(stream, k, block)
    masks = {}
    if any(s.select[0] == "docs" for s in stream):
        masks = {"starts": np.load(os.path.join(tok_dir, "train.docs.npy"), mmap_mode="r"),
                 "is_val": np.load(os.path.join(out_dir, "val_documents.npy"), mmap_mode="r")}
    writer = BlockWriter(os.path.join(out_dir, f"{split}-{k:05d}.arrow"), block)
    for segment in stream[k:]:
        for chunk in _selected(segment, dtype, n_tokens, **masks):
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            writer.add(chunk[:need])
            need -= min(need, len(chunk))
            if not need:
                break
        if not need:
            break
    assert writer.close() == 0, "a segment's blocks end on a block boundary"
    fsync_tree(Path(out_dir, f"{split}-{k:05d}.arrow"))
    return split, writer.blocks


def _selected(segment: Segment, dtype: str, n_tokens: int, starts=None, is_val=None) -> Iterator[np.ndarray]:
    """The segment's tokens, CHUNK_TOKENS of the shard at a time."""
    with open(segment.path, "rb") as f:
        for a in range(0, segment.tokens, CHUNK_TOKENS):
            chunk = np.fromfile(f, dtype=dtype, count=min(CHUNK_TOKENS, segment.tokens - a))
            lo, hi = segment.offset + a, segment.offset + a + len(chunk)
            kind = segment.select[0]
            if kind == "range":
                yield chunk[max(0, segment.select[1] - lo):max(0, min(hi, segment.select[2]) - lo)]
            elif kind == "docs":
                d0, d1 = np.searchsorted(starts, lo, "right") - 1, np.searchsorted(starts, hi, "left")
                doc_ends = np.append(starts[d0 + 1:d1], n_tokens if d1 >= len(starts) else starts[d1])
                lengths = np.clip(doc_ends, lo, hi) - np.clip(starts[d0:d1], lo, hi)
                yield chunk[np.repeat(is_val[d0:d1] == segment.select[1], lengths)]
            else:
                yield chunk


def validation_documents(n_docs: int, val_split: float, seed: int, hashes: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Which of n_docs documents are held out for validation (a bool mask; the documents counted are those with
    text, in reading order), or None when there are too few to hold out whole ones: then the last val_split of
    the tokens is, as nanoGPT does. With the documents' `hashes` (shards.DocumentHash), a document with a byte-identical
    copy anywhere in the data is held out only when too few documents are unique. train_tokenizer.py holds out
    the same documents."""
    n_val = int(round(n_docs * val_split))
    if not 1 <= n_val < n_docs:
        return None
    order = np.random.default_rng(seed).permutation(n_docs)
    if hashes is not None and len(hashes) == n_docs:  # copies last: held out only when too few documents are unique
        copied = copied_documents(hashes)[order]
        order = np.concatenate([order[~copied], order[copied]])
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[order[:n_val]] = True
    return is_val


def copied_documents(hashes: np.ndarray) -> np.ndarray:
    """Mask of the documents whose text occurs more than once (one sorted copy of the hashes at a time)."""
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    return np.isin(hashes, repeated) if len(repeated) else np.zeros(len(hashes), dtype=bool)


# ----------------------------------------------------------------------------------------------
# The cache: a folder per key, renamed into place only when complete


def tokenizer_fingerprint(tokenizer) -> str:
    key = id(getattr(tokenizer, "_tokenizer", tokenizer))
    if key not in _TOKENIZER_FP:
        _TOKENIZER_FP[key] = _tokenizer_fingerprint(tokenizer)
    return _TOKENIZER_FP[key]


_TOKENIZER_FP: dict = {}


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(state.encode()).hexdigest()


def cached(cache_root: Path, key: str, build, args: DataArguments, resumable: bool = False) -> Path:
    """Return cache_root/key, building it first with build(work_dir, heartbeat) if it is not complete.

    One process builds while any other that wants the same entry (every rank of a torchrun job) waits for it.
    The work folder of a resumable build keeps what an interrupted run finished (token shards); the entry is
    renamed into place only when complete."""
    final = cache_root / key
    if cache_damage(final) is None:
        return final
    try:
        remove(temp_beside(final))  # a probe: the folder can be written
    except OSError as e:
        raise DataError(f"cache_dir {cache_root}: cannot write the token cache there ({e.strerror or e}). Pass a "
                        "writable folder with cache_dir=... (--cache_dir) or $GPT2_CACHE_DIR.") from None
    with shards.exclusive(cache_root / f".{key}.lock", f"the data cache {final}", args.prepare_timeout) as heartbeat:
        damage = cache_damage(final)
        if damage is None:  # the process waited for made it
            return final
        if final.exists():  # an entry cut short (a copy, a crash before its data reached the disk): never trust it
            warnings.warn(f"Cache entry {final} is damaged ({damage}): rebuilding it.", stacklevel=3)
        work = cache_root / f".{key}.partial"
        if not resumable:
            remove(work)
        work.mkdir(exist_ok=True)
        try:
            meta = build(str(work), heartbeat)
            meta["cache_files"] = {p.name: p.stat().st_size for p in work.iterdir()}  # checked when the entry is reused
            (work / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks the entry complete
            install(work, final, replace=final.exists())
        except DataError as e:
            if not getattr(e, "resumable", False):
                remove(work)  # the input must change before a rerun: nothing here would be reused
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
                remove(work)
                raise DataError(f"The disk holding cache_dir {cache_root} is full ({e.strerror or e}); nothing "
                                "half-written was kept. Free space, or pass cache_dir=... (--cache_dir) on a larger "
                                "disk.") from None
            raise
        finally:
            if not resumable:
                remove(work)
    return final


def cache_damage(entry: Path) -> Optional[str]:
    """None when a cache entry is complete, else what is wrong (a copy cut short, a crash before data reached disk)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable: {e}"
    for name, size in meta.get("cache_files", {}).items():  # entries from before cache_files are taken as they are
        try:
            actual = (entry / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, not {size}"
    return None


def get_dataset_and_tokenizer(
    dataset_name: str = DEFAULT_DATASET_NAME,
    dataset_path: Optional[str] = None,
    val_split: float = 0.05,
    block_size: int = 128,
    seed: int = 42,
    *,
    context: Optional[int] = None,
    **kwargs,
):
    """Return (tokenizer, train_dataset, val_dataset) of `block_size`-token blocks with input_ids and labels.

    `seed` fixes which documents go to validation. `context` is the model's context length, which block_size
    must fit in (default: the tokenizer's model_max_length, 1024 for GPT-2). Keyword arguments are the other fields of
    `DataArguments` (tokenizer_name, text_field, data_dir, cache_dir, skip_bad_lines, dataset_config). val_dataset is None when val_split is 0 and the
    data has no official validation split.
    """
    args = DataArguments(dataset_name=dataset_name, dataset_path=dataset_path, val_split=val_split,
                         block_size=block_size, **kwargs)
    tokenizer = load_tokenizer(args.tokenizer_name)
    if context is None:
        context = tokenizer.model_max_length if tokenizer.model_max_length < 1e9 else None
    if block_size < 2 or (context and block_size > context):
        raise DataError(f"block_size={block_size} must be between 2 and the model's context length"
                        f"{f' ({context} tokens)' if context else ''}.")
    if not 0 <= val_split < 1:
        raise DataError(f"val_split={val_split} must be in [0, 1).")
    if args.num_proc is not None and args.num_proc < 1:
        raise DataError(f"num_proc={args.num_proc} must be at least 1 (or None: every core).")
    if not args.prepare_timeout > 0:
        raise DataError(f"prepare_timeout={args.prepare_timeout} must be a number of seconds above 0.")
    train_src, val_src = resolve_sources(args)
    cache_root = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR

    known = KnownDigests(cache_root)
    tok_key = _key("tokens", PIPELINE_VERSION, tokenizer_fingerprint(tokenizer), args.text_field, args.skip_bad_lines,
                   train_src.fingerprint(known.digests), val_src.fingerprint(known.digests) if val_src else None)
    known.save()

    def tokenize(work: str, heartbeat) -> dict:
        counts = {"train": tokenize_source(train_src, args, tokenizer, work, "train", heartbeat)}
        if val_src:
            counts["valid"] = tokenize_source(val_src, args, tokenizer, work, "valid", heartbeat)
        meta = {"dtype": np.dtype(token_dtype(tokenizer)).name, "source": train_src.describe(), "tokenized": counts,
                "shard_tokens": {split: c.pop("shard_tokens") for split, c in counts.items()}}
        if counts["train"]["tokens"] == 0:
            raise DataError(f"{train_src.describe()} contains no text: nothing to train on.")
        return meta

    tok_dir = cached(cache_root, tok_key, tokenize, args, resumable=True)
    block_key = _key("blocks", tok_key, block_size, val_split if not val_src else None, seed)

    def pack(work: str, heartbeat) -> dict:
        meta = json.loads((tok_dir / "meta.json").read_text())
        meta.update(split_and_pack(str(tok_dir), meta, work, args, seed, heartbeat))
        meta.update(fingerprint=block_key, block_size=block_size, data_args=asdict(args), seed=seed)
        return meta

    block_dir = cached(cache_root, block_key, pack, args)
    meta = json.loads((block_dir / "meta.json").read_text())
    meta["source"] = train_src.describe()  # the entry may have been built from a copy of this data elsewhere
    train_ds = _load_split(block_dir, "train", meta, args)
    val_ds = _load_split(block_dir, "val", meta, args) if "val" in meta else None
    return tokenizer, train_ds, val_ds


class KnownDigests:
    """The input files' digests by stamp, kept in the cache folder: a warm call reads no input file whole."""

    def __init__(self, cache_root: Path):
        self.path = cache_root / "file-digests.json"
        try:
            self.digests = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.digests = {}
        self.before = json.dumps(self.digests, sort_keys=True)

    def save(self) -> None:
        if json.dumps(self.digests, sort_keys=True) != self.before:
            try:
                write_atomic(self.path, json.dumps(self.digests))
            except OSError:  # a read-only cache still serves; the digests are computed again next time
                pass


def _key(*parts) -> str:
    return parts[0] + "-" + hashlib.sha256(json.dumps(parts[1:], default=str).encode()).hexdigest()[:20]


def _load_split(block_dir: Path, split: str, meta: dict, args: DataArguments):
    from datasets import Dataset

    if meta[split]["blocks"] == 0:
        tokens = meta[split]["dropped_tokens"]
        raise DataError(f"The {split} split of {meta['source']} has {tokens} tokens, fewer than one block of "
                        f"{args.block_size}. Use more data, a smaller --block_size"
                        f"{' or a larger --val_split' if split == 'val' else ''}.")
    from datasets import concatenate_datasets
    from datasets.table import MemoryMappedTable

    parts = []
    for f in sorted(block_dir.glob(f"{split}-*.arrow")):  # one per token shard where a block starts, in order
        # labels: the same mapped column under a second name. Both steps are replayed by name when the dataset is
        # pickled (a DataLoader worker), so a pickle stays small and the data is never copied.
        table = MemoryMappedTable.from_file(str(f)).select(["input_ids", "input_ids"])
        parts.append(Dataset(table.rename_columns(["input_ids", "labels"])))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def dataset_info(dataset) -> dict:
    """What get_dataset_and_tokenizer recorded about a dataset: fingerprint, source, counts, arguments."""
    path = Path(dataset.cache_files[0]["filename"]).parent / "meta.json"
    return json.loads(path.read_text())


if __name__ == "__main__":
    from transformers import HfArgumentParser

    @dataclass
    class PrepareArguments(DataArguments):
        seed: int = field(default=42, metadata={"help": "Seed of the train/validation split."})

    (cli_args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses()

    def prepare() -> None:
        _, train, val = get_dataset_and_tokenizer(**asdict(cli_args))
        print(json.dumps({k: v for k, v in dataset_info(train).items() if k not in ("data_args", "shard_tokens")}, indent=2))

    sys.exit(run_main(prepare))
