import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import PRESETS, ModelError, count_parameters, get_model, lm_head_loss

TINY = dict(n_layer=2, n_embd=32, n_head=2)


def test_signature_is_kept():
    params = inspect.signature(get_model).parameters
    assert [(n, params[n].default) for n in ("n_embd", "n_layer", "n_head", "vocab_size")] == [
        ("n_embd", 768), ("n_layer", 12), ("n_head", 12), ("vocab_size", 50257)]
    # Everything added after them is keyword-only, so old positional calls keep working.
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in list(params.values())[4:])


def test_tiny_model_config_and_sdpa(capsys):
    model = get_model(**TINY, n_positions=64, dropout=0.2)
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == (2, 32, 2, 64, 50257)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.2
    assert c._attn_implementation == "sdpa"
    assert model.generation_config.pad_token_id == 50256
    assert "parameters" in capsys.readouterr().out
    ids = torch.randint(0, 50257, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 50257) and torch.isfinite(out.loss)


@pytest.mark.parametrize("preset,millions", [("gpt2", 124), ("gpt2-medium", 355), ("gpt2-large", 774), ("gpt2-xl", 1558)])
def test_gpt2_presets_have_the_official_sizes(preset, millions):
    with torch.device("meta"):  # no memory, no init: just the shapes
        model = get_model(preset=preset, verbose=False)
    assert round(count_parameters(model) / 1e6) == millions


def test_small_preset_is_cpu_sized():
    assert PRESETS["small"] == dict(n_layer=4, n_head=4, n_embd=256)
    with torch.device("meta"):
        model = get_model(preset="small", verbose=False)
    assert count_parameters(model) < 20e6


def test_init_from_local_folder(tmp_path):
    torch.manual_seed(0)
    base = get_model(**TINY, verbose=False)
    base.save_pretrained(tmp_path)
    tuned = get_model(init_from=tmp_path, dropout=0.0, verbose=False)
    assert tuned.config.resid_pdrop == 0.0 and tuned.config.n_embd == 32
    assert tuned.config._attn_implementation == "sdpa"
    for (name, a), (_, b) in zip(base.state_dict().items(), tuned.state_dict().items()):
        assert torch.equal(a, b), name


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of n_head"):
        get_model(n_layer=1, n_embd=30, n_head=4, verbose=False)
    with pytest.raises(ValueError, match="Unknown model preset"):
        get_model(preset="gpt5", verbose=False)
    with pytest.raises(ValueError, match="Could not load a model from init_from"):
        get_model(init_from=tmp_path / "missing", verbose=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_layer=1, n_embd=32, n_head=0), "n_head=0 must be a whole number of at least 1"),  # was ZeroDivisionError
    (dict(n_layer=0, n_embd=32, n_head=2), "n_layer=0 must be"),
    (dict(**TINY, n_positions=0), "n_positions=0 must be"),
    (dict(**TINY, dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
])
def test_bad_shapes_are_model_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        get_model(**kwargs, verbose=False)


def test_init_from_a_broken_or_foreign_folder_is_a_model_error(tmp_path):
    from safetensors.torch import load_file, save_file

    get_model(**TINY, verbose=False).save_pretrained(tmp_path / "good")
    weights = tmp_path / "good" / "model.safetensors"
    shutil.copytree(tmp_path / "good", tmp_path / "cut")
    (tmp_path / "cut" / "model.safetensors").write_bytes(weights.read_bytes()[:1000])  # a download or copy that stopped
    with pytest.raises(ModelError, match="Could not load a model from init_from=.*cut"):
        get_model(init_from=tmp_path / "cut", verbose=False)
    # Weights under other names (not a GPT-2): transformers would start them from random values with only a log report.
    shutil.copytree(tmp_path / "good", tmp_path / "foreign")
    save_file({f"encoder.{k}": v for k, v in load_file(weights).items()}, tmp_path / "foreign" / "model.safetensors")
    with pytest.raises(ModelError, match="lacks 28 of the weights config.json describes"):
        get_model(init_from=tmp_path / "foreign", verbose=False)
    with pytest.raises(ModelError, match="dropout"):
        get_model(init_from=tmp_path / "good", dropout=-0.1, verbose=False)


def test_import_has_no_side_effects():
    # (transformers itself prints a line at import when WANDB_MODE is set, so leave it out here)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    out = subprocess.run([sys.executable, "-c", "import model, train"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_building_a_model_keeps_stderr_clean():
    # transformers imports torchao at its first model; torchao's import-time warnings stay hidden.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    code = "from model import get_model; get_model(n_layer=1, n_embd=32, n_head=2, verbose=False)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1], env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr


# ----------------------------------------------------------------------------------------------
# lm_head_loss: the model's loss without its logits


# Vocabulary chunks (CPU): whole chunks, a ragged last one, a single chunk; token chunks (GPU): the same for 36 tokens.
@pytest.mark.parametrize("by_tokens,chunk_size", [(False, 1024), (False, 1000), (False, 50257), (True, 12), (True, 7), (True, 2048)])
def test_lm_head_loss_equals_the_models_loss_and_gradients(by_tokens, chunk_size):
    torch.manual_seed(0)
    model = get_model(n_layer=1, n_embd=32, n_head=2, dropout=0.0, verbose=False)
    ids = torch.randint(0, 50257, (3, 12))
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions, as padding or prompts would be

    for num_items in (None, torch.tensor(40)):  # the mean, and the Trainer's sum / tokens in the accumulated batch
        model.zero_grad()
        expected = model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
        (expected * 3).backward()  # a gradient scale other than 1, as under gradient accumulation
        expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

        model.zero_grad()
        hidden = model.transformer(ids).last_hidden_state
        loss = lm_head_loss(hidden, model.lm_head.weight, labels, num_items, chunk_size=chunk_size, by_tokens=by_tokens)
        (loss * 3).backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("by_tokens", [False, True])
def test_lm_head_loss_without_gradients_and_with_large_logits(by_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8) * 30  # logits in the thousands: exp would overflow without the max shift
    weight = torch.randn(100, 8)
    labels = torch.randint(0, 100, (2, 5))
    logits = hidden @ weight.t()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    with torch.no_grad():
        loss = lm_head_loss(hidden, weight, labels, chunk_size=4 if by_tokens else 16, by_tokens=by_tokens)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def test_new_models_use_gpt2s_gelu_as_one_op():
    from transformers import GPT2LMHeadModel

    model = get_model(**TINY, dropout=0.0, verbose=False).eval()
    assert model.config.activation_function == "gelu_pytorch_tanh"
    reference = GPT2LMHeadModel(model.config.__class__(**{**model.config.to_dict(), "activation_function": "gelu_new"}))
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50257, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-5)


def test_padded_vocab_size_rounds_up_to_the_multiple():
    from model import padded_vocab_size

    assert padded_vocab_size(50257) == 50304  # GPT-2's, as nanoGPT pads it
    assert [padded_vocab_size(n) for n in (1, 64, 65, 300, 512, 8192)] == [64, 64, 128, 320, 512, 8192]
    assert padded_vocab_size(50257, 1) == 50257 and padded_vocab_size(300, 128) == 384
    for bad in (0, -64, 1.5, True):
        with pytest.raises(ModelError, match="multiple="):
            padded_vocab_size(300, bad)



@pytest.mark.parametrize("by_tokens", [False, True])
def test_bf16_gemms_give_the_fp32_loss_and_gradients_within_bf16_rounding(by_tokens):
    from model import lm_head_loss

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 40, 64), torch.randn(1000, 64) * 0.3  # logits of a few units, as in training
    labels = torch.randint(0, 1000, (3, 40))
    labels[0, :5] = -100
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = lm_head_loss(h, w, labels, chunk_size=50 if by_tokens else 256, gemm_dtype=dtype, by_tokens=by_tokens)  # ragged
        (loss * 3).backward()
        assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32  # fp32 out, for fp32 weights and AdamW
        results[dtype] = loss.detach(), h.grad, w.grad
    (loss32, h32, w32), (loss16, h16, w16) = results.values()
    assert not torch.equal(w16, w32)  # the bf16 GEMMs did run
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0)
    for bf16, fp32 in ((h16, h32), (w16, w32)):  # each element within bf16's rounding of its GEMM's output
        torch.testing.assert_close(bf16, fp32, rtol=0, atol=8e-3 * fp32.abs().max().item())
        assert (bf16 - fp32).norm() < 5e-3 * fp32.norm()


@pytest.mark.parametrize("by_tokens", [False, True])
def test_bf16_gemms_with_large_logits_and_without_gradients(by_tokens):
    from model import lm_head_loss

    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(2, 5, 8) * 30, torch.randn(100, 8), torch.randint(0, 100, (2, 5))
    expected = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :-1].reshape(-1, 100), labels[:, 1:].reshape(-1))
    with torch.no_grad():
        loss = lm_head_loss(hidden, weight, labels, chunk_size=16, gemm_dtype=torch.bfloat16, by_tokens=by_tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)  # logits in the thousands: still no overflow


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_native_bf16_is_off_when_torch_runs_avx2_kernels(env):
    # ATEN_CPU_CAPABILITY=avx2 stands in for an AVX2-only CPU; ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16.
    code = "import torch, model; print(torch.backends.cpu.get_cpu_capability(), model.native_bf16_cpu())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


def test_native_bf16_follows_the_cpu_flags():
    from model import native_bf16_cpu

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    has = " avx512_bf16" in flags or " amx_bf16" in flags
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and os.environ.get("ONEDNN_MAX_CPU_ISA") is None:
        assert native_bf16_cpu() == has
    else:
        assert not native_bf16_cpu()


# ----------------------------------------------------------------------------------------------
# Training forward: the fused loss as the model's own, whole blocks, compiled


def test_fused_loss_installed_is_the_models_loss_and_leaves_no_trace():
    from model import FusedCausalLMLoss, no_logits

    torch.manual_seed(0)
    model = get_model(n_layer=1, n_embd=32, n_head=2, dropout=0.0, verbose=False)
    ids = torch.randint(0, 50257, (2, 10))
    expected = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(15)).loss
    fused = FusedCausalLMLoss(model)
    out = model(input_ids=ids, labels=ids, logits_to_keep=no_logits(ids.device), num_items_in_batch=torch.tensor(15))
    assert out.logits.shape[1] == 0  # no logits were computed
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    fused.remove()
    assert not model.transformer.wte.sparse and not model.transformer._forward_hooks
    torch.testing.assert_close(model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(15)).loss, expected)


def test_whole_blocks_attention_equals_sdpa_and_reads_nothing_on_the_host(monkeypatch):
    from model import whole_blocks

    torch.manual_seed(0)
    model = get_model(n_layer=2, n_embd=32, n_head=2, dropout=0.0, verbose=False)
    ids = torch.randint(0, 50257, (2, 12))
    ids[0, 0] = model.config.pad_token_id  # an EOS at a block's edge, which transformers takes for padding
    expected = model(input_ids=ids, labels=ids, use_cache=False)
    reads = []
    for name in ("item", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, **k: reads.append(1) or _real(self, *a, **k))
    with whole_blocks(model):
        assert model.config._attn_implementation == "sdpa_causal_blocks"
        out = model(input_ids=ids, labels=ids, use_cache=False)
    assert reads == []
    monkeypatch.undo()
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
    assert model.config._attn_implementation == "sdpa" and "warn_if_padding_and_no_attention_mask" not in vars(model.transformer)


@pytest.mark.slow
@pytest.mark.parametrize("by_tokens", [False, True])
def test_the_model_and_its_fused_loss_compile_as_one_graph(by_tokens, monkeypatch):
    # torch.compile traces the loss inside the model's forward (aot_eager: dynamo and AOTAutograd, the parts that
    # break on model code; fullgraph: any graph break fails), with no recompilation from one step to the next.
    import torch._dynamo

    import model as model_lib
    from model import FusedCausalLMLoss, no_logits, whole_blocks

    real = model_lib.lm_head_loss
    monkeypatch.setattr(model_lib, "lm_head_loss", lambda *a, **k: real(*a, **k, by_tokens=by_tokens, chunk_size=8))
    torch.manual_seed(0)
    model = get_model(n_layer=2, n_embd=32, n_head=2, vocab_size=512, dropout=0.0, verbose=False, bos_token_id=0, eos_token_id=0)
    reference = get_model(n_layer=2, n_embd=32, n_head=2, vocab_size=512, dropout=0.0, verbose=False, bos_token_id=0, eos_token_id=0)
    reference.load_state_dict(model.state_dict())
    FusedCausalLMLoss(model, sparse_embedding=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 512, (2, 16))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        with whole_blocks(model):
            loss = compiled(input_ids=ids, labels=ids, logits_to_keep=no_logits(ids.device), use_cache=False).loss
        loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    expected = reference(input_ids=ids, labels=ids, use_cache=False).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad / 3, q.grad, rtol=1e-4, atol=1e-6)


def test_nan_weights_are_refused_by_every_loader_and_cli(tiny_gpt2_dir, tmp_path, capsys):
    """A diverged run's weights: the loader names the tensor; export, quantize and generate stop with one line."""
    from safetensors.torch import load_file, save_file

    import export_gguf
    import generate
    import quantize
    from model import load_pretrained

    folder = tmp_path / "diverged"
    shutil.copytree(tiny_gpt2_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["transformer.h.1.attn.c_proj.weight"][3, 4] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"the weight transformer\.h\.1\.attn\.c_proj\.weight holds NaN or inf"):
        load_pretrained(folder)
    for main, argv in ((export_gguf.main, ["--out", str(tmp_path / "m.gguf")]),
                       (quantize.main, ["--out", str(tmp_path / "q")]),
                       (generate.main, ["--length", "5", "--prompt", "Hi"])):
        assert main(["--model_path", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "transformer.h.1.attn.c_proj.weight" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged"]  # nothing exported or quantized
