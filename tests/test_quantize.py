"""quantize.py: int8/int4 quantization of a tiny random GPT-2, the safe folder format, loading it in
generate.py and evaluation.py, and the errors."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluation as ev
import decode
import generate as G
import quantize as Q

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="session")
def fp32_dir(tmp_path_factory, tiny_gpt2_dir):
    path = tmp_path_factory.mktemp("q") / "final_model"
    shutil.copytree(tiny_gpt2_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
    return path


@pytest.fixture(scope="session")
def ids(tokenizer):
    return torch.tensor([tokenizer.encode("It was the best of times, it was the worst of times, it was the age of wisdom")])


@pytest.fixture(scope="session")
def quantized(fp32_dir, ids):
    """mode -> (folder, logits of the quantized model before saving, fp32 logits)."""
    out = {}
    tok, ref, _ = G.load_model(fp32_dir, device="cpu")
    with torch.no_grad():
        ref_logits = ref(ids).logits
    for mode in Q.MODES:
        tok, model, _ = G.load_model(fp32_dir, device="cpu")
        Q.quantize_model(model, mode, group_size=32)
        with torch.no_grad():
            logits = model(ids).logits
        folder = Q.save_quantized(model, tok, fp32_dir.parent / f"final_model-{mode}", source_dir=fp32_dir)
        out[mode] = (folder, logits, ref_logits)
    return out


def _no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("loading a quantized folder must not unpickle anything")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("mode", Q.MODES)
def test_quantize_save_load_roundtrip(quantized, fp32_dir, ids, mode, monkeypatch):
    folder, logits, ref_logits = quantized[mode]
    # close to fp32 (random weights: int4 is coarse), and the top token mostly the same
    err = (logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert err < (0.02 if mode == "int8" else 0.2)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > (0.9 if mode == "int8" else 0.6)

    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "quantization.json", "tokenizer.json", "tokenizer_config.json"])
    assert not list(folder.parent.glob(f".{folder.name}.*"))  # no temporary folder left behind
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors: length + JSON header
    assert header["__metadata__"]["quantization"] == mode
    assert header["lm_head.weight.qdata"]["dtype"] == ("I8" if mode == "int8" else "U8")
    assert "transformer.wte.weight" not in header  # the tied table is stored once, as the LM head
    info = json.loads((folder / "quantization.json").read_text())
    assert info["mode"] == mode and info["library"] == "torchao" and len(info["quantized"]) == 2 * 4 + 1
    size, fp32 = Q.folder_size(folder), Q.folder_size(fp32_dir)
    assert size < fp32 / (3 if mode == "int8" else 5)

    _no_pickle(monkeypatch)
    model = Q.load_quantized(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-5)
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    kind = Int8Tensor if mode == "int8" else Int4OpaqueTensor
    linears = [m for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")) or n == "lm_head"]
    assert len(linears) == 9 and all(isinstance(m, torch.nn.Linear) and isinstance(m.weight, kind) for m in linears)
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert isinstance(model.transformer.wte, Q.QuantizedEmbedding) and model.transformer.wte.weight is model.lm_head.weight


@pytest.mark.parametrize("mode", Q.MODES)
def test_generate_loads_and_samples(quantized, mode, monkeypatch):
    folder = quantized[mode][0]
    _no_pickle(monkeypatch)
    tok, model, dev = G.load_model(folder)
    monkeypatch.undo()
    assert dev == torch.device("cpu") and model.quantization["mode"] == mode
    enc = tok(PROMPT, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)  # HF's own loop
    expected = tok.decode(ref[0, enc.input_ids.shape[1] :])
    expected = expected.split(tok.eos_token)[0]
    assert G.generate(tok, model, dev, PROMPT, max_new_tokens=12, temperature=0)[0].completion == expected
    a = G.generate_batch(tok, model, dev, ["a", "b c"], max_new_tokens=6, num_return_sequences=2, seed=3)
    assert a == G.generate_batch(tok, model, dev, ["a", "b c"], max_new_tokens=6, num_return_sequences=2, seed=3)
    assert [len(per_prompt) for per_prompt in a] == [2, 2] and a[1][0]["generated_text"].startswith("b c")
    assert G.generate_once(tok, model, dev, PROMPT, max_new_tokens=5, top_k=0, seed=1).startswith(PROMPT)  # full-logits path


# Where safetensors leaves a tensor: not 16-byte aligned (measured offsets mod 64 were 10 and 26). On
# AVX-512 CPUs torch._weight_int8pack_mm read out of bounds and segfaulted on such an int8 weight
# with 50257 rows; quantize.int8_mm must hand the kernel aligned copies on every CPU.
UNALIGNED_INT8_MM = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import quantize as Q
torch.manual_seed(0)
N, K = 50257, 64
buf = torch.empty(N * K + 64, dtype=torch.int8)
q = buf[10 : 10 + N * K].view(N, K)
q.copy_(torch.randint(-127, 128, (N, K), dtype=torch.int8))
scale = (torch.rand(N) / 64).bfloat16()
x = torch.randn(3, K)
assert q.data_ptr() % 16
for rows in (1, 3):
    got = Q.int8_mm(x[:rows], q, scale).float()
    want = x[:rows].bfloat16().float() @ (q.float() * scale.float()[:, None]).t()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
"""


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_int8_kernel_on_unaligned_tensors_does_not_crash(isa):
    env = {**os.environ}
    if isa == "avx2":  # torch's AVX2 kernels, also on an AVX-512 machine
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    r = subprocess.run([sys.executable, "-c", UNALIGNED_INT8_MM, str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"


def test_private_kernels_only_see_contiguous_aligned_tensors(quantized, monkeypatch):
    # Every tensor that reaches a private kernel, from a folder loaded from disk, on every path:
    # projections, the int8 screen, int4's approximate logits, the full-logits path.
    seen = []

    def spy(real):
        def kernel(*args):
            seen.extend(a.is_contiguous() and a.data_ptr() % 64 == 0 for a in args if isinstance(a, torch.Tensor))
            return real(*args)

        return kernel

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy(torch._weight_int8pack_mm))
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", spy(torch.ops.aten._weight_int4pack_mm_for_cpu))
    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", spy(torch.ops.aten._convert_weight_to_int4pack_for_cpu))
    for mode in Q.MODES:
        tok, model, dev = G.load_model(quantized[mode][0])
        G.generate(tok, model, dev, [PROMPT, "Hi"], max_new_tokens=4, seed=0)
        G.generate(tok, model, dev, PROMPT, max_new_tokens=4, top_k=0, seed=0)
        with torch.no_grad():
            model(torch.tensor([tok.encode(PROMPT)]))
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} tensors were unaligned or not contiguous"


def test_a_kernel_that_fails_its_self_test_is_never_used(quantized, tmp_path, monkeypatch, caplog):
    # A private kernel is probed in a child process: one that crashes there (here: the probe
    # segfaults) is never run in ours, and int8 falls back to plain torch ops.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(Q, "_KERNEL_OK", {})
    monkeypatch.setattr(Q, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with caplog.at_level("WARNING", logger="quantize"):
        assert not Q.kernel_ok("int8")
    assert "signal 11" in caplog.text and "plain torch" in caplog.text
    assert False in json.loads((tmp_path / "gpt2-toolkit" / "kernels.json").read_text()).values()

    def refuse(*a, **k):
        raise AssertionError("a kernel that failed its self-test was called")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", refuse)
    tok, model, dev = G.load_model(quantized["int8"][0])
    fast = decode.fast_forward(model)
    assert fast.screen is None
    enc = tok(PROMPT, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert G.generate(tok, model, dev, PROMPT, max_new_tokens=8, temperature=0)[0].completion == tok.decode(ref[0, enc.input_ids.shape[1]:]).split(tok.eos_token)[0]
    assert decode.FastGPT2(G.load_model(quantized["int8"][0].parent / "final_model")[1], lm_head_dtype=torch.float32).screen is None
    with pytest.raises(Q.QuantizationError, match="self-test"):
        Q.check_mode("int4")


def test_int8_top_logits_exact(quantized):
    # the int8 screen finds the same top-k as the quantized model's full fp32 logits
    tok, model, dev = G.load_model(quantized["int8"][0])
    fast = decode.fast_forward(model)
    h = torch.randn(3, model.config.n_embd) * 3
    vals, idx = fast.top_logits(h, 50)
    full = torch.topk(fast.logits(h), 50)
    assert torch.equal(idx, full.indices)
    torch.testing.assert_close(vals, full.values, rtol=1e-5, atol=1e-4)


def test_evaluation_tool_on_quantized(quantized, fp32_dir, tmp_path):
    docs = ["It was the best of times, it was the worst of times. " * 6, "Call me Ishmael. " * 10]
    tok, ref_model, _ = G.load_model(str(fp32_dir), "cpu")
    ref = ev.evaluate_texts(ref_model, tok, docs, stride=64, progress=False)["perplexity"]
    for mode, tolerance in (("int8", 0.02), ("int4", 0.10)):
        tok, model, _ = G.load_model(str(quantized[mode][0]), "cpu")
        ppl = ev.evaluate_texts(model, tok, docs, stride=64, progress=False)["perplexity"]
        assert abs(ppl / ref - 1) < tolerance, (mode, ppl, ref)
    with pytest.raises(ValueError, match="float32"):
        G.load_model(str(quantized["int8"][0]), "cpu", torch.bfloat16)
    # the CLI, with sampling (model.generate) on the quantized model
    text, out = tmp_path / "t.txt", tmp_path / "r.json"
    text.write_text(docs[0])
    assert ev.main(["--model_path", str(quantized["int8"][0]), "--dataset_path", str(text), "--num_samples", "1",
                    "--prompt_tokens", "8", "--reference_tokens", "4", "--no_progress", "--output_json", str(out)]) == 0
    row = json.loads(out.read_text())["models"][0]
    assert row["perplexity"]["perplexity"] > 1 and row["generation"]["samples"] == 1


def test_cli_quantize_then_generate_cli(fp32_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    assert Q.main(["--model_path", str(fp32_dir), "--mode", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MB ->" in printed and str(out) in printed and "% of the original" in printed
    assert Q.main(["--model_path", str(fp32_dir), "--mode", "int8", "--out", str(out)]) == 0  # replaces it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model_path", str(out), "--length", "5", "--prompt", "Hi",
                        "--seed", "0"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi") and r.stderr == ""


def test_cli_default_out_and_help(fp32_dir, capsys):
    with pytest.raises(SystemExit):
        Q.parse_args(["--help"])
    helptext = capsys.readouterr().out
    for flag in ("--model_path", "--mode", "--out", "--group_size"):
        assert flag in helptext
    args = Q.parse_args(["--model_path", str(fp32_dir), "--mode", "int4"])
    assert args.out is None and args.group_size == Q.DEFAULT_GROUP_SIZE


def test_errors(fp32_dir, quantized, tmp_path, capsys, monkeypatch):
    with pytest.raises(Q.QuantizationError, match="int8, int4"):
        Q.check_mode("int3")
    assert Q.main(["--model_path", str(fp32_dir), "--mode", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown quantization mode 'fp8'") and err.count("\n") == 1
    with pytest.raises(Q.QuantizationError, match="group size"):
        Q.check_mode("int4", 48)
    # a machine without the int4 kernel: said so, with int8 suggested
    monkeypatch.setitem(Q._KERNEL_OK, "int4", False)
    assert Q.main(["--model_path", str(fp32_dir), "--mode", "int4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "int4 kernels" in err and "--mode int8" in err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--mode int8"):
        G.load_model(quantized["int4"][0])
    monkeypatch.undo()
    # not a model, missing, not GPT-2, already quantized
    assert Q.main(["--model_path", str(tmp_path), "--mode", "int8"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert Q.main(["--model_path", str(tmp_path / "missing"), "--mode", "int8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert Q.main(["--model_path", str(other), "--mode", "int8"]) == 2
    assert "'llama' model" in capsys.readouterr().err
    assert Q.main(["--model_path", str(quantized["int8"][0]), "--mode", "int4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    from transformers import BertConfig, BertModel

    with pytest.raises(Q.QuantizationError, match="GPT-2"):
        Q.quantize_model(BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)))
    # loading: GPU asked for, half precision asked for, a broken folder
    with pytest.raises(Q.QuantizationError, match="CPU"):
        Q.load_quantized(quantized["int8"][0], device="cuda")
    with pytest.raises(ValueError, match="float32"):
        G.load_model(quantized["int8"][0], dtype=torch.bfloat16)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((fp32_dir / "config.json").read_text())
    (broken / "quantization.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a format"):
        G.load_model(broken)


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("kind,named", [
    ("int8 tensors, quantization.json says int4", "transformer.h.0.attn.c_attn.weight.qdata"),
    ("int4 tensors, quantization.json says int8", "transformer.h.0.attn.c_attn.weight.qdata"),
    ("int4 tensors, another group size", "transformer.h.0.attn.c_attn.weight.scale"),
    ("int4 group size not a number", "quantization.json"),
    ("quantization.json not an object", "quantization.json"),
    ("config.json wider than the tensors", "transformer.h.0.attn.c_attn.weight.qdata"),
    ("config.json not JSON", "config.json"),
    ("truncated weights", "model.safetensors"),
])
def test_a_folder_that_does_not_match_its_quantization_json_is_one_error(quantized, tmp_path, kind, named, capsys):
    # These were KeyError / IndexError / library tracebacks: now QuantizationError naming the file and tensor.
    folder = tmp_path / "q"
    shutil.copytree(quantized["int4" if kind.startswith("int4") else "int8"][0], folder)
    if "says int4" in kind:
        _edit_json(folder / "quantization.json", mode="int4", group_size=32)
    elif "says int8" in kind:
        _edit_json(folder / "quantization.json", mode="int8", group_size=None)
    elif "another group size" in kind:
        _edit_json(folder / "quantization.json", group_size=64)
    elif "not a number" in kind:
        _edit_json(folder / "quantization.json", group_size="x")
    elif "not an object" in kind:
        (folder / "quantization.json").write_text("[]")
    elif "wider" in kind:
        _edit_json(folder / "config.json", n_embd=128)
    elif "not JSON" in kind:
        (folder / "config.json").write_text("[1, 2")
    else:
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(Q.QuantizationError, match=named.replace(".", r"\.")):
        Q.load_quantized(folder)
    assert G.main(["--model_path", str(folder), "--prompt", "x", "--length", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err


def test_out_never_replaces_a_folder_quantize_did_not_write(fp32_dir, tmp_path, capsys, monkeypatch):
    # --out used to be renamed away and deleted whatever it was (e.g. --out ~/Documents)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with monkeypatch.context() as m:  # every case is refused before the model loads
        m.setattr(Q, "load_pretrained", lambda *a, **k: pytest.fail("loaded the model although --out cannot be written"))
        for out, reason in ((precious, f"{precious} already exists and is not one this writer made: choose another --out, "
                                       "or move it away first."),
                            (blocker / "q", f"{blocker} is a file, not a folder: choose another --out."),
                            (blocker, f"{blocker} is a file, not a folder: choose another --out, or move it away first.")):
            assert Q.main(["--model_path", str(fp32_dir), "--mode", "int8", "--out", str(out)]) == 2
            assert capsys.readouterr().err == f"error: --out {out}: {reason}\n"
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and blocker.read_text() == "x"
    broken = tmp_path / "broken"
    shutil.copytree(fp32_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    assert Q.main(["--model_path", str(broken), "--mode", "int8", "--out", str(tmp_path / "q2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken / 'model.safetensors'} cannot be loaded") and err.count("\n") == 1
