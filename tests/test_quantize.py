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
    assert len(a) == 4 and a[2].startswith("b c")
    assert G.generate_once(tok, model, dev, PROMPT, max_new_tokens=5, top_k=0, seed=1).startswith(PROMPT)  # full-logits path


def test_int8_top_logits_exact(quantized):
    # the int8 screen finds the same top-k as the quantized model's full fp32 logits
    tok, model, dev = G.load_model(quantized["int8"][0])
    fast = G._fast(model)
    h = torch.randn(3, model.config.n_embd) * 3
    vals, idx = fast.top_logits(h, 50)
    full = torch.topk(fast.logits(h), 50)
    assert torch.equal(idx, full.indices)
    torch.testing.assert_close(vals, full.values, rtol=1e-5, atol=1e-4)


def test_evaluation_tool_on_quantized(quantized, fp32_dir, tmp_path):
    docs = ["It was the best of times, it was the worst of times. " * 6, "Call me Ishmael. " * 10]
    ref_model, tok = ev.load_model(str(fp32_dir), "cpu")
    ref = ev.evaluate_texts(ref_model, tok, docs, stride=64, progress=False)["perplexity"]
    for mode, tolerance in (("int8", 0.02), ("int4", 0.10)):
        model, tok = ev.load_model(str(quantized[mode][0]), "cpu")
        ppl = ev.evaluate_texts(model, tok, docs, stride=64, progress=False)["perplexity"]
        assert abs(ppl / ref - 1) < tolerance, (mode, ppl, ref)
    with pytest.raises(ev.EvaluationError, match="float32"):
        ev.load_model(str(quantized["int8"][0]), "cpu", precision="bf16")
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
