"""estimate.py: the memory estimate's parts and their sum, what fits, the time estimate, and the estimate
against the real peak RSS of training steps on CPU (child processes)."""

import sys

import pytest
import torch

from estimate import (MemoryEstimate, available_memory, estimate_memory, estimate_time, fits, flops_per_token,
                      format_duration, largest_batch, measure_peak, parameter_count, peak_flops, shape_of, what_fits)
from model import PRESETS, count_parameters, get_model

GPT2 = dict(PRESETS["gpt2"], vocab_size=50304, n_positions=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=50304, n_positions=128)


def test_parameter_count_matches_the_model():
    for shape in (TINY, dict(n_layer=3, n_embd=96, n_head=4, vocab_size=1000, n_positions=64)):
        model = get_model(verbose=False, **shape)
        assert parameter_count(model.config) == count_parameters(model) == parameter_count(model)
    assert shape_of(GPT2).n_inner == 4 * 768


def test_fields_and_total_add_up():
    est = estimate_memory(GPT2, 8, 1024, precision="fp32", optimizer="adamw_torch")
    assert isinstance(est, MemoryEstimate)
    n = est.parameters
    assert 124e6 < n < 125e6
    assert est.weights == 4 * n and est.gradients == 4 * n and est.optimizer_state == 8 * n  # fp32, AdamW's two states
    assert est.total == est.weights + est.optimizer_state + max(est.gradients, est.activations + est.logits + est.head_gradient)
    assert est.logits == 8 * 1024 * 50304 * 12  # logits, log_softmax and their gradients, fp32
    table = est.table(available=2**40)
    for word in ("weights", "gradients", "optimizer state", "activations", "logits", "peak", "available"):
        assert word in table
    small = estimate_memory(GPT2, 1, 16, optimizer="sgd")
    assert small.optimizer_state == 0 and small.total == small.weights + small.gradients  # gradients dominate at 16 tokens
    bf16 = estimate_memory(GPT2, 8, 1024, precision="bf16")
    assert bf16.weights == 6 * n  # fp32 master weights + autocast's 16-bit copies


def test_muon_keeps_one_buffer_per_hidden_matrix_and_adamws_two_for_the_rest():
    from optimizers import muon_with_adamw

    model = get_model(verbose=False, **TINY)
    optimizer = muon_with_adamw(model, lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    model(x, labels=x).loss.backward()
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert estimate_memory(model.config, 2, 8, optimizer="muon").optimizer_state == measured


def test_fused_loss_removes_the_logits_copies():
    plain = estimate_memory(GPT2, 8, 512, fused_loss=False)
    fused = estimate_memory(GPT2, 8, 512, fused_loss=True)
    assert fused.logits == plain.logits / 3  # one fp32 tokens x vocab buffer inside the loss, none kept
    assert fused.total < plain.total and fused.activations == plain.activations


def test_checkpointing_shrinks_activations():
    for device in ("cpu", "cuda"):
        full = estimate_memory(GPT2, 8, 1024, device_type=device)
        ckpt = estimate_memory(GPT2, 8, 1024, gradient_checkpointing=True, device_type=device)
        assert ckpt.activations < full.activations / 4 and ckpt.total < full.total


def test_bf16_halves_activations():
    shape = dict(GPT2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    fp32 = estimate_memory(shape, 8, 1024, device_type="cuda")
    bf16 = estimate_memory(shape, 8, 1024, device_type="cuda", precision="bf16")
    blocks_fp32 = fp32.activations - estimate_memory(dict(shape, n_layer=0), 8, 1024, device_type="cuda").activations
    blocks_bf16 = bf16.activations - estimate_memory(dict(shape, n_layer=0), 8, 1024, device_type="cuda", precision="bf16").activations
    assert blocks_bf16 * 2 == blocks_fp32
    assert 0.5 <= bf16.activations / fp32.activations < 0.6  # ln_f and the loss stay fp32
    # On CPU, dropout inside attention keeps T x T matrices (the SDPA math path); not on CUDA.
    assert estimate_memory(GPT2, 8, 1024).activations > 2 * estimate_memory(GPT2, 8, 1024, device_type="cuda").activations


def test_largest_batch_is_monotone_and_exact():
    options = dict(fused_loss=True, precision="fp32")
    previous = 0
    for gib in (1, 2, 4, 8, 16, 64):
        available = gib * 2**30
        best = largest_batch(GPT2, 512, available, **options)
        assert best >= previous
        previous = best
        if best:
            assert fits(GPT2, best, 512, available, **options)
            assert estimate_memory(GPT2, best, 512, **options).total <= available
        assert not fits(GPT2, best + 1, 512, available, **options)
    assert largest_batch(GPT2, 512, 2**20) == 0


def test_what_fits_says_the_batch_and_accumulation():
    need = estimate_memory(GPT2, 16, 512, fused_loss=True).total
    assert what_fits(GPT2, 512, need, batch_size=16, fused_loss=True).startswith("Fits")
    available = estimate_memory(GPT2, 5, 512, fused_loss=True).total
    message = what_fits(GPT2, 512, available, batch_size=16, gradient_accumulation_steps=2, fused_loss=True)
    assert "Largest batch that fits: 5" in message and "--gradient_accumulation_steps 7" in message
    assert "effective batch 35, was 32" in message
    assert "Not even batch 1" in what_fits(GPT2, 512, 2**20, batch_size=4)
    assert available_memory("cpu") > 0


def test_time_estimate():
    t = estimate_time(8 * 1024, 1000)
    assert t.tokens == 8_192_000 and t.seconds is None and t.utilization is None
    fpt = flops_per_token(GPT2, 1024)
    assert fpt == 6 * (parameter_count(GPT2) - 1024 * 768) + 12 * 12 * 768 * 1024
    t = estimate_time(8 * 1024, 1000, measured_tokens_per_s=100_000.0, flops_per_token=fpt, peak=peak_flops("NVIDIA H100 80GB HBM3"))
    assert t.seconds == pytest.approx(81.92) and 0.0 < t.utilization < 1.0
    assert t.utilization == pytest.approx(100_000 * fpt / 989e12)
    assert "ETA 1m 22s" in t.line() and "utilisation" in t.line()
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None and peak_flops(None) is None and peak_flops("NVIDIA H100", "fp32") is None
    assert format_duration(3 * 86400 + 3600) == "3d 1h 00m" and format_duration(None) == "unknown"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("shape, batch, block", [
    (TINY, 2, 128),
    (dict(n_layer=4, n_embd=128, n_head=4, vocab_size=50304, n_positions=256), 4, 256),
])
def test_estimate_is_within_a_quarter_of_the_measured_peak(shape, batch, block):
    measured = measure_peak(shape, batch, block, fused_loss=True)["growth"]
    est = estimate_memory(shape, batch, block, fused_loss=True, optimizer="adamw_torch_fused")
    predicted = est.total - est.weights  # the child's baseline already holds the weights
    assert 0.75 <= predicted / measured <= 1.25, (predicted, measured)
