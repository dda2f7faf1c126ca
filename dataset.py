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
those plus block size, split and seed. A repeated call memory-maps the cache.
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
from atomic import install, remove, temp_beside
from errors import run_main
from gpt2_tokenizer import load_tokenizer
from readers import _STATS, DataError, expand_path, file_digest, file_state, normalise, read_files, shown

PIPELINE_VERSION = 2  # bump when the tokens or blocks written for the same inputs would change
REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = Path(os.environ.get("GPT2_CACHE_DIR", REPO_DIR / ".cache" / "datasets"))
GPT2_OUTPUT_ALIASES = {"small": "small-117M", "medium": "medium-345M", "large": "large-762M", "xl": "xl-1542M"}
GPT2_OUTPUT_NAMES = download_dataset.DATASETS
DEFAULT_DATASET_NAME = "small"
BUILTIN_NAME = "builtin"
BATCH_CHARS = 4 << 20  # text handed to the tokenizer at once


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


# ----------------------------------------------------------------------------------------------
# Sources: where documents come from, and a fingerprint of their content


@dataclass
class Source:
    """One split's worth of input: files, a Hub dataset split, or the built-in corpus."""

    kind: str  # "files" | "hub" | "builtin"
    files: list = field(default_factory=list)
    hub_dataset: object = None
    states: dict = field(default_factory=dict)  # path -> file_state when fingerprinted: a later change is an error

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        if self.kind == "files":
            for path in self.files:
                self.states[path] = file_state(path)
                h.update(os.fsencode(os.path.basename(path)) + b"\0" + file_digest(path).encode())
        elif self.kind == "hub":
            h.update(self.hub_dataset._fingerprint.encode())
        else:
            h.update(builtin_text_digest().encode())
        return h.hexdigest()

    def total(self) -> tuple[int, str]:
        """Size for the progress bar: (amount, unit)."""
        if self.kind == "files":
            return sum(os.path.getsize(p) for p in self.files), "B"
        if self.kind == "hub":
            return len(self.hub_dataset), "doc"
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
    val = Source("hub", hub_dataset=splits[val_name]) if val_name else None
    return Source("hub", hub_dataset=splits["train"]), val


def load_hub(args: DataArguments, split: Optional[str] = None):
    """The Hub dataset `args.dataset_name` (all its splits, or only `split`), its text field checked."""
    import datasets

    try:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config, split=split)
    except Exception as e:  # the library's errors for a bad name are long; say what was tried instead
        raise DataError(
            f"'{args.dataset_name}' is not a file, a gpt-2-output-dataset name ({', '.join(GPT2_OUTPUT_NAMES)}), "
            f"'{BUILTIN_NAME}', nor a loadable Hugging Face dataset{f' with a {split!r} split' if split else ''}: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ) from None
    for ds in ([loaded] if split else loaded.values()):
        if args.text_field not in ds.column_names:
            raise DataError(f"Hub dataset {args.dataset_name} has no column '{args.text_field}'; columns: "
                            f"{', '.join(ds.column_names)}. Choose one with --text_field.")
    return loaded


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
    return Source("hub", hub_dataset=load_hub(args, split))


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
# Tokenizing: documents -> one flat token file plus document start offsets


def make_encoder(tokenizer):
    """A function list[str] -> list[list[int]] using all cores; tiktoken for the official GPT-2 BPE."""
    import gpt2_tokenizer

    if gpt2_tokenizer.is_official_gpt2(tokenizer):
        enc = gpt2_tokenizer.tiktoken_encoding()  # same ids as the HF tokenizer (tested), ~4x faster
        threads = os.cpu_count() or 1
        return lambda texts: enc.encode_ordinary_batch(texts, num_threads=threads)
    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else None
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def token_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32


def tokenize_source(source: Source, args: DataArguments, tokenizer, out_dir: str, split: str) -> dict:
    """Write `{split}.tokens` (flat ids), `{split}.docs.npy` (start of each document) and `{split}.hashes.npy` (a
    64-bit hash of each document's text, to find byte-identical copies) to out_dir."""
    eot = tokenizer.eos_token_id
    if eot is None:
        raise DataError(f"Tokenizer {tokenizer.name_or_path} has no EOS token to separate documents.")
    encode = make_encoder(tokenizer)
    dtype = token_dtype(tokenizer)
    stats_before = (_STATS.bad_lines, _STATS.empty_docs)
    doc_starts, n_tokens, n_chars = [], 0, 0
    batch, batch_ends, batch_chars = [], [], 0
    doc_has_text = False
    doc_hashes, doc_hash = [], DocumentHash()
    total, unit = source.total()
    with open(os.path.join(out_dir, f"{split}.tokens"), "wb") as out, \
            tqdm(total=total, unit=unit, unit_scale=True, desc=f"Tokenizing {split} ({source.describe()})",
                 disable=None) as progress:

        def flush():
            nonlocal n_tokens, doc_has_text, doc_hash
            for ids, ends, text in zip(encode(batch), batch_ends, batch):
                doc_hash.update(text)
                if ids and not doc_has_text:
                    doc_starts.append(n_tokens)
                    doc_has_text = True
                if ends:
                    if doc_has_text:
                        ids = ids + [eot]
                        doc_hashes.append(doc_hash.value())
                    else:
                        _STATS.empty_docs += 1
                    doc_has_text, doc_hash = False, DocumentHash()
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
            batch.clear()
            batch_ends.clear()

        for text, ends in iter_pieces(source, args, progress, out_dir):
            batch.append(text)
            batch_ends.append(ends)
            batch_chars += len(text)
            n_chars += len(text)
            if batch_chars >= BATCH_CHARS or len(batch) >= 16384:
                flush()
                batch_chars = 0
        flush()
        if doc_has_text:  # a last document without an end
            doc_hashes.append(doc_hash.value())
    np.save(os.path.join(out_dir, f"{split}.docs.npy"), np.asarray(doc_starts, dtype=np.int64))
    np.save(os.path.join(out_dir, f"{split}.hashes.npy"), np.asarray(doc_hashes, dtype=np.uint64))
    bad_lines, empty = _STATS.bad_lines - stats_before[0], _STATS.empty_docs - stats_before[1]
    if bad_lines:
        print(f"Skipped {bad_lines} malformed line(s) in {source.describe()} (skip_bad_lines=True).")
    return {"documents": len(doc_starts), "tokens": n_tokens, "characters": n_chars,
            "skipped_bad_lines": bad_lines, "empty_documents": empty}


# ----------------------------------------------------------------------------------------------
# Packing: token streams -> Arrow files of fixed-length blocks


class BlockWriter:
    """Streams tokens into an Arrow file of `block_size` rows; only the final partial block is dropped."""

    def __init__(self, path: str, block_size: int):
        import pyarrow as pa

        self.pa, self.block_size = pa, block_size
        row = pa.list_(pa.int32(), block_size)
        self.schema = pa.schema([("input_ids", row), ("labels", row)])
        self.sink = pa.OSFile(path, "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.carry = np.empty(0, dtype=np.int32)
        self.blocks = 0

    def add(self, tokens: np.ndarray):
        buf = np.concatenate([self.carry, tokens.astype(np.int32)])
        n = len(buf) // self.block_size * self.block_size
        if n:
            flat = self.pa.array(buf[:n])
            rows = self.pa.FixedSizeListArray.from_arrays(flat, self.block_size)
            self.writer.write_batch(self.pa.record_batch([rows, rows], schema=self.schema))
            self.blocks += n // self.block_size
        self.carry = buf[n:]

    def close(self) -> int:
        """Finish the file; returns the number of tokens dropped (less than one block)."""
        self.writer.close()
        self.sink.close()
        return len(self.carry)


CHUNK_TOKENS = 1 << 22  # tokens moved at a time while splitting and packing: bounds memory


def split_and_pack(tok_dir: str, tok_meta: dict, out_dir: str, args: DataArguments, seed: int) -> dict:
    """Assign documents to train/val and pack each split into blocks."""
    def memmap(split):
        return np.memmap(os.path.join(tok_dir, f"{split}.tokens"), mode="r", dtype=tok_meta["dtype"])

    tokens, starts = memmap("train"), np.load(os.path.join(tok_dir, "train.docs.npy"))
    n_docs, n_tokens = len(starts), len(tokens)
    train = BlockWriter(os.path.join(out_dir, "train.arrow"), args.block_size)
    val = BlockWriter(os.path.join(out_dir, "val.arrow"), args.block_size)
    if "valid" in tok_meta["tokenized"]:
        method = "official valid split"
        _pack(tokens, 0, n_tokens, train)
        valid = memmap("valid")
        _pack(valid, 0, len(valid), val)
    elif args.val_split <= 0:
        method = "none"
        _pack(tokens, 0, n_tokens, train)
    elif (is_val := validation_documents(n_docs, args.val_split, seed, hashes := np.load(
            os.path.join(tok_dir, "train.hashes.npy")))) is not None:
        method = "documents"
        copied = copied_documents(hashes)
        if copied.any():
            held = int((copied & is_val).sum())
            print(f"{int(copied.sum())} documents of {tok_meta['source']} are byte-identical to another one: "
                  + ("every copy stays in training, none in validation (it would score text the model was trained on)."
                     if not held else f"too few are unique to hold out {int(is_val.sum())} without copies, so {held} "
                                      "copies are in validation too."))
        doc_ends = np.append(starts[1:], n_tokens)
        for a in range(0, n_tokens, CHUNK_TOKENS):
            b = min(a + CHUNK_TOKENS, n_tokens)
            d0, d1 = np.searchsorted(starts, a, "right") - 1, np.searchsorted(starts, b, "left")
            lengths = np.clip(doc_ends[d0:d1], a, b) - np.clip(starts[d0:d1], a, b)
            in_val = np.repeat(is_val[d0:d1], lengths)
            chunk = np.asarray(tokens[a:b])
            train.add(chunk[~in_val])
            val.add(chunk[in_val])
    else:  # too few documents to hold some out whole: the last val_split of the tokens, as nanoGPT does
        method = "position"
        cut = int(n_tokens * (1 - args.val_split))
        _pack(tokens, 0, cut, train)
        _pack(tokens, cut, n_tokens, val)
    info = {"split_method": method, "train": {"blocks": train.blocks, "dropped_tokens": train.close()}}
    val_dropped = val.close()
    if method != "none":
        info["val"] = {"blocks": val.blocks, "dropped_tokens": val_dropped}
    return info


def validation_documents(n_docs: int, val_split: float, seed: int, hashes: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Which of n_docs documents are held out for validation (a bool mask; the documents counted are those with
    text, in reading order), or None when there are too few to hold out whole ones: then the last val_split of
    the tokens is, as nanoGPT does. With the documents' `hashes` (DocumentHash), a document with a byte-identical
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


class DocumentHash:
    """A 64-bit hash of a document's text, fed piece by piece: equal for byte-identical documents."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=8)

    def update(self, text: str) -> None:
        self._hash.update(text.encode("utf-8", "surrogatepass"))

    def value(self) -> int:
        return int.from_bytes(self._hash.digest(), "little")


def copied_documents(hashes: np.ndarray) -> np.ndarray:
    """Mask of the documents whose text occurs more than once."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > 1


def _pack(tokens: np.ndarray, a: int, b: int, writer: BlockWriter):
    for start in range(a, b, CHUNK_TOKENS):
        writer.add(np.asarray(tokens[start:min(start + CHUNK_TOKENS, b)]))


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


def cached(cache_root: Path, key: str, build) -> Path:
    """Return cache_root/key, building it with build(tmp_dir) first if it is not complete."""
    final = cache_root / key
    damage = cache_damage(final)
    if damage is None:
        return final
    try:
        tmp = temp_beside(final, folder=True)
    except OSError as e:
        raise DataError(f"cache_dir {cache_root}: cannot write the token cache there ({e.strerror or e}). Pass a "
                        "writable folder with cache_dir=... (--cache_dir) or $GPT2_CACHE_DIR.") from None
    if final.exists():  # an entry cut short (a copy, a crash before its data reached the disk): never trust it
        warnings.warn(f"Cache entry {final} is damaged ({damage}): rebuilding it.", stacklevel=3)
    try:
        meta = build(str(tmp))
        meta["cache_files"] = {p.name: p.stat().st_size for p in tmp.iterdir()}  # checked when the entry is reused
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks the entry complete
        # Replace the entry only if it is still damaged: another process that finished it first made one as good.
        install(tmp, final, replace=final.exists() and cache_damage(final) is not None)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            raise DataError(f"The disk holding cache_dir {cache_root} is full ({e.strerror or e}); nothing half-written "
                            "was kept. Free space, or pass cache_dir=... (--cache_dir) on a larger disk.") from None
        raise
    finally:
        remove(tmp)
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
    train_src, val_src = resolve_sources(args)
    cache_root = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR

    tok_key = _key("tokens", PIPELINE_VERSION, tokenizer_fingerprint(tokenizer), args.text_field,
                   args.skip_bad_lines, train_src.fingerprint(), val_src.fingerprint() if val_src else None)

    def tokenize(tmp: str) -> dict:
        counts = {"train": tokenize_source(train_src, args, tokenizer, tmp, "train")}
        if val_src:
            counts["valid"] = tokenize_source(val_src, args, tokenizer, tmp, "valid")
        meta = {"dtype": np.dtype(token_dtype(tokenizer)).name, "source": train_src.describe(), "tokenized": counts}
        if counts["train"]["tokens"] == 0:
            raise DataError(f"{train_src.describe()} contains no text: nothing to train on.")
        return meta

    tok_dir = cached(cache_root, tok_key, tokenize)
    block_key = _key("blocks", tok_key, block_size, val_split if not val_src else None, seed)

    def pack(tmp: str) -> dict:
        meta = json.loads((tok_dir / "meta.json").read_text())
        meta.update(split_and_pack(str(tok_dir), meta, tmp, args, seed))
        meta.update(fingerprint=block_key, block_size=block_size, data_args=asdict(args), seed=seed)
        return meta

    block_dir = cached(cache_root, block_key, pack)
    meta = json.loads((block_dir / "meta.json").read_text())
    meta["source"] = train_src.describe()  # the entry may have been built from a copy of this data elsewhere
    train_ds = _load_split(block_dir, "train", meta, args)
    val_ds = _load_split(block_dir, "val", meta, args) if "val" in meta else None
    return tokenizer, train_ds, val_ds


def _key(*parts) -> str:
    return parts[0] + "-" + hashlib.sha256(json.dumps(parts[1:], default=str).encode()).hexdigest()[:20]


def _load_split(block_dir: Path, split: str, meta: dict, args: DataArguments):
    from datasets import Dataset

    if meta[split]["blocks"] == 0:
        tokens = meta[split]["dropped_tokens"]
        raise DataError(f"The {split} split of {meta['source']} has {tokens} tokens, fewer than one block of "
                        f"{args.block_size}. Use more data, a smaller --block_size"
                        f"{' or a larger --val_split' if split == 'val' else ''}.")
    return Dataset.from_file(str(block_dir / f"{split}.arrow"))


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
        print(json.dumps({k: v for k, v in dataset_info(train).items() if k != "data_args"}, indent=2))

    sys.exit(run_main(prepare))
