"""export_gguf.py: GGUF files that transformers and llama.cpp (llama-cpp-python) load and run like the source model."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA

WEBTEXT = SHARED_DATA / "gpt2-output" / "webtext.test.head30.jsonl"
BUILTIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. It was not amused, and said so at some length.",
    "In 1998, the city council voted 7 to 2 to rebuild the old bridge; work began the following spring.",
    "Researchers say the new battery stores twice the energy of today's cells while charging in minutes.",
]
PROMPTS = ["The meaning of life is", "ROMEO:", "Once upon a time, in a land far away,", "def main():\n    ", "1, 2, 3,"]
STRINGS = [
    "Hello world", " leading space", "trailing space ", "two  spaces", "   three leading", "tabs\tand\ttabs",
    "new\nline", "\n\n\nnewlines\n", "mixed \n \n\n  end", "I've been told he's there, 'RE you sure? We'Ve a'lL",
    "3 33 333 3333 3.3 3..3", "naïve café – déjà vu", "нещо на Български", "我想在apple工作1314151天～",
    "🚀 (normal) 😶\u200d🌫️ 🦙🦙", "<|endoftext|>", "a<|endoftext|>b", "end.<|endoftext|>\n\nStart again",
    "!!!!!!?????? ......\"\"\"\"``````", "x = [1, 2]  # comment\n\tprint(x)\n",
]


def webtext_sentences(n=3, chars=300):
    if WEBTEXT.is_file():
        lines = WEBTEXT.read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["text"][:chars] for line in lines[:n]]
    return BUILTIN_TEXT[:n]


@pytest.fixture(scope="module")
def llama_cpp_module(tiny_gpt2_dir, exported):
    """llama_cpp, or a skip saying why it cannot run here: it cannot be imported, or it crashes on this CPU.
    pip builds llama-cpp-python for the CPU it builds on and caches the wheel, so a wheel built on an AVX-512
    machine dies of SIGILL on an AVX2-only one; a child process finds that out without killing pytest."""
    import subprocess
    import sys

    try:
        import llama_cpp
    except Exception as e:  # ImportError, or its shared library failing to load
        pytest.skip(f"llama_cpp (llama-cpp-python) cannot be imported: {type(e).__name__}: {e}")
    probe = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, verbose=False); "
             "llm.eval([1, 2, 3]); print(llm.n_vocab())")
    child = subprocess.run([sys.executable, "-c", probe, str(exported(tiny_gpt2_dir, "f32"))], capture_output=True, text=True,
                           timeout=120)
    if child.returncode < 0:
        pytest.skip(f"llama-cpp-python dies of signal {-child.returncode} on this CPU: its wheel was built for another "
                    "machine. Rebuild it here: pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36")
    assert child.returncode == 0 and child.stdout.strip() == "50257", child.stderr[-2000:]
    return llama_cpp


def save_model(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def padded_gpt2_dir(tmp_path_factory, tokenizer):
    """A random 2-layer GPT-2 with GPT-2's BPE and train.py's padded vocabulary: 50257 tokens -> 50304 rows."""
    from model import get_model, padded_vocab_size

    torch.manual_seed(1)
    model = get_model(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=padded_vocab_size(len(tokenizer)), verbose=False)
    assert model.config.vocab_size == 50304
    return save_model(tmp_path_factory.mktemp("padded") / "final_model", model, tokenizer)


@pytest.fixture(scope="module")
def own_tok_dir(tmp_path_factory):
    """A random GPT-2 with a 500-token byte-level BPE from train_tokenizer.py (<|endoftext|> is id 0), padded to 512."""
    from model import get_model, padded_vocab_size
    from train_tokenizer import train_tokenizer

    tok, _ = train_tokenizer(dataset_name="builtin", vocab_size=500, out=tmp_path_factory.mktemp("tok") / "bpe")
    assert tok.eos_token_id == 0 and len(tok) == 500
    torch.manual_seed(2)
    model = get_model(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=padded_vocab_size(len(tok)),
                      bos_token_id=0, eos_token_id=0, verbose=False)
    return save_model(tmp_path_factory.mktemp("own") / "final_model", model, tok)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(model_dir, dtype) -> path of the GGUF file, written once per (folder, dtype)."""
    from export_gguf import export_gguf

    cache, out_dir = {}, tmp_path_factory.mktemp("gguf")

    def get(model_dir, dtype="f32"):
        key = (str(model_dir), dtype)
        if key not in cache:
            out = out_dir / f"{len(cache)}-{dtype}" / "model.gguf"
            cache[key] = export_gguf(model_dir, out, dtype, progress=False)
            assert cache[key] == out and out.is_file()
        return cache[key]

    return get


def source(model_dir):
    from model import load_pretrained

    tok, model = load_pretrained(model_dir, torch.float32)
    return tok, model.eval()


def logits_of(model, tok, texts):
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(t)[:64]])).logits[0] for t in texts]


# ----------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_file_layout_is_llama_cpps_gpt2(padded_gpt2_dir, exported, dtype):
    import gguf

    r = gguf.GGUFReader(exported(padded_gpt2_dir, dtype))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2"
    assert (field("gpt2.block_count"), field("gpt2.context_length"), field("gpt2.embedding_length")) == (2, 128, 64)
    assert (field("gpt2.feed_forward_length"), field("gpt2.attention.head_count")) == (256, 2)
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == 50256
    assert field("tokenizer.ggml.add_bos_token") is False
    if dtype == "f32":  # the same tokenizer fields in every file; reading 100k strings takes seconds
        tokens, types, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges")
        assert len(tokens) == len(types) == 50304  # one token per embedding row
        assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
        assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)] and set(types[50257:]) == {gguf.TokenType.UNUSED}
        assert set(types[:50256]) == {gguf.TokenType.NORMAL} and tokens[198] == "Ċ"
        assert merges[0] == "Ġ t" and len(merges) == 50000
    t = {x.name: x for x in r.tensors}
    assert "output.weight" not in t  # tied: llama.cpp duplicates token_embd
    assert sorted(t) == sorted(["token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"] + [
        f"blk.{i}.{n}.{w}" for i in range(2) for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
        for w in ("weight", "bias")])
    weight_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    for name, tensor in t.items():
        stays_f32 = name.endswith(("bias", "_norm.weight")) or name == "position_embd.weight"
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if stays_f32 else weight_type), name
    assert list(t["blk.0.attn_qkv.weight"].shape) == [64, 192]  # ggml order (in, out): the Conv1D weight transposed
    assert list(t["token_embd.weight"].shape) == [64, 50304]


def test_own_tokenizer_ids_and_padding(own_tok_dir, exported):
    import gguf

    r = gguf.GGUFReader(exported(own_tok_dir))
    tokens, types = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 512 and tokens[0] == "<|endoftext|>" and types[0] == gguf.TokenType.CONTROL
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == r.fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert tokens[500:] == [f"[PAD{i}]" for i in range(500, 512)] and set(types[500:]) == {gguf.TokenType.UNUSED}


# ----------------------------------------------------------------------------- transformers loads it back


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("which", ["tiny", "padded"])
def test_transformers_loads_it_back_with_the_same_logits(tiny_gpt2_dir, padded_gpt2_dir, exported, which, dtype):
    import gguf
    from transformers import GPT2LMHeadModel

    folder = tiny_gpt2_dir if which == "tiny" else padded_gpt2_dir
    path = exported(folder, dtype)
    tok, model = source(folder)
    # transformers 5.24 maps the file's gpt2.context_length to `n_ctx`, which GPT2Config ignores (it would build 1024
    # positions and refuse the file's 128): pass it as n_positions.
    n_positions = gguf.GGUFReader(path).fields["gpt2.context_length"].contents()
    back = GPT2LMHeadModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, n_positions=n_positions).eval()
    assert back.config.vocab_size == model.config.vocab_size and back.config.n_layer == model.config.n_layer
    texts = webtext_sentences()
    for want, got in zip(logits_of(model, tok, texts), logits_of(back, tok, texts)):
        assert got.shape == want.shape
        if dtype == "f32":
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        else:
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < 2e-2, rel


# ----------------------------------------------------------------------------- llama.cpp runs it


def llama(llama_cpp, path, n_ctx=128):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=False, verbose=False, n_threads=2, seed=0)


@pytest.mark.parametrize("which", ["tiny", "padded"])
def test_llama_cpp_greedy_continuation_equals_generate(llama_cpp_module, tiny_gpt2_dir, padded_gpt2_dir, exported, which):
    llama_cpp = llama_cpp_module
    import generate

    folder = tiny_gpt2_dir if which == "tiny" else padded_gpt2_dir
    llm = llama(llama_cpp, exported(folder, "f32"))
    tok, model, device = generate.load_model(folder, device="cpu")
    want = generate.generate(tok, model, device, PROMPTS, max_new_tokens=40, temperature=0)
    n_tok = len(tok)

    calls = []

    def never_padding(_ids, scores):  # generate.py never samples the padding rows; llama.cpp would, if they won
        calls.append(len(scores))
        scores[n_tok:] = -np.inf
        return scores

    for prompt, completion in zip(PROMPTS, want):
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == tok.encode(prompt)
        got = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=llama_cpp.LogitsProcessorList([never_padding])):
            if t == llm.token_eos() or len(got) == 40:
                break
            got.append(t)
        assert got == completion.completion_ids, prompt
        assert calls and set(calls) == {llm.n_vocab()}  # the mask ran, over every row
        assert llm.detokenize(got).decode("utf-8", errors="replace") == completion.completion


def test_llama_cpp_text_completion_equals_generate(llama_cpp_module, tiny_gpt2_dir, exported):
    """llama-cpp-python's own text API (tokenize, sample, detokenize), as `llama-cli -p` would run it."""
    llama_cpp = llama_cpp_module
    import generate

    llm = llama(llama_cpp, exported(tiny_gpt2_dir, "f32"))
    tok, model, device = generate.load_model(tiny_gpt2_dir, device="cpu")
    prompt = "The meaning of life is"
    want = generate.generate(tok, model, device, prompt, max_new_tokens=20, temperature=0)[0]
    out = llm.create_completion(prompt, max_tokens=20, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert out["usage"]["prompt_tokens"] == len(tok.encode(prompt))  # no BOS prepended, as GPT-2
    assert out["choices"][0]["text"] == want.completion


@pytest.mark.parametrize("which", ["gpt2 bpe", "train_tokenizer bpe"])
def test_llama_cpp_tokenizes_like_our_tokenizer(llama_cpp_module, padded_gpt2_dir, own_tok_dir, exported, which):
    llama_cpp = llama_cpp_module
    folder = padded_gpt2_dir if which == "gpt2 bpe" else own_tok_dir
    tok, _ = source(folder)
    llm = llama(llama_cpp, exported(folder, "f32"))
    assert llm.n_vocab() == (50304 if which == "gpt2 bpe" else 512)
    assert llm.token_eos() == llm.token_bos() == tok.eos_token_id
    for s in STRINGS:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), repr(s)
        ids = tok.encode(s)
        assert llm.detokenize(ids, special=True).decode() == s, repr(s)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_runs_f16_and_q8_0(llama_cpp_module, tiny_gpt2_dir, exported, dtype, monkeypatch):
    llama_cpp = llama_cpp_module
    # llama.cpp's weight repacking into "extra buffer types" is off: on CPUs with AMX (this test machine has it) its AMX
    # buffer takes the Q8_0 weights and then llama_decode fails (-1) or crashes, for any GGUF with Q8_0 tensors,
    # whatever wrote it. With repacking off llama.cpp computes Q8_0 with its ordinary CPU kernels.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", no_repacking)
    tok, model = source(tiny_gpt2_dir)
    llm = llama(llama_cpp, exported(tiny_gpt2_dir, dtype))
    for text in webtext_sentences():
        ids = tok.encode(text)[:64]
        llm.reset()
        llm.eval(ids)  # logits of the last position only (logits_all=False)
        got = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy())
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, -1]
        assert ((got - want).norm() / want.norm()).item() < 2e-2


# ----------------------------------------------------------------------------- errors and the CLI


def run_cli(capsys, *argv):
    from export_gguf import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err):
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_writes_the_file_and_replaces_an_existing_one_atomically(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"GGUF, an older export")
    rc, stdout, err = run_cli(capsys, "--model_path", str(tiny_gpt2_dir), "--out", str(out), "--dtype", "q8_0")
    assert rc == 0, err
    assert out.read_bytes()[:4] == b"GGUF" and str(out) in stdout and "q8_0" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left beside it


@pytest.mark.parametrize("victim", ["model.safetensors", "notes.txt", "folder_is_a_file/model.gguf"])
def test_an_existing_file_it_did_not_make_is_never_replaced(tiny_gpt2_dir, tmp_path, capsys, victim):
    model = tmp_path / "final_model"
    shutil.copytree(tiny_gpt2_dir, model)
    (model / "notes.txt").write_text("my notes")
    (model / "folder_is_a_file").write_text("a file where --out needs a folder")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    rc, _, err = run_cli(capsys, "--model_path", str(model), "--out", str(model / victim))
    one_line_error(rc, err)
    assert "choose another --out" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # the weights and notes untouched, nothing added


def test_a_failed_export_leaves_the_existing_file_alone(tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    rc, _, err = run_cli(capsys, "--model_path", str(tmp_path / "missing"), "--out", str(out))
    one_line_error(rc, err)
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_quantized_folder_is_a_one_line_error(tiny_gpt2_dir, tmp_path, capsys):
    from export_gguf import GGUFError, export_gguf
    from quantize import QUANT_FILE

    folder = tmp_path / "final_model-int8"
    shutil.copytree(tiny_gpt2_dir, folder)
    (folder / QUANT_FILE).write_text(json.dumps({"mode": "int8"}))  # what quantize.is_quantized_folder recognises
    rc, _, err = run_cli(capsys, "--model_path", str(folder), "--out", str(tmp_path / "m.gguf"))
    one_line_error(rc, err)
    assert "quantized" in err and "fp32" in err
    with pytest.raises(GGUFError, match="quantized"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_not_a_model_and_not_a_gpt2_are_one_line_errors(tiny_gpt2_dir, tmp_path, capsys):
    from export_gguf import GGUFError, export_gguf

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(capsys, "--model_path", str(empty), "--out", str(tmp_path / "m.gguf"))
    one_line_error(rc, err)
    assert "config.json" in err
    llama_folder = tmp_path / "llama"
    shutil.copytree(tiny_gpt2_dir, llama_folder)
    cfg = json.loads((llama_folder / "config.json").read_text())
    (llama_folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    rc, _, err = run_cli(capsys, "--model_path", str(llama_folder), "--out", str(tmp_path / "m.gguf"))
    one_line_error(rc, err)
    assert "'llama'" in err and "GPT-2" in err
    with pytest.raises(GGUFError, match="config.json"):
        export_gguf(empty, tmp_path / "m.gguf")
    with pytest.raises(GGUFError, match="does not exist"):  # the library's own error, not a FileNotFoundError
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "llama"]


def test_bad_dtype_is_a_one_line_error(tiny_gpt2_dir, tmp_path, capsys):
    from export_gguf import GGUFError, export_gguf

    rc, _, err = run_cli(capsys, "--model_path", str(tiny_gpt2_dir), "--out", str(tmp_path / "m.gguf"), "--dtype", "q4_0")
    one_line_error(rc, err)
    assert "'q4_0'" in err and "f32, f16, q8_0" in err
    with pytest.raises(GGUFError, match="dtype"):
        export_gguf(tiny_gpt2_dir, tmp_path / "m.gguf", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_cli_help_lists_every_flag(capsys):
    from export_gguf import ExportArguments, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ExportArguments.__dataclass_fields__:
        assert f"--{name}" in text
    assert "f32" in text and "q8_0" in text and "GGUF" in text
