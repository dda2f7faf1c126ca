"""The model's side of the web API: one worker thread owns the model, requests wait in a bounded queue, and
the worker decodes every waiting request in one batch (generate.generate_many: each request with its own
settings, seed, length and stop strings, each row finishing on its own), so that concurrent clients share
each decode step. Each request gets its text back as events as it is sampled, or scored (generate.score,
for OpenAI's `logprobs`, one request at a time). web_api.py validates requests and formats the answers;
this module knows nothing of HTTP beyond the status of a RequestError.
"""

import asyncio
import collections
import threading

from errors import GPT2ToolkitError
from generate import Completion, generate, generate_many, prepare, score


class RequestError(GPT2ToolkitError):
    """A client mistake or a refusal, answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}




class _Cancelled(Exception):
    pass


class _Job:
    def __init__(self, kwargs: dict, loop: asyncio.AbstractEventLoop):
        self.kwargs, self.loop = kwargs, loop
        self.rows = len(kwargs.get("prompts") or [""]) * kwargs.get("num_return_sequences", 1)
        self.prepared = None  # generate.Prepared, once the worker has checked and tokenized it
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def put(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's event loop is gone (server shutting down)
            self.cancelled = True


class Engine:
    """One worker thread owns the model; requests wait in a bounded queue and are decoded in batches.

    The worker takes every waiting request, up to `max_batch` sequences, and decodes them together; a
    request that arrives meanwhile joins the running batch at the next step where its prompt fits (on
    CUDA, where each step is a captured graph of fixed shape, it waits for the next batch). A request
    with `logprobs` runs alone. Each request's answer is sent as soon as its own rows end; a client that
    goes away drops its rows at the next step. Every request, from the page or the API, goes through here.
    """

    def __init__(self, tokenizer, model, device, queue_size: int = 32, threads: int | None = None, max_batch: int = 16,
                 lm_head_dtype: str | None = None):
        self.tokenizer, self.model, self.device, self.threads = tokenizer, model, device, threads
        self.queue_size, self.max_batch, self.lm_head_dtype = queue_size, max_batch, lm_head_dtype
        self._batch: list = []  # the jobs in the running batch, those that joined it included
        # A deque rather than a queue.Queue: a job whose client went away leaves it at once, so a
        # crowd of clients that disconnect cannot keep its places full while one long job runs.
        self._waiting: collections.deque = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="web_demo-model", daemon=True)
        self._worker.start()

    def close(self):
        """Stop the worker once the jobs already waiting are done."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _next_jobs(self) -> list:
        """The next batch: the oldest waiting job and the plain ones after it, up to max_batch sequences;
        a job with logprobs alone. None once closed and empty."""
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            jobs, rows = [], 0
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                scored = "logprobs" in job.kwargs
                if jobs and (scored or rows + job.rows > self.max_batch):
                    break
                jobs.append(self._waiting.popleft())
                rows += job.rows
                if scored:
                    break
            if not jobs and self._closed:
                return None
            return jobs

    def _work(self):
        while (jobs := self._next_jobs()) is not None:
            if len(jobs) == 1 and "logprobs" in jobs[0].kwargs:
                self._run_scored(jobs[0])
            elif jobs:
                self._run_batch(jobs)

    def _run_scored(self, job):
        def on_text(row, piece):
            if job.cancelled:  # the client went away: stop sampling at the next token
                raise _Cancelled
            job.put("text", row, piece)

        try:  # a /v1/completions request with logprobs or max_tokens 0
            job.put("done", _generate_scored(self.tokenizer, self.model, self.device, on_text, self.threads, self.lm_head_dtype, **job.kwargs))
        except _Cancelled:
            pass
        except Exception as e:  # handed to the request, which answers with it
            job.put("error", e)

    def _run_batch(self, jobs):
        self._batch = [job for job in jobs if self._prepared(job) is not None]
        if not self._batch:
            return
        try:
            generate_many(self.tokenizer, self.model, self.device, [job.prepared for job in self._batch], self.threads,
                          self.lm_head_dtype, admit=self._admit)
        except Exception as e:  # the batch failed: every request in it is answered with the error
            for job in self._batch:
                job.put("error", e)

    def _prepared(self, job):
        """The job checked and tokenized (generate.prepare) with its hooks, once; None when it cannot be (its
        client is answered with the error)."""
        if job.prepared is None:
            try:
                job.prepared = prepare(self.tokenizer, self.model, self.device, **job.kwargs)
            except Exception as e:  # noqa: BLE001  (this request's mistake: the others go on)
                job.put("error", e)
                return None
            r, p = job.prepared.request, job.prepared
            r.on_text = lambda row, piece: job.put("text", row, piece)
            r.cancelled = lambda: job.cancelled
            r.on_done = lambda out: job.put("done", p.completions(out))
        return job.prepared

    def _admit(self, columns: int, rows: int, room: int) -> list:
        """Waiting requests that join the running batch (sampling.decode_rows' `admit`), oldest first: prompts of at
        most `columns` tokens, at most `room` new tokens, up to max_batch rows with the batch's `rows`. The first
        waiting request that does not fit stops the scan, so requests start in the order they came."""
        new = []
        with self._changed:
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                if "logprobs" in job.kwargs or rows + job.rows > self.max_batch:
                    break
                p = self._prepared(job)
                if p is None:
                    self._waiting.popleft()
                    continue
                if max(len(ids) for ids in p.request.rows) > columns or p.request.max_new_tokens > room:
                    break
                new.append(self._waiting.popleft())
                rows += job.rows
        self._batch += new
        return [job.prepared.request for job in new]

    async def run(self, kwargs: dict):
        """Queue one `generate(**kwargs)`; yield ("text", row, piece) events, then ("done", completions).

        With "logprobs" and "echo" in kwargs: `_generate_scored(**kwargs)`, and ("done", (completions, logprobs)).
        """
        job = _Job(kwargs, asyncio.get_running_loop())
        with self._changed:
            if len(self._waiting) >= self.queue_size:
                raise RequestError(503, "The server is busy: too many requests are waiting. Retry shortly.", code="overloaded", type="server_error")
            self._waiting.append(job)
            self._changed.notify()
        try:
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    e = event[1]
                    if isinstance(e, ValueError):
                        raise RequestError(400, str(e)) from e
                    raise RequestError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from e
                yield event
                if event[0] == "done":
                    return
        finally:
            job.cancelled = True  # covers a client that disconnects while its request waits or streams
            with self._changed:
                if job in self._waiting:
                    self._waiting.remove(job)


def _generate_scored(tokenizer, model, device, on_text, threads, lm_head_dtype, logprobs: int | None, echo: bool, **kwargs):
    """`generate(**kwargs)` (nothing when max_new_tokens is 0), then OpenAI's `logprobs` object of each
    completion (None when `logprobs` is None), from one scoring pass (generate.score) over prompt + completion.

    The logprob of a sampled token is the model's own (log_softmax of its logits): no temperature,
    top-k/top-p or penalty, as OpenAI reports it. A completion that ended at EOS has that token last.
    """
    n, top_n = kwargs["num_return_sequences"], logprobs or 0
    if kwargs["max_new_tokens"] == 0:  # score the prompts: nothing is generated
        scored = score(tokenizer, model, device, kwargs["prompts"], top_n, threads=threads)
        done = [Completion(p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True), "", len(s.ids), 0, "length",
                           [], s.ids) for p, s in zip(kwargs["prompts"], scored) for _ in range(n)]
        if logprobs is None:
            return done, None
        scored = [s for s in scored for _ in range(n)]
    else:
        done = generate(tokenizer, model, device, on_text=on_text, threads=threads, lm_head_dtype=lm_head_dtype, **kwargs)
        if logprobs is None:
            return done, None
        eos = tokenizer.eos_token_id
        scored = score(tokenizer, model, device, [c.prompt_ids + c.completion_ids + ([eos] if c.finish_reason == "eos" else [])
                                                  for c in done], top_n, threads=threads)
    return done, [_openai_logprobs(tokenizer, c, s, echo, logprobs) for c, s in zip(done, scored)]


def _openai_logprobs(tokenizer, c, s, echo: bool, top_n: int) -> dict:
    """OpenAI's legacy `logprobs` of one choice: its tokens (the prompt's first with echo), their logprobs,
    the `top_n` most likely tokens at each position (plus the chosen one when it is not among them, as
    OpenAI documents: up to top_n + 1 entries) and each token's character offset in the choice's text."""
    P = len(c.prompt_ids)
    start = 0 if echo else P
    ids, logprobs, tops = s.ids[start:], s.logprobs[start:], s.top[start:]
    names: dict[int, str] = {}

    def name(t):
        if t not in names:
            names[t] = tokenizer.decode([t])  # special tokens too: a final EOS reads "<|endoftext|>"
        return names[t]

    top_logprobs = []
    for t, lp, top in zip(ids, logprobs, tops):
        if top is None:
            top_logprobs.append(None)
            continue
        alternatives = {}
        for alt, alt_lp in [*top, (t, lp)][: top_n + (t not in {a for a, _ in top})]:
            alternatives.setdefault(name(alt), alt_lp)  # two ids may read the same (byte pieces): keep the likelier
        top_logprobs.append(alternatives)
    prompt_text = c.prompt if echo else ""
    offsets = (_text_offsets(tokenizer, s.ids[:P], len(prompt_text), 0) if echo else []) + \
        _text_offsets(tokenizer, s.ids[P:], len(c.completion), len(prompt_text))
    return {"tokens": [name(t) for t in ids], "token_logprobs": logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _text_offsets(tokenizer, ids: list[int], length: int, base: int) -> list[int]:
    """Where each token starts in a text of `length` characters that these ids decode to, plus `base`: the
    characters the tokens before it complete (a token inside a multi-byte character starts where it does)."""
    offsets, done, pending = [], 0, 0
    for i in range(len(ids)):
        offsets.append(base + min(done, length))
        piece = tokenizer.decode(ids[pending : i + 1], skip_special_tokens=True)
        if not piece.endswith("\ufffd"):
            done, pending = done + len(piece), i + 1
    return offsets


async def collect(engine: Engine, kwargs: dict):
    """The completions of one queued request."""
    async for event in engine.run(kwargs):
        if event[0] == "done":
            return event[1]
