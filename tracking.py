"""What a run records besides its checkpoints: metrics.jsonl, loss_curve.png, WandB, and final_model's manifest.

metrics.jsonl and the plot are always written (by LocalMetricsCallback); WandB is one run per output
folder, offline unless an account is configured, so a resumed training continues the same WandB run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
from transformers import TrainerCallback

REPO_DIR = Path(__file__).resolve().parent
WANDB_ID_FILE = "wandb_run_id.txt"


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
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(l) + "\n" for l in kept))
            os.replace(tmp, self.path)

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
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    os.replace(tmp, png_path)


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
