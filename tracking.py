"""What a run records besides its checkpoints: metrics.jsonl, loss_curve.png, samples during training, WandB,
and final_model's manifest.

metrics.jsonl and the plot are always written (by LocalMetricsCallback); WandB is one run per output
folder, offline unless an account is configured, so a resumed training continues the same WandB run.
SampleCallback samples fixed prompts during training into samples.jsonl, the console, WandB and TensorBoard.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
import torch
from transformers import TrainerCallback

import decode
import generate
from atomic import atomic_path, write_atomic

REPO_DIR = Path(__file__).resolve().parent
WANDB_ID_FILE = "wandb_run_id.txt"
SAMPLES_FILE = "samples.jsonl"


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and loss_curve.png


class LocalMetricsCallback(TrainerCallback):
    """metrics.jsonl (every log line) and loss_curve.png (refreshed at each evaluation) in the run folder."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.plot_path = Path(output_dir) / "loss_curve.png"

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run drops the lines the interrupted run logged after its last checkpoint, and a line cut
        # short; the file is rewritten aside and renamed, so that it is whole again and never half-written.
        if state.is_world_process_zero and self.path.is_file():
            kept = [l for l in read_metrics(self.path, warn=True) if l.get("step", 0) <= state.global_step]
            write_atomic(self.path, "".join(json.dumps(l) + "\n" for l in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs, "time": time.time()}) + "\n")

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(self.path, self.plot_path)


def read_metrics(path: Path, warn: bool = False) -> list[dict]:
    """metrics.jsonl's rows. A line that is not whole JSON (a kill or a full disk in the middle of an append) is
    skipped, and named when warn is set."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif warn:
            print(f"{path}: line {number} is cut short or not a JSON object (a run stopped while writing it?); dropped it.")
    return rows


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no screen needed, nothing pops up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png_path: Path) -> None:
    """Write `fig` as a PNG whole (a temporary file renamed into place: a reader never sees half a
    plot) and close it."""
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        pyplot().close(fig)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    plt = pyplot()
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("GPT-2 training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)


# ----------------------------------------------------------------------------------------------
# Samples: the same prompts and seed at each evaluation (or every --sample_every steps)


def draw_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[generate.Completion]:
    """Each prompt sampled with the toolkit's one sampler (generate.generate: top-k 50, temperature 0.8, `seed`),
    in eval mode. The model's train/eval mode and every RNG training draws from (torch's CPU and CUDA, Python's
    random, NumPy's) are as they were, so sampling during training changes no weight (tested)."""
    device = next(model.parameters()).device
    # A model with a short context (--n_positions) keeps room for a prompt of at least one token.
    max_new_tokens = min(max_new_tokens, model.config.n_positions - 1)
    was_training = model.training
    python_state = random.getstate()
    numpy_state = _numpy_rng_state()
    # generate(seed=...) draws from a torch.Generator of its own (the fallback path forks the RNG); fork anyway.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        try:
            return generate.generate(tokenizer, model, device, prompts, max_new_tokens=max_new_tokens, top_k=50, top_p=1.0,
                                     temperature=0.8, seed=seed)
        finally:
            model.train(was_training)
            random.setstate(python_state)
            if numpy_state is not None:
                import numpy as np

                np.random.set_state(numpy_state)


def _numpy_rng_state():
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def one_line(text: str, limit: int) -> str:
    """`text` on one line (runs of whitespace become one space), cut to `limit` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def read_samples(path: Path, warn: bool = False) -> list[dict]:
    """samples.jsonl's rows (step, prompt, text); a line cut short by a kill is skipped (named when warn is set)."""
    if not path.is_file():
        return []
    return [r for r in read_metrics(path, warn=warn) if isinstance(r.get("step"), int) and "text" in r]


class SampleCallback(TrainerCallback):
    """Samples the fixed prompts during training, on the main process: at each evaluation (every=None), or every
    `every` optimizer steps. Each sample goes to the console (one line per prompt), samples.jsonl in the run
    folder (step, prompt, text), WandB (a table of every sample so far) and TensorBoard (text) when they are on.

    A resumed run drops the rows the interrupted run wrote after its checkpoint, and writes those steps again
    (the same weights and seed: the same text), so no step is in the file twice."""

    console_width = 160

    def __init__(self, output_dir: str, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                 every: int | None = None, callbacks: list | None = None):
        self.path = Path(output_dir) / SAMPLES_FILE
        self.tokenizer, self.prompts, self.max_new_tokens, self.seed, self.every = tokenizer, prompts, max_new_tokens, seed, every
        self.callbacks = callbacks if callbacks is not None else []  # the Trainer's: its TensorBoardCallback's writer
        self.rows: list[dict] = []
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        if state.is_world_process_zero:
            self.rows = [r for r in read_samples(self.path, warn=True) if r["step"] <= state.global_step]
            if self.path.is_file():  # rewritten aside and renamed, as metrics.jsonl
                write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # the final evaluate() after training samples nothing: train.py prints the final samples

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.sample(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.every is None and self.training:
            self.sample(args, state, model)

    def sample(self, args, state, model) -> None:
        step = state.global_step
        if not state.is_world_process_zero or model is None or any(r["step"] == step for r in self.rows):
            return
        completions = draw_samples(model, self.tokenizer, self.prompts, self.max_new_tokens, self.seed)
        # The fast decoder's weight copies are stale after the next optimizer step: free them for training.
        decode.forget_fast_forward(model)
        rows = [{"step": step, "prompt": c.prompt, "text": c.text} for c in completions]
        self.rows += rows
        for r in rows:
            print(f"[step {step}] {one_line(r['text'], self.console_width)}", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        self.log_wandb(step)
        self.log_tensorboard(rows, step)

    def log_wandb(self, step: int) -> None:
        if "wandb" not in sys.modules:
            return
        import wandb

        if wandb.run is not None:
            # A logged table is immutable: log a new one with every row so far, which WandB shows as the latest.
            table = wandb.Table(columns=["step", "prompt", "text"], data=[[r["step"], r["prompt"], r["text"]] for r in self.rows])
            wandb.log({"samples": table, "train/global_step": step})

    def log_tensorboard(self, rows: list[dict], step: int) -> None:
        writer = next((getattr(c, "tb_writer", None) for c in self.callbacks if type(c).__name__ == "TensorBoardCallback"), None)
        if writer is None:
            return
        for i, r in enumerate(rows):
            writer.add_text(f"samples/prompt_{i}", r["text"], step)
        writer.flush()


# ----------------------------------------------------------------------------------------------
# WandB and TensorBoard


def tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(args, config: dict) -> None:
    """One WandB run per output folder (args: train.TrainArguments): a resumed training continues the same run."""
    import wandb

    if not os.environ.get("WANDB_MODE") and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
        print("WandB: no account configured (WANDB_API_KEY or `wandb login`), logging offline into "
              f"{args.output_dir}/wandb; upload later with `wandb sync`.")
    id_file = Path(args.output_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    wandb.init(
        project=os.environ.get("WANDB_PROJECT", "gpt2-training"),
        id=run_id,
        resume="allow",
        name=args.run_name or Path(args.output_dir).resolve().name,
        dir=args.output_dir,
        config=config,
    )


def finish_wandb() -> None:
    """End this process's WandB run, if one was started (after a failure too, or the next run logs into it)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ----------------------------------------------------------------------------------------------
# The manifest: what final_model/ was trained from, and with


def manifest(config: dict, data: dict, state, world_size: int, eval_metrics: dict) -> dict[str, Any]:
    """final_model/manifest.json: the resolved arguments, the data's fingerprint, package versions, the git
    commit, and where training ended (state: the Trainer's TrainerState)."""
    return {
        "arguments": config,
        "data": data,
        "versions": package_versions(),
        "git": git_commit(),
        "world_size": world_size,
        "global_step": state.global_step,
        "best_checkpoint": state.best_model_checkpoint,
        "eval": eval_metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "numpy", "wandb"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def git_commit() -> dict[str, Any]:
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        commit = run("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {}
        dirty = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {}
