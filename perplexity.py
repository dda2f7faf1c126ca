"""Perplexity and bits per byte of a token stream: sliding windows or fixed blocks, scored in batches with only
running sums kept, and text turned into that stream (documents joined with <|endoftext|>, as in training).

The scoring half of evaluation.py, which re-exports the public functions and adds data selection, the
generation metrics, reports and the CLI; the functions take any Hugging Face causal LM:

    from perplexity import evaluate_perplexity, evaluate_texts
    evaluate_perplexity(model, tokenizer, val_dataset)   # fixed blocks, as Trainer.evaluate() scores them
    evaluate_texts(model, tokenizer, ["some text", ...], stride=512)   # sliding window over documents
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from errors import GPT2ToolkitError


LN2 = math.log(2)
TOKENIZE_BATCH_CHARS = 1 << 20  # text tokenized at once while streaming


class EvaluationError(GPT2ToolkitError, ValueError):
    """Bad input to an evaluation (model, data or settings); the message says what to change."""


def model_context(model) -> int:
    """The model's context length in tokens (n_positions, max_position_embeddings, ...)."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise EvaluationError(f"cannot tell the context length of {type(model).__name__}: pass --context.")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------
# Scoring: batched windows, running sums only


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens).

    Exact for byte-level BPE (GPT-2 and most GPT-style tokenizers: each character of a vocabulary
    entry is one byte); otherwise the length of each token decoded on its own (approximate).
    """
    size = len(tokenizer)
    lengths = np.zeros(size, dtype=np.int64)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    byte_level = _is_byte_level(tokenizer)
    for i, tok in enumerate(tokens):
        if i in special or tok is None:
            continue
        if byte_level:
            lengths[i] = len(tok)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):  # SentencePiece byte fallback
            lengths[i] = 1
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


class WindowScorer:
    """Sums the negative log-likelihood of the last `n_score` tokens of each window, in batches.

    Windows of the same length and target count share a batch; only the logits of scored positions
    are computed (`logits_to_keep`), and nothing but the running sums outlives a batch.
    """

    def __init__(self, model, batch_size: int = 8, byte_lengths: Optional[np.ndarray] = None, progress=None):
        if batch_size < 1:
            raise EvaluationError(f"batch_size={batch_size} must be at least 1.")
        self.model, self.batch_size, self.byte_lengths, self.progress = model, batch_size, byte_lengths, progress
        self.device = _device_of(model)
        self.nll = 0.0  # nats, summed in float64
        self.tokens = 0
        self.bytes = 0
        self.windows = 0
        self._pending: list[np.ndarray] = []
        self._key: Optional[tuple[int, int]] = None
        self._supports_keep = True

    def add(self, ids: np.ndarray, n_score: int) -> None:
        if n_score <= 0:
            return
        key = (len(ids), n_score)
        if self._pending and key != self._key:
            self.flush()
        self._key = key
        self._pending.append(np.asarray(ids, dtype=np.int64))
        if len(self._pending) >= self.batch_size:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        if not self._pending:
            return
        length, n = self._key
        x = torch.from_numpy(np.stack(self._pending)).to(self.device)
        self._pending = []
        logits = None
        mask = torch.ones_like(x)  # no padding; explicit, since <|endoftext|> doubles as GPT-2's pad token
        if self._supports_keep:
            try:
                logits = self.model(input_ids=x, attention_mask=mask, logits_to_keep=n + 1).logits
            except TypeError:  # a model without logits_to_keep: compute them all, keep what is scored
                self._supports_keep = False
        if logits is None:
            logits = self.model(input_ids=x, attention_mask=mask).logits
        logits = logits[:, -(n + 1):-1]  # position t predicts token t + 1
        targets = x[:, length - n:]
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for row in range(x.shape[0]):  # one row at a time bounds the float32 copy of half-precision logits
            total += F.cross_entropy(logits[row].float(), targets[row], reduction="sum").double()
        total = total.item()  # one device sync per batch
        if math.isnan(total):  # NaN would silently turn every result into nan
            raise EvaluationError("the model's loss is NaN on this data: its activations overflow (with --precision fp16 "
                                  "use bf16 or fp32) or its weights hold NaN/inf (use an earlier checkpoint).")
        self.nll += total
        self.tokens += targets.numel()
        self.windows += x.shape[0]
        if self.byte_lengths is not None:
            self.bytes += int(self.byte_lengths[targets.cpu().numpy()].sum())
        if self.progress is not None:
            self.progress.update(targets.numel())
            self.progress.set_postfix(ppl=f"{_exp(self.nll / self.tokens):.4g}", refresh=False)

    def result(self, n_bytes: Optional[int] = None) -> dict:
        self.flush()
        if self.tokens == 0:
            raise EvaluationError("nothing to score: the data has fewer than two tokens.")
        loss = self.nll / self.tokens
        n_bytes = self.bytes if n_bytes is None else n_bytes
        return {
            "loss": loss,
            "perplexity": _exp(loss),
            "bits_per_byte": self.nll / LN2 / n_bytes if n_bytes else None,
            "bits_per_token": loss / LN2,
            "tokens": self.tokens,
            "bytes": n_bytes or None,
            "windows": self.windows,
        }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def iter_windows(token_chunks: Iterable[Sequence[int]], context: int, stride: int) -> Iterator[tuple[np.ndarray, int]]:
    """Hugging Face's sliding windows over the concatenation of `token_chunks`, streamed.

    Yields (window token ids, number of its last tokens to score). Window k spans
    [k*stride, min(k*stride + context, N)); it scores the tokens after the previous window's end,
    except a window's first token, which has no context inside the window. Stops at the window that
    reaches the end, as the documented loop does. Holds at most one chunk plus one window of tokens.
    """
    if context < 2:
        raise EvaluationError(f"context={context} must be at least 2 tokens.")
    if not 1 <= stride <= context:
        raise EvaluationError(f"stride={stride} must be between 1 and the context ({context} tokens): "
                              "a larger stride would skip tokens.")
    buf = np.empty(0, dtype=np.int64)
    base = begin = prev_end = 0  # base: position of buf[0] in the stream

    def window(end: int) -> tuple[np.ndarray, int]:
        ids = buf[begin - base:end - base]
        return ids, min(end - prev_end, end - begin - 1)

    for chunk in token_chunks:
        chunk = np.asarray(chunk, dtype=np.int64)
        if not len(chunk):
            continue
        buf = np.concatenate([buf, chunk])
        while begin + context <= base + len(buf):
            end = begin + context
            yield window(end)
            prev_end, begin = end, begin + stride
            buf, base = buf[begin - base:], begin
    n = base + len(buf)
    while prev_end < n:
        end = min(begin + context, n)
        yield window(end)
        prev_end, begin = end, begin + stride


def sliding_window_nll(model, token_chunks: Iterable[Sequence[int]], *, context: Optional[int] = None,
                       stride: Optional[int] = None, batch_size: int = 8, n_bytes=None, progress: bool = True,
                       desc: str = "Perplexity") -> dict:
    """Perplexity of one token stream (an iterable of id chunks, consumed lazily) by sliding windows.

    `context` defaults to the model's, `stride` to half of it. `n_bytes`: the UTF-8 bytes the stream
    stands for (an int, or a callable returning it once the stream is consumed) for bits per byte.
    Returns loss (mean nats per scored token), perplexity, bits_per_byte, bits_per_token, tokens,
    bytes, windows, context, stride.
    """
    context = context or model_context(model)
    if context > model_context(model):
        raise EvaluationError(f"context={context} is longer than the model's context of {model_context(model)} tokens.")
    stride = stride or max(1, context // 2)
    was_training = model.training
    model.eval()
    try:
        with tqdm(desc=desc, unit="tok", unit_scale=True, disable=None if progress else True) as bar:
            scorer = WindowScorer(model, batch_size, progress=bar)
            for ids, n_score in iter_windows(token_chunks, context, stride):
                scorer.add(ids, n_score)
            result = scorer.result(n_bytes() if callable(n_bytes) else n_bytes)
    finally:
        model.train(was_training)
    result.update(context=context, stride=stride)
    return result


def evaluate_perplexity(model, tokenizer, data, *, batch_size: int = 8, n_bytes: Optional[int] = None,
                        progress: bool = True, desc: str = "Perplexity") -> dict:
    """Perplexity of fixed blocks, each scored on its own, as `Trainer.evaluate()` scores them.

    `data`: a datasets.Dataset with an `input_ids` column (what dataset.get_dataset_and_tokenizer
    returns), or any iterable of blocks (lists/arrays of token ids, or dicts with "input_ids"); it is
    consumed lazily. Every token but a block's first is scored, so `exp(result["loss"])` matches
    `exp(Trainer.evaluate()["eval_loss"])` -- but note that transformers 5.24's Trainer divides a
    GPT2LMHeadModel's summed loss by all L labels of a block, not the L - 1 predicted ones, unless
    `model.loss_type = "ForCausalLM"` is set before the Trainer is built (tests/test_evaluation.py).
    With a `tokenizer` (None: no byte count) the bytes of the scored tokens are counted and
    bits_per_byte is given (exact for byte-level BPE such as GPT-2's); `n_bytes` overrides that.

    Returns {"loss", "perplexity", "bits_per_byte" (None when bytes are unknown), "bits_per_token",
    "tokens", "bytes", "windows" (blocks)}. The model's train/eval mode is restored afterwards.
    """
    context = model_context(model)
    byte_lengths = token_byte_lengths(tokenizer) if tokenizer is not None and n_bytes is None else None
    was_training = model.training
    model.eval()
    try:
        with tqdm(desc=desc, unit="tok", unit_scale=True, disable=None if progress else True) as bar:
            scorer = WindowScorer(model, batch_size, byte_lengths=byte_lengths, progress=bar)
            for block in _iter_blocks(data):
                if len(block) > context:
                    raise EvaluationError(f"a block of {len(block)} tokens is longer than the model's context of {context}.")
                scorer.add(block, len(block) - 1)
            return scorer.result(n_bytes)
    finally:
        model.train(was_training)


def _iter_blocks(data) -> Iterator[np.ndarray]:
    if hasattr(data, "column_names") and hasattr(data, "iter"):  # a datasets.Dataset: Arrow batches, lazily
        if "input_ids" not in data.column_names:
            raise EvaluationError(f"the dataset has no input_ids column (columns: {', '.join(data.column_names)}).")
        for batch in data.iter(batch_size=256):
            yield from (np.asarray(ids, dtype=np.int64) for ids in batch["input_ids"])
        return
    for block in data:
        if isinstance(block, dict):
            block = block["input_ids"]
        if torch.is_tensor(block):
            block = block.cpu().numpy()
        yield np.asarray(block, dtype=np.int64).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Text -> token stream


class TextCounter:
    """What a token stream was made of: documents, UTF-8 bytes, tokens."""

    def __init__(self):
        self.documents = 0
        self.bytes = 0
        self.tokens = 0


def encoder_for(tokenizer):
    """list[str] -> list[list[int]], no special tokens added (tiktoken for the official GPT-2 BPE)."""
    from shards import encoder

    return encoder(tokenizer)


def iter_token_chunks(pieces: Iterable[tuple[str, bool]], tokenizer, counter: Optional[TextCounter] = None,
                      add_start_token: bool = True, max_documents: Optional[int] = None) -> Iterator[np.ndarray]:
    """Token ids of (text, ends_document) pieces as dataset.py reads them, with <|endoftext|> after each
    non-empty document (and in front, when add_start_token, so that the first token is scored too).
    Counts documents, bytes and tokens into `counter`."""
    counter = counter if counter is not None else TextCounter()
    encode = encoder_for(tokenizer)
    eos = tokenizer.eos_token_id
    start = eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    if add_start_token and start is not None:
        counter.tokens += 1
        yield np.asarray([start], dtype=np.int64)
    batch: list[tuple[str, bool]] = []
    chars = 0
    doc_has_text = False

    def flush() -> np.ndarray:
        nonlocal doc_has_text
        out: list[int] = []
        for ids, (_, ends) in zip(encode([t for t, _ in batch]), batch):
            out.extend(ids)
            doc_has_text = doc_has_text or bool(ids)
            if ends:
                if doc_has_text:
                    counter.documents += 1
                    if eos is not None:
                        out.append(eos)
                doc_has_text = False
        batch.clear()
        counter.tokens += len(out)
        return np.asarray(out, dtype=np.int64)

    ended = 0  # documents read, empty ones included
    for text, ends in pieces:
        if max_documents is not None and ended >= max_documents:
            break
        ended += ends
        batch.append((text, ends))
        counter.bytes += len(text.encode("utf-8"))
        chars += len(text)
        if chars >= TOKENIZE_BATCH_CHARS or len(batch) >= 1024:
            yield flush()
            chars = 0
    if batch:
        yield flush()


def documents_as_pieces(documents: Iterable[str]) -> Iterator[tuple[str, bool]]:
    for doc in documents:
        yield doc.replace("\r\n", "\n"), True


def evaluate_texts(model, tokenizer, documents: Iterable[str], *, stride: Optional[int] = None,
                   context: Optional[int] = None, batch_size: int = 8, add_start_token: bool = True,
                   progress: bool = True) -> dict:
    """Sliding-window perplexity and bits per byte of documents (an iterable of strings, read lazily),
    joined with <|endoftext|> as in training. Adds `documents` to sliding_window_nll's result."""
    counter = TextCounter()
    chunks = iter_token_chunks(documents_as_pieces(documents), tokenizer, counter, add_start_token)
    result = sliding_window_nll(model, chunks, context=context, stride=stride, batch_size=batch_size,
                                n_bytes=lambda: counter.bytes, progress=progress)
    result["documents"] = counter.documents
    return result
