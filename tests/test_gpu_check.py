"""bench/gpu_check.py: its CPU mode end to end (as CI runs it), --profile, the cli cell's reading of train.py's
output, the cells it builds, and the MFU arithmetic, peak lookup and targets it prints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check

ROWS = ["ours bf16 AdamW eager", "ours bf16 AdamW compile", "ours fp16 AdamW eager", "ours bf16 Muon eager",
        "ours bf16 Muon compile", "plain bf16 AdamW eager", "plain bf16 AdamW compile", "nanoGPT bf16 AdamW eager",
        "nanoGPT bf16 AdamW compile", "train.py CLI (GPU defaults)"]
# What train.py prints after its first timed steps on a GPU whose peak it knows (EtaCallback), and its batch line.
AFTER_LINE = ("After 11 steps: 30 steps, 1.23M tokens; 412,345 tokens/s, ETA 0m 03s; FLOPs utilisation 45.1% to go; "
              "peak GPU memory 60.2 GiB (estimated 52.5).")
GPU_BATCH_LINE = ("GPU batch: 64 x 1024 tokens per device (the largest power of two that fits in 90% of the free memory) "
                  "x 8 accumulation step(s) x 1 device(s) = 524,288 tokens per optimizer step; 2 step(s) per epoch.")


@pytest.mark.slow
def test_cpu_mode_runs_every_cell_and_passes_every_check(tmp_path):
    report = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--json", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "CPU mode" in out and "dense peak: none for a CPU" in out
    for row in ROWS:
        line = next((l for l in out.splitlines() if l.startswith(f"| {row} |")), None)
        assert line is not None, f"no row {row!r}:\n{out}"
        assert float(line.split("|")[2].replace(",", "")) > 0, line
    result = json.loads(report.read_text())
    assert [c["name"] for c in result["cells"]] == [c[0] for c in gpu_check.CELLS]
    assert all(c["tokens_per_s"] > 0 and "error" not in c for c in result["cells"])
    assert all(c["peak_memory"] > 0 for c in result["cells"] if c["runner"] != "cli")  # train.py prints it on CUDA only
    cli = next(c for c in result["cells"] if c["runner"] == "cli")
    assert cli["after_line"].startswith("After ") and "--torch_compile off" in cli["command"] and not cli["compile"]
    assert cli["vs_nanogpt"] > 0  # against nanoGPT's eager cell in the CPU mode
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
    assert "train() bf16 eager >= 0.9x nanoGPT eager: " in out and "python train.py (GPU defaults) MFU >= 45%: " in out
    assert "peak memory <= nanoGPT's at equal batch (plain bf16 AdamW compile)" in out


def test_a_check_that_cannot_pass_exits_non_zero(tmp_path):
    # nan_guard rides on the fp16 cell: without it the check fails, and the command says so with exit code 1.
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--only", "none", "--checks", "nan_guard",
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "- **nan_guard**: FAILED: the fp16 cell, which hosts this check, did not run" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == ["nan_guard"]


def test_profile_writes_and_prints_the_top_ops_of_steps_after_the_timed_ones(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--only", "plain-bf16-eager", "--checks",
                           "none", "--profile", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "plain-bf16-eager.profile.txt").read_text()
    assert "Self CPU" in table and "aten::" in table and len(table.splitlines()) >= 15 + 4  # header, rules, total
    assert "## Profiles (self CPU time)" in proc.stdout and table.splitlines()[1] in proc.stdout
    cell = json.loads((tmp_path / "r.json").read_text())["cells"][0]
    assert cell["tokens_per_s"] > 0 and cell["last_loss"] > 0


def test_the_cli_cell_reads_train_pys_speed_line():
    parsed = gpu_check.parse_cli(f"Data: ...\n{GPU_BATCH_LINE}\n{{'loss': '10.4'}}\n{AFTER_LINE}\nFinal model saved\n")
    assert parsed["tokens_per_s"] == 412_345 and parsed["printed_mfu"] == pytest.approx(0.451)
    assert parsed["peak_memory"] == int(60.2 * 2**30) and parsed["estimated_memory"] == int(52.5 * 2**30)
    assert parsed["gpu_batch"] == GPU_BATCH_LINE and parsed["after_line"] == AFTER_LINE and parsed["after_steps"] == 11
    cpu = gpu_check.parse_cli("After 11 steps: 3 steps, 0.00M tokens; 4,746 tokens/s, ETA 0m 00s to go.\n")
    assert cpu == {"after_line": "After 11 steps: 3 steps, 0.00M tokens; 4,746 tokens/s, ETA 0m 00s to go.",
                   "after_steps": 11, "tokens_per_s": 4746.0}
    assert gpu_check.parse_cli("Traceback ...\n") == {}
    # The MFU column takes train.py's printed figure; the ratio is to nanoGPT's compiled cell, as the cli compiles on CUDA.
    results = [{"name": "cli", "runner": "cli", "precision": "bf16", "compile": True, **parsed},
               {"name": "nanogpt-compile", "runner": "nanogpt", "precision": "bf16", "compile": True, "tokens_per_s": 400_000}]
    gpu_check.derive(results, 1e9, {"bf16": 989e12, "fp16": 989e12})
    assert results[0]["mfu"] == pytest.approx(0.451) and results[0]["vs_nanogpt"] == pytest.approx(412_345 / 400_000)
    targets = gpu_check.target_results({"device": "cuda", "name": "NVIDIA H100 80GB HBM3"}, results)
    assert targets["cli_mfu_45_percent"]["met"] is True


def test_cells_and_the_cli_command(tmp_path):
    info = {"device": "cuda", "name": "NVIDIA H200", "bf16": True}
    specs = gpu_check.cell_specs(info, gpu_check.SIZES["cuda"], "web.jsonl", tmp_path, {"ours-bf16-adamw-compile", "cli"},
                                 profile=True, before=str(tmp_path / "old"))
    assert [s["name"] for s in specs] == ["ours-bf16-adamw-compile", "before-ours-bf16-adamw-compile", "cli"]
    ours, before, cli = specs
    assert before["root"] == str(tmp_path / "old") and "root" not in ours
    assert before["train"]["output_dir"] == str(tmp_path / "before-ours-bf16-adamw-compile") != ours["train"]["output_dir"]
    assert ours["train"]["max_steps"] == 10 + 30 + gpu_check.PROFILE_STEPS  # profiled after the timed steps
    assert before["profile"].endswith("before-ours-bf16-adamw-compile.profile.txt") and "profile" not in cli
    assert cli["compile"] is True and cli["argv"] == [
        "--dataset_path", "web.jsonl", "--output_dir", str(tmp_path / "cli"), "--max_steps", "25", "--report_to", "none",
        "--sample_prompts", "none", "--eval_strategy", "no", "--save_strategy", "no", "--val_split", "0",
        "--disable_tqdm", "true", "--torch_compile", "on"]
    cpu = gpu_check.cell_specs({"device": "cpu", "bf16": True}, gpu_check.SIZES["cpu"], None, tmp_path, {"cli"})[0]
    assert cpu["compile"] is False and cpu["argv"][:2] == ["--dataset_name", "builtin"]
    assert cpu["argv"][-10:] == ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--block_size", "32",
                                 "--torch_compile", "off"]


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
    results = [{"name": "ours-bf16-adamw-compile", "runner": "ours", "precision": "bf16", "compile": True, "tokens_per_s": 600_000},
               {"name": "nanogpt-compile", "runner": "nanogpt", "precision": "bf16", "compile": True, "tokens_per_s": 500_000}]
    flops = gpu_check.flops_per_token(gpu_check.model_shape(gpu_check.SIZES["cuda"]), 1024)
    peaks = {p: gpu_check.card_peak("NVIDIA H200", p) for p in ("bf16", "fp16")}
    gpu_check.derive(results, flops, peaks)
    assert results[0]["vs_nanogpt"] == pytest.approx(1.2) and results[0]["mfu"] == pytest.approx(600_000 * flops / 989e12)
    on_h200 = gpu_check.target_results({"device": "cuda", "name": "NVIDIA H200"}, results)
    assert on_h200["mfu_45_percent_bf16_compile"]["met"] is True and on_h200["at_least_nanogpt_tokens_per_s"]["met"] is True
    on_a100 = gpu_check.target_results({"device": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, results)
    assert on_a100["mfu_45_percent_bf16_compile"] == {"value": results[0]["mfu"], "applies": False, "met": None}


def test_the_eager_and_memory_targets():
    results = [{"name": "ours-bf16-adamw-eager", "runner": "ours", "precision": "bf16", "optim": "adamw", "compile": False,
                "tokens_per_s": 89_000},
               {"name": "plain-bf16-compile", "runner": "plain", "precision": "bf16", "optim": "adamw", "compile": True,
                "tokens_per_s": 500_000, "peak_memory": 9 * 2**30},
               {"name": "nanogpt-eager", "runner": "nanogpt", "precision": "bf16", "optim": "adamw", "compile": False,
                "tokens_per_s": 100_000},
               {"name": "nanogpt-compile", "runner": "nanogpt", "precision": "bf16", "optim": "adamw", "compile": True,
                "tokens_per_s": 450_000, "peak_memory": 10 * 2**30}]
    gpu_check.derive(results, 1e9, {"bf16": None, "fp16": None})
    targets = gpu_check.target_results({"device": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, results)
    assert targets["eager_at_least_0_9_nanogpt_eager"] == {"value": pytest.approx(0.89), "applies": True, "met": False}
    assert targets["peak_memory_at_most_nanogpt_compile"] == {
        "plain bf16 AdamW compile": {"value": pytest.approx(0.9), "applies": True, "met": True}}
    assert targets["cli_mfu_45_percent"] == {"value": None, "applies": False, "met": None}
    text = gpu_check.report({"device": "cuda"}, results, {}, targets, 1.0, 720)
    assert "- train() bf16 eager >= 0.9x nanoGPT eager: 0.89x: NOT met" in text
    assert "- peak memory <= nanoGPT's at equal batch (plain bf16 AdamW compile): 0.90x nanoGPT compile's: met" in text
