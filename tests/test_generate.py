"""generate.py: API, sampling semantics, edge cases and the CLI, on a tiny random GPT-2."""

import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import decode
import generate as G
import sampling
from model import ModelError

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def model_dir(tiny_gpt2_dir):
    return tiny_gpt2_dir


@pytest.fixture(scope="session")
def loaded(model_dir):
    return G.load_model(model_dir, device="cpu")


def greedy(loaded, prompt, n=12, **kw):
    tok, model, dev = loaded
    return G.generate(tok, model, dev, prompt, max_new_tokens=n, temperature=0, **kw)


# ----------------------------------------------------------------------------- API


def test_signatures_are_kept():
    once = inspect.signature(G.generate_once).parameters
    assert list(once)[:8] == ["tokenizer", "model", "device", "prompt", "max_new_tokens", "top_k", "top_p", "temperature"]
    assert [once[k].default for k in ("max_new_tokens", "top_k", "top_p", "temperature")] == [50, 50, 0.95, 1.0]
    batch = inspect.signature(G.generate_batch).parameters
    assert list(batch)[:7] == ["tokenizer", "model", "device", "prompt", "max_length", "num_return_sequences", "top_p"]
    assert [batch[k].default for k in ("max_length", "num_return_sequences", "top_p")] == [100, 3, 0.9]


def test_return_types(loaded):
    tok, model, dev = loaded
    assert dev == CPU and not model.training
    once = G.generate_once(tok, model, dev, "Hello there", max_new_tokens=5)
    assert isinstance(once, str) and once.startswith("Hello there")
    # generate_batch returns what the original's text-generation pipeline returned: {"generated_text": ...} dicts
    batch = G.generate_batch(tok, model, dev, "Hello there", max_length=10)
    assert isinstance(batch, list) and len(batch) == 3
    assert all(list(o) == ["generated_text"] and o["generated_text"].startswith("Hello there") for o in batch)
    many = G.generate_batch(tok, model, dev, ["a", "b c"], max_new_tokens=3, num_return_sequences=2)
    assert [[o["generated_text"][0] for o in per_prompt] for per_prompt in many] == [["a", "a"], ["b", "b"]]  # one list per prompt


def test_matches_hf_greedy(loaded):
    tok, model, dev = loaded
    ids = tok("The quick brown fox", return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=15, do_sample=False, pad_token_id=tok.eos_token_id)
    expected = tok.decode(ref[0, ids.input_ids.shape[1] :])
    if tok.eos_token in expected:  # we stop at EOS; HF pads after it
        expected = expected[: expected.index(tok.eos_token)]
    assert greedy(loaded, "The quick brown fox", 15)[0].completion == expected


def test_seed_reproducible_and_greedy_deterministic(loaded):
    tok, model, dev = loaded
    a = G.generate_once(tok, model, dev, "Once", max_new_tokens=20, seed=123)
    b = G.generate_once(tok, model, dev, "Once", max_new_tokens=20, seed=123)
    c = G.generate_once(tok, model, dev, "Once", max_new_tokens=20, seed=124)
    assert a == b and a != c
    assert G.generate_batch(tok, model, dev, "Once", max_length=12, seed=5) == G.generate_batch(tok, model, dev, "Once", max_length=12, seed=5)
    assert greedy(loaded, "Once") == greedy(loaded, "Once")


def test_left_padded_batch_equals_single_prompt_greedy(loaded):
    tok, model, dev = loaded
    prompts = ["Hi", "Once upon a time there was", "The"]
    batch = G.generate_batch(tok, model, dev, prompts, num_return_sequences=1, max_new_tokens=12, temperature=0)
    assert [o["generated_text"] for (o,) in batch] == [G.generate_once(tok, model, dev, p, max_new_tokens=12, temperature=0) for p in prompts]


def test_penalties_match_hf_generate(loaded):
    # repetition_penalty and no_repeat_ngram_size have HF's semantics: greedy text equals model.generate's
    tok, model, dev = loaded
    enc = tok("The quick brown fox", return_tensors="pt")
    for kw in (dict(repetition_penalty=1.8), dict(no_repeat_ngram_size=2), dict(repetition_penalty=0.7, no_repeat_ngram_size=3)):
        ref = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id, **kw)
        expected = tok.decode(ref[0, enc.input_ids.shape[1] :]).split(tok.eos_token)[0]
        assert greedy(loaded, "The quick brown fox", 20, **kw)[0].completion == expected, kw


def test_sampling_settings_take_effect(loaded):
    tok, model, dev = loaded
    plain = greedy(loaded, "Hi", 30)[0]
    penalized = greedy(loaded, "Hi", 30, repetition_penalty=3.0)[0]
    repeats = [len(ids) - len(set(ids)) for ids in (tok.encode(plain.completion), tok.encode(penalized.completion))]
    assert repeats[1] < repeats[0], repeats  # a repetition penalty lowers repeats
    # top_k=1 is greedy whatever the seed and temperature
    assert [G.generate(tok, model, dev, "Hi", 10, top_k=1, temperature=1.5, seed=s)[0].completion for s in (0, 1)] == [greedy(loaded, "Hi", 10)[0].completion] * 2

    def distinct_first_tokens(**kw):
        return len({G.generate(tok, model, dev, "Hi", 1, top_k=0, seed=s, **kw)[0].completion for s in range(40)})

    # a hotter temperature spreads the samples, a tighter top_p concentrates them (the random model's
    # logits are nearly flat: std ~0.2, so "cold" needs a small temperature)
    assert distinct_first_tokens(temperature=0.01) < distinct_first_tokens(temperature=1.0)
    assert distinct_first_tokens(top_p=0.001) < distinct_first_tokens(top_p=1.0)


def test_a_model_the_fast_path_cannot_run_is_sampled_with_model_generate(loaded, monkeypatch):
    # decode.unsupported names it; generate() then runs model.generate, never the fast forward
    tok, model, dev = loaded
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    half = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, reorder_and_upcast_attn=True)).to(torch.bfloat16).eval()
    assert decode.unsupported(half)
    monkeypatch.setattr(decode, "FastGPT2", lambda *a, **k: pytest.fail("the fast forward ran on a model it does not implement"))
    enc = tok("The quick brown fox", return_tensors="pt")
    ref = half.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    expected = tok.decode(ref[0, enc.input_ids.shape[1] :]).split(tok.eos_token)[0]
    with pytest.warns(UserWarning, match="model.generate"):
        (c,) = G.generate(tok, half, dev, "The quick brown fox", max_new_tokens=12, temperature=0)
    assert c.completion == expected and c.completion_tokens == len(tok.encode(expected)) or c.finish_reason == "eos"
    with pytest.warns(UserWarning):
        a = G.generate(tok, half, dev, ["x", "y z"], max_new_tokens=6, seed=4, num_return_sequences=2)
    with pytest.warns(UserWarning):
        b = G.generate(tok, half, dev, ["x", "y z"], max_new_tokens=6, seed=4, num_return_sequences=2)
    assert [c.completion for c in a] == [c.completion for c in b] and [c.prompt for c in a] == ["x", "x", "y z", "y z"]
    if len(expected) > 4:
        stop = expected[2:4]
        with pytest.warns(UserWarning):
            (s,) = G.generate(tok, half, dev, "The quick brown fox", max_new_tokens=12, temperature=0, stop=stop)
        assert s.completion == expected[: expected.find(stop)] and s.finish_reason == "stop"


def test_stop_strings_cut_and_stream_never_shows_them(loaded):
    tok, model, dev = loaded
    full = greedy(loaded, "Hello", 20)[0].completion
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    (c,) = greedy(loaded, "Hello", 20, stop=[stop, "never-appears"])
    assert c.completion == expected and c.finish_reason == "stop"
    assert G.generate_once(tok, model, dev, "Hello", max_new_tokens=20, temperature=0, stop=stop) == "Hello" + expected
    assert "".join(G.stream(tok, model, dev, "Hello", max_new_tokens=20, temperature=0, stop=stop)) == expected


def _naive_stop(text, stops):
    """The first stop string's start and the held-back tail, by brute force (what _StopMatcher must equal)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return cut, hold


def test_stop_matcher_equals_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        matcher, text = sampling.StopMatcher(stops), ""
        while len(text) < 40:
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
            text += piece
            cut, hold = _naive_stop(text, stops)
            assert matcher.feed(piece) == cut, (stops, text)
            if cut is not None:
                break
            assert matcher.pending() == hold, (stops, text)


def test_a_long_stop_string_costs_no_more_than_new_text(loaded):
    # Each token used to test every prefix of every stop string against the text: quadratic in the stop
    # string's length (one 65 KB stop string held the web demo's only worker for a minute).
    import time

    tok, model, dev = loaded
    kw = dict(max_new_tokens=40, temperature=0)
    G.generate(tok, model, dev, "Hello", **kw)  # warm-up
    t0 = time.perf_counter()
    (plain,) = G.generate(tok, model, dev, "Hello", stop=["zz"], **kw)
    short = time.perf_counter() - t0
    long_stop = plain.completion[-5:] + "q" * 65536  # shares a prefix with the text, so matching does work
    t0 = time.perf_counter()
    (c,) = G.generate(tok, model, dev, "Hello", stop=[long_stop], **kw)
    long = time.perf_counter() - t0
    assert c.completion == plain.completion and c.finish_reason == plain.finish_reason
    assert long < 5 * short + 1.0, (long, short)


def test_stream_equals_generate(loaded):
    tok, model, dev = loaded
    pieces = list(G.stream(tok, model, dev, "Hi", max_new_tokens=15, seed=3))
    assert len(pieces) > 1
    assert "Hi" + "".join(pieces) == G.generate_once(tok, model, dev, "Hi", max_new_tokens=15, seed=3)


def test_stops_at_eos_and_strips_it(loaded, monkeypatch):
    tok, model, dev = loaded
    real, calls = sampling.sample_top, []

    def eos_on_third_step_for_row0(*a):
        token = real(*a)
        calls.append(1)
        if len(calls) == 3:
            token[0] = tok.eos_token_id
        return token

    monkeypatch.setattr(sampling, "sample_top", eos_on_third_step_for_row0)
    a, b = G.generate(tok, model, dev, ["Hi", "Hello"], max_new_tokens=8, temperature=0)
    assert (a.finish_reason, a.completion_tokens) == ("eos", 2) and tok.eos_token not in a.completion
    assert (b.finish_reason, b.completion_tokens) == ("length", 8)


def test_long_prompt_keeps_last_tokens_with_warning(loaded):
    tok, model, dev = loaded
    prompt = " ".join(f"w{i}" for i in range(200))  # well over the 128-token context
    with pytest.warns(UserWarning, match="keeping its last 118 tokens"):
        (c,) = G.generate(tok, model, dev, prompt, max_new_tokens=10, temperature=0)
    assert c.prompt_tokens == 118 and c.completion_tokens == 10
    tail = tok.decode(tok.encode(prompt)[-118:])
    assert c.completion == greedy(loaded, tail, 10)[0].completion


def test_empty_prompt_starts_from_endoftext(loaded):
    tok, model, dev = loaded
    # no_repeat_ngram_size=1 bans the prompt's tokens: a random tied-embedding model would echo EOS.
    (c,) = greedy(loaded, "", 10, no_repeat_ngram_size=1)
    assert c.prompt == "" and c.prompt_tokens == 1 and c.completion_tokens == 10
    assert c.completion == greedy(loaded, "<|endoftext|>", 10, no_repeat_ngram_size=1)[0].completion
    assert G.generate_once(tok, model, dev, "", 10, temperature=0, no_repeat_ngram_size=1) == c.completion


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_new_tokens=128), "context"),
])
def test_bad_arguments_raise(loaded, kw, match):
    tok, model, dev = loaded
    with pytest.raises(ValueError, match=match):
        G.generate_once(tok, model, dev, "Hi", **kw)


def test_bad_paths_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        G.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        G.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        G.load_model(tmp_path)


def test_checkpoint_folder_without_tokenizer(model_dir, tmp_path, loaded):
    from transformers import GPT2LMHeadModel

    ckpt = tmp_path / "checkpoint-5"
    GPT2LMHeadModel.from_pretrained(model_dir).save_pretrained(ckpt)
    assert not (ckpt / "tokenizer.json").exists()
    tok, model, dev = G.load_model(ckpt)
    assert len(tok) == 50257 and tok.pad_token == tok.eos_token
    assert G.generate_once(tok, model, dev, "Hi", 8, temperature=0) == G.generate_once(*loaded, "Hi", 8, temperature=0)


def test_tokenizer_name_replaces_the_folders_tokenizer(model_dir, tmp_path, small_bpe_folder):
    from model import ModelError, get_model

    tok, model, _ = G.load_model(model_dir, tokenizer_name=str(small_bpe_folder))
    assert len(tok) == 300 and model.get_input_embeddings().num_embeddings == 50257
    with pytest.raises(ModelError, match=f"could not load the tokenizer '{tmp_path / 'none'}' for {model_dir}"):
        G.load_model(model_dir, tokenizer_name=str(tmp_path / "none"))
    small = tmp_path / "small"  # a model of 300 tokens with its own tokenizer, named with GPT-2's 50257-token one
    shutil.copytree(small_bpe_folder, small)
    get_model(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=300, bos_token_id=0, eos_token_id=0,
              verbose=False).save_pretrained(small)
    assert len(G.load_model(small)[0]) == 300
    with pytest.raises(ModelError, match=f"{small} with the tokenizer {model_dir}: the tokenizer has 50257 tokens but the model only 300"):
        G.load_model(small, tokenizer_name=str(model_dir))


def test_weights_changed_in_place_are_picked_up(model_dir):
    tok, model, dev = G.load_model(model_dir)
    before = G.generate_once(tok, model, dev, "Hi", 8, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an optimizer step also updates in place
    after = G.generate_once(tok, model, dev, "Hi", 8, temperature=0)
    ids = model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert after != before and after == tok.decode(ids[0], skip_special_tokens=True)


def test_no_pad_or_attention_mask_warnings(model_dir, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok, model, dev = G.load_model(model_dir)
        G.generate_once(tok, model, dev, "Hi", max_new_tokens=5)
        G.generate_batch(tok, model, dev, ["Hi", "Hello there"], max_length=12)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + [capfd.readouterr().err]
    assert not [m for m in messages if "pad" in m.lower() or "attention mask" in m.lower() or "attention_mask" in m]


# ----------------------------------------------------------------------------- CLI


def run_cli(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_help_lists_every_flag():
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in ("--model_path", "--prompt", "--prompt_file", "--length", "--num_return_sequences", "--top_k", "--top_p",
                 "--temperature", "--repetition_penalty", "--no_repeat_ngram_size", "--seed", "--stop", "--stream", "--json", "--device", "--threads"):
        assert flag in out.stdout


def test_cli_json_prompt_file_and_seed(model_dir, loaded, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n\n{"text": "The end"}\nplain line\n')
    out = run_cli("--model_path", str(model_dir), "--prompt_file", str(prompts), "--length", "6", "--seed", "7", "--json",
                  "--num_return_sequences", "2")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "Hello", "The end", "The end", "plain line", "plain line"]
    assert set(records[0]) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}
    same_seed = G.generate(*loaded, "Hello", max_new_tokens=6, seed=7, num_return_sequences=2)
    assert [r["completion"] for r in records[:2]] == [c.completion for c in same_seed]
    assert [r["completion_tokens"] for r in records[:2]] == [c.completion_tokens for c in same_seed]


def test_cli_stdin_and_plain_output(model_dir):
    out = run_cli("--model_path", str(model_dir), "--length", "5", "--temperature", "0", stdin="Hi\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == G.generate_once(*G.load_model(model_dir), "Hi", 5, temperature=0).strip()
    assert out.stderr == ""


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    assert G.main(["--model_path", str(model_dir), "--prompt", "x", "--top_p", "1.5"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: top_p") and err.count("\n") == 1
    assert G.main(["--model_path", str(tmp_path / "missing"), "--prompt", "x"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: model folder") and "missing" in err and err.count("\n") == 1


def test_cli_stream_prints_the_same_text(model_dir, loaded, capsys):
    assert G.main(["--model_path", str(model_dir), "--prompt", "Hi", "--length", "8", "--seed", "2", "--stream"]) == 0
    assert capsys.readouterr().out == G.generate_once(*loaded, "Hi", 8, seed=2) + "\n"


def _hidden(fast, tok, text):
    ids = torch.tensor([tok.encode(text)])
    return fast.hidden(ids, torch.arange(ids.shape[1])[None], fast.new_cache(1, ids.shape[1]), 0)[0]


def test_lm_head_is_exact_unless_bf16_is_asked_for(loaded):
    # fp32 on every CPU, native bf16 or not (with the int8 screen where the int8 kernel passed its
    # self-test); bf16 only when asked for, and asking again for the default rebuilds the exact head.
    tok, model, dev = loaded
    fast = decode.FastGPT2(model)
    assert fast.lm_head_dtype == torch.float32
    assert (fast.screen is not None) == decode.quantize.kernel_ok("int8")
    assert decode.fast_forward(model, len(tok), torch.bfloat16).lm_head_dtype == torch.bfloat16
    assert decode.fast_forward(model, len(tok)).lm_head_dtype == torch.float32
    with pytest.raises(ValueError, match="lm_head_dtype must be one of fp32, bf16"):
        G.generate(tok, model, dev, "Hi", 2, lm_head_dtype="int3")


EXACT_PROMPTS = ["The quick brown fox", "In 1905, Einstein", "import numpy as np\n", "She said that the"]


def test_greedy_and_seeded_top_k_equal_transformers_fp32(loaded):
    # An fp32 model samples what its fp32 forward gives, on this CPU's own kernels: greedy equals
    # transformers' greedy token for token, and seeded top-k equals the same generator replayed over
    # transformers' full fp32 logits. (With the bf16 LM head, the default on native-bf16 CPUs before,
    # greedy differed within a few tokens here.)
    from sampling import sample_top

    tok, model, dev = loaded
    eos = tok.eos_token_id
    with torch.inference_mode():
        for seed, prompt in enumerate(EXACT_PROMPTS):
            ids = tok.encode(prompt)
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False, pad_token_id=eos)[0, len(ids):].tolist()
            ref = ref[: ref.index(eos)] if eos in ref else ref
            assert greedy(loaded, prompt, 30)[0].completion_ids == ref, prompt
            generator, seq = torch.Generator().manual_seed(seed), list(ids)
            for _ in range(30):
                vals, idx = torch.topk(model(torch.tensor([seq])).logits[0, -1].float(), 40)
                token = int(sample_top(vals[None], idx[None], 1.0, 1.0, generator))
                if token == eos:
                    break
                seq.append(token)
            ours = G.generate(tok, model, dev, prompt, 30, top_k=40, top_p=1.0, seed=seed)[0].completion_ids
            assert ours == seq[len(ids):], prompt


def test_exact_on_the_avx2_kernels_too():
    # The same test on torch's AVX2 kernels (what AVX2-only CPUs run), in a process started with them.
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        pytest.skip("this CPU runs the AVX2 kernels already: the test above covered them")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    test = f"{Path(__file__)}::test_greedy_and_seeded_top_k_equal_transformers_fp32"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


BATCHED = [
    dict(prompts=["The cat", "A"], max_new_tokens=3, num_return_sequences=2, top_k=40, seed=0, stop="e"),
    dict(prompts="Once upon a time", max_new_tokens=15, temperature=0),
    dict(prompts=[[464, 3290], "x"], max_new_tokens=10, top_k=0, top_p=0.8, temperature=1.3, seed=2, repetition_penalty=1.3,
         no_repeat_ngram_size=2),
]


def test_calls_decoded_together_equal_each_alone(loaded, monkeypatch):
    # engine.py's batches: calls with their own settings, seeds, lengths and stop strings share one
    # batch, each answered as if alone; once half the rows have ended they leave the batch (CPU).
    tok, model, dev = loaded
    alone = [G.generate(tok, model, dev, **c) for c in BATCHED]
    kept, real_keep = [], decode.Steps.keep
    monkeypatch.setattr(decode.Steps, "keep", lambda self, rows: (kept.append(rows.tolist()), real_keep(self, rows))[1])
    done = []
    jobs = [G.prepare(tok, model, dev, **c) for c in BATCHED]
    for i, job in enumerate(jobs):
        job.request.on_done = lambda out, i=i: done.append(i)
    assert G.generate_many(tok, model, dev, jobs) == alone
    # the first call's 4 rows leave after 3 steps, the third's 2 after 10; each call is answered when it ends
    assert kept == [[4, 5, 6], [0]] and done == [0, 2, 1]


def test_calls_that_join_a_running_batch_equal_each_alone(loaded):
    # engine.py's waiting requests join a running batch between steps, where their prompts fit.
    tok, model, dev = loaded
    alone = [G.generate(tok, model, dev, **c) for c in BATCHED]
    waiting = [G.prepare(tok, model, dev, **c) for c in (BATCHED[0], BATCHED[2])]
    answers, asked = {}, []
    for i, job in zip((0, 2), waiting):
        job.request.on_done = lambda out, i=i, job=job: answers.__setitem__(i, job.completions(out))

    def admit(columns, rows, room):
        asked.append((columns, rows, room))
        return [waiting.pop(0).request] if len(asked) in (2, 6) else []

    (first,) = G.generate_many(tok, model, dev, [G.prepare(tok, model, dev, **BATCHED[1])], admit=admit)
    assert first == alone[1] and answers == {0: alone[0], 2: alone[2]}
    P = len(tok.encode(BATCHED[1]["prompts"]))
    assert asked[0] == (P + 1, 1, model.config.n_positions - P - 1) and asked[2][1] == 5  # 1 row, then 1 + 4


def test_a_cancelled_call_leaves_the_batch_and_the_others_go_on(loaded):
    tok, model, dev = loaded
    alone = G.generate(tok, model, dev, **BATCHED[1])
    jobs = [G.prepare(tok, model, dev, **BATCHED[1]), G.prepare(tok, model, dev, "Gone", 15, temperature=0)]
    pieces, done = [], []
    jobs[1].request.on_text = lambda row, piece: pieces.append(piece)
    jobs[1].request.cancelled = lambda: len(pieces) >= 3
    jobs[1].request.on_done = done.append
    first, second = G.generate_many(tok, model, dev, jobs)
    assert first == alone and not done
    assert {c.finish_reason for c in second} == {"cancelled"} and len(second[0].completion_ids) == 3


def test_bf16_lm_head_is_fp32_within_bf16_rounding(loaded):
    # What the bf16 path promises, forced so that it runs on every CPU.
    tok, model, dev = loaded
    fp32, bf16 = decode.FastGPT2(model, lm_head_dtype=torch.float32), decode.FastGPT2(model, lm_head_dtype=torch.bfloat16)
    assert bf16.screen is None
    with torch.inference_mode():
        h = _hidden(fp32, tok, "The quick brown fox jumps over the lazy dog")
        exact, approx = fp32.logits(h), bf16.logits(h)
        assert approx.dtype == torch.float32
        bound = (h.abs().sum(-1, keepdim=True) * model.lm_head.weight.abs().amax()) * 2**-7  # bf16 inputs, fp32 sums
        assert ((approx - exact).abs() <= bound).all()
        vals, idx = bf16.top_logits(h, 5)
        assert torch.equal(vals, torch.topk(approx, 5).values)


@pytest.fixture
def fp32_head(loaded, monkeypatch):
    """generate.py's sampler on the fp32 LM head with the int8 screen, the path of CPUs without native bf16."""
    tok, model, dev = loaded
    if not decode.quantize.kernel_ok("int8"):
        pytest.skip("PyTorch's int8 kernel failed its self-test on this CPU: no screen to test")
    fast = decode.FastGPT2(model, lm_head_dtype=torch.float32)
    monkeypatch.setitem(decode._FAST, model, fast)
    return fast


def test_int8_screened_top_logits_equal_the_exact_top_k(loaded, fp32_head):
    tok, model, dev = loaded
    fast = fp32_head
    assert fast.screen is not None
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog, and then")])
    with torch.inference_mode():
        h = _hidden(fast, tok, "The quick brown fox jumps over the lazy dog, and then")
        seen = torch.zeros(h.shape[0], model.config.vocab_size, dtype=torch.bool)
        seen[:, ids[0]] = True
        banned = torch.zeros_like(seen)
        banned[:, 11] = True

        def adjust(z, at):
            z = torch.where(seen if at is None else seen.gather(1, at), torch.where(z > 0, z / 1.3, z * 1.3), z)
            return z.masked_fill(banned if at is None else banned.gather(1, at), float("-inf"))

        for k in (1, 50):
            for fn in (None, adjust):
                vals, idx = fast.top_logits(h, k, fn)
                full = fast.logits(h) if fn is None else fn(fast.logits(h), None)
                want_vals, want_idx = torch.topk(full, k)
                assert torch.equal(idx.sort(-1).values, want_idx.sort(-1).values)
                torch.testing.assert_close(vals, want_vals, rtol=1e-5, atol=1e-5)


def test_screen_does_not_change_sampled_text(loaded, fp32_head, monkeypatch):
    tok, model, dev = loaded
    kw = dict(max_new_tokens=20, seed=3, top_k=50, top_p=0.9, repetition_penalty=1.2)
    with_screen = G.generate(tok, model, dev, ["Once upon", "a time"], **kw)
    monkeypatch.setattr(fp32_head, "screen", None)
    without = G.generate(tok, model, dev, ["Once upon", "a time"], **kw)
    assert [c.completion for c in with_screen] == [c.completion for c in without]


# ----------------------------------------------------------------------------- bad input: one line, never a traceback


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--repetition_penalty", "nan"), ("--top_p", "nan"),
                                        ("--temperature", "inf"), ("--repetition_penalty", "inf")])
def test_non_finite_sampling_numbers_are_refused(loaded, model_dir, flag, value, capsys):
    # NaN passes every comparison, so `temperature < 0` let it through (and it sampled garbage or crashed)
    assert G.main(["--model_path", str(model_dir), "--prompt", "x", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[2:]} must be") and err.count("\n") == 1
    with pytest.raises(ValueError, match=flag[2:]):
        G.generate(*loaded, "x", max_new_tokens=2, **{flag[2:]: float(value)})


def _cli_with_stdin(model_dir, data: bytes, *args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model_path", str(model_dir), "--length", "2", *args],
                          input=data, capture_output=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def test_binary_prompts_are_named_not_a_traceback(model_dir, tmp_path, capsys):
    binary = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256))
    out = _cli_with_stdin(model_dir, binary)
    assert out.returncode == 2 and out.stderr.decode().startswith("error: stdin holds NUL bytes"), out.stderr
    assert out.stderr.decode().count("\n") == 1
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("first\ncaf\xe9\n".encode("latin-1"))
    assert G.main(["--model_path", str(model_dir), "--prompt_file", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: prompt file {latin1} is not UTF-8 text (byte 0xe9 on line 2)") and err.count("\n") == 1
    assert G.main(["--model_path", str(model_dir), "--prompt_file", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    bad_json = tmp_path / "p.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n')
    assert G.main(["--model_path", str(model_dir), "--prompt_file", str(bad_json)]) == 2
    assert f"{bad_json}, line 2: looks like JSON" in capsys.readouterr().err


def test_utf8_bom_on_stdin_is_not_part_of_the_prompt(model_dir, loaded):
    out = _cli_with_stdin(model_dir, "\ufeffHello\n".encode(), "--temperature", "0", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == "Hello"


@pytest.mark.parametrize("kind", ["garbage weights", "truncated weights", "bad config json", "wrong config type",
                                  "weights of a shallower model", "weights of a narrower model", "refused pickle",
                                  "corrupt tokenizer", "tokenizer larger than the vocabulary"])
def test_broken_model_folders_are_one_line_errors(broken_model_folder, kind, capsys):
    folder, named = broken_model_folder(kind)
    with pytest.raises(ModelError, match=re.escape(str(named))):
        G.load_model(folder)
    assert G.main(["--model_path", str(folder), "--prompt", "x", "--length", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {named}"), err
    if kind == "refused pickle":
        assert "could run code" in err[0]


@pytest.mark.parametrize("args,message", [
    (["--device", "banana"], "error: device 'banana' is not a device"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "error: device cuda"),
    (["--seed", str(10**30)], "error: seed must be an integer"),
    (["--threads", "-1"], "error: threads must be an integer >= 0"),
])
def test_cli_bad_device_seed_threads_are_one_line(model_dir, args, message, capsys):
    assert G.main(["--model_path", str(model_dir), "--prompt", "x", "--length", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_prompts_that_are_not_text_are_refused(loaded, model_dir):
    with pytest.raises(ValueError, match="lone surrogate"):  # was a TypeError from inside the tokenizer
        G.generate_once(*loaded, "a\ud800b", 3)
    out = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model_path", str(model_dir), "--prompt", b"caf\xe9"],
                         capture_output=True, cwd=ROOT, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and out.stderr.decode().startswith("error: --prompt is not UTF-8 text"), out.stderr


def test_a_reader_that_goes_away_is_not_a_traceback(model_dir, tmp_path):
    # `python generate.py ... | head -1`: the pipe closes while completions are still printed
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n" * 100)
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--model_path", str(model_dir), "--prompt_file", str(prompts),
                             "--length", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=240) == 141 and "Traceback" not in stderr and "Broken pipe" not in stderr, stderr


@pytest.mark.parametrize("kw", [dict(temperature=1e-320), dict(top_p=1e-320), dict(top_k=0, top_p=1e-320), dict(top_k=0, temperature=1e-320)])
def test_vanishing_temperature_or_top_p_is_greedy_not_a_crash(loaded, kw):
    # 1e-320 is 0 in float32: dividing by it gave inf/NaN probabilities, and top_p masked every token
    tok, model, dev = loaded
    (c,) = G.generate(tok, model, dev, "Once upon", max_new_tokens=8, seed=0, **kw)
    assert c.completion == greedy(loaded, "Once upon", 8)[0].completion


def test_huge_temperature_samples(loaded):
    tok, model, dev = loaded
    for top_k in (0, 50):
        (c,) = G.generate(tok, model, dev, "Once upon", max_new_tokens=8, seed=0, top_k=top_k, temperature=1e300)
        assert c.completion_tokens == 8


def test_extreme_repetition_penalty_is_refused(loaded):
    for value in (1e-320, 1e-4, 1e4, 1e300):
        with pytest.raises(ValueError, match="repetition_penalty must be from 0.001 to 1000"):
            G.generate(*loaded, "x", max_new_tokens=2, repetition_penalty=value)
    G.generate(*loaded, "x", max_new_tokens=2, repetition_penalty=1e3)


def test_token_id_prompts_and_completion_ids(loaded):
    tok, model, dev = loaded
    ids = tok.encode("Once upon a time")
    (by_text,), (by_ids,) = (G.generate(tok, model, dev, [p], max_new_tokens=10, seed=2) for p in ("Once upon a time", ids))
    assert by_ids.prompt == "Once upon a time" and by_ids.completion == by_text.completion
    assert by_ids.completion_ids and tok.decode(by_ids.completion_ids) == by_ids.completion
    with pytest.raises(ValueError, match="token ids must hold integers from 0 to 50256"):
        G.generate(tok, model, dev, [[1, 50257]], max_new_tokens=2)
    with pytest.raises(ValueError, match="wrap it in a list"):
        G.generate(tok, model, dev, ids, max_new_tokens=2)


# ----------------------------------------------------------------------------- a tokenizer other than GPT-2's


@pytest.fixture(scope="module")
def padded(small_bpe_folder):
    """(tokenizer, model): the 300-token BPE (EOS id 0) and a tiny model whose vocabulary is padded to 320, as train.py
    pads it, with HUGE logits on the 20 padding rows: any path that computes them picks an id the tokenizer lacks."""
    from gpt2_tokenizer import load_tokenizer
    from model import get_model

    tok = load_tokenizer(small_bpe_folder)
    assert len(tok) == 300 and tok.eos_token_id == 0
    torch.manual_seed(0)
    model = get_model(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=320, dropout=0.0,  # 300 padded to 64s
                      bos_token_id=0, eos_token_id=0, verbose=False).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(3.0)  # final hidden states ~3 + noise in every dimension ...
        model.lm_head.weight[len(tok):] = 2.0  # ... so the padding rows' logits are ~400, the tokenizer's ~0
        model.lm_head.weight[0] = -1.0  # and EOS (id 0) ~-200: never picked here (test_generation_stops_at_the_tokenizers_eos)
    return tok, model


def _padded_cases(tok, model):
    n = len(tok)
    for top_k, top_p, temperature in ((50, 0.95, 0), (50, 0.95, 1.0), (5, 1.0, 0.8), (0, 1.0, 1.0), (0, 0.9, 1.5)):
        kw = dict(top_k=top_k, top_p=top_p, temperature=temperature, max_new_tokens=20, seed=1, num_return_sequences=2)
        for extra in ({}, dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
            out = G.generate(tok, model, CPU, ["The", "def f(x):"], **kw, **extra)
            ids = [t for c in out for t in c.completion_ids]
            assert ids and max(ids) < n, (kw, extra)
            assert all(c.finish_reason == "length" for c in out)


def test_padding_rows_are_never_sampled_or_picked(padded):
    tok, model = padded
    _padded_cases(tok, model)
    assert decode.fast_forward(model, len(tok)).vocab == len(tok)


def test_padding_rows_are_never_sampled_or_picked_by_the_model_generate_fallback(padded, monkeypatch):
    tok, model = padded
    monkeypatch.setattr(decode, "unsupported", lambda m: "a test says so")
    monkeypatch.setattr(decode, "FastGPT2", lambda *a, **k: pytest.fail("the fast forward ran"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sampling with model.generate"
        _padded_cases(tok, model)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_padding_rows_of_a_quantized_model_are_never_picked(padded, mode):
    import copy

    tok, model = padded
    q = decode.quantize.quantize_model(copy.deepcopy(model), mode, group_size=32)
    for kw in (dict(temperature=0), dict(top_k=5), dict(top_k=0)):
        out = G.generate(tok, q, CPU, ["The", "def f(x):"], max_new_tokens=10, seed=0, **kw)
        assert max(t for c in out for t in c.completion_ids) < len(tok), kw


def test_generation_stops_at_the_tokenizers_eos(padded, monkeypatch):
    import copy

    tok, model = padded
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight[0] = 1.0  # EOS (id 0) now leads the tokenizer's ids by far (logit ~200), padding still above
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(decode, "unsupported", lambda m: "a test says so")
        for kw in (dict(temperature=0), dict(top_k=5), dict(top_k=0)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                (c,) = G.generate(tok, model, CPU, "The", max_new_tokens=10, seed=0, **kw)
            assert (c.finish_reason, c.completion, c.completion_tokens) == ("eos", "", 0), (fallback, kw)


def test_token_id_prompts_stay_within_the_tokenizer(padded):
    tok, model = padded
    with pytest.raises(ValueError, match="token ids must hold integers from 0 to 299"):
        G.generate(tok, model, CPU, [[1, 305]], max_new_tokens=2)
    (c,) = G.generate(tok, model, CPU, [[1, 299]], max_new_tokens=2, temperature=0)
    assert c.prompt_tokens == 2


def test_score_is_the_models_own_log_softmax(padded):
    # Log-probabilities normalize over every output row, as training's loss and perplexity (and lm-eval's
    # `hf` model) do, padding rows included; the alternatives offered are only ids the tokenizer has.
    tok, model = padded
    prompts = ["The", "def f(x):\n    return x", [5, 6, 7, 8, 9, 10, 11]]
    scored = G.score(tok, model, CPU, prompts, top_n=3)  # one right-padded batch
    for p, s, alone in zip(prompts, scored, G.score(tok, model, CPU, prompts, top_n=3, batch_size=1)):
        assert s.ids == (tok.encode(p) if isinstance(p, str) else p) and s.logprobs[0] is None and s.top[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([s.ids])).logits.float(), -1)[0]
        for t in range(1, len(s.ids)):
            assert abs(s.logprobs[t] - ref[t - 1, s.ids[t]].item()) < 1e-4
            vals, idx = torch.topk(ref[t - 1, : len(tok)], 3)  # not the padding rows, whose logits are the largest here
            assert [i for i, _ in s.top[t]] == idx.tolist() and all(abs(v - w) < 1e-4 for (_, v), w in zip(s.top[t], vals.tolist()))
        assert all(a is b is None or abs(a - b) < 1e-4 for a, b in zip(s.logprobs, alone.logprobs))  # padding changes nothing (~400 logits: float32 rounding)
    assert G.score(tok, model, CPU, [""])[0].ids == [tok.eos_token_id]  # an empty prompt is EOS, as in generate
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        G.score(tok, model, CPU, [list(range(65))])
    with pytest.raises(ValueError, match="token ids must hold integers from 0 to 299"):
        G.score(tok, model, CPU, [[1, 305]])
    (c,) = G.generate(tok, model, CPU, [[1, 2, 3]], max_new_tokens=2, temperature=0)
    assert c.prompt_ids == [1, 2, 3]
