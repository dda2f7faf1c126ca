"""Train a byte-level BPE tokenizer on your own text, for models that train and sample faster on it.

    python train_tokenizer.py --dataset_path my_texts/ --vocab_size 8192 --out tokenizers/my_bpe
    python train.py --dataset_path my_texts/ --tokenizer_name tokenizers/my_bpe

    from train_tokenizer import train_tokenizer
    tokenizer, report = train_tokenizer(dataset_path="my_texts/", vocab_size=8192, out="tokenizers/my_bpe")

The tokenizer is GPT-2's kind, fitted to your data: byte-level BPE (every byte is a token, so any text
encodes and decodes back exactly), GPT-2's pre-tokenizer regex, and `<|endoftext|>` (id 0) as its one
special token, which separates documents and ends generation. Hugging Face `tokenizers` trains it
(in Rust, on all cores) from a stream of documents, so a corpus larger than memory is fine: only the
counts of distinct words are kept. The output folder is a Hugging Face tokenizer that
`AutoTokenizer.from_pretrained` and `GPT2TokenizerFast.from_pretrained` load with no code of ours.

Text is read by dataset.py (every format it reads, the same errors for bad input). The documents
train.py will hold out for validation (same --val_split and --seed) are left out of training, so
validation loss stays honest; they are the held-out text of the report, which compares bytes per
token against GPT-2's BPE. The report is printed and saved as training_report.json in the folder.

A smaller vocabulary means a smaller output layer, which is most of a small model's step, and more
tokens per document. The README's "Train your own tokenizer" section has the measured trade-off.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

import dataset
import shards
from atomic import atomic_path, destination_problem
from errors import run_main
from gpt2_tokenizer import CONTEXT_LENGTH, EOT, SPECIAL_TOKENS, load_tokenizer
from readers import DataError

MAX_VOCAB = 1 << 16  # dataset.py caches token ids as uint16 up to this size
TRAINER_CHARS = 1 << 16  # text handed to the BPE trainer at once (it buffers 256 of these)
HELD_OUT_CHARS = 8 << 20  # held-out text kept for the report: enough for a stable ratio, bounded memory
REPORT_FILE = "training_report.json"


def _data_field(name: str, **overrides):
    """A field of dataset.DataArguments, with its default and help, so both CLIs document it the same way."""
    f = next(f for f in fields(dataset.DataArguments) if f.name == name)
    return field(default=overrides.get("default", f.default), metadata={"help": overrides.get("help", f.metadata["help"])})


@dataclass
class TokenizerArguments:
    """What to train a tokenizer on, and how large."""

    out: str = field(default="tokenizers/bpe", metadata={"help": "Folder to write the tokenizer to (it must not exist, or give --overwrite)."})
    vocab_size: int = field(
        default=8192,
        metadata={"help": f"Tokens in the vocabulary, <|endoftext|> and the 256 bytes included: {257} to {MAX_VOCAB}. "
                  "train.py pads the model's vocabulary to a multiple of 64, so a multiple of 64 wastes nothing."},
    )
    min_frequency: int = field(default=2, metadata={"help": "A pair of tokens seen fewer times than this is never merged."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --out if it exists (only once the new tokenizer is complete)."})
    dataset_name: str = _data_field("dataset_name")
    dataset_path: Optional[str] = _data_field("dataset_path")
    val_split: float = _data_field(
        "val_split", help="Share of documents held out of tokenizer training and measured in the report: the same "
        "documents train.py holds out for validation with the same --val_split and --seed. 0 trains on everything.")
    seed: int = field(default=42, metadata={"help": "Seed of the train/validation split (train.py's --seed)."})
    text_field: str = _data_field("text_field")
    dataset_config: Optional[str] = _data_field("dataset_config")
    data_dir: str = _data_field("data_dir")
    skip_bad_lines: bool = _data_field("skip_bad_lines")


def train_tokenizer(
    dataset_name: str = dataset.DEFAULT_DATASET_NAME,
    dataset_path: Optional[str] = None,
    vocab_size: int = 8192,
    out: str | os.PathLike = "tokenizers/bpe",
    *,
    val_split: float = 0.05,
    seed: int = 42,
    min_frequency: int = 2,
    overwrite: bool = False,
    **kwargs,
):
    """Train a byte-level BPE on the training documents, save it to `out`, and return (tokenizer, report).

    Keyword arguments are the other fields of dataset.DataArguments (text_field, data_dir, skip_bad_lines,
    dataset_config). The report holds the vocabulary size, what was read, the speed, and bytes per token on
    the held-out documents, ours against GPT-2's BPE. Raises DataError for bad input or a bad vocab_size.
    """
    if not 257 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size={vocab_size}: must be from 257 (the 256 bytes and {EOT}) to {MAX_VOCAB} "
                        "(dataset.py stores token ids in 16 bits).")
    if min_frequency < 1:
        raise DataError(f"min_frequency={min_frequency}: must be at least 1.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists: choose another --out, or pass --overwrite to replace it.")
    problem = destination_problem(out, folder=True, replaceable=lambda _: overwrite)
    if problem:  # checked before training, which can take an hour
        raise DataError(f"--out {out}: {problem}: choose another --out.")
    args = dataset.DataArguments(dataset_name=dataset_name, dataset_path=dataset_path, val_split=val_split, **kwargs)
    if not 0 <= val_split < 1:
        raise DataError(f"val_split={val_split} must be in [0, 1).")
    train_src, valid_src = dataset.resolve_sources(args)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plan = _HeldOut.plan(train_src, valid_src, args, seed, tmp)
        backend = _train_bpe(plan.training_text(train_src, args, tmp), vocab_size, min_frequency)
        seconds = time.perf_counter() - start
        if plan.trained_chars == 0:
            raise DataError(f"{train_src.describe()} contains no text to train a tokenizer on.")
        if backend.get_vocab_size() < vocab_size:
            raise DataError(
                f"{train_src.describe()} only fills {backend.get_vocab_size()} of {vocab_size} tokens (every pair of tokens "
                f"seen at least {min_frequency} times is merged already): use --vocab_size {backend.get_vocab_size()} or "
                "less, more text, or a lower --min_frequency.")
        held_out = plan.held_out_text(valid_src, args, tmp)

    tokenizer = _wrap(backend)
    report = {
        "vocab_size": len(tokenizer),
        "source": train_src.describe(),
        "split": plan.method,
        "val_split": val_split,
        "seed": seed,
        "min_frequency": min_frequency,
        "trained": {"documents": plan.trained_docs, "bytes": plan.trained_bytes, "seconds": round(seconds, 3),
                    "mb_per_s": round(plan.trained_bytes / 1e6 / seconds, 3)},
        "held_out": compare_bytes_per_token(tokenizer, held_out),
    }
    _save(tokenizer, report, out)
    return tokenizer, report


# ----------------------------------------------------------------------------------------------
# Which text trains the tokenizer and which is held out: the documents dataset.py would hold out


class _HeldOut:
    """The held-out documents as dataset.py chooses them: the official validation split when the data has one;
    else the validation documents of dataset.validation_documents; else (too few documents) the last val_split
    of the text, as dataset.py holds out the last val_split of the tokens (the boundary may differ by a few
    characters, since tokens and characters do not line up exactly). Text is streamed piece by piece: a
    document is never held whole (one .txt file is one document, however large)."""

    def __init__(self, method: str, is_val: Optional[np.ndarray] = None, cut_chars: Optional[int] = None):
        self.method, self.is_val, self.cut_chars = method, is_val, cut_chars
        self.trained_docs = self.trained_chars = self.trained_bytes = 0
        self.kept: dict[int, list[str]] = {}  # held-out pieces by document, up to HELD_OUT_CHARS in all
        self.kept_chars = 0

    @classmethod
    def plan(cls, train_src, valid_src, args, seed: int, tmp: str) -> "_HeldOut":
        if valid_src is not None:
            return cls("official valid split")
        if args.val_split <= 0:
            return cls("none")
        n_chars = 0  # a first pass: which documents are held out depends on how many there are, and on copies
        hashes: list[int] = []  # one int per document; only the current document's hasher is alive
        current, current_doc = None, -1
        for doc, piece in _pieces(train_src, args, tmp, "Counting documents"):
            if doc != current_doc:
                if current is not None:
                    hashes.append(current.value())
                current, current_doc = shards.DocumentHash(), doc
            current.update(piece)
            n_chars += len(piece)
        if current is not None:
            hashes.append(current.value())
        is_val = dataset.validation_documents(len(hashes), args.val_split, seed, np.asarray(hashes, dtype=np.uint64))
        if is_val is not None:
            return cls("documents", is_val=is_val)
        return cls("position", cut_chars=int(n_chars * (1 - args.val_split)))

    def training_text(self, source, args, tmp: str) -> Iterator[str]:
        """The training source's text, without its held-out part (kept aside, up to HELD_OUT_CHARS)."""
        chars, last_doc = 0, -1
        for doc, piece in _pieces(source, args, tmp, "Reading text for BPE"):
            if self.is_val is not None and self.is_val[doc]:
                self._keep(doc, piece)
                continue
            if self.cut_chars is not None and chars + len(piece) > self.cut_chars:
                cut = max(0, self.cut_chars - chars)
                self._keep(doc, piece[cut:])
                piece = piece[:cut]
            if piece:
                chars += len(piece)
                self.trained_chars += len(piece)
                self.trained_bytes += len(piece.encode())
                self.trained_docs += doc != last_doc
                last_doc = doc
                yield from _split_lines(piece, TRAINER_CHARS)

    def _keep(self, doc: int, piece: str):
        if self.kept_chars < HELD_OUT_CHARS:
            self.kept.setdefault(doc, []).append(piece)
            self.kept_chars += len(piece)

    def held_out_text(self, valid_src, args, tmp: str) -> list[str]:
        if valid_src is not None:
            for doc, piece in _pieces(valid_src, args, tmp, "Reading held-out text"):
                if self.kept_chars >= HELD_OUT_CHARS:
                    break
                self._keep(doc, piece)
        return ["".join(pieces) for pieces in self.kept.values()]


def _split_lines(text: str, size: int) -> Iterator[str]:
    """`text` in parts of about `size` characters, cut after a newline where there is one: the trainer
    buffers 256 items in Python, so a reader's megabyte pieces would hold hundreds of megabytes."""
    start = 0
    while len(text) - start > size:
        end = text.rfind("\n", start, start + size) + 1 or start + size
        yield text[start:end]
        start = end
    yield text[start:]


def _pieces(source, args, tmp: str, desc: str) -> Iterator[tuple[int, str]]:
    """(document number, text) of every non-empty piece of a source, streamed; documents are numbered as
    dataset.py counts them: those with text, in reading order."""
    total, unit = source.total()
    with tqdm(total=total, unit=unit, unit_scale=True, desc=f"{desc} ({source.describe()})", disable=None) as progress:
        doc, has_text = 0, False
        for text, ends in dataset.iter_pieces(source, args, progress, tmp):
            if text:
                has_text = True
                yield doc, text
            if ends and has_text:
                doc, has_text = doc + 1, False


# ----------------------------------------------------------------------------------------------
# Training and saving


def _train_bpe(text: Iterator[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())  # no unknown token: the 256 byte tokens spell any text
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty())
    backend.train_from_iterator(text, trainer=trainer)
    return backend


def _wrap(backend):
    """The Hugging Face tokenizer class of GPT-2, as the official one in gpt2_tokenizer/ is built."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS,
                             add_prefix_space=False, clean_up_tokenization_spaces=False, model_max_length=CONTEXT_LENGTH)


def _save(tokenizer, report: dict, out: Path) -> None:
    """Write the folder beside `out` and rename it into place (atomic.py): an interrupted run leaves no half
    tokenizer. train_tokenizer has refused an existing `out` without --overwrite before training."""
    with atomic_path(out, folder=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def compare_bytes_per_token(tokenizer, texts: list[str]) -> dict:
    """UTF-8 bytes per token of `texts` with `tokenizer` and with GPT-2's BPE (more is a denser tokenizer)."""
    n_bytes = sum(len(t.encode()) for t in texts)
    if not n_bytes:
        return {"documents": 0, "bytes": 0}
    ours = sum(map(len, shards.encoder(tokenizer)(texts)))  # as dataset.py will tokenize the corpus
    gpt2 = sum(map(len, shards.encoder(load_tokenizer())(texts)))
    return {"documents": len(texts), "bytes": n_bytes, "tokens": ours, "gpt2_tokens": gpt2,
            "bytes_per_token": round(n_bytes / ours, 4), "gpt2_bytes_per_token": round(n_bytes / gpt2, 4)}


def format_report(report: dict) -> str:
    trained, held = report["trained"], report["held_out"]
    lines = [f"Trained a {report['vocab_size']}-token byte-level BPE on {trained['documents']} documents "
             f"({trained['bytes'] / 1e6:.2f} MB of {report['source']}) in {trained['seconds']:.1f} s "
             f"({trained['mb_per_s']:.2f} MB/s)."]
    if held.get("bytes"):
        lines += [f"Held-out text ({report['split']}: {held['documents']} documents, {held['bytes'] / 1e6:.2f} MB):",
                  "| tokenizer | vocabulary | tokens | bytes per token |", "|---|---:|---:|---:|",
                  f"| this one | {report['vocab_size']} | {held['tokens']} | {held['bytes_per_token']:.3f} |",
                  f"| GPT-2 BPE | 50257 | {held['gpt2_tokens']} | {held['gpt2_bytes_per_token']:.3f} |"]
    else:
        lines.append("No held-out text (val_split=0 or too little data): bytes per token not measured.")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TokenizerArguments, description=__doc__.split("\n\n")[0])
    (cli,) = parser.parse_args_into_dataclasses(args=argv)

    def body():
        _, report = train_tokenizer(**asdict(cli))
        print(format_report(report))
        print(f"Saved to {cli.out}. Train on it: python train.py --tokenizer_name {cli.out} ...")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
