"""Train a GPT-2 on your text with the Hugging Face Trainer, then print a few samples.

    python train.py                                  # the main job: see "Defaults" below
    python train.py --dataset_path my_texts/ --max_steps 2000
    python train.py config.yaml                      # every flag from a JSON/YAML file instead
    python train.py --help                           # all flags, the Trainer's included

    from train import train                          # in a notebook: the same arguments
    result = train(dataset_path="my.txt", max_steps=200)

Defaults. On a CPU: the "small" model (4 layers, 256 wide), 128-token blocks, a step budget that
finishes in a few minutes on 2 cores. On a GPU: GPT-2 124M, 1024-token blocks, 3 epochs, bf16 where
the GPU supports it else fp16. From scratch the learning rate follows the model's width (1e-3 for the
small preset, 6e-4 for GPT-2 124M, less for wider ones), decaying linearly; with --init_from
(fine-tuning) it is 5e-5. Warmup is 500 steps, capped at 10% of the run.

Output (--output_dir, default logs/): checkpoint-N folders (the last --save_total_limit plus the
best by validation loss), metrics.jsonl, loss_curve.png, and final_model/, a plain Hugging Face
model folder with eval_results.json and manifest.json.

Resuming: rerunning the same command continues from the latest complete checkpoint (--resume auto).
A checkpoint is complete once its COMPLETE file exists, written last; Ctrl-C saves one and exits.
A complete checkpoint whose files were damaged later is named, set aside as checkpoint-N.damaged, and
the one before it is used.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

import dataset
from model import PRESETS, ModelError, check_shape, lm_head_loss

REPO_DIR = Path(__file__).resolve().parent
COMPLETE = "COMPLETE"  # marker file: the checkpoint folder holds everything needed to resume
WANDB_ID_FILE = "wandb_run_id.txt"
CPU_MAX_STEPS = 80  # default step budget on CPU: 80 x 8 x 128 tokens (~60% of the built-in corpus), ~5 min on 2 idle cores
CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 8


class UserError(Exception):
    """A problem the user can fix; main() prints the message without a traceback."""


# ----------------------------------------------------------------------------------------------
# Arguments


@dataclass
class ModelArguments:
    """The model: a preset size, any shape, or pretrained weights to fine-tune (see model.get_model)."""

    preset: str = field(
        default="auto",
        metadata={"help": "Model size: small (4 layers, 256 wide; CPU-sized), gpt2 (124M), gpt2-medium (355M), "
                  "gpt2-large (774M), gpt2-xl (1558M), or auto = small on CPU, gpt2 on GPU. "
                  "--n_embd/--n_layer/--n_head override single dimensions."},
    )
    n_embd: int | None = field(default=None, metadata={"help": "Width of the model (default: from --preset)."})
    n_layer: int | None = field(default=None, metadata={"help": "Number of transformer blocks (default: from --preset)."})
    n_head: int | None = field(default=None, metadata={"help": "Attention heads; must divide n_embd (default: from --preset)."})
    n_positions: int = field(default=1024, metadata={"help": "Context length of a new model (GPT-2: 1024); --block_size must fit in it."})
    dropout: float | None = field(default=None, metadata={"help": "Dropout for residual, embedding and attention (default 0 from scratch; with --init_from, the model's own, GPT-2's 0.1)."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Fine-tune pretrained weights: a local Hugging Face model folder or a Hub name (e.g. gpt2). "
                  "The shape then comes from that model, and the default learning rate is 5e-5."},
    )


@dataclass
class DataArguments(dataset.DataArguments):
    """What to train on: dataset.get_dataset_and_tokenizer's arguments (its seed is --seed)."""

    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training example (default: 128 on CPU, 1024 on GPU); at most the context."}
    )


@dataclass
class TrainArguments(TrainingArguments):
    """The Trainer's arguments with this project's defaults, plus resuming, early stopping and samples.

    Fields left at None/"auto" are filled in by the hardware (CPU or GPU) and by --init_from."""

    output_dir: str = field(default="logs", metadata={"help": "Run folder: checkpoints, metrics, plots and final_model/."})
    per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": f"Batch size per device (default {CPU_BATCH_SIZE} on CPU, {GPU_BATCH_SIZE} on GPU)."}
    )
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Batch size per device for evaluation."})
    num_train_epochs: float | None = field(
        default=None, metadata={"help": f"Epochs (default 3 on GPU; on CPU the default is a budget of {CPU_MAX_STEPS} steps)."}
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": f"Optimizer steps to train; wins over --num_train_epochs. Default {CPU_MAX_STEPS} on CPU unless "
                  "--num_train_epochs is given; -1 (the default on GPU): train for --num_train_epochs."},
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate (default from scratch: by width, 1e-3 up to 512 wide, 6e-4 at 768 (GPT-2 "
                  "124M), 3e-4 at 1024, 2.5e-4 up to 1536, then 2e-4; 5e-5 with --init_from)."},
    )
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning rate schedule after warmup (linear, cosine, constant, ...)."})
    warmup_steps: float = field(default=500, metadata={"help": "Warmup steps (or a fraction of the run if < 1); capped by --max_warmup_fraction."})
    max_warmup_fraction: float = field(
        default=0.1, metadata={"help": "Warmup never exceeds this fraction of the total steps, so short runs still decay."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not applied to biases and LayerNorm)."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: steps, epoch or no."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (a float < 1: that fraction of the run)."})
    save_steps: float = field(
        default=0.1, metadata={"help": "Checkpoint every N steps (a float < 1: that fraction of the run). Keep it a multiple of --eval_steps."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the last N complete checkpoints, plus the best by validation loss."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "Metric that picks the best checkpoint."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    report_to: None | str | list[str] = field(
        default="wandb",
        metadata={"help": "wandb (offline unless you are logged in), tensorboard, none, or several. "
                  "metrics.jsonl and loss_curve.png are always written."},
    )
    resume: str = field(
        default="auto",
        metadata={"help": "auto: continue from the latest complete, undamaged checkpoint in --output_dir if any; never: start "
                  "fresh (old checkpoints are kept until rotated out); or a checkpoint folder. "
                  "--resume_from_checkpoint PATH also works and wins."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without a better validation loss, and keep the best model."}
    )
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU), fp32, fp16 or bf16 "
                                          "(without a GPU, bf16 trains on the CPU)."}
    )
    fused_loss: str = field(
        default="auto",
        metadata={"help": "Compute the loss from the final hidden states a vocabulary chunk at a time, never "
                  "materializing the logits (model.lm_head_loss; same loss, faster and smaller on CPU): auto (on for "
                  "fp32 on CPU; on GPU the Trainer's --use_liger_kernel does this), on or off."},
    )
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The", "In the beginning", "Python is"],
        metadata={"help": "Prompts to sample from the final model (none: skip sampling)."},
    )
    sample_max_new_tokens: int = field(default=40, metadata={"help": "Tokens to generate per sample."})

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise UserError(f"--precision {self.precision!r}: choose auto, fp32, fp16 or bf16.")
        if self.precision != "auto":
            self.fp16, self.bf16 = self.precision == "fp16", self.precision == "bf16"
        if self.bf16 and not self.use_cpu and not torch.accelerator.is_available():
            # Without a GPU, bf16 can only mean the CPU (native bf16 on AMX/AVX-512 CPUs, emulated elsewhere),
            # and transformers refuses it unless --use_cpu says so.
            self.use_cpu = True
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if self.precision == "auto" and not (self.fp16 or self.bf16) and on_gpu:
            self.bf16 = torch.cuda.is_bf16_supported()
            self.fp16 = not self.bf16
        if self.per_device_train_batch_size is None:
            self.per_device_train_batch_size = GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE
        if self.max_steps is None:
            # On CPU the default is a step budget, unless epochs are asked for; -1 is the Trainer's "count epochs".
            self.max_steps = CPU_MAX_STEPS if not on_gpu and self.num_train_epochs is None else -1
        if self.num_train_epochs is None:
            self.num_train_epochs = 3.0
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least 1.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max_steps {self.max_steps}: give a positive number of optimizer steps, "
                            "or -1 to train for --num_train_epochs.")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise UserError(f"--num_train_epochs {self.num_train_epochs}: must be more than 0 (or give --max_steps).")
        if not 0 <= self.max_warmup_fraction <= 1:
            raise UserError(f"--max_warmup_fraction {self.max_warmup_fraction}: must be between 0 and 1.")
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every GPT-2 parameter is used; searching costs a graph walk
        if not on_gpu:
            self.dataloader_pin_memory = False  # pinning only helps copies to a GPU
        if self.fused_loss not in ("auto", "on", "off"):
            raise UserError(f"--fused_loss {self.fused_loss!r}: choose auto, on or off.")
        if self.sample_prompts in (["none"], ["None"]):
            self.sample_prompts = []
        if self.early_stopping_patience:
            # Early stopping means the best model is the one to keep.
            self.load_best_model_at_end = True
        try:
            super().__post_init__()
        except ValueError as e:  # transformers' own checks of its flags: a message for the user, not a traceback
            raise UserError(str(e)) from None

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return min(super().get_warmup_steps(num_training_steps), math.ceil(self.max_warmup_fraction * num_training_steps))


def scratch_learning_rate(n_embd: int) -> float:
    """Peak learning rate for a new model: GPT-3's by width (Brown et al. 2020, table 2.1), and 1e-3 for
    narrow models. Measured for the small preset, linear decay: val loss 7.18 after 150 x 2048 WebText tokens
    at 1e-3, against 7.22 at 1e-3 and 7.27 at 6e-4 with cosine decay (bench/train_bench.py --loss_steps 150)."""
    for width, lr in ((512, 1e-3), (768, 6e-4), (1024, 3e-4), (1536, 2.5e-4)):
        if n_embd <= width:
            return lr
    return 2e-4


def check_block_size(block_size: int, context: int | None) -> None:
    """--block_size against the model's context (None: not known yet, e.g. a pretrained model not loaded)."""
    if block_size < 2:
        raise UserError(f"--block_size {block_size}: must be at least 2 (each block predicts its tokens from the ones before).")
    if context is not None and block_size > context:
        raise UserError(f"--block_size {block_size} exceeds the model's context of {context} tokens; "
                        f"use --block_size {context} or less (or a larger --n_positions for a new model).")


def resolve_defaults(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> None:
    """Fill in what depends on the hardware or on fine-tuning."""
    on_gpu = args.device.type == "cuda"
    if model_args.preset == "auto":
        model_args.preset = "gpt2" if on_gpu else "small"
    if model_args.preset not in PRESETS:
        raise UserError(f"--preset {model_args.preset!r}: choose auto or one of {', '.join(PRESETS)}.")
    for dim, value in PRESETS[model_args.preset].items():  # explicit --n_embd/--n_layer/--n_head win
        if getattr(model_args, dim) is None:
            setattr(model_args, dim, value)
    if data_args.block_size is None:
        data_args.block_size = 1024 if on_gpu else 128
    if model_args.dropout is None and not model_args.init_from:
        # Pretraining sees each token about once, so dropout only slows learning (nanoGPT's default too):
        # val loss after 150 steps x 2048 WebText tokens 7.30 with GPT-2's 0.1, 7.27 with 0 (measured).
        model_args.dropout = 0.0
    try:  # a new model's shape now, before anything is tokenized; a pretrained one's comes with it
        if model_args.init_from:
            check_shape(dropout=model_args.dropout)
        else:
            check_shape(model_args.n_embd, model_args.n_layer, model_args.n_head, model_args.n_positions, model_args.dropout)
    except ModelError as e:
        raise UserError(str(e)) from None
    check_block_size(data_args.block_size, None if model_args.init_from else model_args.n_positions)
    if args.learning_rate is None:
        args.learning_rate = 5e-5 if model_args.init_from else scratch_learning_rate(model_args.n_embd)
    elif not 0 < args.learning_rate < math.inf:  # also refuses nan; 0 would train nothing
        raise UserError(f"--learning_rate {args.learning_rate:g}: must be a positive number "
                        "(e.g. 1e-3 from scratch, 5e-5 to fine-tune; leave it out for the default).")
    if "tensorboard" in args.report_to and not _tensorboard_installed():
        raise UserError("--report_to tensorboard needs the tensorboard package: `pip install tensorboard`, "
                        "or use --report_to wandb / none.")
    if data_args.tokenizer_name is None and model_args.init_from and Path(model_args.init_from, "tokenizer.json").is_file():
        data_args.tokenizer_name = model_args.init_from


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Command-line flags, or a single .json/.yaml config file holding the same names."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return parse_config_file(argv[0])
    return HfArgumentParser((ModelArguments, DataArguments, TrainArguments)).parse_args_into_dataclasses(args=argv)


def parse_config_file(path: str) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """A .json/.yaml mapping of flag names to values, read as the same flags on the command line would be: values are
    converted by the flag's type (YAML reads 1e-3 as a string), null keeps the default; mistakes raise UserError."""
    import yaml

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse would print the usage and exit
            raise UserError(f"{path}: {message}")

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read it as {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values (max_steps: 100, ...), "
                        f"not a {type(config).__name__}.")
    known = {f.name for cls in (ModelArguments, DataArguments, TrainArguments) for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; see `python train.py --help`.")
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"--{key}={json.dumps(value) if isinstance(value, dict) else value}")
    return Parser((ModelArguments, DataArguments, TrainArguments)).parse_args_into_dataclasses(args=argv)


def split_kwargs(kwargs: dict[str, Any]) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """train(**kwargs) -> the three dataclasses, refusing unknown names like the command line does."""
    groups = []
    for cls in (ModelArguments, DataArguments, TrainArguments):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        groups.append({k: kwargs.pop(k) for k in list(kwargs) if k in names})
    if kwargs:
        raise UserError(f"Unknown argument(s) {', '.join(sorted(kwargs))}; see `python train.py --help`.")
    return ModelArguments(**groups[0]), DataArguments(**groups[1]), TrainArguments(**groups[2])


# ----------------------------------------------------------------------------------------------
# Checkpoints: complete or not, which one to resume, rotation


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [c for c in list_checkpoints(output_dir) if is_complete(c)]
    return complete[-1] if complete else None


def fsync_tree(folder: Path) -> None:
    """Flush a checkpoint's files to disk, so that COMPLETE never reaches the disk before them."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename/write is still ordered there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(checkpoint: Path) -> None:
    fsync_tree(checkpoint)
    with open(checkpoint / COMPLETE, "w") as f:
        f.write(f"saved at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(checkpoint)


def rotate_checkpoints(output_dir: str | Path, keep: int | None, best: str | None) -> None:
    """Delete all but the last `keep` complete checkpoints and the best one; incomplete ones that
    are older than the newest complete one go too. Never touches the newest complete checkpoint."""
    checkpoints = list_checkpoints(output_dir)
    complete = [c for c in checkpoints if is_complete(c)]
    if not complete:
        return
    newest = checkpoint_step(complete[-1])
    keep_set = set(complete[-keep:]) if keep else set(complete)
    if best:
        keep_set.add(Path(best))
    for c in checkpoints:
        if c in keep_set or Path(best or "") == c or checkpoint_step(c) >= newest:
            continue
        shutil.rmtree(c, ignore_errors=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes this checkpoint unusable (the file and why), or None. A COMPLETE checkpoint was whole when it
    was written; a file can still be cut short or overwritten later (a copy that stopped, a failing disk).
    Checked here, before the Trainer's deep tracebacks: JSON parses, safetensors headers cover their files,
    torch's zip archives (optimizer.pt, scheduler.pt, rng_state.pth) are whole and match their checksums."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    if not any(any(checkpoint.glob(weights)) for weights in ("model*.safetensors", "pytorch_model*", "adapter_model*", "global_step*")):
        return "it holds no model weights (model.safetensors)"
    try:
        for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
            try:
                if path.suffix == ".json":
                    json.loads(path.read_text(encoding="utf-8"))
                elif path.suffix == ".safetensors":
                    with safe_open(str(path), "pt"):
                        pass
                elif path.suffix in (".pt", ".pth", ".bin"):
                    with zipfile.ZipFile(path) as archive:
                        for entry in archive.infolist():
                            if entry.CRC or not entry.file_size:  # torch can be told not to write checksums (then 0)
                                with archive.open(entry) as f:  # reading to the end checks the CRC-32
                                    while f.read(1 << 24):
                                        pass
            except (ValueError, zipfile.BadZipFile, SafetensorError, EOFError) as e:  # ValueError: JSON, UTF-8
                return f"{path.name} is damaged ({e})"
    except OSError as e:
        return f"{e.filename or checkpoint} cannot be read ({e.strerror or e})"
    return None


def choose_checkpoint(args: TrainArguments) -> str | None:
    """The checkpoint to resume from, per --resume_from_checkpoint / --resume, or None to start fresh.

    With auto, a damaged latest checkpoint is named and set aside (renamed *.damaged, by the main process),
    and the one before it is used."""
    wanted = args.resume_from_checkpoint or args.resume
    if wanted in ("never", "no", "false", "False"):
        return None
    if wanted in ("auto", "true", "True", "last"):
        checkpoints = list_checkpoints(args.output_dir)
        if args.should_log:
            for c in checkpoints:
                if not is_complete(c):
                    print(f"Ignoring incomplete checkpoint {c} (no {COMPLETE} marker: the run stopped while saving it).")
        damaged = []
        for c in reversed([c for c in checkpoints if is_complete(c)]):
            problem = checkpoint_problem(c)
            if problem is None:
                for bad in damaged:
                    set_aside(bad, args)
                return str(c)
            damaged.append(c)
            if args.should_log:
                print(f"Checkpoint {c} cannot be resumed from: {problem}.")
        if damaged:
            raise UserError(f"No usable checkpoint in {args.output_dir}: every complete one is damaged (see above). "
                            "Start fresh with --resume never, or resume from a copy with --resume PATH.")
        if wanted != "auto":
            raise UserError(f"--resume {wanted}: no complete checkpoint in {args.output_dir}.")
        return None
    path = Path(wanted)
    if not path.is_dir():
        raise UserError(f"Checkpoint {wanted} does not exist; use --resume auto, never or an existing checkpoint folder.")
    if not is_complete(path) and not (path / "trainer_state.json").is_file():
        raise UserError(f"{wanted} is not a complete checkpoint (no {COMPLETE} marker or trainer_state.json).")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"Checkpoint {wanted} cannot be resumed from: {problem}. Resume from another checkpoint (--resume auto "
                        "takes the latest usable one) or start fresh with --resume never.")
    return str(path)


def set_aside(checkpoint: Path, args: TrainArguments) -> None:
    """Rename a damaged checkpoint out of the way: never resumed from or rotated, but its files are kept."""
    aside = checkpoint.with_name(checkpoint.name + ".damaged")
    if args.should_save:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
    if args.should_log:
        print(f"Moved the damaged {checkpoint} to {aside} (delete it when you no longer need it); "
              "resuming from the checkpoint before it.")


def make_output_dir(out: Path) -> None:
    """Create the run folder, or say why it cannot be one, before anything is tokenized or trained."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder; choose another --output_dir.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # writable? (a read-only disk, someone else's folder)
            pass
    except OSError as e:
        raise UserError(f"Cannot write to --output_dir {out}: {e.strerror or e}; choose a folder you can write to.") from None


def check_checkpoint_fits(checkpoint: Path, model) -> None:
    """A checkpoint of another model shape (the model arguments changed, same --output_dir) would fail deep in
    load_state_dict; say which arguments differ instead."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # sharded layouts (FSDP, DeepSpeed) keep no config.json here; the Trainer checks those itself
    names = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
    differ = [f"{n} {saved.get(n)} (this run: {getattr(model.config, n)})" for n in names if saved.get(n) != getattr(model.config, n)]
    if differ:
        raise UserError(f"Checkpoint {checkpoint} holds another model: {', '.join(differ)}. Rerun with the arguments it was "
                        "trained with, or start a new model with --resume never or another --output_dir.")


def remove_partial_checkpoints(output_dir: str | Path, resume_from: str | None) -> None:
    """Partial checkpoints newer than the one we resume from would be written again; clear them first."""
    # The step from its state, not its name: --resume may name any folder.
    start = json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"] if resume_from else -1
    for c in list_checkpoints(output_dir):
        if not is_complete(c) and checkpoint_step(c) > start:
            shutil.rmtree(c, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The Trainer with safe checkpoints, guards and perplexity


class NonFiniteLossError(RuntimeError):
    pass


class GPT2Trainer(Trainer):
    """Trainer whose checkpoints are marked COMPLETE last, and which stops on a NaN/inf loss."""

    max_skipped_steps = 20  # fp16 loss scaling skips a few overflowing steps by design; many mean divergence

    def _save_checkpoint(self, model, trial):
        checkpoint = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and (checkpoint / COMPLETE).exists():
            # A folder left by an earlier run (--resume from an older checkpoint) is about to be overwritten:
            # it must not look complete while it holds a mix of old and new files.
            (checkpoint / COMPLETE).unlink()
            fsync_dir(checkpoint)
        # Rotate only after the new checkpoint is complete, so a crash mid-save always leaves the previous one.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if os.environ.get("GPT2_DEBUG_KILL_IN_SAVE") == str(self.state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the files written but no marker
        self.accelerator.wait_for_everyone()  # every rank's RNG state is on disk
        if self.args.should_save:
            mark_complete(checkpoint)
            rotate_checkpoints(self.args.output_dir, limit, self.state.best_model_checkpoint)

    def _run_epoch(self, *args, **kwargs):
        if 0 < self.state.max_steps <= self.state.global_step:
            # Resumed from the last step's checkpoint (the run stopped during its final evaluation or save):
            # transformers would train one step past --max_steps before its check, and change the final model.
            self.control.should_training_stop = True
            return
        return super()._run_epoch(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(self.compute_loss_func, FusedCausalLMLoss) and "labels" in inputs:
            # The loss comes from the final hidden states; the model computes logits for no position.
            inputs = {**inputs, "logits_to_keep": torch.empty(0, dtype=torch.long, device=inputs["labels"].device)}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            if self.accelerator.scaler is not None:
                # The grad scaler sees the inf/nan gradients and skips this optimizer step.
                self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
                print(f"Step {step}: non-finite loss under fp16 loss scaling; the optimizer step is skipped.")
                if self.skipped_steps <= self.max_skipped_steps:
                    return torch.zeros_like(loss)
            latest = latest_complete_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at step {step}; training stopped before the weights were updated. "
                f"Last good checkpoint: {latest or 'none yet'}. Try a lower --learning_rate, a longer --warmup_steps, "
                f"--max_grad_norm 1.0, or --precision fp32/bf16, then resume with --resume {latest or 'never'}."
            )
        self.skipped_steps = 0
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))  # capped: exp overflows past ~709
        super().log(logs, *args, **kwargs)


class FusedCausalLMLoss:
    """The Trainer's compute_loss_func: GPT-2's loss by model.lm_head_loss from the final hidden states.

    A forward hook on model.transformer hands over the hidden states, so the model still runs through
    its DDP wrapper (gradient sync) and the Trainer keeps its own loss scaling and accumulation.

    With a tied embedding in a single process, the embedding's gradient is made sparse: the loss
    already forms the table's dense gradient, and the looked-up rows are added into it, instead of
    a second dense table of zeros (DDP expects the layout it saw when wrapping, so not there)."""

    def __init__(self, model, sparse_embedding: bool = True):
        self.model, self.hidden = model, None
        self.hook = model.transformer.register_forward_hook(self._keep)
        wte = model.transformer.wte
        self.sparse_embedding = sparse_embedding and wte.weight is model.lm_head.weight and not wte.sparse
        if self.sparse_embedding:
            wte.sparse = True

    def _keep(self, module, args, output):
        self.hidden = output.last_hidden_state

    def __call__(self, outputs, labels, num_items_in_batch=None):
        hidden, self.hidden = self.hidden, None
        return lm_head_loss(hidden, self.model.lm_head.weight, labels, num_items_in_batch)

    def remove(self):
        self.hook.remove()
        if self.sparse_embedding:
            self.model.transformer.wte.sparse = False


def not_the_padding_warning(record: logging.LogRecord) -> bool:
    """Log filter: training blocks are never padded, but an EOS between two documents at a block's edge
    looks like padding to transformers, which then recommends an attention mask."""
    return "since your input_ids may be padded" not in record.getMessage()


def use_fused_loss(args: TrainArguments) -> bool:
    """--fused_loss auto: in fp32 on CPU (where it was measured), never where the Trainer shards the weights
    or smooths labels. It computes in fp32 even under bf16/fp16 autocast."""
    unsupported = bool(args.fsdp) or args.deepspeed is not None or args.label_smoothing_factor != 0 or args.use_liger_kernel
    if args.fused_loss == "on" and unsupported:
        raise UserError("--fused_loss on does not combine with FSDP, DeepSpeed, label smoothing or --use_liger_kernel; "
                        "use --fused_loss auto or off.")
    measured = args.device.type == "cpu" and not (args.bf16 or args.fp16)
    return args.fused_loss == "on" or (args.fused_loss == "auto" and measured and not unsupported)


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


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


class StopOnSignalCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop. A second Ctrl-C kills."""

    def __init__(self):
        self.requested = False
        self.stopped = False
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              "(press Ctrl-C again to stop at once).", flush=True)
        self.requested = True
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Every rank must stop at the same step, or the others would wait forever in the next all-reduce.
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


class DebugCallback(TrainerCallback):
    """Test hooks, enabled by environment variables only: slow steps down, or die at a given step."""

    def on_step_end(self, args, state, control, **kwargs):
        delay = float(os.environ.get("GPT2_DEBUG_STEP_SLEEP", "0"))
        if delay:
            time.sleep(delay)
        if os.environ.get("GPT2_DEBUG_KILL_AT_STEP") == str(state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Tracking


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(args: TrainArguments, config: dict) -> None:
    """One WandB run per output folder: a resumed training continues the same run."""
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


# ----------------------------------------------------------------------------------------------
# Final model, manifest, samples


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


def save_final_model(trainer: Trainer, final_dir: Path, eval_metrics: dict, manifest: dict) -> None:
    """final_model/ is written aside and renamed into place, so it is never half-written.

    Every rank calls this (FSDP gathers the full weights collectively); only the main process writes."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # weights, config.json, generation_config.json, tokenizer files
    trainer.accelerator.wait_for_everyone()
    if not trainer.args.should_save:
        return
    (tmp / "eval_results.json").write_text(json.dumps(eval_metrics, indent=2) + "\n")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    for leftover in ("training_args.bin",):
        (tmp / leftover).unlink(missing_ok=True)
    fsync_tree(tmp)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    fsync_dir(final_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def print_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, top_k=50, temperature=0.8, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        samples.append(text)
        print(f"--- {prompt!r}\n{text}\n")
    return samples


def weights_hash(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def debug_weight_hash(model, args: TrainArguments) -> None:
    """Test hook: with GPT2_DEBUG_HASH_DIR set, every rank writes a hash of its weights there."""
    folder = os.environ.get("GPT2_DEBUG_HASH_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank{args.process_index}.sha256").write_text(weights_hash(model))


# ----------------------------------------------------------------------------------------------
# The training run


def run(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> dict[str, Any]:
    from transformers import EarlyStoppingCallback, default_data_collator, set_seed

    from model import get_model

    resolve_defaults(model_args, data_args, args)
    out = Path(args.output_dir)
    if args.should_save:
        make_output_dir(out)
    resume_from = choose_checkpoint(args)
    if args.should_save:
        remove_partial_checkpoints(out, resume_from)
    if resume_from and args.should_log:
        print(f"Resuming from {resume_from} (use --resume never to start fresh).")

    # The main process tokenizes (and caches) first; the other ranks then read its cache.
    with args.main_process_first(desc="tokenizing"):
        tokenizer, train_ds, val_ds = dataset.get_dataset_and_tokenizer(
            **dataclasses.asdict(data_args), seed=args.seed, context=None if model_args.init_from else model_args.n_positions)
    data = dataset.dataset_info(train_ds)
    if args.should_log:
        print(f"Data: {data.get('source', '?')}: {len(train_ds):,} training blocks of {data_args.block_size} tokens, "
              f"{len(val_ds) if val_ds is not None else 0:,} validation blocks.")
    if val_ds is None:
        # Nothing to evaluate on: no evaluation, and no "best" checkpoint.
        args.eval_strategy = args.eval_strategy.__class__("no")
        args.metric_for_best_model = None
        args.load_best_model_at_end = False
        args.do_eval = False

    set_seed(args.seed)  # the same initial weights on every rank and on every rerun
    try:
        model = get_model(
            n_embd=model_args.n_embd, n_layer=model_args.n_layer, n_head=model_args.n_head, vocab_size=len(tokenizer),
            n_positions=model_args.n_positions, dropout=model_args.dropout, init_from=model_args.init_from,
            verbose=args.should_log,
        )
    except ModelError as e:
        raise UserError(str(e)) from None
    check_block_size(data_args.block_size, model.config.n_positions)
    # The saved tokenizer states the context the model has (pipelines truncate prompts to it), not GPT-2's 1024.
    tokenizer.model_max_length = model.config.n_positions
    if resume_from:
        check_checkpoint_fits(Path(resume_from), model)

    config = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "train": args.to_dict()}
    if "wandb" in args.report_to and args.should_save:
        start_wandb(args, config)

    stop = StopOnSignalCallback()
    callbacks = [LocalMetricsCallback(args.output_dir), stop, DebugCallback()]
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    logging.getLogger("transformers.modeling_utils").addFilter(not_the_padding_warning)
    fused_loss = FusedCausalLMLoss(model, sparse_embedding=args.world_size == 1) if use_fused_loss(args) else None
    trainer = GPT2Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
        compute_loss_func=fused_loss,
    )

    stop.install()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
        eval_metrics = trainer.evaluate() if val_ds is not None and not stop.stopped else {}
    finally:
        stop.uninstall()
        if fused_loss is not None:
            fused_loss.remove()  # the model is plain Hugging Face again: it samples below with its logits
    result: dict[str, Any] = {"output_dir": str(out), "global_step": trainer.state.global_step,
                              "train_metrics": train_result.metrics, "interrupted": stop.stopped}
    if stop.stopped:
        latest = latest_complete_checkpoint(out)
        if args.should_log:
            print(f"Stopped at step {trainer.state.global_step}; saved {latest}. Rerun the same command to resume.")
        result["checkpoint"] = str(latest) if latest else None
        _finish_wandb()
        return result

    eval_metrics["step"] = trainer.state.global_step
    if args.should_log and val_ds is not None:
        print(f"Validation loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['eval_perplexity']:.2f} "
              f"after {trainer.state.global_step} steps.")
    manifest = {
        "arguments": config,
        "data": data,
        "versions": package_versions(),
        "git": git_commit(),
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "eval": eval_metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    final_dir = out / "final_model"
    save_final_model(trainer, final_dir, eval_metrics, manifest)
    debug_weight_hash(trainer.model, args)
    if args.should_log:
        print(f"Final model saved in {final_dir} (load it with transformers.pipeline('text-generation', model='{final_dir}')).")
    if args.should_save and args.sample_prompts:
        result["samples"] = print_samples(trainer.model, tokenizer, args.sample_prompts, args.sample_max_new_tokens, args.seed)
    _finish_wandb()
    result.update(eval_metrics=eval_metrics, final_model=str(final_dir))
    return result


def _tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))


def _finish_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def disk_usage(path: str | Path):
    """shutil.disk_usage of the disk that holds path (or would: its nearest existing folder), or None."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path)
    except OSError:
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def explain_error(e: BaseException, args: TrainArguments | None) -> str | None:
    """A message that says what to change, for errors the user can fix; None for real bugs."""
    out = args.output_dir if args else "logs"
    latest = latest_complete_checkpoint(out)
    resume_hint = f" The last complete checkpoint, {latest}, is intact; rerun to resume from it." if latest else ""
    text = str(e)
    if isinstance(e, (UserError, NonFiniteLossError, ModelError)):
        return text
    if e.__class__.__name__ == "DataError":
        return text
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return ("Out of memory. Use a smaller --per_device_train_batch_size (with --gradient_accumulation_steps to keep "
                "the effective batch), a smaller --block_size, a smaller --preset, or --activation_checkpointing."
                + resume_hint)
    full_advice = "Free space, lower --save_total_limit, or choose --output_dir on a larger disk." + resume_hint
    # ENOSPC reaches us as an OSError, or only as text: tokenizers and safetensors raise their own classes.
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text or "os error 28" in text:
        return f"The disk is full while writing to {out}. " + full_advice
    if "PytorchStreamWriter" in text or ("inline_container" in text and "unexpected pos" in text):
        # torch.save says only that a write failed ("file write failed", "unexpected pos 704 vs 598"): ask the disk.
        usage = disk_usage(out)
        if usage is not None and usage.free < min(2**30, usage.total // 100):
            return f"The disk is full while writing to {out} ({_gb(usage.free)} free). " + full_advice
        free = f", although {_gb(usage.free)} are free there" if usage is not None else ""
        return (f"Writing a checkpoint to {out} failed ({text.splitlines()[0] if text else e.__class__.__name__}){free}. "
                "Check that the disk is writable and within its quota, or choose another --output_dir." + resume_hint)
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"Cannot write {e.filename or out}: {e.strerror}. Choose an --output_dir you can write to."
                + resume_hint)
    return None


def train(**kwargs) -> dict[str, Any]:
    """Train from Python with the command line's arguments, e.g. train(max_steps=100, report_to="none").

    Returns output_dir, final_model, eval_metrics (eval_loss, eval_perplexity), train_metrics,
    global_step, interrupted, and the samples printed."""
    return run(*split_kwargs(dict(kwargs)))


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        model_args, data_args, args = parse_args(argv)
        result = run(model_args, data_args, args)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (tokenizing, loading), or a second Ctrl-C
        latest = latest_complete_checkpoint(args.output_dir if args else "logs")
        print(f"error: interrupted; rerun the same command to {f'resume from {latest}' if latest else 'start again'}.",
              file=sys.stderr)
        return 130
    except Exception as e:
        message = explain_error(e, args)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
