"""Text metrics of generated samples: BLEU and ROUGE against references, distinct-n, repetition, and
the copy rate (the share of a sample's token n-grams found in the training data). Plain functions of
texts and token ids, used by evaluation.py; they import nothing of the toolkit.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(texts: Iterable[Sequence], n: int) -> Optional[float]:
    """Distinct n-grams / all n-grams, pooled over samples (Li et al. 2016). Items are word lists
    (or any token sequences); None when there is no n-gram at all."""
    total, unique = 0, set()
    for words in texts:
        grams = ngrams(list(words), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def repetition_rate(texts: Iterable[Sequence], n: int = 4) -> Optional[float]:
    """Share of n-grams that repeat an n-gram seen earlier in the same sample, pooled over samples
    (0: no repetition; "a b c d a b c d a b c d" with n=4 gives 5/9). None when no sample has an n-gram."""
    total = repeated = 0
    for words in texts:
        grams = ngrams(list(words), n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else None


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Optional[float]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 4-grams), 0-100; None without hypotheses."""
    import sacrebleu

    if not hypotheses:
        return None
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict:
    """Mean ROUGE-1/2/L F1 over sample pairs (rouge-score, Porter stemmer), 0-1."""
    from rouge_score import rouge_scorer

    if not hypotheses:
        return {t: None for t in ROUGE_TYPES}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    sums = Counter()
    for hyp, ref in zip(hypotheses, references, strict=True):
        for t, s in scorer.score(ref, hyp).items():
            sums[t] += s.fmeasure
    return {t: sums[t] / len(hypotheses) for t in ROUGE_TYPES}


_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def ngram_hashes(ids: Sequence[int], n: int = 8) -> np.ndarray:
    """64-bit hashes of every n-gram of token ids (a polynomial hash, then splitmix64's finaliser)."""
    a = np.asarray(ids, dtype=np.uint64)
    m = len(a) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h = h * _MULT + a[k:k + m] + np.uint64(1)
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


def find_ngrams(queries: np.ndarray, token_chunks: Iterable[Sequence[int]], n: int = 8) -> np.ndarray:
    """Which of the `queries` (n-gram hashes) occur in the token stream; streamed chunk by chunk.

    Memory is that of the queries plus one chunk, however large the stream: the small set of
    generated n-grams is what is kept, and the training data only flows past it."""
    queries = np.unique(np.asarray(queries, dtype=np.uint64))
    found = np.zeros(len(queries), dtype=bool)
    carry = np.empty(0, dtype=np.int64)
    for chunk in token_chunks:
        ids = np.concatenate([carry, np.asarray(chunk, dtype=np.int64)])
        if len(queries) and not found.all():
            found |= np.isin(queries, ngram_hashes(ids, n))
        carry = ids[-(n - 1):] if n > 1 else ids[:0]
    return queries[found]


def copy_rate(samples: Sequence[Sequence[int]], found: np.ndarray, n: int = 8) -> Optional[float]:
    """Share of the samples' n-grams (token ids, counted with repeats) whose hash is in `found`."""
    hashes = [ngram_hashes(s, n) for s in samples]
    total = sum(len(h) for h in hashes)
    if not total:
        return None
    found = np.asarray(found, dtype=np.uint64)
    return float(sum(np.isin(h, found).sum() for h in hashes) / total)


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """BLEU, ROUGE, distinct-1/2, repetition rate and mean length in words of texts vs references."""
    words = [h.split() for h in hypotheses]
    return {
        "bleu": bleu(hypotheses, references),
        **rouge(hypotheses, references),
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "repetition_4": repetition_rate(words, 4),
        "mean_length_words": float(np.mean([len(w) for w in words])) if words else None,
    }
