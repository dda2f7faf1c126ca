"""How the next token is chosen and how a completion's text grows: the sampling half of generate.py.

HF's semantics and order: repetition penalty and n-gram bans (`Penalties`), then temperature, top-k,
top-p (`sample`, `sample_top`); stop strings matched in O(new text) per token (`StopMatcher`,
`RowText`); and `decode_rows`, the loop that runs decode.py's fast forward over one left-padded batch
of `Request`s, each with its own settings, random generator, length and stop strings, each row
finishing on its own. generate.py's `generate` is the API over these; engine.py batches a server's
requests through the same loop.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch


def check_sampling_args(max_new_tokens=50, top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=1):
    """Raise ValueError naming the bad argument and the accepted range."""

    def bad(name, value, want):
        raise ValueError(f"{name} must be {want}, got {value!r}")

    def number(name, value, want):  # NaN passes every comparison, so non-finite values are refused first
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            bad(name, value, want)
        return float(value)

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        bad("max_new_tokens (--length)", max_new_tokens, "a positive integer")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        bad("top_k", top_k, "an integer >= 0 (0 disables top-k)")
    if not 0.0 < number("top_p", top_p, "in (0, 1]") <= 1.0:
        bad("top_p", top_p, "in (0, 1] (1 disables nucleus sampling)")
    if number("temperature", temperature, "a finite number >= 0") < 0.0:
        bad("temperature", temperature, ">= 0 (0 means greedy decoding)")
    if not 1e-3 <= number("repetition_penalty", repetition_penalty, "a number from 0.001 to 1000") <= 1e3:
        # beyond these, penalized float32 logits overflow to inf or vanish to 0 (and NaN in the softmax)
        bad("repetition_penalty", repetition_penalty, "from 0.001 to 1000 (1 disables it; 1.1-1.5 is usual)")
    if isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        bad("no_repeat_ngram_size", no_repeat_ngram_size, "an integer >= 0 (0 disables it)")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        bad("num_return_sequences", num_return_sequences, "a positive integer")


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    # Same rule as HF's NoRepeatNGramLogitsProcessor: ban tokens that would repeat an n-gram.
    if len(seq) < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1 :])
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]


def sample(logits, top_k: int, top_p: float, temperature: float, generator):
    """Next token per row of float `logits` (B, V), with HF's warper order: temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:
        vals, idx = torch.topk(logits, top_k)
    elif top_p < 1.0:
        vals, idx = torch.sort(logits, descending=True)
    else:
        return torch.multinomial(torch.softmax(tempered(logits, temperature), -1), 1, generator=generator).squeeze(1)
    return sample_top(vals, idx, top_p, temperature, generator)


def tempered(logits, temperature: float):
    """`logits / temperature`, shifted so that each row's largest is 0 and in float64 when scaled, so any
    positive temperature, however small (1e-320) or large, gives finite probabilities; the order is kept."""
    if temperature == 1.0:
        return logits
    logits = logits.double()
    return (logits - logits.amax(-1, keepdim=True)) / temperature


def sample_top(vals, idx, top_p: float, temperature: float, generator):
    """Sample among the largest logits `vals` (B, k, sorted descending) of tokens `idx`."""
    if temperature == 0:
        return idx[:, 0]
    vals = tempered(vals, temperature)  # scaling keeps the order: top-k first is the same
    if top_p < 1.0:
        probs = torch.softmax(vals, -1)
        # Keep the smallest prefix whose mass reaches top_p; the top token always survives (even for a
        # top_p below float32's smallest number, which compares as 0).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(torch.softmax(vals, -1), 1, generator=generator)
    return idx.gather(1, choice).squeeze(1)


class StopMatcher:
    """The first of several stop strings in a text that arrives piece by piece.

    Knuth-Morris-Pratt: each stop string keeps the length of its longest prefix that ends the text
    so far, so a piece costs O(its length) per stop string, whatever the stop strings' lengths.
    (Searching the whole text and testing every prefix of a stop string at each token cost its
    length squared per token: one 65 KB stop string held a server's worker for a minute.)
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fallback = [self._table(s) for s in stops]
        self.state = [0] * len(stops)
        self.length = 0  # characters fed so far

    @staticmethod
    def _table(s: str) -> list[int]:
        # fallback[i]: length of the longest proper prefix of s[: i + 1] that is also its suffix
        table, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = table[k - 1]
            if s[i] == s[k]:
                k += 1
            table[i] = k
        return table

    def feed(self, piece: str) -> int | None:
        """Add `piece` to the text; the index where the earliest stop string now in it starts, or None."""
        found = None
        for j, s in enumerate(self.stops):
            k, table = self.state[j], self.fallback[j]
            for i, ch in enumerate(piece):
                while k and s[k] != ch:
                    k = table[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    start = self.length + i + 1 - k
                    found = start if found is None else min(found, start)
                    k = table[k - 1]
                    break
            self.state[j] = k
        self.length += len(piece)
        return found

    def pending(self) -> int:
        """How many characters at the end of the text may be the start of a stop string."""
        return max(self.state, default=0)


class RowText:
    """Decoded completion of one row: applies stop strings and yields printable increments."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.matcher = StopMatcher(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character split across tokens: wait for its last byte
        if text.startswith(self.text):
            cut = self.matcher.feed(text[len(self.text) :])
        else:  # decoding changed earlier text (not seen with byte-level BPE): match all of it again
            self.matcher = StopMatcher(self.stop)
            cut = self.matcher.feed(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            safe = cut
        else:
            self.text = text
            safe = len(text) - self.matcher.pending()  # a possible start of a stop string is never printed
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def rest(self) -> str:
        """The text not yet returned by `add`, including a trailing partial character."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def left_padded(rows: list[list[int]], pad: int, max_new_tokens: int, device):
    """(ids (B, P), valid (B, P + max_new_tokens) "is a real token", positions (B, P), attention mask or None)."""
    B, P = len(rows), max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=device)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        valid[b, P - len(r) : P] = True
    pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    mask = None
    if any(len(r) != P for r in rows):  # causal & not padding; a pad query attends to itself so no softmax row is all -inf
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        mask = ((causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device))[:, None]
    return ids, valid, pos, mask


class Penalties:
    """HF's repetition penalty and n-gram ban as one adjustment of the logits, `self(z, ids)`, which is
    non-decreasing in z per token, as decode's `top_logits` needs (ids None: all tokens)."""

    def __init__(self, rows, vocab: int, device, repetition_penalty: float, no_repeat_ngram_size: int):
        self.penalty, self.n, self.vocab, self.device = repetition_penalty, no_repeat_ngram_size, vocab, device
        self.seen = self.banned = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
            for b, r in enumerate(rows):
                self.seen[b, r] = True
        self.histories = [list(r) for r in rows] if no_repeat_ngram_size else None

    @property
    def active(self) -> bool:
        """Whether this changes any logit."""
        return self.seen is not None or self.histories is not None

    def start_step(self) -> None:
        if self.histories is not None:
            self.banned = torch.zeros(len(self.histories), self.vocab, dtype=torch.bool, device=self.device)
            for b, hist in enumerate(self.histories):
                self.banned[b, banned_ngram_tokens(hist, self.n)] = True

    def __call__(self, z, ids):
        if self.seen is not None:  # HF's rule: divide positive logits, multiply negative ones
            penalized = torch.where(z > 0, z / self.penalty, z * self.penalty)
            z = torch.where(self.seen if ids is None else self.seen.gather(1, ids), penalized, z)
        if self.banned is not None:
            z = z.masked_fill(self.banned if ids is None else self.banned.gather(1, ids), float("-inf"))
        return z

    def add(self, row: int, token: int) -> None:
        if self.histories is not None:
            self.histories[row].append(token)

    def end_step(self, tokens) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=self.device), tokens] = True


class RowsOut:
    """What each row of a request has produced: its new tokens, its text as it grows (when stop strings or
    `on_text` need it) and why it ended. Fed token by token, by `decode_rows` or from model.generate's output.
    A row ends at EOS, at a stop string, or with `limit` tokens."""

    def __init__(self, tokenizer, n_rows: int, stop: list[str], on_text, limit: int | None = None):
        self.tokenizer, self.eos, self.on_text, self.limit = tokenizer, tokenizer.eos_token_id, on_text, limit
        self.texts = [RowText(tokenizer, stop) for _ in range(n_rows)] if stop or on_text is not None else None
        self.finish, self.tokens = [None] * n_rows, [[] for _ in range(n_rows)]

    def add(self, row: int, token: int) -> bool:
        """Take `token` for `row`; False when the row has ended (before, or by this EOS)."""
        if self.finish[row] is not None:
            return False
        if token == self.eos:
            self.finish[row] = "eos"
            return False
        self.tokens[row].append(token)
        if self.texts is not None:
            piece = self.texts[row].add(token)
            if piece and self.on_text is not None:
                self.on_text(row, piece)
            if self.texts[row].stopped:
                self.finish[row] = "stop"
        if self.finish[row] is None and len(self.tokens[row]) == self.limit:
            self.finish[row] = "length"
        return True

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def results(self) -> list[tuple[str, list[int], str]]:
        """(completion text, token ids, finish reason) per row; held-back text goes to on_text first."""
        out = []
        for b, tokens in enumerate(self.tokens):
            if self.texts is not None:
                rest = self.texts[b].rest()
                if self.on_text is not None and rest:
                    self.on_text(b, rest)
                text = self.texts[b].text
            else:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append((text, tokens, self.finish[b] or "length"))
        return out


@dataclass
class Request:
    """Rows that share sampling settings and a random generator (one `generate` call, one server request),
    for `decode_rows`: their prompts' token ids, one row each, and how to sample their continuations."""

    rows: list[list[int]]
    max_new_tokens: int
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    generator: torch.Generator | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable | None = None  # on_text(row of this request, new printable text)
    cancelled: Callable[[], bool] | None = None  # polled each step: True drops the request's rows
    on_done: Callable | None = None  # on_done(RowsOut) once every row has ended (not when cancelled)


class _Running:
    """A request's state inside `decode_rows`: its output and penalties. Its rows sit together in the batch."""

    def __init__(self, request: Request, tokenizer, vocab: int, device):
        self.request, self.n = request, len(request.rows)
        self.out = RowsOut(tokenizer, self.n, request.stop, request.on_text, request.max_new_tokens)
        self.penalties = Penalties(request.rows, vocab, device, request.repetition_penalty, request.no_repeat_ngram_size)
        self.reported = False

    @property
    def k(self) -> int:
        """How many of the largest logits sampling looks at (1 when greedy; 0: all of them)."""
        return 1 if self.request.temperature == 0 else self.request.top_k

    def finish(self) -> bool:
        """Whether the request has ended; calls on_done once when it has (cancellation ends it silently)."""
        if self.request.cancelled is not None and self.request.cancelled():
            self.out.finish = ["cancelled" if f is None else f for f in self.out.finish]
            self.reported = True
        if self.out.done() and not self.reported:
            self.reported = True
            if self.request.on_done is not None:
                self.request.on_done(self.out)
        return self.out.done()


def decode_rows(tokenizer, fast, device, requests: list[Request], mode: str | None = None, admit=None) -> list[RowsOut]:
    """The decode loop over one left-padded batch of every row of `requests`; a RowsOut per request.

    Each request samples with its own settings and generator, and each row ends on its own (EOS, a stop
    string, its request's max_new_tokens). On CPU, once half the batch has ended, the ended requests leave
    it so that they cost no more steps. `mode` is decode.Steps' (default: CUDA graphs on CUDA).

    `admit(columns, rows, room)`, when given, is asked after each step for more requests to join the batch
    (not with CUDA graphs, whose shapes are fixed): each with prompts of at most `columns` tokens and at most
    `room` new tokens, at most `rows` rows in all. Their RowsOut come to their own `on_done`, not in the result.
    """
    running = [_Running(r, tokenizer, fast.vocab, device) for r in requests]
    everyone = list(running)
    rows = [row for r in requests for row in r.rows]
    ids, valid, pos, mask = left_padded(rows, tokenizer.eos_token_id, max(r.max_new_tokens for r in requests), device)
    at = ids.shape[1]  # the column the next step writes
    room = max(valid.shape[1], fast.n_positions)  # a batch that rows join grows to the context's width, no more
    steps = fast.steps(valid, padded=mask is not None, mode=mode)
    try:
        h = steps.prefill(ids, pos, mask)
        next_pos = pos[:, -1] + 1
        spans = _spans(running)
        while True:
            tokens = _pick(fast, h, running, spans)
            picked = tokens.tolist()
            for run, (a, b) in zip(running, spans):
                for row, t in enumerate(picked[a:b]):
                    if run.out.add(row, t):
                        run.penalties.add(row, t)
                run.penalties.end_step(tokens if b - a == len(picked) else tokens[a:b])
            ended = [run.finish() for run in running]
            if all(ended):
                break
            if steps.can_keep and 2 * sum(run.n for run, e in zip(running, ended) if not e) <= len(picked) > 1:
                keep = torch.tensor([i for (a, b), e in zip(spans, ended) if not e for i in range(a, b)], device=device)
                at -= steps.keep(keep)
                tokens, next_pos = tokens[keep], next_pos[keep]
                running = [run for run, e in zip(running, ended) if not e]
                spans = _spans(running)
            h = steps.step(tokens, next_pos, at)
            at, next_pos = at + 1, next_pos + 1
            if admit is not None and steps.can_keep and (new := admit(at, len(next_pos), room - at)):
                joined = [_Running(r, tokenizer, fast.vocab, device) for r in new]
                ids, valid, pos, mask = left_padded([row for r in new for row in r.rows], tokenizer.eos_token_id, 0, device)
                h = torch.cat([h, steps.join(ids, pos, mask, valid, at, at + max(r.max_new_tokens for r in new))])
                next_pos = torch.cat([next_pos, pos[:, -1] + 1])
                running, everyone = running + joined, everyone + joined
                spans = _spans(running)
    finally:
        steps.close()
    for run in everyone:
        run.finish()
    return [run.out for run in everyone[: len(requests)]]


def _pick(fast, h, running: list[_Running], spans: list[tuple[int, int]]):
    """The next token of every row in the batch, each request sampled with its own settings and generator.

    The LM head runs once for the rows of every top-k request (the largest k of them, each request's
    penalties applied to its rows): on CPU that is one int8 screen for the batch rather than one per
    request, most of a small model's step. Requests that need every logit (top_k 0) compute their own.
    """
    live = [(run, a, b) for run, (a, b) in zip(running, spans)]
    for run, _, _ in live:
        run.penalties.start_step()
    picked = {}
    top = [(run, a, b) for run, a, b in live if 0 < run.k < fast.vocab]  # the top-k warper only looks at the k largest
    if top:
        whole = len(top) == len(live)
        rows = h if whole else torch.cat([h[a:b] for _, a, b in top])
        local = []
        for run, a, b in top:
            start = local[-1][1] if local else 0
            local.append((start, start + b - a))
        penalized = [(run.penalties, s, e) for (run, _, _), (s, e) in zip(top, local) if run.penalties.active]

        def adjust(z, ids):
            z = z.clone()
            for pen, s, e in penalized:
                z[s:e] = pen(z[s:e], None if ids is None else ids[s:e])
            return z

        if len(penalized) == 1 and len(top) == 1:
            adjust = penalized[0][0]  # one request: its penalties as they are
        vals, idx = fast.top_logits(rows, max(run.k for run, _, _ in top), adjust if penalized else None)
        for (run, _, _), (s, e) in zip(top, local):
            r = run.request
            picked[id(run)] = sample_top(vals[s:e, : run.k], idx[s:e, : run.k], r.top_p, r.temperature, r.generator)
    for run, a, b in live:
        if id(run) not in picked:
            r = run.request
            picked[id(run)] = sample(run.penalties(fast.logits(h[a:b]), None), r.top_k, r.top_p, r.temperature, r.generator)
    return torch.cat([picked[id(run)] for run, _, _ in live]) if len(live) > 1 else picked[id(live[0][0])]


def _spans(running: list[_Running]) -> list[tuple[int, int]]:
    """Where each request's rows sit in the batch: consecutive (start, end) ranges, in request order."""
    spans, start = [], 0
    for run in running:
        spans.append((start, start + run.n))
        start += run.n
    return spans
