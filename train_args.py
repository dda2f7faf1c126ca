"""train.py's arguments: the typed dataclasses that serve the CLI, config files and notebooks, and the one
place their defaults are resolved (they depend on the device and on fine-tuning) and checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
from transformers import HfArgumentParser, TrainingArguments

import dataset
from checkpoints import UserError
from model import PRESETS, VOCAB_MULTIPLE, ModelError, check_shape, native_bf16_cpu
from optimizers import MUON_LR
from tracking import tensorboard_installed


# With Muon training the hidden matrices, AdamW's share (the tied embedding / LM head, norms, biases) learns best at
# 3x the AdamW-alone rate: val loss after 75 steps x 2048 WebText tokens, small preset, Muon 0.01: 7.345 at 0.5x,
# 7.161 at 1x, 7.062 at 2x, 7.042 at 3x, 7.049 at 4x (bench/train_bench.py --loss_steps 75 --sweep ...).
MUON_ADAMW_LR_SCALE = 3
CPU_MAX_STEPS = 80  # default step budget on CPU: 80 x 8 x 128 tokens (~60% of the built-in corpus), ~5 min on 2 idle cores
CPU_BATCH_SIZE = 8
# --torch_compile auto compiles a CUDA run whose estimated time is at least this long: compiling GPT-2 124M takes about a
# minute, and a compiled step is ~1.3x faster (nanoGPT's loop on an H200, 473k against 350-376k tokens/s), so compiling
# repays itself after ~4 minutes of eager training.
COMPILE_PAYS_AFTER_S = 300


# ----------------------------------------------------------------------------------------------
# Arguments


# Numeric flags the Trainer takes as they come: each must be a finite number in its range, or a run silently does
# something else (--max_grad_norm nan turns clipping off, --weight_decay nan makes every weight NaN at the first step).
# name: (lowest, highest, "[" or "(" for whether the lowest is allowed, "]" or ")" for the highest, what it means)
NUMERIC_RANGES = {
    "weight_decay": (0, math.inf, "[)", "a number at least 0"),
    "max_grad_norm": (0, math.inf, "[)", "a number at least 0 (0: no clipping)"),
    "adam_beta1": (0, 1, "[)", "at least 0 and less than 1"),
    "adam_beta2": (0, 1, "[)", "at least 0 and less than 1"),
    "adam_epsilon": (0, math.inf, "()", "a positive number"),
    "warmup_steps": (0, math.inf, "[)", "a number of steps at least 0 (or a fraction of the run below 1)"),
    "label_smoothing_factor": (0, 1, "[)", "at least 0 and less than 1"),
    "logging_steps": (0, math.inf, "()", "a positive number of steps (or a fraction of the run below 1)"),
    "save_steps": (0, math.inf, "()", "a positive number of steps (or a fraction of the run below 1)"),
    "eval_steps": (0, math.inf, "()", "a positive number of steps (or a fraction of the run below 1)"),
    "max_warmup_fraction": (0, 1, "[]", "between 0 and 1"),
    "decay_fraction": (0, 1, "(]", "more than 0 and at most 1"),
    "muon_learning_rate": (0, math.inf, "()", "a positive number"),
}


def check_numeric_flags(args) -> None:
    """Refuse a NUMERIC_RANGES flag that is not finite or out of its range, before anything is read or trained."""
    for name, (low, high, ends, meaning) in NUMERIC_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        above = low <= value if ends[0] == "[" else low < value
        below = value <= high if ends[1] == "]" else value < high
        if not (math.isfinite(value) and above and below):
            raise UserError(f"--{name} {value:g}: must be {meaning}.")


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
    vocab_multiple: int = field(
        default=VOCAB_MULTIPLE,
        metadata={"help": "A new model's vocabulary is the tokenizer's length rounded up to a multiple of this, for speed "
                  "(GPT-2's 50257 -> 50304, as nanoGPT); the rows beyond the tokenizer are never sampled. 1 turns "
                  "padding off. A pretrained model (--init_from) or a resumed checkpoint keeps its own."},
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

    Fields left at None or "auto" are unset: resolve_defaults fills them in from the device and --init_from."""

    output_dir: str = field(default="logs", metadata={"help": "Run folder: checkpoints, metrics, plots and final_model/."})
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size per device for training. Default 8 on CPU; on a GPU the largest power of two whose "
                  "estimated peak memory fits in 85%% of the free memory (estimate.gpu_batch_size), checked by one "
                  "forward and backward, with --gradient_accumulation_steps towards GPT-2's ~0.5M tokens per optimizer "
                  "step where the data has that many (at most 1/100 of an epoch's tokens per step)."},
    )
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per optimizer step (default 1; on a GPU with the default batch, see "
                  "--per_device_train_batch_size)."},
    )
    torch_compile: str = field(
        default="auto",
        metadata={"nargs": "?", "const": "on",
                  "help": "Compile the model and its loss with torch.compile (inductor): on, off, or auto = on for CUDA "
                  "runs long enough to repay it. Compiling GPT-2 124M takes about a minute and makes each step faster "
                  "(fused kernels; README: Speed on a GPU), so auto compiles when the run's estimated time at a "
                  f"third of the card's peak FLOP/s is at least {COMPILE_PAYS_AFTER_S // 60} minutes; off on CPU unless "
                  "asked (inductor compiles C++ there, for minutes)."},
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
        metadata={"help": "Peak learning rate (of AdamW's parameters with --optim muon). Default from scratch: by width, "
                  "1e-3 up to 512 wide, 6e-4 at 768 (GPT-2 124M), 3e-4 at 1024, 2.5e-4 up to 1536, then 2e-4, and 3x "
                  "that with Muon; 5e-5 with --init_from."},
    )
    optim: str = field(
        default="auto",
        metadata={"help": "Optimizer: muon (torch.optim.Muon for the hidden weight matrices at --muon_learning_rate, AdamW "
                  "at --learning_rate for the embeddings, LayerNorms and biases; optimizers.py), any of the Trainer's "
                  "(adamw_torch_fused, adamw_torch, adafactor, ...), or auto = muon from scratch, adamw_torch_fused (the Trainer's default) "
                  "with --init_from or FSDP/DeepSpeed."},
    )
    muon_learning_rate: float = field(
        default=MUON_LR, metadata={"help": "Peak learning rate of Muon's matrices (--optim muon); the schedule scales it as --learning_rate."}
    )
    lr_scheduler_type: str = field(
        default="warmup_stable_decay",
        metadata={"help": "Learning rate schedule after warmup: warmup_stable_decay (constant, then a linear decay to 0 "
                  "over the last --decay_fraction of the run), linear (decay to 0 over the run), cosine, constant, ..."},
    )
    decay_fraction: float = field(
        default=0.3, metadata={"help": "warmup_stable_decay: the fraction of the run, at its end, over which the learning rate decays."}
    )
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
        metadata={"help": "Compute the loss from the final hidden states in chunks (of the vocabulary on a CPU, of the "
                  "tokens on a GPU), never materializing the logits (model.lm_head_loss; the same loss, faster and "
                  "smaller): auto (on on a GPU, and for fp32 on a CPU), on or off."},
    )
    fused_loss_gemm: str = field(
        default="auto",
        metadata={"help": "The fused loss's three GEMMs (logits and both gradients): fp32, bf16 (bf16 operands with fp32 "
                  "accumulation; softmax and weights stay fp32), or auto = bf16 on a GPU training in bf16/fp16, and "
                  "with --precision auto on a CPU with native bf16 (AVX512-BF16 or AMX; model.native_bf16_cpu), where "
                  "it trains faster; else fp32."},
    )
    sample_prompts: list[str] = field(
        default_factory=lambda: ["The", "In the beginning", "Python is"],
        metadata={"help": "Prompts to sample during training and from the final model (none: skip sampling)."},
    )
    sample_max_new_tokens: int = field(default=40, metadata={"help": "Tokens to generate per sample."})
    sample_every: int | None = field(
        default=None,
        metadata={"help": "Sample the prompts every N optimizer steps during training, into the console, samples.jsonl, "
                  "WandB and TensorBoard (default: at each evaluation; 0: only the final samples)."},
    )

    estimate: bool = field(
        default=False,
        metadata={"help": "Print the memory estimate (weights, gradients, optimizer state, activations, loss buffers, "
                  "against the memory available) and the run's steps and tokens, then exit: nothing is tokenized or trained."},
    )
    memory_check: str = field(
        default="on",
        metadata={"help": "on: refuse to start, before tokenizing, when the estimated peak memory exceeds what is "
                  "available, saying what fits (a smaller batch with gradient accumulation); off: try anyway."},
    )

    def __post_init__(self):
        """Check this project's flags and turn an explicit --precision into the Trainer's fp16/bf16 flags, which
        transformers checks and acts on in its own __post_init__. Unset values stay None/"auto": resolve_defaults."""
        for name, allowed in (("precision", ("auto", "fp32", "fp16", "bf16")), ("fused_loss", ("auto", "on", "off")),
                              ("fused_loss_gemm", ("auto", "fp32", "bf16")),
                              ("memory_check", ("on", "off"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} {getattr(self, name)!r}: choose {', '.join(allowed[:-1])} or {allowed[-1]}.")
        if self.precision != "auto":
            self.fp16, self.bf16 = self.precision == "fp16", self.precision == "bf16"
        if self.bf16 and not self.use_cpu and not torch.accelerator.is_available():
            # Without a GPU, bf16 can only mean the CPU (native bf16 on AMX/AVX-512 CPUs, emulated elsewhere),
            # and transformers refuses it unless --use_cpu says so.
            self.use_cpu = True
        # Unset batch and accumulation: transformers checks stand-ins, resolve_defaults chooses (train.py on a GPU).
        self.batch_auto = self.per_device_train_batch_size is None
        self.accumulation_auto = self.gradient_accumulation_steps is None
        if self.batch_auto:
            self.per_device_train_batch_size = CPU_BATCH_SIZE
        if self.accumulation_auto:
            self.gradient_accumulation_steps = 1
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least 1.")
        compile_choice = {True: "on", False: "off", "true": "on", "false": "off", "True": "on", "False": "off", "1": "on",
                          "0": "off"}.get(self.torch_compile, self.torch_compile)
        if compile_choice not in ("auto", "on", "off"):
            raise UserError(f"--torch_compile {self.torch_compile!r}: choose auto, on or off.")
        self.torch_compile = compile_choice == "on"  # transformers' bool; "auto" comes back after its checks
        check_numeric_flags(self)
        if self.sample_prompts in (["none"], ["None"]):
            self.sample_prompts = []
        if self.sample_every is not None and self.sample_every < 0:
            raise UserError(f"--sample_every {self.sample_every}: give a number of steps, 0 for no samples during "
                            "training, or leave it out to sample at each evaluation.")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise UserError(f"--early_stopping_patience {self.early_stopping_patience}: must be at least 1 evaluation.")
            self.load_best_model_at_end = True  # early stopping means the best model is the one to keep
        # transformers knows neither "auto" nor "muon": it checks a stand-in, and the choice comes back after.
        optim, self.optim = self.optim, self.optim if self.optim not in ("auto", "muon") else "adamw_torch"
        try:
            super().__post_init__()
        except ValueError as e:  # transformers' own checks of its flags: a message for the user, not a traceback
            raise UserError(str(e)) from None
        if optim in ("auto", "muon"):
            self.optim = optim
        if compile_choice == "auto" and not self.torch_compile:  # a --torch_compile_backend/mode alone turns it on
            self.torch_compile = "auto"

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return min(super().get_warmup_steps(num_training_steps), math.ceil(self.max_warmup_fraction * num_training_steps))


def resolve_defaults(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> None:
    """Fill in every argument left unset (None or "auto") from the device (args.device, known once transformers
    set it up) and from --init_from, and check what the model and data arguments must satisfy, before anything
    is tokenized. The one place defaults are chosen; running it again changes nothing."""
    on_gpu = args.device.type == "cuda"
    resolve_training_defaults(args, on_gpu)
    resolve_model_defaults(model_args, data_args, on_gpu)
    sharded = bool(args.fsdp) or args.deepspeed is not None
    if args.optim == "auto":  # Muon trains a new model further per token; fine-tuning keeps the optimizer it was tuned with
        args.optim = "adamw_torch_fused" if model_args.init_from or sharded else "muon"
    if args.optim == "muon" and sharded:
        raise UserError("--optim muon needs each hidden matrix whole on every process, which FSDP and DeepSpeed shard; "
                        "use --optim adamw_torch_fused with them, or plain data parallelism (torchrun) with Muon.")
    if args.learning_rate is None:
        scratch = scratch_learning_rate(model_args.n_embd) * (MUON_ADAMW_LR_SCALE if args.optim == "muon" else 1)
        args.learning_rate = 5e-5 if model_args.init_from else scratch
    elif not 0 < args.learning_rate < math.inf:  # also refuses nan; 0 would train nothing
        raise UserError(f"--learning_rate {args.learning_rate:g}: must be a positive number "
                        "(e.g. 1e-3 from scratch, 5e-5 to fine-tune; leave it out for the default).")
    if data_args.tokenizer_name is None and model_args.init_from and Path(model_args.init_from, "tokenizer.json").is_file():
        data_args.tokenizer_name = model_args.init_from


def resolve_training_defaults(args: TrainArguments, on_gpu: bool) -> None:
    precision_auto = args.precision == "auto" and not (args.fp16 or args.bf16)
    if args.precision == "auto":  # the Trainer's own --fp16/--bf16 still win
        if on_gpu and not (args.fp16 or args.bf16):
            args.bf16 = torch.cuda.is_bf16_supported()
            args.fp16 = not args.bf16
            args.mixed_precision = "bf16" if args.bf16 else "fp16"  # what transformers' __post_init__ derives from them
        args.precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    if args.max_steps is None:
        # On CPU the default is a step budget, unless epochs are asked for; -1 is the Trainer's "count epochs".
        args.max_steps = CPU_MAX_STEPS if not on_gpu and args.num_train_epochs is None else -1
    if args.num_train_epochs is None:
        args.num_train_epochs = 3.0
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max_steps {args.max_steps}: give a positive number of optimizer steps, "
                        "or -1 to train for --num_train_epochs.")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise UserError(f"--num_train_epochs {args.num_train_epochs}: must be more than 0 (or give --max_steps).")
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False  # every GPT-2 parameter is used; searching costs a graph walk
    if not on_gpu:
        args.dataloader_pin_memory = False  # pinning only helps copies to a GPU
    else:
        # Batches go to the GPU from pinned memory without waiting: a blocking copy waits for every kernel queued
        # before it, so the CPU could never prepare the next step while the GPU runs this one.
        args.accelerator_config.non_blocking = args.dataloader_pin_memory
    # train.GPT2Trainer's guard stops on a NaN/inf loss, reading it on the device; transformers' filter of such
    # losses from the logged mean would read every micro-step's loss on the host.
    args.logging_nan_inf_filter = False
    args.fused_loss = "on" if use_fused_loss(args) else "off"
    if args.fused_loss_gemm == "auto":
        # fp32 weights and model, bf16 GEMMs in the loss: faster where the CPU has native bf16 (bench/train_bench.py);
        # an explicit --precision fp32 keeps every GEMM in fp32.
        native = args.fused_loss == "on" and precision_auto and args.device.type == "cpu" and native_bf16_cpu()
        tensor_cores = args.fused_loss == "on" and args.device.type == "cuda" and (args.bf16 or args.fp16)
        args.fused_loss_gemm = "bf16" if native or tensor_cores else "fp32"
    elif args.fused_loss_gemm == "bf16" and args.fused_loss != "on":
        raise UserError("--fused_loss_gemm bf16 sets the fused loss's GEMMs, but the fused loss is off here: "
                        "add --fused_loss on, or leave --fused_loss_gemm out.")
    if "tensorboard" in args.report_to and not tensorboard_installed():
        raise UserError("--report_to tensorboard needs the tensorboard package: `pip install tensorboard`, "
                        "or use --report_to wandb / none.")


def use_fused_loss(args: TrainArguments) -> bool:
    """--fused_loss auto: on a GPU, and in fp32 on a CPU (where it was measured), never where the Trainer shards the
    weights or smooths labels. Its softmax is fp32 even under bf16/fp16 autocast."""
    unsupported = bool(args.fsdp) or args.deepspeed is not None or args.label_smoothing_factor != 0 or args.use_liger_kernel
    if args.fused_loss == "on" and unsupported:
        raise UserError("--fused_loss on does not combine with FSDP, DeepSpeed, label smoothing or --use_liger_kernel; "
                        "use --fused_loss auto or off.")
    measured = args.device.type == "cuda" or not (args.bf16 or args.fp16)
    return args.fused_loss == "on" or (args.fused_loss == "auto" and measured and not unsupported)


def resolve_model_defaults(model_args: ModelArguments, data_args: DataArguments, on_gpu: bool) -> None:
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
    if isinstance(model_args.vocab_multiple, bool) or not isinstance(model_args.vocab_multiple, int) or model_args.vocab_multiple < 1:
        raise UserError(f"--vocab_multiple {model_args.vocab_multiple!r}: must be a whole number of at least 1 (1: no padding).")
    try:  # a new model's shape now, before anything is tokenized; a pretrained one's comes with it
        if model_args.init_from:
            check_shape(dropout=model_args.dropout)
        else:
            check_shape(model_args.n_embd, model_args.n_layer, model_args.n_head, model_args.n_positions, model_args.dropout)
    except ModelError as e:
        raise UserError(str(e)) from None
    check_block_size(data_args.block_size, None if model_args.init_from else model_args.n_positions)


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


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Command-line flags, or a single .json/.yaml config file holding the same names; unset values stay None
    or "auto" until run() resolves them (resolve_defaults)."""
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
