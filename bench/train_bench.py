"""Training throughput: our train.py against the original recipe and nanoGPT, side by side in one run.

    python bench/train_bench.py                        # throughput at batch 2 and 16 (WebText sample)
    python bench/train_bench.py --loss_steps 150       # plus val loss after 150 steps x 2048 tokens

Same model (GPT-2, 4 layers, 256 wide, 4 heads, block 128), same data (the WebText sample in
../shared/data, or the built-in corpus without it, split by document), same machine. The original
recipe, re-implemented faithfully: a from-scratch GPT2LMHeadModel trained by the Trainer with its
settings (learning rate 5e-5, warmup 500, weight decay 0.01, fp32 on CPU, DataCollatorForLanguageModeling).
nanoGPT's training loop, re-implemented from its train.py/model.py defaults for a CPU: its GPT (no
biases, tied embedding, vocabulary padded to 50304, exact GELU, SDPA attention), AdamW with betas
(0.9, 0.95) and weight decay 0.1 (unfused off CUDA), gradient clipping at 1.0, fp32 eager, random
128-token windows of the same training tokens. Tokens/s is measured over the steps after a
warm-up, each configuration in its own subprocess.
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


def data_kwargs() -> dict:
    return {"dataset_path": str(WEBTEXT)} if WEBTEXT.is_file() else {"dataset_name": "builtin"}


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


def run_ours(batch: int, steps: int, out: str, evaluate: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import train as train_module

    timer = StepTimer()
    real_trainer = train_module.GPT2Trainer

    class TimedTrainer(real_trainer):  # the bench's only addition: a timing callback
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [timer.callback]
            super().__init__(*a, **k)

    train_module.GPT2Trainer = TimedTrainer
    result = train_module.train(**data_kwargs(), **SHAPE, block_size=BLOCK, per_device_train_batch_size=batch,
                                max_steps=steps, output_dir=out, report_to="none", sample_prompts=["none"],
                                eval_strategy="no" if not evaluate else "steps", save_strategy="no",
                                eval_steps=steps, resume="never")
    return {"tokens_per_s": timer.steps * batch * BLOCK / (timer.end - timer.start),
            "val_loss": result.get("eval_metrics", {}).get("eval_loss")}


def run_original(batch: int, steps: int, out: str, evaluate: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    from dataset import get_dataset_and_tokenizer

    tokenizer, train_ds, val_ds = get_dataset_and_tokenizer(block_size=BLOCK, **data_kwargs())
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


def run_nanogpt(batch: int, steps: int, out: str, evaluate: bool) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from dataset import get_dataset_and_tokenizer

    _, train_ds, _ = get_dataset_and_tokenizer(block_size=BLOCK, **data_kwargs())
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

    for step in range(steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        loss = model(*get_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"tokens_per_s": (steps - WARMUP_STEPS) * batch * BLOCK / (time.perf_counter() - start), "val_loss": None}


def measure(which: str, batch: int, steps: int, evaluate: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", which, "--batch", str(batch), "--steps", str(steps), "--out", out]
        env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd + (["--evaluate"] if evaluate else []), capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main(cli):
    import torch

    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"data: {'WebText sample' if WEBTEXT.is_file() else 'built-in corpus'}; {cli.steps} timed steps after {WARMUP_STEPS}, "
          f"median of {cli.repeats} interleaved runs.")
    rows = []
    for batch in (2, 16):
        # Interleaved repeats, medians: this shared machine's speed drifts by tens of percent within minutes.
        runs = {which: [] for which in ("original", "nanogpt", "ours")}
        for _ in range(cli.repeats):
            for which, speeds in runs.items():
                speeds.append(measure(which, batch, cli.steps + WARMUP_STEPS)["tokens_per_s"])
        rows.append((batch, *(statistics.median(runs[w]) for w in ("original", "nanogpt", "ours"))))
    print("\n| batch | original recipe tok/s | nanoGPT tok/s | our train.py tok/s | vs original | vs nanoGPT |"
          "\n|---:|---:|---:|---:|---:|---:|")
    for batch, o, n, u in rows:
        print(f"| {batch} | {o:,.0f} | {n:,.0f} | {u:,.0f} | {u / o:.2f}x | {u / n:.2f}x |")
    if cli.loss_steps:
        original = measure("original", 16, cli.loss_steps, evaluate=True)
        ours = measure("ours", 16, cli.loss_steps, evaluate=True)
        print(f"\nVal loss after {cli.loss_steps} steps x {16 * BLOCK} tokens: original recipe {original['val_loss']:.3f}, "
              f"our train.py {ours['val_loss']:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per configuration.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per configuration, interleaved; the table shows medians.")
    parser.add_argument("--loss_steps", type=int, default=0, help="Also train this many steps at batch 16 and compare val loss.")
    parser.add_argument("--worker", choices=["ours", "original", "nanogpt"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        run = {"ours": run_ours, "original": run_original, "nanogpt": run_nanogpt}[cli.worker]
        print("RESULT " + json.dumps(run(cli.batch, cli.steps, cli.out, cli.evaluate)))
    else:
        main(cli)
