"""The HTTP API behind web_demo.py: request limits and validation, and the JSON and OpenAI routes.

`build_api(tokenizer, model, device, WebDemoArguments(...))` returns the FastAPI app without the page
(POST /api/generate, POST /v1/completions, GET /v1/models); web_demo.py mounts its Gradio page on it and
runs the command line. Requests wait for the model in engine.py's queue, where generate.py's `generate`
samples and its `score` gives log-probabilities; this module validates and formats, and never imports
web_demo."""

import asyncio
import hmac
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from engine import Engine, RequestError, collect
from generate import DEFAULT_MODEL_PATH, check_sampling_args

API_KEY_ENV = "WEB_DEMO_API_KEY"


@dataclass
class WebDemoArguments:
    """Serve a GPT-2 trained by train.py: a browser page, a JSON API and an OpenAI-compatible /v1/completions."""

    model_path: str = field(
        default=DEFAULT_MODEL_PATH,
        metadata={"help": "Model folder (train.py's logs/final_model, a checkpoint-N folder) or a Hub name; fixed for the server's life."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; the default serves this machine only. 0.0.0.0 serves the network (set --api_key)."})
    port: int = field(default=7860, metadata={"help": "TCP port."})
    api_key: str | None = field(
        default=None,
        metadata={"help": f"Require 'Authorization: Bearer KEY' on the API and a login on the page (the key as password); also read from "
                          f"${API_KEY_ENV}. An empty key is an error, not 'no key'."},
    )
    model_name: str | None = field(default=None, metadata={"help": "Model id shown by /v1/models and in responses; default: the model folder's name."})
    max_prompt_tokens: int = field(default=512, metadata={"help": "Longest prompt accepted, in tokens (longer ones get a 400)."})
    max_tokens_cap: int = field(default=256, metadata={"help": "Most new tokens one sequence may ask for (max_tokens / max_new_tokens)."})
    max_sequences: int = field(default=4, metadata={"help": "Most sequences per request: prompts x n (num_return_sequences)."})
    max_stop_chars: int = field(default=256, metadata={"help": "Longest stop string accepted, in characters (longer ones get a 400)."})
    max_body_bytes: int = field(default=65536, metadata={"help": "Largest request body accepted, in bytes (larger ones get a 413)."})
    queue_size: int = field(default=32, metadata={"help": "Requests that may wait for the model; beyond that a request gets a 503."})
    max_connections: int = field(
        default=1000,
        metadata={"help": "Most open client connections; held below the open-file limit (ulimit -n). When full, the connection "
                          "idle longest is closed for a new one, or the new one refused."},
    )
    read_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds a client has to send a request's headers, and again its body (else 408), before its "
                          "connection is closed: stalled clients cannot hold the server's connections."},
    )
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; when unset, the best available."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads while sampling; when unset, 1 (fastest for small models), as in generate.py."})
    max_batch: int = field(default=16, metadata={"help": "Most sequences decoded together: waiting requests share each decode step, up to this many rows."})
    lm_head_dtype: str | None = field(
        default=None,
        metadata={"choices": ["fp32", "bf16"], "help": "Precision of the LM head, as in generate.py; when unset, the model's own (exact)."},
    )


def resolve_api_key(args: WebDemoArguments) -> str | None:
    """The key the server requires: --api_key, else $WEB_DEMO_API_KEY, else None; ValueError for one that cannot work."""
    key, where = (args.api_key, "--api_key") if args.api_key is not None else (os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}")
    if key is None:
        return None
    if not key.strip():
        # `--api_key "$KEY"` with KEY unset: the API looked protected while the page and generation were open.
        raise ValueError(f"{where} is empty (an unset variable?): give a key, e.g. --api_key \"$(openssl rand -hex 16)\", or "
                         + ("leave out --api_key" if where == "--api_key" else f"unset {API_KEY_ENV}") + " to serve without one")
    if key != key.strip() or not (key.isascii() and key.isprintable()):
        raise ValueError(f"{where} must be printable ASCII without leading or trailing spaces: it travels in an HTTP header")
    return key


class _ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _unless_disconnected(receive, awaitable):
    """`await awaitable`; if the client disconnects first, cancel it and raise _ClientGone.

    uvicorn does not cancel a handler whose client went away, and a request answered in one piece
    sends nothing until it is done: without this, a closed connection kept the model busy (and every
    request queued behind it waiting) to its last token. Cancelling the wait on `Engine.run` marks
    the job cancelled, so the worker stops at the next token, or skips a job still queued.
    The request body has been read, so `receive` now only answers when the client disconnects.
    """

    async def gone():
        while (await receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        work.cancel()  # a no-op once it is done; otherwise the client is gone (or the server is stopping)
    if work not in done:
        raise _ClientGone
    return work.result()


# ----------------------------------------------------------------------------- validation


def _check_text(text: str, where: str, param: str):
    """RequestError(400) for text that is not valid Unicode: a lone surrogate such as JSON's "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # the tokenizer and the response encoder would fail on it later, as a 500
        raise RequestError(400, f"{where} contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}: "
                                "send valid Unicode (a surrogate only as half of a pair)", param=param) from None


class Limits:
    """The caps of WebDemoArguments and the model's context, checked before a request is queued."""

    def __init__(self, args: WebDemoArguments, tokenizer, context: int, vocab: int | None = None):
        self.args, self.tokenizer, self.context = args, tokenizer, context
        self.vocab = vocab or len(tokenizer)  # the token ids a prompt of ids may hold

    @property
    def max_new_tokens(self) -> int:
        return min(self.args.max_tokens_cap, self.context - 1)

    def generate_kwargs(self, prompts: list[str] | list[list[int]], max_new_tokens, n, temperature, top_k, top_p, repetition_penalty,
                        no_repeat_ngram_size=0, seed=None, stop=None, names=None, scoring=False) -> dict:
        """Checked keyword arguments for generate(); RequestError(400) naming the parameter otherwise.

        `names` maps generate's parameter names to the ones the caller's API uses in messages. A prompt
        is text or a list of token ids. `scoring`: max_new_tokens may be 0 (the prompt is only scored),
        and the prompt's tokens count against the same limits.
        """
        names = names or {}
        name = lambda k: names.get(k, k)  # noqa: E731
        if not prompts:
            raise RequestError(400, "prompt must not be an empty list", param=name("prompt"))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < (0 if scoring else 1):
            raise RequestError(400, f"{name('max_new_tokens')} must be a positive integer, got {max_new_tokens!r}", param=name("max_new_tokens"))
        if max_new_tokens > self.max_new_tokens:
            raise RequestError(400, f"{name('max_new_tokens')} must be at most {self.max_new_tokens} on this server, got {max_new_tokens}", param=name("max_new_tokens"))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError(400, f"{name('num_return_sequences')} must be a positive integer, got {n!r}", param=name("num_return_sequences"))
        if len(prompts) * n > self.args.max_sequences:
            raise RequestError(
                400,
                f"{len(prompts)} prompt(s) x {name('num_return_sequences')}={n} asks for {len(prompts) * n} sequences; "
                f"this server allows at most {self.args.max_sequences} per request",
                param=name("num_return_sequences"),
            )
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stop) > 4:
            raise RequestError(400, f"{name('stop')} takes at most 4 strings, got {len(stop)}", param=name("stop"))
        for i, s in enumerate(stop):
            where = f"stop string {i}" if len(stop) > 1 else "the stop string"
            # Each stop string is matched against the text at every token: its length bounds that work.
            if len(s) > self.args.max_stop_chars:
                raise RequestError(400, f"{where} has {len(s)} characters; this server accepts at most {self.args.max_stop_chars}",
                                   param=name("stop"))
            _check_text(s, where, name("stop"))
        for i, prompt in enumerate(prompts):
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if isinstance(prompt, str):
                _check_text(prompt, where, name("prompt"))
                n_tokens = len(self.tokenizer.encode(prompt, verbose=False)) if prompt else 1
            else:
                if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab for t in prompt):
                    raise RequestError(400, f"{where} is a list of token ids, which must be integers from 0 to {self.vocab - 1} "
                                            "(the tokenizer's vocabulary)", param=name("prompt"))
                n_tokens = len(prompt) or 1
            if n_tokens > self.args.max_prompt_tokens:
                raise RequestError(400, f"{where} has {n_tokens} tokens; this server accepts at most {self.args.max_prompt_tokens}", param=name("prompt"))
            if n_tokens + max_new_tokens > self.context:
                raise RequestError(
                    400,
                    f"{where} has {n_tokens} tokens and {name('max_new_tokens')}={max_new_tokens}: together more than the "
                    f"model's context of {self.context} tokens; shorten the prompt or ask for fewer tokens",
                    param=name("max_new_tokens"),
                )
        if seed is not None and not 0 <= seed < 2**63:
            raise RequestError(400, f"{name('seed')} must be an integer in [0, 2**63), got {seed}", param=name("seed"))
        for key, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
            if not math.isfinite(value):  # JSON parsers accept NaN and Infinity, which no range check catches
                raise RequestError(400, f"{name(key)} must be a finite number, got {value}", param=name(key))
        try:
            check_sampling_args(max(max_new_tokens, 1), top_k, top_p, temperature, repetition_penalty, no_repeat_ngram_size, n)
        except ValueError as e:
            raise RequestError(400, str(e), param=name(str(e).split()[0])) from None
        return dict(prompts=prompts, max_new_tokens=max_new_tokens, num_return_sequences=n, temperature=float(temperature),
                    top_k=top_k, top_p=float(top_p), repetition_penalty=float(repetition_penalty),
                    no_repeat_ngram_size=no_repeat_ngram_size, seed=seed, stop=stop)


# ----------------------------------------------------------------------------- HTTP API


def _request_models():
    # Defined in a function so that importing web_api (or web_demo) does not import pydantic/FastAPI.
    from typing import Annotated

    from pydantic import BaseModel, BeforeValidator, ConfigDict

    def not_bool(value):
        # pydantic reads true as 1: "max_tokens": true would silently ask for one token.
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value

    Int, Float = Annotated[int, BeforeValidator(not_bool)], Annotated[float, BeforeValidator(not_bool)]

    class Strict(BaseModel):
        # Unknown fields are refused with their name: a misspelt "max_token" would otherwise be silently ignored.
        model_config = ConfigDict(extra="forbid")

    class CompletionRequest(Strict):
        model: str | None = None
        # Text, token ids, or a list of prompts each text or token ids, as OpenAI accepts (lm-evaluation-harness sends ids).
        prompt: str | list[Int] | list[str | list[Int]] = "<|endoftext|>"
        max_tokens: Int | None = 16
        temperature: Float = 1.0
        top_p: Float = 1.0
        n: Int = 1
        stream: bool = False
        stream_options: dict | None = None
        stop: str | list[str] | None = None
        seed: Int | None = None
        echo: bool = False
        logprobs: Int | None = None
        user: str | None = None
        # OpenAI parameters without a counterpart here: accepted at their neutral values only.
        presence_penalty: Float = 0.0
        frequency_penalty: Float = 0.0
        best_of: Int | None = None
        logit_bias: dict | None = None
        suffix: str | None = None
        # Extensions, as in generate.py.
        top_k: Int = 0
        repetition_penalty: Float = 1.0
        no_repeat_ngram_size: Int = 0

    class GenerateRequest(Strict):
        prompt: str | list[str] = ""
        max_new_tokens: Int = 50
        top_k: Int = 50
        top_p: Float = 0.95
        temperature: Float = 1.0
        repetition_penalty: Float = 1.0
        no_repeat_ngram_size: Int = 0
        num_return_sequences: Int = 1
        seed: Int | None = None
        stop: str | list[str] | None = None
        stream: bool = False

    return CompletionRequest, GenerateRequest


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # OpenAI says "stop" for EOS and for a stop string


class _BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, declared or streamed; 408 (and the connection
    closed) for one that does not arrive within `timeout` seconds, so that a stalled client frees its place."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, RequestError(400, "invalid Content-Length header"))
            if int(declared) > self.max_bytes:
                return await _send_error(send, self._too_large())
        received, started, refused, complete = 0, False, False, False

        async def limited_receive():
            nonlocal received, refused, complete
            if complete:  # the body is in: receive() now only answers when the client disconnects
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                refused = True
                if not started:
                    await _send_error(send, RequestError(408, f"the request body did not arrive within {self.timeout:g} s",
                                                         code="request_timeout"), close=True)
                raise _TooLarge from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not refused:  # chunked bodies declare no length
                    # Answer now: frameworks turn an exception while reading the body into their own 400.
                    refused = True
                    if not started:
                        await _send_error(send, self._too_large())
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return  # the 413 is answered already
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            pass

    def _too_large(self):
        return RequestError(413, f"request body over this server's limit of {self.max_bytes} bytes", code="request_too_large")


class _TooLarge(Exception):
    """The body was refused (too large, or too slow): the answer is sent already."""


async def _send_error(send, error: RequestError, close: bool = False):
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status,
                "headers": headers + [(b"connection", b"close")] * close})
    await send({"type": "http.response.body", "body": body})


def build_api(tokenizer, model, device, args: WebDemoArguments | None = None):
    """The FastAPI app with the JSON and OpenAI routes; `app.state` holds its engine, limits and model_name."""
    import contextlib

    from fastapi import Depends, FastAPI

    args = args or WebDemoArguments()
    api_key = resolve_api_key(args)
    model_name = args.model_name or Path(str(args.model_path).rstrip("/")).name or "gpt2"
    limits = Limits(args, tokenizer, model.config.n_positions, min(len(tokenizer), model.get_input_embeddings().weight.shape[0]))
    engine = Engine(tokenizer, model, device, args.queue_size, args.threads, args.max_batch, args.lm_head_dtype)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        engine.close()

    app = FastAPI(title="GPT-2 web demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits, app.state.model_name = engine, limits, model_name
    _add_error_handlers(app)
    auth = [Depends(_key_checker(api_key))]
    _add_schema_routes(app, auth)
    CompletionRequest, GenerateRequest = _request_models()
    _add_openai_routes(app, auth, engine, limits, model_name, CompletionRequest)
    _add_generate_route(app, auth, engine, limits, model_name, GenerateRequest)
    app.add_middleware(_BodyLimit, max_bytes=args.max_body_bytes, timeout=args.read_timeout)
    return app


def _add_schema_routes(app, auth) -> None:
    """/api/openapi.json and /api/docs, behind the key like every other route: the schema names every route and field."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/api/openapi.json", dependencies=auth, include_in_schema=False)
    def schema():
        return app.openapi()

    @app.get("/api/docs", dependencies=auth, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/api/openapi.json", title=f"{app.title}: API")


def _add_error_handlers(app) -> None:
    """Every error is a JSON body in OpenAI's shape (RequestError.body), never a bare 500 page."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(_ClientGone)
    async def client_gone(_, e: _ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param is None and first.get("type") in ("missing", "model_attributes_type"):
            # Also what `curl -d` sends: it labels its body as a form unless told otherwise.
            message = "the request body must be a JSON object, sent with 'Content-Type: application/json'"
        elif first.get("type") == "extra_forbidden":
            message = f"unknown parameter {param!r}"
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(RequestError(422, message, param=param).body(), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(RequestError(e.status_code, str(e.detail)).body(), status_code=e.status_code)


def _key_checker(api_key: str | None):
    """A FastAPI dependency that refuses requests without `Authorization: Bearer <api_key>` (any case of Bearer)."""
    from fastapi import Request

    def check_key(request: Request):
        if api_key is None:
            return
        scheme, given = (request.headers.get("authorization", "").split(None, 1) + ["", ""])[:2]
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    return check_key


def _refuse_unsupported(req) -> None:
    """A 400 naming the first OpenAI completion parameter this server does not implement, rather than ignoring it."""
    unsupported = [
        ("presence_penalty", req.presence_penalty not in (0, None), "use repetition_penalty"),
        ("frequency_penalty", req.frequency_penalty not in (0, None), "use repetition_penalty"),
        ("logit_bias", bool(req.logit_bias), None),
        ("suffix", bool(req.suffix), None),
        ("best_of", req.best_of not in (None, req.n), None),
    ]
    for param, used, hint in unsupported:
        if used:
            raise RequestError(400, f"{param} is not supported by this server" + (f" ({hint})" if hint else ""), param=param)


def _add_openai_routes(app, auth, engine: Engine, limits: Limits, model_name: str, CompletionRequest) -> None:
    """GET /v1/models, /v1/models/{name} and POST /v1/completions (plain and SSE), as OpenAI's API has them."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    created = int(time.time())

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "web_demo"}]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def get_model(name: str):
        if name != model_name:
            raise RequestError(404, f"model {name!r} is not served here; this server serves {model_name!r}", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "web_demo"}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        _refuse_unsupported(req)
        if req.logprobs is not None and not 0 <= req.logprobs <= 5:
            raise RequestError(400, f"logprobs must be an integer from 0 to 5, got {req.logprobs}", param="logprobs")
        if req.max_tokens == 0 and not req.echo:
            raise RequestError(400, "max_tokens must be a positive integer, got 0 (0 only with echo: true, which scores the prompt "
                                    "with logprobs)", param="max_tokens")
        scoring = req.logprobs is not None or req.max_tokens == 0
        if scoring and req.stream:
            raise RequestError(400, "stream: true does not carry logprobs or max_tokens 0 here: send stream: false", param="stream")
        if isinstance(req.prompt, str):
            prompts = [req.prompt]
        elif req.prompt and all(isinstance(t, int) for t in req.prompt):
            prompts = [list(req.prompt)]  # one prompt of token ids
        else:
            prompts = [p if isinstance(p, str) else list(p) for p in req.prompt]
        # "<|endoftext|>" is OpenAI's default prompt; generate.py starts an empty prompt from it.
        prompts = ["" if p == "<|endoftext|>" else p for p in prompts]
        kwargs = limits.generate_kwargs(
            prompts, req.max_tokens if req.max_tokens is not None else limits.max_new_tokens, req.n, req.temperature,
            req.top_k, req.top_p, req.repetition_penalty, req.no_repeat_ngram_size, req.seed, req.stop,
            names={"max_new_tokens": "max_tokens", "num_return_sequences": "n"}, scoring=scoring,
        )
        if scoring:
            kwargs.update(logprobs=req.logprobs, echo=req.echo)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(done):
            prompt_tokens = sum(c.prompt_tokens for c in done[:: req.n])  # each prompt counted once, as OpenAI does
            completion_tokens = sum(c.completion_tokens for c in done)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

        def chunk(choices, **extra):
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name, "choices": choices, **extra}

        if not req.stream:
            done = await _unless_disconnected(request.receive, collect(engine, kwargs))
            done, logprobs = done if scoring else (done, None)
            choices = [{"text": (c.prompt if req.echo else "") + c.completion, "index": i, "logprobs": logprobs[i] if logprobs else None,
                        "finish_reason": _openai_finish(c.finish_reason)} for i, c in enumerate(done)]
            return chunk(choices, usage=usage(done))

        events = engine.run(kwargs)
        first = await _unless_disconnected(request.receive, anext(events))  # errors before the first token get a status code

        async def body():
            try:
                if req.echo:
                    for i, p in enumerate(kwargs["prompts"]):
                        for j in range(req.n):
                            yield _sse(chunk([{"text": p, "index": i * req.n + j, "logprobs": None, "finish_reason": None}]))
                event = first
                while True:
                    if event[0] == "text":
                        yield _sse(chunk([{"text": event[2], "index": event[1], "logprobs": None, "finish_reason": None}]))
                    else:
                        done = event[1]
                        for i, c in enumerate(done):
                            yield _sse(chunk([{"text": "", "index": i, "logprobs": None, "finish_reason": _openai_finish(c.finish_reason)}]))
                        if (req.stream_options or {}).get("include_usage"):
                            yield _sse(chunk([], usage=usage(done)))
                        break
                    event = await anext(events)
            except RequestError as e:  # the status line is sent already: report in the stream, as OpenAI does
                yield _sse(e.body())
            finally:
                await events.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_generate_route(app, auth, engine: Engine, limits: Limits, model_name: str, GenerateRequest) -> None:
    """POST /api/generate: generate.py's own JSON (plain, or SSE with `stream`)."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    @app.post("/api/generate", dependencies=auth)
    async def generate_route(req: GenerateRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        kwargs = limits.generate_kwargs(prompts, req.max_new_tokens, req.num_return_sequences, req.temperature, req.top_k,
                                        req.top_p, req.repetition_penalty, req.no_repeat_ngram_size, req.seed, req.stop)

        def result(done):
            return {"model": model_name, "completions": [
                {"prompt": c.prompt, "completion": c.completion, "text": c.text, "prompt_tokens": c.prompt_tokens,
                 "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason} for c in done]}

        if not req.stream:
            return result(await _unless_disconnected(request.receive, collect(engine, kwargs)))
        events = engine.run(kwargs)
        first = await _unless_disconnected(request.receive, anext(events))

        async def body():
            try:
                event = first
                while event[0] == "text":
                    yield _sse({"index": event[1], "text": event[2]})
                    event = await anext(events)
                yield _sse(result(event[1]))
            except RequestError as e:
                yield _sse(e.body())
            finally:
                await events.aclose()
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
