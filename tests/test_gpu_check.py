"""bench/gpu_check.py: its CPU mode end to end (as CI runs it), and the MFU arithmetic and peak lookup it prints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

ROWS = ["ours bf16 AdamW eager", "ours bf16 AdamW compile", "ours fp16 AdamW eager", "ours bf16 Muon eager",
        "ours bf16 Muon compile", "nanoGPT bf16 AdamW eager", "nanoGPT bf16 AdamW compile"]


@pytest.mark.slow
def test_cpu_mode_runs_every_cell_and_passes_every_check(tmp_path):
    report = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--json", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "CPU mode" in out and "dense peak: none for a CPU" in out
    for row in ROWS:
        line = next((l for l in out.splitlines() if l.startswith(f"| {row} |")), None)
        assert line is not None, f"no row {row!r}:\n{out}"
        assert float(line.split("|")[2].replace(",", "")) > 0, line
    result = json.loads(report.read_text())
    assert [c["name"] for c in result["cells"]] == [c[0] for c in gpu_check.CELLS]
    assert all(c["tokens_per_s"] > 0 and c["peak_memory"] > 0 and "error" not in c for c in result["cells"])
    assert {c["name"]: c["optim"] for c in result["cells"] if c["runner"] == "ours"}["ours-bf16-muon-eager"] == "muon"
    checks = result["checks"]
    assert set(checks) == set(gpu_check.CHECKS) and all(c["passed"] for c in checks.values()), checks
    guard = checks["nan_guard"]
    assert guard["weights_unchanged_at_that_step"] and guard["counted_by_guard"] and guard["weights_changed_later"]
    assert guard["loss_scale_before_after"][1] < guard["loss_scale_before_after"][0]  # the scaler saw the inf
    resume = checks["resume"]
    assert resume["resumed_from"] == f"checkpoint-{gpu_check.SIZES['cpu']['resume']['save']}"
    assert resume["max_weight_diff"] <= 1e-6 and resume["eval_loss"][0] == pytest.approx(resume["eval_loss"][1], abs=1e-6)
    assert checks["web_demo"]["status"] == 200 and checks["web_demo"]["model_device"] == "cpu"
    assert checks["generate"]["ours_tokens_per_s"] > 0 and checks["generate"]["model_generate_tokens_per_s"] > 0
    for name in checks:
        assert f"- **{name}**: passed" in out
    assert "MFU >= 45%" in out and "not applicable here" in out and "tok/s >= nanoGPT's" in out


def test_a_check_that_cannot_pass_exits_non_zero(tmp_path):
    # nan_guard rides on the fp16 cell: without it the check fails, and the command says so with exit code 1.
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--only", "none", "--checks", "nan_guard",
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "- **nan_guard**: FAILED: the fp16 cell, which hosts this check, did not run" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == ["nan_guard"]


def test_flops_per_token_is_nanogpts_6n_plus_12ltd():
    from transformers import GPT2Config, GPT2LMHeadModel

    size = gpu_check.SIZES["cuda"]
    shape = gpu_check.model_shape(size)
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, n_positions=1024))
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()  # tied: wte counted once
    assert round(n / 1e6, 2) == 123.69  # what nanoGPT prints for GPT-2 124M: "number of parameters: 123.69M"
    assert gpu_check.flops_per_token(shape, 1024) == 6 * n + 12 * 12 * 1024 * 768


def test_mfu_is_achieved_flops_over_the_peak():
    flops = gpu_check.flops_per_token(gpu_check.model_shape(gpu_check.SIZES["cuda"]), 1024)
    peak = gpu_check.card_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert gpu_check.mfu(500_000, flops, peak) == pytest.approx(500_000 * flops / 989e12)
    assert 0.40 < gpu_check.mfu(500_000, flops, peak) < 0.45  # ~0.86 GFLOP per token at 500k tokens/s on 989 TFLOP/s
    assert gpu_check.mfu(500_000, flops, None) is None and gpu_check.mfu(None, flops, peak) is None


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "fp16", 989e12), ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12), ("NVIDIA A100-SXM4-80GB", "fp16", 312e12), ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12), ("Tesla T4", "fp16", None), (None, "bf16", None),
    ("NVIDIA H100 80GB HBM3", "fp32", None),
])
def test_the_cards_dense_peak_is_looked_up_by_name(name, precision, peak):
    assert gpu_check.card_peak(name, precision) == peak


def test_targets_apply_to_an_h100_or_h200_only():
    results = [dict(name="ours-bf16-adamw-compile", runner="ours", precision="bf16", compile=True, tokens_per_s=600_000),
               dict(name="nanogpt-compile", runner="nanogpt", precision="bf16", compile=True, tokens_per_s=500_000)]
    flops = gpu_check.flops_per_token(gpu_check.model_shape(gpu_check.SIZES["cuda"]), 1024)
    peaks = {p: gpu_check.card_peak("NVIDIA H200", p) for p in ("bf16", "fp16")}
    gpu_check.derive(results, flops, peaks)
    assert results[0]["vs_nanogpt"] == pytest.approx(1.2) and results[0]["mfu"] == pytest.approx(600_000 * flops / 989e12)
    on_h200 = gpu_check.target_results({"device": "cuda", "name": "NVIDIA H200"}, results)
    assert on_h200["mfu_45_percent_bf16_compile"]["met"] is True and on_h200["at_least_nanogpt_tokens_per_s"]["met"] is True
    on_a100 = gpu_check.target_results({"device": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, results)
    assert on_a100["mfu_45_percent_bf16_compile"] == {"value": results[0]["mfu"], "applies": False, "met": None}
