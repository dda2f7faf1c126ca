"""Training throughput: our train.py against the original recipe and nanoGPT, side by side in one run.

    python bench/train_bench.py                        # throughput at batch 2 and 16 (WebText sample)
    python bench/train_bench.py --loss_steps 150       # plus val loss after 150 steps x 2048 tokens
    python bench/train_bench.py --loss_steps 75 --sweep muon_learning_rate=0.01,0.02,0.04   # a sweep of ours

Same model (GPT-2, 4 layers, 256 wide, 4 heads, block 128), same data (the WebText sample in
../shared/data, or the built-in corpus without it, split by document), same machine. The original
recipe, re-implemented faithfully: a from-scratch GPT2LMHeadModel trained by the Trainer with its
settings (learning rate 5e-5, warmup 500, weight decay 0.01, fp32 on CPU, DataCollatorForLanguageModeling).
nanoGPT's training loop, re-implemented from its train.py/model.py defaults for a CPU: its GPT (no
biases, tied embedding, vocabulary padded to 50304, exact GELU, SDPA attention), AdamW with betas
(0.9, 0.95) and weight decay 0.1 (unfused off CUDA), gradient clipping at 1.0, fp32 eager, random
128-token windows of the same training tokens; its learning rate follows its get_lr (linear warmup, cosine
to a tenth) with lr_decay_iters = the run's steps, as its configs set max_iters = lr_decay_iters, and warmup
capped at 10% of the run like ours. Tokens/s is measured over the steps after a warm-up, each configuration
in its own subprocess. Ours runs twice: the fused loss's GEMMs in fp32 and in bf16 (--fused_loss_gemm; our
default picks bf16 with --precision auto on a CPU with native bf16, model.native_bf16_cpu).

Validation loss (--loss_steps N): N steps x 16 x 128 tokens each, evaluated on the same held-out documents
(--val_split of them): the original recipe, nanoGPT, our defaults, and ours with each optimizer and schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEBTEXT = ROOT.parent / "shared" / "data" / "gpt2-output" / "webtext.train.head1408.jsonl"
SHAPE = dict(n_layer=4, n_embd=256, n_head=4)
BLOCK = 128
WARMUP_STEPS = 3


def data_kwargs(val_split: float = 0.05) -> dict:
    source = {"dataset_path": str(WEBTEXT)} if WEBTEXT.is_file() else {"dataset_name": "builtin"}
    return {**source, "val_split": val_split}


class StepTimer:
    """Trainer callback: wall time of the steps after the first WARMUP_STEPS."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == WARMUP_STEPS:
                    outer.start = time.perf_counter()
                outer.end, outer.steps = time.perf_counter(), state.global_step - WARMUP_STEPS

        self.callback = _CB()


def run_ours(batch: int, steps: int, out: str, evaluate: bool, val_split: float, options: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import train as train_module

    timer = StepTimer()
    real_trainer = train_module.GPT2Trainer

    class TimedTrainer(real_trainer):  # the bench's only addition: a timing callback
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [timer.callback]
            super().__init__(*a, **k)

    train_module.GPT2Trainer = TimedTrainer
    result = train_module.train(**{**data_kwargs(val_split), **SHAPE, "block_size": BLOCK, "per_device_train_batch_size": batch,
                                   "max_steps": steps, "output_dir": out, "report_to": "none", "sample_prompts": ["none"],
                                   "eval_strategy": "no" if not evaluate else "steps", "save_strategy": "no",
                                   "eval_steps": steps, "resume": "never", **options})
    return {"tokens_per_s": timer.steps * batch * BLOCK / (timer.end - timer.start),
            "val_loss": result.get("eval_metrics", {}).get("eval_loss")}


def run_original(batch: int, steps: int, out: str, evaluate: bool, val_split: float, options: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    from dataset import get_dataset_and_tokenizer

    tokenizer, train_ds, val_ds = get_dataset_and_tokenizer(block_size=BLOCK, **data_kwargs(val_split))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **SHAPE))
    model.loss_type = "ForCausalLM"
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-5,
                             warmup_steps=500, weight_decay=0.01, report_to="none", save_strategy="no",
                             logging_steps=10, eval_strategy="no")
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[timer.callback])
    trainer.train()
    val_loss = trainer.evaluate()["eval_loss"] if evaluate else None
    return {"tokens_per_s": timer.steps * batch * BLOCK / (timer.end - timer.start), "val_loss": val_loss}


def run_nanogpt(batch: int, steps: int, out: str, evaluate: bool, val_split: float, options: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from dataset import get_dataset_and_tokenizer

    _, train_ds, val_ds = get_dataset_and_tokenizer(block_size=BLOCK, **data_kwargs(val_split))
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in train_ds["input_ids"]])
    n_layer, n_embd, n_head, vocab = SHAPE["n_layer"], SHAPE["n_embd"], SHAPE["n_head"], 50304

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=False), nn.LayerNorm(n_embd, bias=False)
            self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd, bias=False), nn.Linear(n_embd, n_embd, bias=False)
            self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd, bias=False), nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(C, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(BLOCK, n_embd)
            self.h, self.ln_f = nn.ModuleList(Block() for _ in range(n_layer)), nn.LayerNorm(n_embd, bias=False)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.wte.weight = self.lm_head.weight
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, vocab), targets.view(-1), ignore_index=-1)

    torch.manual_seed(1337)
    model = GPT()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95))

    def get_batch():
        ix = torch.randint(len(tokens) - BLOCK, (batch,))
        x = torch.stack([torch.from_numpy(tokens[i:i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
        return x, y

    # nanoGPT's get_lr: linear warmup, cosine decay to min_lr = lr / 10 at lr_decay_iters (= the run's steps).
    learning_rate, warmup = 6e-4, min(2000, math.ceil(0.1 * steps))

    def get_lr(it):
        if it < warmup:
            return learning_rate * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / max(1, steps - warmup)
        return learning_rate / 10 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - learning_rate / 10)

    for step in range(steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        loss = model(*get_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens_per_s = (steps - WARMUP_STEPS) * batch * BLOCK / (time.perf_counter() - start)
    val_loss = None
    if evaluate:  # the mean loss over every predicted token of the validation blocks, as the Trainer's eval_loss
        model.eval()
        blocks = torch.tensor(np.asarray(val_ds["input_ids"], dtype=np.int64))
        with torch.no_grad():
            losses = [model(b[:, :-1].contiguous(), b[:, 1:].contiguous()).item() * len(b) for b in blocks.split(16)]
        val_loss = sum(losses) / len(blocks)
    return {"tokens_per_s": tokens_per_s, "val_loss": val_loss}


def measure(which: str, batch: int, steps: int, evaluate: bool = False, val_split: float = 0.05, options: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", which, "--batch", str(batch), "--steps", str(steps), "--out", out,
               "--val_split", str(val_split), "--options", json.dumps(options or {})]
        env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd + (["--evaluate"] if evaluate else []), capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


RECIPES = {  # the loss table's rows of ours: each optimizer with each schedule
    "ours: AdamW, linear decay (before issue 19)": {"optim": "adamw_torch_fused", "lr_scheduler_type": "linear"},
    "ours: AdamW, warmup-stable-decay": {"optim": "adamw_torch_fused", "lr_scheduler_type": "warmup_stable_decay"},
    "ours: Muon, linear decay": {"optim": "muon", "lr_scheduler_type": "linear"},
    "ours: Muon, warmup-stable-decay": {"optim": "muon", "lr_scheduler_type": "warmup_stable_decay"},
}


# The throughput table's runs: ours twice, with the fused loss's GEMMs in fp32 and in bf16 (--fused_loss_gemm;
# our default picks bf16 on CPUs with native bf16, model.native_bf16_cpu).
THROUGHPUT_RUNS = {"original": ("original", {}), "nanogpt": ("nanogpt", {}),
                   "ours": ("ours", {"fused_loss_gemm": "fp32"}), "ours_bf16": ("ours", {"fused_loss_gemm": "bf16"})}


def throughput_table(cli) -> None:
    sys.path.insert(0, str(ROOT))
    from model import native_bf16_cpu

    rows = []
    for batch in (2, 16):
        # Interleaved repeats, medians: this shared machine's speed drifts by tens of percent within minutes.
        runs = {name: [] for name in THROUGHPUT_RUNS}
        for _ in range(cli.repeats):
            for name, speeds in runs.items():
                which, options = THROUGHPUT_RUNS[name]
                speeds.append(measure(which, batch, cli.steps + WARMUP_STEPS, options=options)["tokens_per_s"])
        rows.append((batch, *(statistics.median(runs[name]) for name in THROUGHPUT_RUNS)))
    print(f"\nNative bf16 on this CPU (model.native_bf16_cpu): {native_bf16_cpu()}; our default fused-loss GEMMs: "
          f"{'bf16' if native_bf16_cpu() else 'fp32'}.")
    print("\n| batch | original recipe tok/s | nanoGPT tok/s | ours, fp32 fused loss tok/s | ours, bf16 fused loss tok/s "
          "| fp32 loss vs original | bf16 loss vs original | bf16 vs nanoGPT |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, o, n, u, b in rows:
        print(f"| {batch} | {o:,.0f} | {n:,.0f} | {u:,.0f} | {b:,.0f} | {u / o:.2f}x | {b / o:.2f}x | {b / n:.2f}x |")


def sweep_grid(sweeps: list[str]) -> dict[str, dict]:
    """--sweep name=v1,v2 (repeated) -> {label: train() options} over the grid."""
    import itertools

    def value(text):
        try:
            return float(text) if any(c in text for c in ".e") else int(text)
        except ValueError:
            return text

    axes = [(name, [value(v) for v in values.split(",")]) for name, values in (s.split("=", 1) for s in sweeps)]
    return {", ".join(f"{n}={v}" for n, v in zip([a[0] for a in axes], combo)): dict(zip([a[0] for a in axes], combo))
            for combo in itertools.product(*(a[1] for a in axes))}


def loss_table(cli) -> None:
    sys.path.insert(0, str(ROOT))
    from train_args import parse_args, resolve_defaults

    steps, split = cli.loss_steps, cli.val_split
    print(f"\nValidation loss after {steps} steps x {16 * BLOCK} tokens (val_split {split}):\n"
          "\n| recipe | val loss | train s |\n|---|---:|---:|")

    def row(label, which, options=None):
        start = time.perf_counter()
        result = measure(which, 16, steps, evaluate=True, val_split=split, options=options)
        print(f"| {label} | {result['val_loss']:.3f} | {time.perf_counter() - start:.0f} |", flush=True)

    if cli.sweep:
        for label, options in sweep_grid(cli.sweep).items():
            row(f"ours: {label}", "ours", options)
        return
    rows = [("original recipe (lr 5e-5, warmup 500)", "original", None), ("nanoGPT (AdamW 6e-4, cosine)", "nanogpt", None),
            *((label, "ours", options) for label, options in RECIPES.items())]
    for i, (label, which, options) in enumerate(rows, 1):
        if not cli.rows or str(i) in cli.rows.split(","):
            row(label, which, options)
    model_args, data_args, args = parse_args(["--use_cpu", "true"])
    resolve_defaults(model_args, data_args, args)
    print(f"\nOur defaults: --optim {args.optim} --lr_scheduler_type {args.lr_scheduler_type.value} "
          f"--learning_rate {args.learning_rate:g} --muon_learning_rate {args.muon_learning_rate:g}.")


def main(cli):
    import torch

    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"data: {'WebText sample' if WEBTEXT.is_file() else 'built-in corpus'}; {cli.steps} timed steps after {WARMUP_STEPS}, "
          f"median of {cli.repeats} interleaved runs.")
    if cli.throughput == "on":
        throughput_table(cli)
    if cli.loss_steps:
        loss_table(cli)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per configuration.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per configuration, interleaved; the table shows medians.")
    parser.add_argument("--loss_steps", type=int, default=0, help="Also train this many steps at batch 16 and compare val loss.")
    parser.add_argument("--val_split", type=float, default=0.1, help="Fraction of documents held out for the val loss.")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                        help="With --loss_steps: instead of the recipes, our train.py at each value of a train.py flag "
                             "(repeat for a grid), e.g. --sweep muon_learning_rate=0.01,0.02 --sweep optim=muon.")
    parser.add_argument("--rows", default="", help="With --loss_steps: only these rows of the loss table, e.g. 2,3,6 "
                        "(1 original, 2 nanoGPT, 3-6 ours: AdamW linear, AdamW WSD, Muon linear, Muon WSD).")
    parser.add_argument("--throughput", choices=["on", "off"], default="on", help="Measure tokens/s (off: only the losses).")
    parser.add_argument("--worker", choices=["ours", "original", "nanogpt"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        run = {"ours": run_ours, "original": run_original, "nanogpt": run_nanogpt}[cli.worker]
        print("RESULT " + json.dumps(run(cli.batch, cli.steps, cli.out, cli.evaluate, cli.val_split, json.loads(cli.options))))
    else:
        main(cli)
