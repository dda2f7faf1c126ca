"""What the README promises for GPUs, measured in one command (CUDA), or the same code on a tiny model (CPU, CI).

    python bench/gpu_check.py                              # CUDA when there is a GPU, else the CPU mode
    python bench/gpu_check.py --data webtext.train.head1408.jsonl --json gpu_check.json
    python bench/gpu_check.py --only ours-bf16-adamw-compile,nanogpt-compile --checks none
    python bench/gpu_check.py --only plain-bf16-compile,cli --checks none --profile --workdir gc
    python bench/gpu_check.py --before ../old-checkout     # also time train() as an older commit has it

On a CUDA GPU: GPT-2 124M (the `gpt2` preset, vocabulary padded to 50304) at block 1024, batch 12 (nanoGPT's
micro-batch), on the WebText sample (--data; else ../shared/data/gpt2-output/webtext.train.head1408.jsonl, else the
built-in corpus), trained by train.py's `train()` for a few warm-up steps and then timed steps. Printed: a markdown
table of tokens/s, MFU (nanoGPT's 6N + 12LTd FLOPs per token, estimate.flops_per_token, against the card's dense
bf16/fp16 peak, estimate.peak_flops, looked up by the card's name), peak memory (torch.cuda.max_memory_allocated
over the timed steps) and the ratio to nanoGPT's loop; then the checks:

  nan_guard  fp16 with GradScaler: an inf is injected into one step's loss (from this bench: a Trainer subclass,
             no hook in train.py); the step must be skipped (weights unchanged, train.py's guard counted it) and
             training must go on to its last step with a finite loss and changed weights.
  resume     exact resume on the device: an uninterrupted run; a second one SIGKILLed right after its first
             checkpoint, then rerun (--resume auto); both end with the same weights (max |diff| <= 1e-6) and
             validation loss. All three runs use the Trainer's --full_determinism (deterministic kernels:
             cuBLAS workspace, deterministic attention backward), without which a GPU's atomics make even two
             uninterrupted runs differ.
  generate   generate.py's sampler against model.generate (bench/generate_bench.py's race and its
             re-implementation of the original), tokens/s on the device, on the resume check's trained model.
  web_demo   web_demo.build_app serving that model on the device (uvicorn on a free port) answers a POST
             /v1/completions.

Targets (printed as met or not met, never a failure): MFU >= 45% with torch.compile in bf16 on an H100/H200;
our train() at least as fast as nanoGPT's loop on the same card (both bf16 + torch.compile), and at least 0.9x in
eager mode; `python train.py` with the GPU defaults at MFU >= 45% (H100/H200); and each compiled ours/plain cell at
no more peak memory than nanoGPT's compiled cell at the same batch. A check that fails or a configuration that
crashes exits 1.

Which cells (each in its own process, so that compile caches and GPU memory do not leak between them), and why,
for about 12 minutes on one H100 (compile costs ~1 minute a cell, a process start ~5 s, the timed steps seconds):

  ours   bf16  AdamW  eager      the baseline every other cell differs from in one thing
  ours   bf16  AdamW  compile    the headline: the MFU and nanoGPT targets
  ours   fp16  AdamW  eager      GradScaler's cost (H100 runs fp16 and bf16 matmuls at the same peak, so fp16 x
                                 compile would only repeat the compile cell); hosts the nan_guard check
  ours   bf16  Muon   eager      the optimizer's cost alone (train(optim="muon"))
  ours   bf16  Muon   compile    Muon as it would be run
  plain  bf16  AdamW  eager / compile   our GPT2LMHeadModel in a plain PyTorch loop, without the Trainer, computing
                                 what train() computes on a GPU (the fused loss inside the model's forward under
                                 model.whole_blocks and bf16 autocast, clipping, fused AdamW) on nanoGPT's batches:
                                 ours vs plain is the Trainer's cost, plain vs nanoGPT the model's
  nanoGPT bf16 eager / compile   nanoGPT's train.py loop re-implemented (as bench/train_bench.py does on CPU, here
                                 device-aware): its GPT (no biases, exact GELU, SDPA, vocabulary 50304), fused AdamW
                                 (0.9, 0.95), weight decay 0.1, clipping at 1.0, autocast, TF32 on, random windows
                                 of the same tokens; one micro-step per optimizer step, like our cells.
  cli    `python train.py` as a user runs it on a GPU: its default batch (the `GPU batch:` line), precision and
         optimizer, --torch_compile on, 25 steps; tokens/s, MFU and peak memory as train.py prints them after its
         first timed steps ("After N steps: ..."). On (not auto: auto compiles only runs long enough to repay the
         minute of compiling, which 25 steps are not). Compared with nanoGPT's compiled cell, not at equal batch.
Left out: fp16 x compile and fp16 x Muon (no new information on cards whose bf16 and fp16 peaks are equal).
"vs nanoGPT" divides by nanoGPT's cell with the same compile setting.

--profile: each ours, plain and nanoGPT cell runs 3 more steps after its timed ones under torch.profiler (so the
timing excludes the profiler's overhead) and writes the top 15 ops by self CUDA time (CPU time in the CPU mode) to
<workdir>/<cell>.profile.txt; they are printed after the report. --before PATH (a checkout of an older commit): the
ours bf16 AdamW eager and compile cells also run with that checkout's train.py, as rows "ours (before) ...", for a
before/after on the same card (about 2 minutes more).

On a CPU-only machine (or --device cpu) the same cells and checks run on a 2-layer, 32-wide model at block 32 for a
few steps, budgeted for under 150 s on 2 cores, so that none of this code rots (tests/test_gpu_check.py runs it);
the cli cell runs train.py at that shape (--n_layer 2 --n_embd 32 --n_head 2 --block_size 32), uncompiled, for 14
steps at its CPU default batch. Differences besides the sizes: torch.compile uses the aot_eager backend (dynamo's
capture and AOTAutograd, the parts that break on model code; inductor on a CPU would compile C++, not the GPU's
Triton kernels, for a minute a cell); fp16, which accelerate runs on a CPU as plain fp32 without GradScaler, gets
fp16 autocast and a GradScaler from the bench's Trainer subclass, as accelerate gives them on CUDA, so that
nan_guard runs the GPU's path; the cell processes are forked from a server that has imported train.py once
(multiprocessing's forkserver), since an import costs 10 s on 2 cores. On CUDA each cell is a fresh interpreter
(spawn): a forked process could inherit a CUDA driver state. Peak memory on CPU is the process's peak RSS over the
timed steps. There is no dense peak for a CPU, so no MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
WEBTEXT = ROOT.parent / "shared" / "data" / "gpt2-output" / "webtext.train.head1408.jsonl"
NANOGPT_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, in nanoGPT and in train.py (--vocab_multiple 64)
MFU_TARGET = 0.45
INF_STEP = 2  # the step whose loss the nan_guard check makes infinite: inside the warm-up, never timed
EAGER_TARGET = 0.9  # train() in eager mode against nanoGPT's eager loop
PROFILE_STEPS = 3  # --profile: steps profiled after the timed ones
RESUME_TOLERANCE = 1e-6  # the README's "to 1e-6"

# Everything that differs between the CUDA and the CPU mode: sizes only (see the docstring).
SIZES = {
    "cuda": {"shape": {"n_layer": 12, "n_embd": 768, "n_head": 12}, "block": 1024, "batch": 12, "warmup": 10,
             "timed": 30, "compile_backend": "inductor",
             "resume": {"block": 1024, "batch": 4, "steps": 12, "save": 6, "val_split": 0.02},
             "gen_tokens": 256, "gen_reps": 3, "cell_timeout": 300, "cli_steps": 25, "budget": 720},
    "cpu": {"shape": {"n_layer": 2, "n_embd": 32, "n_head": 2}, "block": 32, "batch": 2, "warmup": 2, "timed": 4,
            "compile_backend": "aot_eager", "resume": {"block": 32, "batch": 2, "steps": 8, "save": 4, "val_split": 0.003},
            "gen_tokens": 16, "gen_reps": 2, "cell_timeout": 120, "cli_steps": 14, "budget": 150},
}
BEFORE_BUDGET = {"cuda": 150, "cpu": 30}  # --before's two cells

CELLS = [  # name, runner, precision, optimizer, compile
    ("ours-bf16-adamw-eager", "ours", "bf16", "adamw", False),
    ("ours-bf16-adamw-compile", "ours", "bf16", "adamw", True),
    ("ours-fp16-adamw-eager", "ours", "fp16", "adamw", False),
    ("ours-bf16-muon-eager", "ours", "bf16", "muon", False),
    ("ours-bf16-muon-compile", "ours", "bf16", "muon", True),
    ("plain-bf16-eager", "plain", "bf16", "adamw", False),
    ("plain-bf16-compile", "plain", "bf16", "adamw", True),
    ("nanogpt-eager", "nanogpt", "bf16", "adamw", False),
    ("nanogpt-compile", "nanogpt", "bf16", "adamw", True),
    ("cli", "cli", "bf16", "default", None),  # compiled on CUDA only (cell_specs)
]
BEFORE_CELLS = ("ours-bf16-adamw-eager", "ours-bf16-adamw-compile")  # also run from --before's checkout
CHECKS = ("nan_guard", "resume", "generate", "web_demo")
# The Trainer's fused AdamW, as nanoGPT uses on CUDA (train.py's own default for a new model is Muon).
OPTIM = {"adamw": "adamw_torch_fused", "muon": "muon"}


# ----------------------------------------------------------------------------------------------
# Arithmetic (unit-tested): FLOPs per token, MFU, the card's peak


def model_shape(size: dict) -> dict:
    """The trained GPT-2's shape as estimate.py reads it (vocabulary padded as train.py pads it)."""
    return dict(size["shape"], vocab_size=NANOGPT_VOCAB, n_positions=max(1024, size["block"]))


def flops_per_token(shape: dict, block: int) -> float:
    """nanoGPT's 6N + 12 L T d (N without the position table), which estimate.flops_per_token computes."""
    sys.path.insert(0, str(ROOT))
    from estimate import flops_per_token as count

    return count(shape, block)


def card_peak(device_name: str | None, precision: str) -> float | None:
    """The card's dense bf16/fp16 FLOP/s, looked up by its name (estimate.peak_flops); None for a CPU or an unknown card."""
    sys.path.insert(0, str(ROOT))
    from estimate import peak_flops

    return peak_flops(device_name, precision)


def mfu(tokens_per_s: float | None, flops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, 0..1: the FLOPs the model's arithmetic needs per second against the card's peak."""
    if not tokens_per_s or not peak:
        return None
    return tokens_per_s * flops / peak


# ----------------------------------------------------------------------------------------------
# The cells, each in a child process


def _data_kwargs(data: str | None) -> dict:
    return {"dataset_path": data} if data else {"dataset_name": "builtin"}


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str):
    """Start the peak-memory window: CUDA's allocator statistics, or the process's high-water RSS (Linux)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def _peak(device: str) -> int | None:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _snapshot(model):
    return [p.detach().to("cpu", copy=True) for p in model.parameters()]


def _same(model, snapshot) -> bool:
    import torch

    return all(torch.equal(p.detach().cpu(), s) for p, s in zip(model.parameters(), snapshot))


def _skipped(trainer) -> int:
    """Optimizer steps the fp16 scaler skipped, as train.py's guard counts them (an older train.py: skipped_steps)."""
    guard = getattr(trainer, "guard", None)
    return guard.skipped() if guard is not None else getattr(trainer, "skipped_steps", 0)


def _profile_callback(spec: dict, after: int):
    """--profile in a Trainer run: the PROFILE_STEPS steps after step `after` under the profiler."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == after:
                self.profiler = _profiler(spec["device"])
                self.profiler.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == after + PROFILE_STEPS and self.profiler is not None:
                _sync(spec["device"])
                self.profiler.stop()
                _write_profile(self.profiler, spec)

    return Profile()


def run_ours(spec: dict) -> dict:
    """A train.py run through train(), timed by a callback; optionally an inf injected into one step's loss
    (nan_guard), a SIGKILL after a step (resume) or the steps after the timed ones profiled (--profile). The
    Trainer subclass is this bench's, as in train_bench.py."""
    import torch
    from transformers import TrainerCallback

    import train as train_module

    device, size = spec["device"], spec["size"]
    warmup, timed = spec.get("warmup"), spec.get("timed")
    probe: dict = {"skipped_by_guard": None}

    class Probe(TrainerCallback):
        trainer = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if spec.get("inject_inf") and state.global_step + 1 == INF_STEP:
                probe["before"] = _snapshot(model)
                probe["scale_before"] = self.trainer.accelerator.scaler.get_scale() if self.trainer.accelerator.scaler else None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if warmup is not None and step == warmup:
                _sync(device)
                _reset_peak(device)
                probe["start"] = time.perf_counter()
            if warmup is not None and step == warmup + timed:
                _sync(device)
                probe["end"] = time.perf_counter()
                probe["peak"] = _peak(device)
            if spec.get("inject_inf") and step == INF_STEP:
                # After the guard's own step end (the callback is added after it), which counts the skipped step;
                # INF_STEP is no logging step, whose report would reset the count.
                scaler = self.trainer.accelerator.scaler
                probe["unchanged_at_inf_step"] = _same(model, probe.pop("before"))
                probe["skipped_by_guard"] = _skipped(self.trainer) >= 1
                probe["scale"] = [probe.pop("scale_before"), scaler.get_scale() if scaler else None]
                probe["after"] = _snapshot(model)
            if spec.get("kill_at") == step:
                os.kill(os.getpid(), signal.SIGKILL)  # as kill -9: no cleanup, the checkpoint before is all there is

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if "after" in probe:
                probe["changed_after"] = not _same(model, probe.pop("after"))
            probe["last_loss"] = float(probe["loss"]) if "loss" in probe else None
            probe["steps"] = state.global_step

    callback = Probe()

    class BenchTrainer(train_module.GPT2Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(callback)  # after the callbacks train.py's Trainer adds (its guard)
            callback.trainer = self
            if spec.get("profile"):
                self.add_callback(_profile_callback(spec, warmup + timed))
            if spec["device"] == "cpu" and spec["train"].get("precision") == "fp16" and self.accelerator.scaler is None:
                # accelerate runs "fp16" on a CPU as plain fp32, without autocast or GradScaler; turn both on as it
                # does on CUDA, so that the CPU mode runs the GPU's fp16 path, train.py's guard included.
                self.accelerator.native_amp = True
                self.accelerator.scaler = torch.amp.GradScaler("cpu")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if spec.get("inject_inf") and model.training and not return_outputs and self.state.global_step + 1 == INF_STEP:
                result = result * float("inf")  # an overflow, as fp16 produces one
            if model.training and not return_outputs:
                probe["loss"] = result.detach()  # read once, at the end: no synchronisation per step
            return result

    train_module.GPT2Trainer = BenchTrainer
    result = train_module.train(**spec["train"])
    out = {"steps": probe.get("steps"), "last_loss": probe.get("last_loss"), "optim": spec["train"].get("optim"),
           "eval_loss": result.get("eval_metrics", {}).get("eval_loss"), "final_model": result.get("final_model"),
           "train_py": train_module.__file__}  # which checkout's (--before)
    if "start" in probe and "end" in probe:
        seconds = probe["end"] - probe["start"]
        out.update(tokens_per_s=timed * size["batch"] * size["block"] / seconds, seconds=seconds, peak_memory=probe["peak"])
    if spec.get("inject_inf"):
        out.update({k: probe.get(k) for k in ("unchanged_at_inf_step", "skipped_by_guard", "scale", "changed_after")})
    return out


def _tokens(spec: dict):
    """The training text's tokens in one array, as nanoGPT's train.bin holds them."""
    import numpy as np

    from dataset import get_dataset_and_tokenizer

    _, train_ds, _ = get_dataset_and_tokenizer(block_size=spec["size"]["block"], val_split=0, **_data_kwargs(spec["data"]))
    return np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in train_ds["input_ids"]])


def _batches(tokens, size: dict, device: str):
    """nanoGPT's get_batch: (inputs, targets) from random windows of the tokens, pinned and copied without blocking on CUDA."""
    import numpy as np
    import torch

    block, batch = size["block"], size["batch"]

    def move(t):
        return t.pin_memory().to(device, non_blocking=True) if device == "cuda" else t

    def get_batch():
        ix = torch.randint(len(tokens) - block, (batch,))
        x = torch.stack([torch.from_numpy(tokens[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return move(x), move(y)

    return get_batch


def _timed_loop(spec: dict, step) -> dict:
    """The warm-up steps, the timed ones (tokens/s, peak memory), then with --profile PROFILE_STEPS more under the
    profiler. step(it) runs optimizer step `it` and returns its loss, read once at the end (no host read per step)."""
    device, size = spec["device"], spec["size"]
    warmup, timed = spec["warmup"], spec["timed"]
    for it in range(warmup):
        loss = step(it)
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for it in range(warmup, warmup + timed):
        loss = step(it)
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"tokens_per_s": timed * size["batch"] * size["block"] / seconds, "seconds": seconds, "peak_memory": _peak(device)}
    if spec.get("profile"):
        with _profiler(device) as prof:
            for it in range(warmup + timed, warmup + timed + PROFILE_STEPS):
                loss = step(it)
            _sync(device)
        _write_profile(prof, spec)
    out["last_loss"] = float(loss.item())
    return out


def _profiler(device: str):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))


def _write_profile(prof, spec: dict) -> None:
    """The top ops of the profiled steps by self time on the device (CPU time in the CPU mode), to spec["profile"]."""
    sort = "self_cuda_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
    Path(spec["profile"]).write_text(prof.key_averages().table(sort_by=sort, row_limit=15) + "\n")


def run_plain(spec: dict) -> dict:
    """Our GPT2LMHeadModel in a plain PyTorch loop, without the Trainer: each step computes what train() computes on
    a GPU (the fused loss inside the model's forward under whole_blocks and bf16 autocast, clipping at 1.0, fused
    AdamW with the Trainer's decay rule), on nanoGPT's batches. The model's speed apart from the Trainer's."""
    import torch

    import model as model_lib

    device, size = spec["device"], spec["size"]
    tokens = _tokens(spec)
    torch.manual_seed(1337)
    model = model_lib.get_model(**size["shape"], vocab_size=NANOGPT_VOCAB, n_positions=max(1024, size["block"]),
                                dropout=0.0, verbose=False).to(device)
    model.train()
    model_lib.FusedCausalLMLoss(model, sparse_embedding=False, gemm_dtype=torch.bfloat16)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), fused=True)
    cmodel = torch.compile(model, backend=size["compile_backend"]) if spec["compile"] else model
    get_batch = _batches(tokens, size, device)
    X = get_batch()[0]

    def step(it):
        nonlocal X
        with model_lib.whole_blocks(model), torch.autocast(device, dtype=torch.bfloat16):
            loss = cmodel(input_ids=X, labels=X, logits_to_keep=model_lib.no_logits(device), use_cache=False).loss
        X = get_batch()[0]  # the next batch while the device works, as nanoGPT's loop does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _timed_loop(spec, step)


def run_nanogpt(spec: dict) -> dict:
    """nanoGPT's train.py loop and model.py, re-implemented at its defaults for this device (see the docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    device, size = spec["device"], spec["size"]
    block = size["block"]
    n_layer, n_embd, n_head = (size["shape"][k] for k in ("n_layer", "n_embd", "n_head"))
    vocab = NANOGPT_VOCAB
    tokens = _tokens(spec)

    class LayerNorm(nn.Module):
        def __init__(self, ndim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = LayerNorm(n_embd), LayerNorm(n_embd)
            self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd, bias=False), nn.Linear(n_embd, n_embd, bias=False)
            self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd, bias=False), nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(self.ln_1(x)).split(n_embd, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
            self.h, self.ln_f = nn.ModuleList(Block() for _ in range(n_layer)), LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.wte.weight = self.lm_head.weight  # weight tying
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, mean=0.0, std=std)

        def forward(self, idx, targets):
            pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for b in self.h:
                x = b(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = True  # nanoGPT's train.py sets both
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
    ctx = torch.amp.autocast(device_type=device, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device, enabled=spec["precision"] == "fp16")
    model = GPT().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), fused=True)
    if spec["compile"]:
        model = torch.compile(model, backend=size["compile_backend"])
    get_batch = _batches(tokens, size, device)
    X, Y = get_batch()

    def step(it):
        nonlocal X, Y
        lr = 6e-4 * (it + 1) / (2000 + 1)  # nanoGPT's linear warmup over 2000 iterations
        for group in optimizer.param_groups:
            group["lr"] = lr
        with ctx:
            loss = model(X, Y)
        X, Y = get_batch()  # nanoGPT prefetches the next batch while the GPU works
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _timed_loop(spec, step)


def run_serve(spec: dict) -> dict:
    """generate.py against model.generate on the device, then the web demo serving the same model."""
    import threading
    import urllib.request
    import warnings

    import uvicorn

    sys.path.insert(0, str(BENCH))
    import generate_bench as GB

    import generate as G
    import web_demo as W

    warnings.filterwarnings("ignore")
    device, size = spec["device"], spec["size"]
    tokenizer, model, dev = G.load_model(spec["model_path"], device=device)
    length = size["gen_tokens"]

    def counted(fn):
        def run():
            text = fn(tokenizer, model, dev, GB.PROMPT, max_new_tokens=length)
            _sync(device)
            return GB.new_tokens(tokenizer, GB.PROMPT, [text])
        return run

    rates = GB.race({"model.generate": counted(GB.original_generate_once), "generate.py": counted(G.generate_once),
                     "generate.py eager": GB.without_cuda_graphs(tokenizer, model, counted(G.generate_once))}, size["gen_reps"])
    fast = G.decode.fast_forward(model, G._n_tokens(tokenizer, model))
    out = {"generate": {"device": str(dev), "dtype": str(next(model.parameters()).dtype), "new_tokens": length,
                        "model_generate_tokens_per_s": rates["model.generate"], "ours_tokens_per_s": rates["generate.py"],
                        "ours_eager_steps_tokens_per_s": rates["generate.py eager"], "graph_problem": fast.graph_problem}}

    app = W.build_app(tokenizer, model, dev, W.WebDemoArguments(model_path=spec["model_path"], device=device))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the web demo's server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    body = json.dumps({"prompt": "The", "max_tokens": 8, "seed": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for our own loopback server
    start = time.perf_counter()
    with opener.open(request, timeout=60) as r:
        status, answer = r.status, json.loads(r.read().decode())
    seconds = time.perf_counter() - start

    def clients(n: int, requests: int = 4, tokens: int = 64) -> float:
        """Completion tokens/s of n concurrent clients, each sending `requests` requests one after another."""
        def client(c):
            done = 0
            for i in range(requests):
                body = json.dumps({"prompt": "The", "max_tokens": tokens, "top_k": 40, "seed": 100 * c + i}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"})
                with opener.open(req, timeout=300) as r:
                    done += json.loads(r.read().decode())["usage"]["completion_tokens"]
            return done

        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            total = sum(pool.map(client, range(n)))
        return total / (time.perf_counter() - t0)

    serving = {"one_client_tokens_per_s": clients(1), "sixteen_clients_tokens_per_s": clients(16)}
    serving["sixteen_vs_one"] = serving["sixteen_clients_tokens_per_s"] / serving["one_client_tokens_per_s"]
    server.should_exit = True
    thread.join(timeout=10)
    engine = app.state.engine
    choice = (answer.get("choices") or [{}])[0]
    out["web_demo"] = {"status": status, "text": choice.get("text"), "finish_reason": choice.get("finish_reason"),
                       "completion_tokens": answer.get("usage", {}).get("completion_tokens"), "seconds": seconds,
                       "engine_device": str(engine.device),
                       "model_device": str(next(engine.model.parameters()).device), **serving}
    return out


RUNNERS = {"ours": run_ours, "plain": run_plain, "nanogpt": run_nanogpt, "serve": run_serve}


def _forget_project_modules() -> None:
    """Drop the project's modules a forkserver preloaded from this checkout, so that the next imports read another
    checkout's (--before). Not the virtual environment's or this bench's."""
    for name, module in list(sys.modules.items()):
        path = Path(getattr(module, "__file__", None) or "/")
        if path.is_relative_to(ROOT) and not path.relative_to(ROOT).parts[0].startswith(".") and path.parent != BENCH:
            del sys.modules[name]


def _child(spec: dict, result_path: str, log_path: str):
    """A cell's process: its output to its log file, its result (or its traceback) to result_path as JSON."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(spec.get("env", {}))  # before torch touches CUDA (spawn: torch is not imported yet)
    root = spec.get("root", str(ROOT))
    if root != str(ROOT):
        _forget_project_modules()
    sys.path.insert(0, root)
    try:
        result = RUNNERS[spec["runner"]](spec)
    except BaseException:  # noqa: BLE001 - whatever ends the cell, its result says why
        traceback.print_exc()
        result = {"error": traceback.format_exc(limit=-3).strip().splitlines()[-1]}
    sys.stdout.flush()
    sys.stderr.flush()
    Path(result_path).write_text(json.dumps(result, default=str))


def launch(ctx, spec: dict, workdir: Path, timeout: float) -> dict:
    """Run one cell in its own process; returns its result, with "exitcode" and, on failure, "error" and "log"."""
    if spec["runner"] == "cli":
        return run_cli(spec, workdir, timeout)
    name = spec["name"]
    result_path, log_path = workdir / f"{name}.json", workdir / f"{name}.log"
    result_path.unlink(missing_ok=True)
    proc = ctx.Process(target=_child, args=(spec, str(result_path), str(log_path)), daemon=False)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        result = {"error": f"took over {timeout:.0f}s"}
    elif result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"error": f"the process ended with exit code {proc.exitcode} before reporting"}
    result["exitcode"] = proc.exitcode
    result["log"] = str(log_path)
    return result


def cli_argv(info: dict, size: dict, data: str | None, workdir: Path) -> list[str]:
    """`python train.py` with the GPU defaults (batch, precision, optimizer): only the data, the run folder and
    what keeps a short run short; compiled on CUDA (see the docstring), the CPU mode's tiny shape on a CPU."""
    argv = ["--dataset_path", data] if data else ["--dataset_name", "builtin"]
    argv += ["--output_dir", str(workdir / "cli"), "--max_steps", str(size["cli_steps"]), "--report_to", "none",
             "--sample_prompts", "none", "--eval_strategy", "no", "--save_strategy", "no", "--val_split", "0",
             "--disable_tqdm", "true"]
    if info["device"] == "cuda":
        return argv + ["--torch_compile", "on"]
    shape = [arg for k, v in size["shape"].items() for arg in (f"--{k}", str(v))]
    return argv + shape + ["--block_size", str(size["block"]), "--torch_compile", "off"]


def run_cli(spec: dict, workdir: Path, timeout: float) -> dict:
    """The cli cell: train.py as a subprocess, its output in the cell's log, its speed as it prints it."""
    log_path = workdir / f"{spec['name']}.log"
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    command = [sys.executable, "train.py", *spec["argv"]]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"took over {timeout:.0f}s", "exitcode": None, "log": str(log_path)}
    out = {**parse_cli(log_path.read_text(errors="replace")), "command": " ".join(["python", *command[1:]]),
           "exitcode": proc.returncode, "log": str(log_path)}
    if proc.returncode:
        out["error"] = f"train.py exited with code {proc.returncode}"
    elif "tokens_per_s" not in out:
        out["error"] = "train.py printed no 'After N steps: ... tokens/s' line"
    return out


def parse_cli(text: str) -> dict:
    """What train.py prints of its speed: the "After N steps: ..." line (tokens/s; the FLOPs utilisation and the peak
    GPU memory where it knows them) and the "GPU batch: ..." line, kept as printed."""
    out = {}
    for line in text.splitlines():
        if line.startswith("GPU batch: "):
            out["gpu_batch"] = line
        after = re.search(r"After (\d+) steps: .*", line)
        if not after:
            continue
        out.update(after_line=after[0], after_steps=int(after[1]))
        if speed := re.search(r"([\d,]+(?:\.\d+)?) tokens/s", line):
            out["tokens_per_s"] = float(speed[1].replace(",", ""))
        if utilisation := re.search(r"FLOPs utilisation ([\d.]+)%", line):
            out["printed_mfu"] = float(utilisation[1]) / 100
        if memory := re.search(r"peak GPU memory ([\d.]+) GiB \(estimated ([\d.]+)\)", line):
            out.update(peak_memory=int(float(memory[1]) * 2**30), estimated_memory=int(float(memory[2]) * 2**30))
    return out


def log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------
# The run


def device_info(choice: str) -> dict:
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but this torch sees no CUDA GPU.")
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "memory": props.total_memory,
                "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda, "torch": torch.__version__}
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"device": "cpu", "name": name, "cores": os.cpu_count(), "bf16": True, "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}


def train_kwargs(size: dict, data: str | None, out: Path, **extra) -> dict:
    return dict(_data_kwargs(data), **size["shape"], block_size=size["block"], per_device_train_batch_size=size["batch"],
                output_dir=str(out), report_to="none", sample_prompts=["none"], disable_tqdm=True, seed=7, **extra)


def cell_specs(info: dict, size: dict, data: str | None, workdir: Path, only: set | None, profile: bool = False,
               before: str | None = None) -> list[dict]:
    """The cells to run, in CELLS' order; with --before, each of BEFORE_CELLS followed by its run from that checkout."""
    specs = []
    for name, runner, precision, optim, compiled in CELLS:
        compiled = info["device"] == "cuda" if compiled is None else compiled
        spec = {"name": name, "runner": runner, "precision": precision, "optim": optim, "compile": compiled,
                "device": info["device"], "size": size, "data": data, "warmup": size["warmup"], "timed": size["timed"]}
        if precision == "bf16" and not info["bf16"] and runner != "cli":  # train.py picks fp16 on such a card itself
            spec["skip"] = "this GPU has no bf16"
        if profile and runner != "cli":
            spec["profile"] = str(workdir / f"{name}.profile.txt")
        if runner == "ours":
            steps = size["warmup"] + size["timed"] + (PROFILE_STEPS if profile else 0)
            spec["train"] = train_kwargs(size, data, workdir / name, max_steps=steps, val_split=0,
                                         eval_strategy="no", save_strategy="no", resume="never", precision=precision,
                                         optim=OPTIM[optim], torch_compile=compiled,
                                         **({"torch_compile_backend": size["compile_backend"]} if compiled else {}))
            spec["inject_inf"] = precision == "fp16"  # the nan_guard check rides on the fp16 cell's warm-up
        if runner == "cli":
            spec["argv"] = cli_argv(info, size, data, workdir)
        if only is None or name in only:
            specs.append(spec)
        if before and name in BEFORE_CELLS and (only is None or name in only or f"before-{name}" in only):
            other = f"before-{name}"
            specs.append(dict(spec, name=other, root=str(Path(before).resolve()), before=True,
                              train=dict(spec["train"], output_dir=str(workdir / other)),
                              **({"profile": str(workdir / f"{other}.profile.txt")} if profile else {})))
    return specs


def run_resume(ctx, info: dict, size: dict, data: str | None, workdir: Path, timeout: float) -> dict:
    """Uninterrupted run, then a run SIGKILLed after its first checkpoint and rerun; the same end state?"""
    r = size["resume"]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS; must be set before cuBLAS starts
    # The GPU's default precision, named, so that the CPU mode runs the GPU's path (bf16 autocast, logits and
    # cross_entropy) rather than the CPU's default fp32 fused loss, which deterministic kernels slow down 15x.
    precision = "bf16" if info["bf16"] else "fp16"

    def spec(name, out, **extra):
        kwargs = train_kwargs(dict(size, block=r["block"], batch=r["batch"]), data, out, max_steps=r["steps"],
                              save_steps=r["save"], eval_strategy="no", val_split=r["val_split"], logging_steps=1,
                              full_determinism=True, optim=OPTIM["adamw"], precision=precision)
        return dict(name=name, runner="ours", device=info["device"], size=dict(size, block=r["block"], batch=r["batch"]),
                    data=data, train=kwargs, env=env, **extra)

    reference = launch(ctx, spec("resume-reference", workdir / "resume-reference"), workdir, timeout)
    if "error" in reference:
        return {"passed": False, "error": f"uninterrupted run: {reference['error']}", "log": reference["log"]}
    out = workdir / "resume-killed"
    killed = launch(ctx, spec("resume-killed", out, kill_at=r["save"] + 1), workdir, timeout)
    checkpoint = out / f"checkpoint-{r['save']}"
    if killed["exitcode"] != -signal.SIGKILL or not (checkpoint / "COMPLETE").is_file():
        return {"passed": False, "error": f"the run was not killed after a complete {checkpoint.name} "
                f"(exit code {killed['exitcode']}; {killed.get('error', '')})", "log": killed["log"]}
    resumed = launch(ctx, spec("resume-rerun", out), workdir, timeout)
    if "error" in resumed:
        return {"passed": False, "error": f"rerun: {resumed['error']}", "log": resumed["log"]}
    if reference.get("eval_loss") is None or resumed.get("eval_loss") is None:
        return {"passed": False, "error": "no validation loss to compare (no validation data?)", "log": resumed["log"]}
    resumed_from = f"Resuming from {checkpoint}" in Path(resumed["log"]).read_text(errors="replace")
    from safetensors.torch import load_file

    a = load_file(Path(reference["final_model"]) / "model.safetensors")
    b = load_file(Path(resumed["final_model"]) / "model.safetensors")
    max_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else math.inf
    loss_diff = abs(reference["eval_loss"] - resumed["eval_loss"])
    passed = resumed_from and max_diff <= RESUME_TOLERANCE and loss_diff <= RESUME_TOLERANCE
    return {"passed": passed, "resumed_from": checkpoint.name if resumed_from else None, "max_weight_diff": max_diff,
            "eval_loss": [reference["eval_loss"], resumed["eval_loss"]], "steps": r["steps"],
            "model_path": reference["final_model"], "log": resumed["log"]}


def nan_guard_result(cell: dict | None) -> dict:
    if cell is None or cell.get("skip"):
        return {"passed": False, "error": "the fp16 cell, which hosts this check, did not run"}
    if "error" in cell:
        return {"passed": False, "error": f"the fp16 cell failed: {cell['error']}", "log": cell.get("log")}
    finite = cell.get("last_loss") is not None and math.isfinite(cell["last_loss"])
    reached = cell.get("steps") == cell["train"]["max_steps"]
    passed = bool(cell.get("unchanged_at_inf_step") and cell.get("skipped_by_guard") and cell.get("changed_after")
                  and finite and reached)
    return {"passed": passed, "inf_at_step": INF_STEP, "weights_unchanged_at_that_step": cell.get("unchanged_at_inf_step"),
            "counted_by_guard": cell.get("skipped_by_guard"), "loss_scale_before_after": cell.get("scale"),
            "weights_changed_later": cell.get("changed_after"), "steps": cell.get("steps"), "last_loss": cell.get("last_loss")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Training text for every cell (a dataset_path: .jsonl/.txt/folder). Default: the "
                        "WebText sample at ../shared/data/gpt2-output/webtext.train.head1408.jsonl if present, else the built-in corpus.")
    parser.add_argument("--json", help="Also write every result (cells, checks, targets, device) to this JSON file.")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: the CUDA mode when a GPU is visible, else the CPU mode; cpu forces the CPU mode.")
    parser.add_argument("--only", help="Comma-separated cells to run (default all; none for none): " + ", ".join(c[0] for c in CELLS)
                        + ". nan_guard needs ours-fp16-adamw-eager.")
    parser.add_argument("--checks", default="all", help="Comma-separated checks to run, all or none: " + ", ".join(CHECKS)
                        + " (generate and web_demo use resume's trained model).")
    parser.add_argument("--workdir", help="Folder for the cells' runs and logs (default: a temporary folder, removed after).")
    parser.add_argument("--timeout", type=float, help="Seconds one cell may take before it is killed (default 300 on CUDA, 120 on CPU).")
    parser.add_argument("--profile", action="store_true", help=f"Profile {PROFILE_STEPS} steps after each cell's timed ones "
                        "(torch.profiler; not timed): the top ops to <workdir>/<cell>.profile.txt, printed after the report.")
    parser.add_argument("--before", metavar="PATH", help="A checkout of an older commit of this repository: also run "
                        f"{' and '.join(BEFORE_CELLS)} with its train.py (rows 'ours (before) ...').")
    cli = parser.parse_args(argv)

    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network; a GPU box may have none
    os.environ.setdefault("WANDB_MODE", "disabled")
    info = device_info(cli.device)
    size = SIZES[info["device"]]
    timeout = cli.timeout or size["cell_timeout"]
    data = cli.data or (str(WEBTEXT) if WEBTEXT.is_file() else None)
    if data and not Path(data).exists():
        raise SystemExit(f"error: --data {data} does not exist.")
    if cli.before and not (Path(cli.before) / "train.py").is_file():
        raise SystemExit(f"error: --before {cli.before} holds no train.py.")
    only = None if not cli.only else set() if cli.only == "none" else set(cli.only.split(","))
    unknown = sorted((only or set()) - {c[0] for c in CELLS} - {f"before-{c}" for c in BEFORE_CELLS})
    checks = set(CHECKS) if cli.checks == "all" else set() if cli.checks == "none" else set(cli.checks.split(","))
    if unknown or checks - set(CHECKS):
        raise SystemExit(f"error: unknown cell or check: {', '.join(unknown + sorted(checks - set(CHECKS)))}")

    if info["device"] == "cuda":
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["train", "web_demo", "generate_bench"])

    tmp = None if cli.workdir else tempfile.TemporaryDirectory(prefix="gpu_check_")
    workdir = Path(cli.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    shape = model_shape(size)
    flops = flops_per_token(shape, size["block"])
    peaks = {p: card_peak(info["name"] if info["device"] == "cuda" else None, p) for p in ("bf16", "fp16")}
    print(header(info, size, data, flops, peaks), flush=True)

    results = run_cells(ctx, cell_specs(info, size, data, workdir, only, cli.profile, cli.before), workdir, timeout)
    check_results = {}
    if "nan_guard" in checks:
        check_results["nan_guard"] = nan_guard_result(next((r for r in results if r["name"] == "ours-fp16-adamw-eager"), None))
    if checks & {"resume", "generate", "web_demo"}:
        t0 = time.perf_counter()
        resume = run_resume(ctx, info, size, data, workdir, timeout)
        print(f"  resume: {'passed' if resume['passed'] else 'FAILED'} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if "resume" in checks:
            check_results["resume"] = resume
        if checks & {"generate", "web_demo"}:
            if not resume.get("model_path"):
                served = {"error": "no trained model (the resume check's uninterrupted run failed)"}
            else:
                t0 = time.perf_counter()
                served = launch(ctx, {"name": "serve", "runner": "serve", "device": info["device"], "size": size,
                                      "model_path": resume["model_path"]}, workdir, timeout)
                print(f"  generate + web demo: {served.get('error', 'done')} ({time.perf_counter() - t0:.0f}s)", flush=True)
            check_results.update(serve_checks(served, info, checks))

    seconds = time.perf_counter() - started
    derive(results, flops, peaks)
    targets = target_results(info, results)
    budget = size["budget"] + (BEFORE_BUDGET[info["device"]] if cli.before else 0)
    print(report(info, results, check_results, targets, seconds, budget))
    print(profiles(info, results))
    failed = [r["name"] for r in results if "error" in r] + [k for k, v in check_results.items() if not v["passed"]]
    if cli.json:
        clean = [{k: v for k, v in r.items() if k not in ("size", "train", "env")} for r in results]
        Path(cli.json).write_text(json.dumps({"device": info, "size": size, "data": data, "flops_per_token": flops,
                                              "peak_flops": peaks, "cells": clean, "checks": check_results,
                                              "targets": targets, "failed": failed, "seconds": seconds},
                                             indent=2, default=str) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


def run_cells(ctx, specs: list[dict], workdir: Path, timeout: float) -> list[dict]:
    """Each cell in turn, its speed (or its failure and its log's end) printed as it ends."""
    results = []
    for spec in specs:
        if spec.get("skip"):
            results.append({**spec, "skipped": spec["skip"]})
            continue
        t0 = time.perf_counter()
        out = launch(ctx, spec, workdir, timeout)
        results.append({**spec, **out, "wall_s": time.perf_counter() - t0})
        status = out.get("error") or f"{out.get('tokens_per_s', 0):,.0f} tok/s"
        print(f"  {spec['name']}: {status} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if "error" in out:
            print(log_tail(out["log"]), flush=True)
    return results


def serve_checks(served: dict, info: dict, checks: set) -> dict:
    out = {}
    if "error" in served:
        for name in ("generate", "web_demo"):
            if name in checks:
                out[name] = {"passed": False, "error": served["error"], "log": served.get("log")}
        return out
    if "generate" in checks:
        g = served["generate"]
        on_device = g["device"].startswith(info["device"])
        out["generate"] = {"passed": on_device and g["ours_tokens_per_s"] > 0 and g["model_generate_tokens_per_s"] > 0,
                           **g, "speedup": g["ours_tokens_per_s"] / g["model_generate_tokens_per_s"],
                           "cuda_graphs_speedup": g["ours_tokens_per_s"] / g["ours_eager_steps_tokens_per_s"],
                           # the targets for GPT-2 124M on an H100/H200: one sequence >= 2,000 tokens/s
                           "target_2000_tokens_per_s_met": g["ours_tokens_per_s"] >= 2000 if info["device"] == "cuda" else None}
    if "web_demo" in checks:
        w = served["web_demo"]
        on_device = w["engine_device"].startswith(info["device"]) and w["model_device"].startswith(info["device"])
        answered = w["status"] == 200 and isinstance(w["text"], str) and w["finish_reason"] in ("length", "stop")
        out["web_demo"] = {"passed": on_device and answered, **w,
                           "target_16_clients_5x_met": w["sixteen_vs_one"] >= 5 if info["device"] == "cuda" else None}
    return out


def derive(results: list[dict], flops: float, peaks: dict) -> None:
    """Each measured cell's MFU (the cli cell's as train.py printed it, where it did) and its ratio to nanoGPT's cell
    with the same compile setting."""
    nano = {r["compile"]: r.get("tokens_per_s") for r in results if r["runner"] == "nanogpt"}
    for r in results:
        if r.get("tokens_per_s"):
            r["mfu"] = r.get("printed_mfu") or mfu(r["tokens_per_s"], flops, peaks.get(r["precision"]))
            base = nano.get(r["compile"])
            r["vs_nanogpt"] = r["tokens_per_s"] / base if base else None


def target_results(info: dict, results: list[dict]) -> dict:
    """The issue's targets: met, not met, or None (not measured / not applicable); the MFU ones apply on an H100/H200."""
    by_name = {r["name"]: r for r in results}
    best, eager, cli = (by_name.get(n, {}) for n in ("ours-bf16-adamw-compile", "ours-bf16-adamw-eager", "cli"))
    applies = info["device"] == "cuda" and any(card in info["name"].upper() for card in ("H100", "H200"))

    def target(value, met, applies=True):
        return {"value": value, "applies": applies, "met": met(value) if applies and value is not None else None}

    nano_peak = by_name.get("nanogpt-compile", {}).get("peak_memory")
    memory = {label(r): target(r["peak_memory"] / nano_peak, lambda v: v <= 1, info["device"] == "cuda")
              for r in results if r["runner"] in ("ours", "plain") and r["compile"] and r.get("peak_memory") and nano_peak}
    return {"mfu_45_percent_bf16_compile": target(best.get("mfu"), lambda v: v >= MFU_TARGET, applies),
            "at_least_nanogpt_tokens_per_s": target(best.get("vs_nanogpt"), lambda v: v >= 1),
            "eager_at_least_0_9_nanogpt_eager": target(eager.get("vs_nanogpt"), lambda v: v >= EAGER_TARGET),
            "cli_mfu_45_percent": target(cli.get("mfu"), lambda v: v >= MFU_TARGET, applies),
            "peak_memory_at_most_nanogpt_compile": memory}


# ----------------------------------------------------------------------------------------------
# Printing


def _mib(n) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "n/a"


def header(info: dict, size: dict, data: str | None, flops: float, peaks: dict) -> str:
    shape = size["shape"]
    if info["device"] == "cuda":
        where = f"CUDA: {info['name']} ({info['memory'] / 2**30:.0f} GiB), CUDA {info['cuda']}, torch {info['torch']}"
        peak = (f"dense peak (estimate.peak_flops, by name): bf16 {peaks['bf16'] / 1e12:.0f} / fp16 {peaks['fp16'] / 1e12:.0f} TFLOP/s"
                if peaks["bf16"] else "dense peak: unknown for this card (no MFU; add it to estimate.PEAK_BF16_FLOPS)")
    else:
        where = (f"CPU mode (no CUDA GPU): {info['name']}, {info['cores']} cores, torch {info['torch']} "
                 f"({info['capability']} kernels)")
        peak = "dense peak: none for a CPU (no MFU)"
    return (f"# GPU check\n\n{where}\n{peak}\n"
            f"Model: {shape['n_layer']} layers x {shape['n_embd']} wide, vocabulary {NANOGPT_VOCAB}, block {size['block']}, "
            f"batch {size['batch']}; {flops / 1e6:,.1f} MFLOPs per token (6N + 12LTd); {size['warmup']} warm-up + "
            f"{size['timed']} timed steps per cell; data: {data or 'the built-in corpus'}\n")


def profiles(info: dict, results: list[dict]) -> str:
    """The --profile tables the cells wrote, each cell's top ops."""
    lines = []
    for r in results:
        path = Path(r["profile"]) if r.get("profile") else None
        if path is not None and path.is_file():
            lines += [f"\n### {label(r)}: top ops over {PROFILE_STEPS} steps after the timed ones ({path})\n",
                      path.read_text().rstrip()]
    if lines:
        lines.insert(0, f"\n## Profiles (self {'CUDA' if info['device'] == 'cuda' else 'CPU'} time)")
    return "\n".join(lines)


def label(r: dict) -> str:
    """The cell's row in the report."""
    if r["runner"] == "cli":
        return "train.py CLI (GPU defaults)"
    who = {"ours": "ours (before)" if r.get("before") else "ours", "plain": "plain", "nanogpt": "nanoGPT"}[r["runner"]]
    return f"{who} {r['precision']} {'Muon' if r['optim'] == 'muon' else 'AdamW'} {'compile' if r['compile'] else 'eager'}"


def report(info, results, checks, targets, seconds, budget) -> str:
    memory = "peak memory (CUDA, allocated)" if info["device"] == "cuda" else "peak RSS"
    lines = [f"| config | tok/s | MFU | {memory} | vs nanoGPT |", "|---|---:|---:|---:|---:|"]
    for r in results:
        if r.get("skipped") or "error" in r:
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"FAILED: {r['error']}"
            lines.append(f"| {label(r)} | {why} | | | |")
            continue
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        vs = f"{r['vs_nanogpt']:.2f}x" if r.get("vs_nanogpt") else "n/a"
        lines.append(f"| {label(r)} | {r['tokens_per_s']:,.0f} | {m} | {_mib(r.get('peak_memory'))} | {vs} |")
    lines += notes(results)
    lines.append("\n## Checks\n")
    for name, c in checks.items():
        lines.append(f"- **{name}**: {'passed' if c['passed'] else 'FAILED'}: {describe(name, c)}")
    lines.append("\n## Targets (not failures)\n")
    h100 = "not applicable here (the target is for an H100/H200)"
    for key, what in (("mfu_45_percent_bf16_compile", "MFU >= 45% (ours, bf16, AdamW, compile)"),
                      ("at_least_nanogpt_tokens_per_s", "tok/s >= nanoGPT's (bf16, compile)"),
                      ("eager_at_least_0_9_nanogpt_eager", "train() bf16 eager >= 0.9x nanoGPT eager"),
                      ("cli_mfu_45_percent", "python train.py (GPU defaults) MFU >= 45%")):
        t = targets[key]
        percent = key.startswith(("mfu", "cli"))
        value = "" if t["value"] is None else f"{100 * t['value']:.1f}%" if percent else f"{t['value']:.2f}x"
        lines.append(f"- {what}: " + (h100 if not t["applies"] else "not measured" if t["met"] is None
                                       else f"{value}: {'met' if t['met'] else 'NOT met'}"))
    for name, t in targets["peak_memory_at_most_nanogpt_compile"].items():
        verdict = ("met" if t["met"] else "NOT met") if t["applies"] else "not applicable (a CPU's RSS is the whole process)"
        lines.append(f"- peak memory <= nanoGPT's at equal batch ({name}): {t['value']:.2f}x nanoGPT compile's: {verdict}")
    lines.append(f"\nTotal {seconds:.0f}s (budget {budget}s{'' if seconds <= budget else ': OVER'}).")
    return "\n".join(lines)


def notes(results: list[dict]) -> list[str]:
    """Below the table: what train.py printed in the cli cell, and --before's speed-up."""
    lines = []
    for r in results:
        if r["runner"] == "cli" and r.get("after_line"):
            lines.append(f"\n{label(r)}: `{r['command']}`\n  " + "\n  ".join(filter(None, [r.get("gpu_batch"), r["after_line"]])))
    speed = {(r.get("before", False), r["name"].removeprefix("before-")): r.get("tokens_per_s") for r in results}
    for name in BEFORE_CELLS:
        if speed.get((True, name)) and speed.get((False, name)):
            lines.append(f"\n{name}: {speed[(False, name)] / speed[(True, name)]:.2f}x the tok/s of --before's checkout")
    return lines


def describe(name: str, c: dict) -> str:
    if "error" in c:
        return c["error"] + (f" (log: {c['log']})" if c.get("log") else "")
    if name == "nan_guard":
        return (f"inf injected into step {c['inf_at_step']}'s loss: weights unchanged by that step {c['weights_unchanged_at_that_step']}, "
                f"counted by train.py's guard {c['counted_by_guard']}, loss scale {c['loss_scale_before_after']}; "
                f"training went on to step {c['steps']} (last loss {c['last_loss']}), weights changed later {c['weights_changed_later']}")
    if name == "resume":
        return (f"killed after {c.get('resumed_from') or 'its first checkpoint'} and rerun: max |weight diff| "
                f"{c['max_weight_diff']:.2e}, eval loss {c['eval_loss'][0]:.6f} vs {c['eval_loss'][1]:.6f} after {c['steps']} steps")
    if name == "generate":
        return (f"{c['new_tokens']} new tokens on {c['device']} ({c['dtype']}): generate.py {c['ours_tokens_per_s']:,.0f} tok/s, "
                f"model.generate {c['model_generate_tokens_per_s']:,.0f} tok/s ({c['speedup']:.2f}x)")
    if name == "web_demo":
        return (f"POST /v1/completions -> {c['status']}, {c['completion_tokens']} tokens ({c['finish_reason']}) in "
                f"{c['seconds']:.2f}s; model on {c['model_device']}, engine on {c['engine_device']}")
    return json.dumps(c, default=str)


if __name__ == "__main__":
    sys.exit(main())
