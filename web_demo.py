"""Serve a trained GPT-2: a browser page, a JSON API and an OpenAI-compatible completions API.

    python web_demo.py --model_path logs/final_model          # http://127.0.0.1:7860
    python web_demo.py --host 0.0.0.0 --port 8000 --api_key s3cret
    python web_demo.py --help

Routes
  /                     the page (Gradio): prompt, sampling settings, text streamed as it is sampled
  POST /api/generate    generate.py's parameter names and results (`"stream": true` for server-sent events)
  POST /v1/completions  OpenAI's completions API (`"stream": true` for server-sent events)
  GET  /v1/models       the one model served

So `openai.OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="...")` and LangChain's OpenAI
class work unchanged. Sampling is generate.py's `generate`; web_api.py validates and formats (the API),
engine.py queues requests for the model; this module adds the page and the command line. The model is loaded once, from the path
given at start-up: no request chooses it.

As a library (tests do this): `app = build_app(tokenizer, model, device, WebDemoArguments(...))`
returns a FastAPI app to serve with uvicorn.
"""

import contextlib
import errno
import hmac
import ipaddress
import logging
import math
import os
import socket
import sys

from errors import run_main
from generate import load_model
# Moved to web_api.py; still importable from here.
from web_api import API_KEY_ENV, Engine, Limits, RequestError, WebDemoArguments, build_api, collect, resolve_api_key  # noqa: F401


def build_app(tokenizer, model, device, args: WebDemoArguments | None = None, page: bool = True):
    """The FastAPI app: JSON and OpenAI routes, with the Gradio page mounted at / unless `page=False`."""
    args = args or WebDemoArguments()
    app = build_api(tokenizer, model, device, args)
    if page:
        app = _mount_page(app, app.state.engine, app.state.limits, app.state.model_name, resolve_api_key(args))
    return app


# ----------------------------------------------------------------------------- the page


def _mount_page(app, engine: Engine, limits: Limits, model_name: str, api_key: str | None):
    # Gradio would otherwise send usage analytics; the page must work with no internet at all.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def show(prompts, pieces, n):
        texts = [prompts[i // n] + "".join(row) for i, row in enumerate(pieces)]
        if len(texts) == 1:
            return texts[0]
        return "\n\n".join(f"--- sequence {i + 1} ---\n{t}" for i, t in enumerate(texts))

    async def run(prompt, length, temperature, top_k, top_p, repetition_penalty, n, seed):
        try:
            kwargs = limits.generate_kwargs(
                [prompt or ""], int(length), int(n), float(temperature), int(top_k), float(top_p), float(repetition_penalty),
                seed=None if seed is None or int(seed) < 0 else int(seed),
                names={"max_new_tokens": "length", "num_return_sequences": "number of sequences"},
            )
            pieces = [[] for _ in range(int(n))]
            yield show(kwargs["prompts"], pieces, int(n))
            async for event in engine.run(kwargs):
                if event[0] == "text":
                    pieces[event[1]].append(event[2])
                    yield show(kwargs["prompts"], pieces, int(n))
        except RequestError as e:
            raise gr.Error(e.message) from None

    with gr.Blocks(title="GPT-2 web demo", analytics_enabled=False) as blocks:
        gr.Markdown(f"## GPT-2 web demo: `{model_name}`\nText appears as it is sampled. The same seed gives the same text.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Once upon a time", elem_id="prompt")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
                output = gr.Textbox(label="Output", lines=12, max_lines=40, interactive=False, elem_id="output")
            with gr.Column(scale=2):
                length = gr.Slider(1, limits.max_new_tokens, value=min(100, limits.max_new_tokens), step=1, label="Length (new tokens)")
                temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p (1 = off)")
                repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)")
                n = gr.Slider(1, limits.args.max_sequences, value=1, step=1, label="Number of sequences")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        inputs = [prompt, length, temperature, top_k, top_p, repetition_penalty, n, seed]
        # concurrency_limit=None: the Engine's queue orders all requests, the page's and the API's alike.
        event = go.click(run, inputs, output, concurrency_limit=None)
        submitted = prompt.submit(run, inputs, output, concurrency_limit=None)
        stop.click(None, cancels=[event, submitted])

    auth = (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(
        app, blocks, path="/", auth=auth, auth_message="Password: the server's API key (any user name)." if api_key else None,
        ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False, footer_links=[],
        app_kwargs={"openapi_url": None},  # Gradio's schema of the page would sit at /openapi.json, open to all
    )


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> WebDemoArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(WebDemoArguments, description=WebDemoArguments.__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_args(args: WebDemoArguments):
    for name in ("max_prompt_tokens", "max_tokens_cap", "max_sequences", "max_stop_chars", "max_body_bytes", "queue_size",
                 "max_connections", "max_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0 < args.read_timeout < math.inf:
        raise ValueError(f"--read_timeout must be a positive number of seconds, got {args.read_timeout}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    resolve_api_key(args)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model loads: a port in use is a one-line error, not uvicorn's
    traceback after "Serving"; uvicorn then serves on this very socket (no other process can take the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart right after a stop works
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use (another server?): stop it, or pass another --port.") from None
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another --host or --port.") from None
    return sock


ACCEPT_BATCH = 128  # uvicorn's backlog: asyncio accepts up to this many sockets per wake-up, before any protocol sees them


def connection_cap(wanted: int) -> int:
    """--max_connections, lowered to what the open-file limit leaves (each connection is a file descriptor):
    past the limit, accept() fails in a loop and no request gets through. The soft limit is raised towards the
    hard one first, as servers do; the reserve covers the files in use, and the sockets asyncio accepts (up to
    two batches) and closes (on the next turn of the loop) before the cap can see them."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return wanted
    reserve = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    reserve += 64 + 3 * ACCEPT_BATCH  # the model's files, logs, static files being sent; sockets in flight
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + reserve:
        raised = wanted + reserve if hard == resource.RLIM_INFINITY else min(hard, wanted + reserve)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft - reserve >= wanted:
        return wanted
    room = max(1, soft - reserve)
    print(f"warning: the open-file limit ({soft}) leaves room for {room} connections, not --max_connections {wanted}: "
          "raise it (ulimit -n) to serve more", file=sys.stderr)
    return room


class _OneLineAcceptErrors(logging.Filter):
    """asyncio logs a traceback each time accept() runs out of file descriptors (then pauses a second): one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("socket.accept() out of system resource"):
            record.msg, record.args, record.exc_info = "accept() failed: too many open files; retrying in 1 s", (), None
        return True


def guarded_protocol(max_connections: int, read_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol with two guards against clients that connect and stall (slowloris): a
    connection that has not sent a complete request's headers `read_timeout` seconds after it began waiting for
    one is closed, and at most `max_connections` are open: past that, the connection waiting longest for a request
    is closed to make room, or, when every connection is busy with a request, the new one is refused. One log line
    per connection closed; the body's timeout is web_api's (an ASGI middleware)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    log = logging.getLogger("uvicorn.error")

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            self.waiting_since, self.refused = self.loop.time(), False
            if len(self.connections) >= max_connections and not self._make_room():
                self.refused = True
                peer = transport.get_extra_info("peername")
                log.warning("refused a connection from %s: %d connections are busy (--max_connections)", _peer(peer),
                            max_connections)
                transport.abort()
                return
            super().connection_made(transport)
            self.timer = self.loop.call_later(read_timeout, self._check_stalled)

        def connection_lost(self, exc):
            if self.refused:
                return
            self.timer.cancel()
            super().connection_lost(exc)

        def _waiting(self) -> bool:
            """Between requests, or in the middle of a request's headers (h11 has not parsed them yet)."""
            return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

        def _check_stalled(self):
            now = self.loop.time()
            if not self._waiting():
                self.waiting_since = None  # a request is being read (its body has web_api's timeout) or answered
            elif self.waiting_since is None:
                self.waiting_since = now
            elif now - self.waiting_since >= read_timeout:
                log.warning("closed the connection from %s: no complete request headers in %g s (--read_timeout)",
                            _peer(self.client), read_timeout)
                self.transport.abort()
                return
            self.timer = self.loop.call_later(min(1.0, read_timeout), self._check_stalled)

        def _make_room(self) -> bool:
            waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c._waiting()]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c.waiting_since if c.waiting_since is not None else self.loop.time())
            log.warning("closed the connection from %s to make room: %d connections are open (--max_connections)",
                        _peer(oldest.client), max_connections)
            oldest.transport.abort()
            return True

    return GuardedH11Protocol


def _peer(address) -> str:
    return f"{address[0]}:{address[1]}" if address else "an unknown client"


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _serve(args), report=(ValueError, FileNotFoundError))


def _serve(args: WebDemoArguments) -> None:
    import uvicorn

    check_args(args)
    with listen(args.host, args.port) as sock:
        tokenizer, model, device = load_model(args.model_path, device=args.device)
        if not _is_loopback(args.host) and resolve_api_key(args) is None:
            print(f"warning: serving on {args.host} without --api_key: anyone who can reach this port can use the model",
                  file=sys.stderr)
        app = build_app(tokenizer, model, device, args)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"Serving {args.model_path} on http://{shown}:{args.port}  (page /, API /v1/completions, /api/generate)",
              file=sys.stderr)
        protocol = guarded_protocol(connection_cap(args.max_connections), args.read_timeout)
        logging.getLogger("asyncio").addFilter(_OneLineAcceptErrors())
        uvicorn.Server(uvicorn.Config(app, http=protocol, backlog=ACCEPT_BATCH, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
