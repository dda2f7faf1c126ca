"""web_demo.py (and web_api.py behind it) over real HTTP on 127.0.0.1: the OpenAI and JSON APIs, limits, the openai client, and the page in Chromium."""

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import engine as E
import generate as G
import web_api as A
import web_demo as W

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(max_prompt_tokens=100, max_tokens_cap=64, max_sequences=4, max_body_bytes=4096)
KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2_dir):
    return tiny_gpt2_dir


@pytest.fixture(scope="module")
def loaded(model_dir):
    return G.load_model(model_dir, device="cpu")


class Server:
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(loaded, model_dir):
    s = Server(W.build_app(*loaded, W.WebDemoArguments(model_path=str(model_dir), **LIMITS)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(loaded, model_dir):
    """API only, with an API key and a one-request queue."""
    s = Server(W.build_app(*loaded, W.WebDemoArguments(model_path=str(model_dir), api_key=KEY, queue_size=1, **LIMITS), page=False))
    yield s
    s.stop()


# Environment proxies must not see requests to our own loopback server.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(server, path, body=None, headers=None, raw=None, timeout=60):
    """(status, parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _opener.open(req, timeout=timeout) as r:
            status, text, ctype = r.status, r.read().decode(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read().decode(), e.headers.get("content-type", "")
    return status, (json.loads(text) if ctype.startswith("application/json") else text)


def sse_events(text):
    events = [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ----------------------------------------------------------------------------- OpenAI API


def test_models(server):
    status, body = call(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["final_model"]
    assert call(server, "/v1/models/final_model")[0] == 200
    assert call(server, "/v1/models/gpt-4")[0] == 404


def test_completion_is_generate_py_output(server, loaded):
    status, body = call(server, "/v1/completions", {"model": "final_model", "prompt": "Hello there", "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "final_model"
    (choice,) = body["choices"]
    (expected,) = G.generate(*loaded, "Hello there", max_new_tokens=8, temperature=0, top_k=0, top_p=1.0)
    assert choice["text"] == expected.completion and choice["index"] == 0
    assert choice["finish_reason"] == ("length" if expected.finish_reason == "length" else "stop")
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": expected.completion_tokens, "total_tokens": 2 + expected.completion_tokens}


def test_stream_matches_plain_and_seed_reproduces(server):
    req = {"prompt": "Once upon a time", "max_tokens": 20, "seed": 7, "top_k": 40}
    _, plain = call(server, "/v1/completions", req)
    _, again = call(server, "/v1/completions", req)
    assert plain["choices"][0]["text"] == again["choices"][0]["text"]  # same seed, same text
    status, text = call(server, "/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = sse_events(text)
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    pieces = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["finish_reason"] is None]
    assert len(pieces) > 1 and "".join(pieces) == plain["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_several_prompts_and_sequences(server):
    status, body = call(server, "/v1/completions", {"prompt": ["A", "B c"], "n": 2, "max_tokens": 4, "seed": 1, "echo": True})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"][0] for c in body["choices"]] == ["A", "A", "B", "B"]  # prompt-major, prompt echoed
    assert body["usage"]["prompt_tokens"] == 3  # each prompt counted once, not once per sequence


# ----------------------------------------------------------------------------- log-probabilities (issue 17)


def reference_logprobs(model, ids):
    """The model's own log_softmax at each position of `ids` (T, V), in fp32."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]


def check_scores(logprobs, ids, ref, tokenizer, top_n, first=0):
    """`logprobs` (OpenAI's object) holds tokens ids[first:] scored as `ref` (log_softmax over ids) says."""
    import torch

    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids[first:]]
    for j, (t, lp, top) in enumerate(zip(ids[first:], logprobs["token_logprobs"], logprobs["top_logprobs"]), start=first):
        if j == 0:
            assert lp is None and top is None
            continue
        assert abs(lp - ref[j - 1, t].item()) < 1e-4, (j, lp, ref[j - 1, t].item())
        vals, idx = torch.topk(ref[j - 1, : len(tokenizer)], top_n)
        # The top_n most likely tokens, then the chosen one when it is not among them; two ids that read the
        # same (pieces of one UTF-8 character read "\ufffd") are one entry, the likelier.
        expected = {}
        for i, v in [*zip(idx.tolist(), vals.tolist()), (t, ref[j - 1, t].item())][: top_n + (t not in idx.tolist())]:
            expected.setdefault(tokenizer.decode([i]), v)
        assert list(top) == list(expected) and all(abs(top[k] - v) < 1e-4 for k, v in expected.items())
        if t == idx[0].item():  # lm-eval's is_greedy compares the two as floats
            assert lp == max(top.values())


def test_echo_with_max_tokens_0_scores_the_prompt(server, loaded):
    tokenizer, model, _ = loaded
    prompt = "The quick brown fox jumps over the lazy dog."
    status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5})
    assert status == 200, body
    (choice,) = body["choices"]
    ids = tokenizer.encode(prompt)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    check_scores(choice["logprobs"], ids, reference_logprobs(model, ids), tokenizer, 5)
    offsets = choice["logprobs"]["text_offset"]  # each token's text starts where the text has it
    assert [prompt[a:b] for a, b in zip(offsets, offsets[1:] + [len(prompt)])] == choice["logprobs"]["tokens"]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # Without logprobs, max_tokens 0 with echo gives the prompt back and computes nothing more.
    _, plain = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True})
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("echo", [False, True])
def test_generated_tokens_logprobs_are_the_models_not_the_samplers(server, loaded, echo):
    # Temperature, top-k and the repetition penalty choose the tokens; the logprobs reported are the model's own.
    tokenizer, model, _ = loaded
    prompt, settings = "Once upon a time", dict(max_tokens=10, seed=3, temperature=0.7, top_k=40, repetition_penalty=1.3)
    status, body = call(server, "/v1/completions", {"prompt": prompt, "logprobs": 2, "echo": echo, **settings})
    assert status == 200, body
    (choice,) = body["choices"]
    (c,) = G.generate(*loaded, prompt, max_new_tokens=10, seed=3, temperature=0.7, top_k=40, top_p=1.0, repetition_penalty=1.3)
    assert choice["text"] == (prompt if echo else "") + c.completion
    ids = c.prompt_ids + c.completion_ids + ([tokenizer.eos_token_id] if c.finish_reason == "eos" else [])
    first = 0 if echo else len(c.prompt_ids)
    check_scores(choice["logprobs"], ids, reference_logprobs(model, ids), tokenizer, 2, first)
    (scored,) = G.score(tokenizer, model, "cpu", [ids], 2)  # the library's scoring pass gives the same numbers
    assert choice["logprobs"]["token_logprobs"] == scored.logprobs[first:]
    offsets = choice["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(choice["text"])
    if echo:
        assert offsets[: len(c.prompt_ids)] == [0, 4, 9, 11]  # "Once", " upon", " a", " time"
        assert offsets[len(c.prompt_ids)] == len(prompt)


def test_batched_prompts_as_text_and_as_token_ids(server, loaded):
    tokenizer, model, _ = loaded
    texts = ["Hello world, this is a test", "A", "The cat sat on the mat"]
    ids = [tokenizer.encode(t) for t in texts]
    req = {"max_tokens": 0, "echo": True, "logprobs": 1}
    status, by_text = call(server, "/v1/completions", {"prompt": texts, **req})
    assert status == 200, by_text
    status, by_ids = call(server, "/v1/completions", {"prompt": ids, **req})
    assert status == 200, by_ids
    assert [c["index"] for c in by_ids["choices"]] == [0, 1, 2]
    for i, (t, row) in enumerate(zip(texts, ids)):
        a, b = by_text["choices"][i], by_ids["choices"][i]
        assert a["text"] == b["text"] == t
        check_scores(a["logprobs"], row, reference_logprobs(model, row), tokenizer, 1)
        for key in ("tokens", "token_logprobs", "text_offset"):  # padded in one batch or not, the same numbers
            assert a["logprobs"][key] == b["logprobs"][key] or key == "token_logprobs" and all(
                x is y is None or abs(x - y) < 1e-5 for x, y in zip(a["logprobs"][key], b["logprobs"][key]))
    assert by_text["usage"]["prompt_tokens"] == sum(map(len, ids))
    # One list of ints is one prompt of token ids.
    status, one = call(server, "/v1/completions", {"prompt": ids[2], **req})
    assert status == 200 and len(one["choices"]) == 1 and one["choices"][0]["logprobs"]["tokens"] == by_ids["choices"][2]["logprobs"]["tokens"]
    # Text and token ids mixed in one list, as OpenAI (and the docs' example) take them.
    status, mixed = call(server, "/v1/completions", {"prompt": [texts[0], ids[2]], **req})
    assert status == 200, mixed
    assert [c["logprobs"]["tokens"] for c in mixed["choices"]] == [by_ids["choices"][i]["logprobs"]["tokens"] for i in (0, 2)]


def test_lm_evaluation_harness_local_completions_request(server, loaded):
    # What lm-eval 0.4.13's `local-completions` sends for loglikelihood (LocalCompletionsAPI._create_payload,
    # generate=False, tokenized requests) and how it reads the answer (parse_logprobs): echo, one generated
    # token that it drops ([ctxlen:-1]), is_greedy from top_logprobs.
    tokenizer, model, _ = loaded
    pairs = [("The capital of France is", " Paris"), ("Two plus two equals", " four or five"), ("Hello", " world")]
    contexts = [tokenizer.encode(c) for c, _ in pairs]
    inputs = [c + tokenizer.encode(x) for c, (_, x) in zip(contexts, pairs)]
    payload = {"model": "final_model", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    status, body = call(server, "/v1/completions", payload)
    assert status == 200, body
    expected = []
    for inp, ctx in zip(inputs, contexts):
        ref = reference_logprobs(model, inp)
        cont = range(len(ctx), len(inp))
        expected.append((sum(ref[j - 1, inp[j]].item() for j in cont),
                         all(ref[j - 1, : len(tokenizer)].argmax().item() == inp[j] for j in cont)))
    for choice, inp in zip(body["choices"], inputs):
        assert len(choice["logprobs"]["token_logprobs"]) == len(inp) + 1  # the prompt's tokens, then the generated one
    lm_eval = pytest.importorskip("lm_eval.models.openai_completions")
    got = lm_eval.LocalCompletionsAPI.parse_logprobs(outputs=body, tokens=inputs, ctxlens=[len(c) for c in contexts])
    assert [g for _, g in got] == [g for _, g in expected]
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(got, expected))
    # A greedy continuation is recognised as greedy: top_logprobs and token_logprobs hold the same float.
    (c,) = G.generate(*loaded, [contexts[0]], max_new_tokens=3, temperature=0, top_k=0, top_p=1.0)
    greedy = contexts[0] + c.completion_ids
    _, body = call(server, "/v1/completions", {**payload, "prompt": [greedy]})
    [(_, is_greedy)] = lm_eval.LocalCompletionsAPI.parse_logprobs(outputs=body, tokens=[greedy], ctxlens=[len(contexts[0])])
    assert is_greedy


def test_quantized_int8_model_scores_through_the_api(model_dir, tmp_path):
    import torch

    import quantize as Q

    tokenizer, model, _ = G.load_model(model_dir, device="cpu")
    folder = Q.save_quantized(Q.quantize_model(model, "int8"), tokenizer, tmp_path / "final_model-int8", source_dir=model_dir)
    loaded = G.load_model(folder, device="cpu")
    s = Server(W.build_app(*loaded, W.WebDemoArguments(model_path=str(folder), **LIMITS), page=False))
    try:
        prompts = ["It was the best of times, it was the worst of times", "Call me Ishmael."]
        status, body = call(s, "/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 3})
        assert status == 200, body
        own = Q.load_quantized(folder)  # quantize's own model, not the server's object
        for choice, p in zip(body["choices"], prompts):
            ids = tokenizer.encode(p)
            check_scores(choice["logprobs"], ids, reference_logprobs(own, ids), tokenizer, 3)
        fp32 = reference_logprobs(G.load_model(model_dir, device="cpu")[1], tokenizer.encode(prompts[0]))
        assert not torch.equal(fp32, reference_logprobs(own, tokenizer.encode(prompts[0])))  # it is the int8 model that was scored
    finally:
        s.stop()


def test_scoring_counts_the_prompt_against_the_context(loaded):
    tokenizer = loaded[0]
    limits = A.Limits(A.WebDemoArguments(max_prompt_tokens=1000), tokenizer, 128)
    settings = dict(n=1, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, names={"max_new_tokens": "max_tokens"}, scoring=True)
    assert limits.generate_kwargs([list(range(128))], 0, **settings)["max_new_tokens"] == 0
    with pytest.raises(A.RequestError, match="has 129 tokens and max_tokens=0: together more than the model's context of 128"):
        limits.generate_kwargs([list(range(129))], 0, **settings)
    with pytest.raises(A.RequestError, match="context of 128"):
        limits.generate_kwargs([list(range(128))], 1, **settings)  # lm-eval's max_tokens 1: one token must fit after the prompt
    with pytest.raises(ValueError, match="more than the model's context of 128"):
        G.score(*loaded, [list(range(129))])


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be a positive integer"),
        ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens must be at most 64"),
        ({"prompt": "x", "n": 5}, 400, "at most 4"),
        ({"prompt": ["a", "b", "c"], "n": 2}, 400, "6 sequences"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty must be from 0.001 to 1000"),
        ({"prompt": "x", "temperature": float("nan")}, 400, "temperature must be a finite number"),
        ({"prompt": "x", "seed": -1}, 400, "seed must be an integer"),
        ({"prompt": "x", "stop": list("abcde")}, 400, "at most 4 strings"),
        ({"prompt": " word" * 101}, 400, "has 101 tokens; this server accepts at most 100"),
        ({"prompt": " word" * 70, "max_tokens": 64}, 400, "context of 128 tokens"),
        ({"prompt": []}, 400, "empty list"),
        ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
        ({"prompt": "x", "logprobs": 6}, 400, "logprobs must be an integer from 0 to 5, got 6"),
        ({"prompt": "x", "logprobs": -1}, 400, "logprobs must be an integer from 0 to 5"),
        ({"prompt": "x", "logprobs": 1, "stream": True}, 400, "stream: true does not carry logprobs"),
        ({"prompt": "x", "max_tokens": 0, "echo": True, "stream": True}, 400, "stream: true does not carry logprobs or max_tokens 0"),
        ({"prompt": " word" * 101, "max_tokens": 0, "echo": True, "logprobs": 1}, 400, "has 101 tokens; this server accepts at most 100"),
        ({"prompt": [[1, 2], [3, 50257]], "max_tokens": 0, "echo": True}, 400, "prompt 1 is a list of token ids, which must be integers from 0 to 50256"),
        ({"prompt": [1, -2], "max_tokens": 0, "echo": True}, 400, "the prompt is a list of token ids"),
        ({"prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens must be a positive integer"),
        ({"prompt": "x", "max_token": 5}, 422, "unknown parameter 'max_token'"),
        ({"prompt": 5}, 422, "prompt"),
        ({"prompt": "x", "n": "many"}, 422, "n: "),
        # One 65 KB stop string held the only worker for a minute: each is capped (--max_stop_chars).
        ({"prompt": "x", "stop": "y" * 257}, 400, "the stop string has 257 characters; this server accepts at most 256"),
        ({"prompt": "x", "stop": ["a", "y" * 300]}, 400, "stop string 1 has 300 characters"),
        # A lone surrogate is valid JSON but not Unicode: the tokenizer raised TypeError, a 500.
        ({"prompt": "\ud800"}, 400, "the prompt contains a lone surrogate (U+D800) at character 0"),
        ({"prompt": ["ok", "a\udfff"]}, 400, "prompt 1 contains a lone surrogate (U+DFFF) at character 1"),
        ({"prompt": "x", "stop": "\ud800"}, 400, "the stop string contains a lone surrogate"),
        ({"prompt": "x", "stop": ["a", "\udc00b"]}, 400, "stop string 1 contains a lone surrogate"),
        # pydantic reads true as 1: it asked for one token, silently.
        ({"prompt": "x", "max_tokens": True}, 422, "max_tokens: Value error, expected a number, got true"),
        ({"prompt": "x", "temperature": False}, 422, "temperature: Value error, expected a number, got false"),
    ],
)
def test_bad_parameters_get_4xx_with_a_message(server, body, status, words):
    got, answer = call(server, "/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_invalid_json_and_body_size_cap(server):
    status, answer = call(server, "/v1/completions", raw=b"{not json")
    assert status == 422 and "not valid JSON" in answer["error"]["message"]
    # A lone surrogate as JSON's escape or as UTF-8 bytes (json.loads accepts both), in both APIs.
    for path, raw in (("/v1/completions", b'{"prompt": "\xed\xa0\x80"}'), ("/api/generate", b'{"prompt": "a\\ud800"}'),
                      ("/api/generate", b'{"prompt": "a", "stop": ["\\udfff"]}')):
        status, answer = call(server, path, raw=raw)
        assert status == 400 and "lone surrogate" in answer["error"]["message"], (path, raw, answer)
    # A body that is not a JSON object, or JSON sent as `curl -d` labels it (a form): say what to send.
    for raw, headers in ((b"null", {}), (b"[1, 2]", {}), (b"", {}),
                         (b'{"prompt": "x"}', {"Content-Type": "application/x-www-form-urlencoded"})):
        status, answer = call(server, "/v1/completions", raw=raw, headers=headers)
        assert status == 422 and "must be a JSON object, sent with 'Content-Type: application/json'" in answer["error"]["message"], (raw, answer)
    status, answer = call(server, "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "4096 bytes" in answer["error"]["message"]
    # A chunked body declares no length: it is counted as it arrives.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"x" * 5000, b'"}']), encode_chunked=True,
                  headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and "4096 bytes" in json.loads(response.read())["error"]["message"]
    conn.close()


def test_twenty_concurrent_requests(server):
    def one(seed):
        return call(server, "/v1/completions", {"prompt": f"Request {seed}", "max_tokens": 12, "seed": seed, "stream": seed % 2 == 0})

    start = time.time()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert [status for status, _ in results] == [200] * 20
    for seed, (_, answer) in enumerate(results):
        text = "".join(e["choices"][0]["text"] for e in sse_events(answer) if e["choices"]) if seed % 2 == 0 else answer["choices"][0]["text"]
        assert text
    assert time.time() - start < 60


def test_concurrent_requests_share_a_batch_and_answer_as_alone(server, monkeypatch):
    # Eight requests with their own settings (greedy, top-k, top-p, temperature, penalties, stop strings,
    # lengths, n, seeds) sent together share one batch (joining it as it runs), and each gets the answer it
    # gets alone.
    bodies = [{"prompt": f"Request {i} says", "max_tokens": 5 + 4 * i, "seed": i, "temperature": [0, 0.7, 1.0, 1.3][i % 4],
               "top_k": [0, 5, 40, 0][i % 4], "top_p": [1.0, 1.0, 0.9, 0.8][i % 4], "n": 1 + (i == 5),
               "repetition_penalty": 1.3 if i % 3 == 1 else 1.0, "no_repeat_ngram_size": 2 if i == 6 else 0,
               "stop": ["e"] if i % 3 == 0 else None, "stream": i % 2 == 1} for i in range(8)]

    def texts(answer, body):
        if body["stream"]:
            choices = {}
            for event in sse_events(answer):
                for c in event["choices"]:
                    choices[c["index"]] = choices.get(c["index"], "") + c["text"]
            return [choices[i] for i in sorted(choices)]
        return [c["text"] for c in answer["choices"]]

    alone = [texts(call(server, "/v1/completions", b)[1], b) for b in bodies]
    sizes, joined, real = [], [], E.generate_many

    def recording(tokenizer, model, device, jobs, *args, admit=None, **kwargs):
        sizes.append(len(jobs))
        if len(sizes) == 1:
            time.sleep(0.5)  # the first batch holds the worker while the other requests arrive

        def counted(*limits):
            new = admit(*limits)
            joined.extend([len(new)] if new else [])
            return new

        return real(tokenizer, model, device, jobs, *args, admit=counted, **kwargs)

    monkeypatch.setattr(E, "generate_many", recording)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: call(server, "/v1/completions", b), bodies))
    assert [status for status, _ in together] == [200] * 8
    assert [texts(answer, b) for (_, answer), b in zip(together, bodies)] == alone
    # the first request starts alone; the others join its batch as their prompts fit, or start the next one
    assert sum(sizes) + sum(joined) == 8 and len(sizes) <= 2, (sizes, joined)


# ----------------------------------------------------------------------------- JSON API


def test_api_generate(server):
    req = {"prompt": "Hi", "max_new_tokens": 6, "num_return_sequences": 2, "seed": 3}
    status, body = call(server, "/api/generate", req)
    assert status == 200 and len(body["completions"]) == 2
    first = body["completions"][0]
    assert first["text"] == first["prompt"] + first["completion"] and first["finish_reason"] in ("eos", "stop", "length")
    status, text = call(server, "/api/generate", {**req, "stream": True})
    events = sse_events(text)
    assert events[-1] == body
    for row in (0, 1):
        assert "".join(e["text"] for e in events[:-1] if e["index"] == row) == body["completions"][row]["completion"]
    status, answer = call(server, "/api/generate", {"prompt": "x", "max_new_tokens": 0})
    assert status == 400 and answer["error"]["param"] == "max_new_tokens"


# ----------------------------------------------------------------------------- API key and queue


def test_api_key(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer "}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        status, answer = call(keyed, "/v1/models", headers=headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", headers
    assert call(keyed, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 401
    # The scheme is case-insensitive (RFC 9110); spacing around the key does not matter.
    for value in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY}", f"Bearer\t{KEY}", f"  Bearer {KEY}  "):
        assert call(keyed, "/v1/models", headers={"Authorization": value})[0] == 200, repr(value)


def test_the_schema_sits_behind_the_key(loaded, model_dir):
    s = Server(W.build_app(*loaded, W.WebDemoArguments(model_path=str(model_dir), api_key=KEY, **LIMITS)))  # with the page
    try:
        for path in ("/api/openapi.json", "/api/docs"):
            assert call(s, path)[0] == 401, path
        status, schema = call(s, "/api/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and "/v1/completions" in schema["paths"]
        assert call(s, "/api/docs", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        status, answer = call(s, "/openapi.json")  # the page's own schema is not served at all
        assert status == 404 and "paths" not in str(answer), answer
    finally:
        s.stop()


def test_a_body_that_does_not_arrive_gets_408_and_the_connection_closed(loaded, model_dir):
    s = Server(W.build_app(*loaded, W.WebDemoArguments(model_path=str(model_dir), read_timeout=0.5, **LIMITS), page=False))
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\"")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in answer, answer
        assert time.monotonic() - start < 5
        assert call(s, "/v1/models")[0] == 200  # and the server serves on
    finally:
        s.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="open-file limits as Linux sets them")
def test_stalled_connections_cannot_starve_the_server(model_dir, tmp_path):
    """1,100 connections that send a request line and one header, then nothing, against a server limited to 1,024
    open files: a new request is still answered within 5 s, the stalled ones are closed after --read_timeout, and
    the log holds one line per connection closed, no traceback."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1500:
        pytest.skip(f"this test opens 1,100 sockets; the open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 4096, hard))
    port, log = _free_port(), tmp_path / "server.log"

    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "web_demo.py", "--model_path", str(model_dir), "--port", str(port),
                                   "--read_timeout", "4"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=limit_files, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    stalled = []
    try:
        deadline = time.monotonic() + 180
        while b"Serving" not in log.read_bytes():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        start = time.monotonic()
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            stalled.append(sock)
            try:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass  # closed already, to make room
        opened = time.monotonic() - start
        target = type("Target", (), {"url": f"http://127.0.0.1:{port}"})
        asked = time.monotonic()
        status, body = call(target, "/v1/models", timeout=5)
        assert status == 200 and time.monotonic() - asked < 5, (status, body)
        # Every stalled connection is closed by the server (made room for, or timed out) within --read_timeout + 5 s.
        open_still = []
        for i, sock in enumerate(stalled):
            sock.settimeout(max(0.1, start + opened + 4 + 5 - time.monotonic()))
            try:
                if sock.recv(1) != b"":
                    open_still.append((i, "answered"))
            except ConnectionResetError:
                pass
            except socket.timeout:
                open_still.append((i, round(time.monotonic() - start, 1)))
        assert not open_still, (open_still, opened)
        assert server.poll() is None
    finally:
        for sock in stalled:
            sock.close()
        server.terminate()
        server.wait(timeout=30)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    text = log.read_text()
    assert log.stat().st_size < 1_000_000 and "Traceback" not in text and "Too many open files" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "closed the connection from" in line or "refused a connection" in line]
    assert len(lines) == 1100, len(lines)


@pytest.fixture
def served(monkeypatch):
    """main() up to serving: the host and port of each socket it would listen on; serving returns at once."""
    import uvicorn

    calls = []
    monkeypatch.setattr(W, "listen", lambda host, port: calls.append({"host": host, "port": port}) or contextlib.nullcontext("socket"))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: calls.append({"sockets": sockets}))
    monkeypatch.delenv(W.API_KEY_ENV, raising=False)
    return calls


@pytest.mark.parametrize("argv, env", [(["--api_key", ""], {}), (["--api_key", "  "], {}), ([], {W.API_KEY_ENV: ""})])
def test_empty_api_key_is_an_error_at_start_up(model_dir, monkeypatch, capsys, served, argv, env):
    # `--api_key "$KEY"` with KEY unset left the page and generation open while the API still asked for a key.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert W.main(["--model_path", str(model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is empty" in err and "give a key" in err and not served, err
    args = W.WebDemoArguments(model_path=str(model_dir), api_key=argv[1] if argv else None)
    with pytest.raises(ValueError, match="is empty"):  # the library refuses it too
        W.build_app(*G.load_model(model_dir, device="cpu"), args, page=False)


def test_key_that_no_header_can_carry_is_an_error(model_dir, capsys, served):
    for key in (" s3cret", "s3cret\n", "clé"):
        assert W.main(["--model_path", str(model_dir), "--api_key", key]) == 2
        assert "printable ASCII" in capsys.readouterr().err and not served


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("192.168.1.5", None, True), ("0.0.0.0", KEY, False),
                                               ("127.0.0.2", None, False), ("localhost", None, False), ("::1", None, False)])
def test_network_host_without_key_warns(model_dir, monkeypatch, capsys, served, host, key, warned):
    monkeypatch.setattr(W, "build_app", lambda *a, **k: None)  # the page is not what this test is about
    assert W.main(["--model_path", str(model_dir), "--host", host] + (["--api_key", key] if key else [])) == 0
    assert served == [{"host": host, "port": 7860}, {"sockets": ["socket"]}]
    assert ("warning: serving on" in capsys.readouterr().err) == warned


def test_port_in_use_is_an_error_before_the_model_loads(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(W, "load_model", lambda *a, **k: pytest.fail("loaded the model although the port is taken"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert W.main(["--model_path", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is in use (another server?): stop it, or pass another --port.\n", err
    with W.listen("127.0.0.1", port) as sock:  # free again: the socket uvicorn serves on
        assert sock.getsockname() == ("127.0.0.1", port)


def test_full_queue_answers_503(keyed):
    def one(_):
        return call(keyed, "/v1/completions", {"prompt": "x", "max_tokens": 60}, headers={"Authorization": f"Bearer {KEY}"})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    assert all("busy" in a["error"]["message"] for s, a in results if s == 503)


# ----------------------------------------------------------------------------- the openai client


def test_openai_client(server, keyed):
    import httpx
    import openai

    def client(s, key):
        return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, http_client=httpx.Client(trust_env=False))

    c = client(server, "unused")
    assert [m.id for m in c.models.list()] == ["final_model"]
    plain = c.completions.create(model="final_model", prompt="The cat", max_tokens=10, seed=5)
    assert plain.choices[0].text and plain.usage.completion_tokens >= 1
    pieces = [chunk.choices[0].text for chunk in c.completions.create(model="final_model", prompt="The cat", max_tokens=10, seed=5, stream=True) if chunk.choices]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at most 64"):
        c.completions.create(model="final_model", prompt="x", max_tokens=500)
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "wrong").models.list()
    assert client(keyed, KEY).completions.create(model="m", prompt="x", max_tokens=2).choices


def paced(monkeypatch, delay=0.02, pieces=None):
    """Slow the tiny model down to a real one's pace; returns how each request the worker decoded ended
    ("done", or "cancelled" when its client went away), in order.

    `pieces`, when given, collects every piece handed on to the server, as it is sampled.
    """
    real_generate_many, ended = E.generate_many, []

    def paced_generate_many(tokenizer, model, device, jobs, *args, admit=None, **kwargs):
        requests, done = [], set()

        def hook(r):
            i = len(requests)
            requests.append(r)

            # The tiny model samples a token in about a millisecond: pace the pieces so that a
            # client visibly receives them one by one, and has time to go away mid-generation.
            def slow(row, piece, on_text=r.on_text):
                time.sleep(delay)
                on_text(row, piece)
                if pieces is not None:
                    pieces.append(piece)

            def finished(out, on_done=r.on_done):
                done.add(i)
                ended.append("done")
                on_done(out)

            r.on_text, r.on_done = slow, finished
            return r

        def hooked_admit(*limits):  # requests that join the running batch are paced too
            return [hook(r) for r in admit(*limits)]

        for job in jobs:
            hook(job.request)
        result = real_generate_many(tokenizer, model, device, jobs, *args, admit=hooked_admit if admit else None, **kwargs)
        ended.extend("cancelled" for i in range(len(requests)) if i not in done)
        return result

    monkeypatch.setattr(E, "generate_many", paced_generate_many)  # where the Engine looks it up
    return ended


def test_disconnect_stops_generation(server, monkeypatch):
    ended = paced(monkeypatch)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 64, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.read(6) == b"data: "
    conn.close()  # after the first piece, long before the 64th
    deadline = time.time() + 10
    while not ended and time.time() < deadline:
        time.sleep(0.05)
    assert ended == ["cancelled"]
    assert call(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200  # the worker serves on


def wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "x", "max_tokens": 64, "seed": 0}),
                                        ("/api/generate", {"prompt": "x", "max_new_tokens": 64, "top_k": 0, "seed": 0})])
def test_non_streaming_disconnect_stops_generation(server, monkeypatch, path, body):
    # A client answered in one piece that went away kept the model busy to its last token (52 s in the issue).
    _, answer = call(server, path, body)
    full = answer["usage"]["completion_tokens"] if "usage" in answer else answer["completions"][0]["completion_tokens"]
    assert full == 64  # uninterrupted, this seed runs to max_tokens: an early end below is the disconnect's doing
    pieces = []
    ended = paced(monkeypatch, delay=0.05, pieces=pieces)  # 64 tokens: 3.2 s
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    assert wait_for(lambda: pieces), "generation did not start"
    conn.close()
    assert wait_for(lambda: ended)
    assert ended == ["cancelled"] and len(pieces) < 20, (ended, len(pieces))
    assert call(server, path, {**body, "seed": 1})[0] == 200  # the worker serves on


def test_many_disconnected_clients_do_not_stall_the_server(server, monkeypatch):
    # 24 clients queue a long request each (some streamed) and go away: none may hold the model, queued or running.
    pieces = []
    ended = paced(monkeypatch, delay=0.05, pieces=pieces)
    conns = []
    for i in range(24):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions" if i % 2 else "/api/generate", headers={"Content-Type": "application/json"},
                     body=json.dumps({"prompt": "x", "max_tokens" if i % 2 else "max_new_tokens": 64, "stream": i % 3 == 0}))
        conns.append(conn)
    assert wait_for(lambda: pieces), "generation did not start"
    time.sleep(0.5)  # every request is read and queued behind the first
    for conn in conns:
        conn.close()
    start = time.time()
    assert call(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    assert time.time() - start < 10  # before the fix: 24 generations of 3.2 s each, 77 s
    assert "done" not in ended[:-1] and len(pieces) < 100, (ended, len(pieces))


def test_a_client_gone_from_the_queue_frees_its_place(keyed, monkeypatch):
    # The queue holds one request. A client that queued one and went away kept that place (503 for
    # everyone else) until the running generation ended; now its place is free at once.
    pieces = []
    ended = paced(monkeypatch, delay=0.05, pieces=pieces)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(call, keyed, "/v1/completions", {"prompt": "x", "max_tokens": 64, "seed": 0}, headers)  # 3.2 s
        assert wait_for(lambda: pieces), "generation did not start"
        gone = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=30)
        # A prompt too long to join the running batch yet (its columns): it waits in the queue.
        gone.request("POST", "/v1/completions", body=json.dumps({"prompt": "word " * 60, "max_tokens": 64}), headers=headers)
        time.sleep(0.3)  # queued behind the running one
        gone.close()
        time.sleep(0.3)
        status, answer = call(keyed, "/v1/completions", {"prompt": "x", "max_tokens": 4}, headers)
        assert status == 200, answer  # queued in the freed place while the first still ran, then served
        assert running.result()[0] == 200
    assert ended == ["done", "done"]  # the gone client's job never ran


# ----------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit:
        W.parse_args(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_path", "--host", "--port", "--api_key", "--max_prompt_tokens", "--max_tokens_cap", "--max_sequences",
                 "--max_stop_chars", "--max_body_bytes", "--queue_size", "--max_connections", "--read_timeout"):
        assert flag in out
    for flags, message in ((["--max_connections", "0"], "--max_connections must be a positive integer, got 0"),
                           (["--read_timeout", "nan"], "--read_timeout must be a positive number of seconds, got nan"),
                           (["--read_timeout", "0"], "--read_timeout must be a positive number of seconds, got 0.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            W.check_args(W.parse_args(flags))


def test_cli_import_is_light_and_bad_model_path_is_a_clear_error(tmp_path):
    # One fresh process for both: importing serves nothing and loads no web framework, and a
    # missing model is a one-line error, not a traceback.
    code = "import sys, web_demo; assert not {'gradio', 'fastapi', 'uvicorn'} & set(sys.modules); sys.exit(web_demo.main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "--model_path", str(tmp_path / "missing")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr, out.stderr


# ----------------------------------------------------------------------------- the page in Chromium


def test_page_streams_in_headless_chromium(server, monkeypatch):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not _has_playwright():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs Debian's chromium and requirements.txt playwright")
        pytest.skip("no chromium binary (apt-get install chromium) or no playwright package")
    from playwright.sync_api import sync_playwright

    paced(monkeypatch)
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()

            def only_local(route):
                # No internet: the page must not need a CDN, web fonts or analytics.
                if route.request.url.startswith(server.url + "/"):
                    return route.continue_()
                outside.append(route.request.url)
                route.abort()

            page.route("**/*", only_local)
            page.goto(server.url + "/")
            page.get_by_label("Prompt").fill("Hello world")
            page.get_by_role("button", name="Generate").click()
            output = page.locator("#output textarea")
            seen, quiet_since = [], time.time()
            deadline = time.time() + 30
            while time.time() < deadline and (len(seen) < 2 or time.time() - quiet_since < 1.0):
                value = output.input_value()
                if not seen or value != seen[-1]:
                    seen.append(value)
                    quiet_since = time.time()
                time.sleep(0.01)
        finally:
            browser.close()
    grown = [v for v in seen if v.startswith("Hello world") and len(v) > len("Hello world")]
    assert len(grown) >= 3, seen  # text arrived in several pieces, not all at once
    assert all(b.startswith(a) for a, b in zip(grown, grown[1:]))
    assert outside == []


def _has_playwright():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def test_same_seed_same_text_from_generate_once_the_cli_and_the_api(server, loaded, model_dir):
    prompt, settings = "Once upon a time", dict(top_k=50, top_p=0.95, temperature=1.0)
    status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "seed": 5, **settings})
    assert status == 200
    api = body["choices"][0]["text"]
    assert G.generate_once(*loaded, prompt, 12, seed=5, **settings) == prompt + api
    cli = subprocess.run([sys.executable, str(Path(G.__file__)), "--model_path", str(model_dir), "--prompt", prompt, "--length", "12",
                          "--seed", "5", "--json"], capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["completion"] == api


# ----------------------------------------------------------------------------- lm-evaluation-harness through the API


def _harness(model, model_args, harness_tasks):
    """lm_eval.simple_evaluate on the local tasks (tests/conftest.py), with every document's log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    include, names = harness_tasks
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, log_samples=True, verbosity="ERROR",
                                  task_manager=TaskManager(include_path=str(include)), batch_size=4)
    lls = {task: [[r[0] for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
           for task, samples in out["samples"].items()}
    return out["results"], lls


def _assert_same_scores(api, reference):
    (api_results, api_lls), (ref_results, ref_lls) = api, reference
    for task, metric in (("local_mc", "acc,none"), ("local_mc", "acc_norm,none"), ("local_lastword", "acc,none")):
        assert api_results[task][metric] == ref_results[task][metric], (task, metric)
    for task in ref_lls:
        np_api, np_ref = (sum(x, []) for x in (api_lls[task], ref_lls[task]))
        assert len(np_api) == len(np_ref) and max(abs(a - b) for a, b in zip(np_api, np_ref)) < 1e-3, task
    assert api_results["local_lastword"]["perplexity,none"] == pytest.approx(ref_results["local_lastword"]["perplexity,none"],
                                                                          rel=1e-3)


def _api_args(server, folder, context):
    return (f"model=final_model,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={folder},"
            f"max_length={context},num_concurrent=1,max_retries=1,tokenized_requests=True")


def test_harness_through_the_api_equals_the_hf_model(loaded, model_dir, harness_tasks):
    """lm-eval's local-completions against our server scores exactly as its `hf` model on the same folder."""
    server = Server(W.build_app(*loaded, W.WebDemoArguments(model_path=str(model_dir), max_prompt_tokens=128), page=False))
    try:
        api = _harness("local-completions", _api_args(server, model_dir, 128), harness_tasks)
    finally:
        server.stop()
    _assert_same_scores(api, _harness("hf", f"pretrained={model_dir},device=cpu", harness_tasks))


def test_harness_through_the_api_on_an_int8_folder_equals_our_loader(model_dir, harness_tasks, tmp_path):
    """The same for quantize.py's int8 folder: through the API, and as an HFLM around quantize's own loader."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    import quantize as Q

    subprocess.run([sys.executable, "quantize.py", "--model_path", str(model_dir), "--mode", "int8", "--out", str(tmp_path / "int8")],
                   cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True)
    int8 = G.load_model(tmp_path / "int8", device="cpu")
    server = Server(W.build_app(*int8, W.WebDemoArguments(model_path=str(tmp_path / "int8"), max_prompt_tokens=128), page=False))
    try:
        api = _harness("local-completions", _api_args(server, tmp_path / "int8", 128), harness_tasks)
    finally:
        server.stop()
    model = Q.load_quantized(tmp_path / "int8")
    _assert_same_scores(api, _harness(HFLM(pretrained=model, tokenizer=int8[0], batch_size=4), None, harness_tasks))
