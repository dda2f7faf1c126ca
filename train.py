"""Train a GPT-2 on your text with the Hugging Face Trainer, then print a few samples.

    python train.py                                  # the main job: see "Defaults" below
    python train.py --dataset_path my_texts/ --max_steps 2000
    python train.py config.yaml                      # every flag from a JSON/YAML file instead
    python train.py --help                           # all flags, the Trainer's included

    from train import train                          # in a notebook: the same arguments
    result = train(dataset_path="my.txt", max_steps=200)

Defaults. On a CPU: the "small" model (4 layers, 256 wide), 128-token blocks, a step budget that
finishes in a few minutes on 2 cores. On a GPU: GPT-2 124M, 1024-token blocks, 3 epochs, bf16 where
the GPU supports it else fp16. From scratch: Muon for the hidden matrices (0.02) and AdamW for the rest at
3x a rate that follows the model's width (1e-3 for the small preset, 6e-4 for GPT-2 124M, less for wider
ones); with --init_from (fine-tuning) AdamW at 5e-5. Warmup is 500 steps, capped at 10% of the run, then the
rate stays until the last 30% of the run, over which it decays linearly to 0 (warmup_stable_decay).

Output (--output_dir, default logs/): checkpoint-N folders (the last --save_total_limit plus the
best by validation loss), metrics.jsonl, loss_curve.png, samples.jsonl (the --sample_prompts sampled at each
evaluation, or every --sample_every steps), and final_model/, a plain Hugging Face model folder with
eval_results.json and manifest.json.

Resuming: rerunning the same command continues from the latest complete checkpoint (--resume auto).
A checkpoint is complete once its COMPLETE file exists, written last; Ctrl-C saves one and exits.
A complete checkpoint whose files were damaged later is named, set aside as checkpoint-N.damaged, and
the one before it is used.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
from accelerate.utils import broadcast_object_list
from transformers import (EarlyStoppingCallback, Trainer, default_data_collator, set_seed)

import dataset
from atomic import install, temp_beside
from checkpoints import (COMPLETE, UserError, check_checkpoint_fits, checkpoint_step, choose_checkpoint,  # noqa: F401
                         latest_complete_checkpoint, make_output_dir, remove_partial_checkpoints)
from errors import GPT2ToolkitError, run_main
from estimate import (GPU_MEMORY_SHARE, accumulation_steps, available_memory, estimate_memory, flops_per_token,
                      gpu_batch_size, largest_batch, peak_flops, what_fits)
from gpt2_tokenizer import load_tokenizer
from model import FusedCausalLMLoss, ModelError, check_vocab, first_line, get_model, no_logits, padded_vocab_size, whole_blocks
from perplexity import token_byte_lengths
from trainer import EtaCallback, GPT2Trainer, StopOnSignalCallback
from tracking import LocalMetricsCallback, SampleCallback, draw_samples, finish_wandb, manifest, start_wandb
from train_args import (COMPILE_PAYS_AFTER_S, CPU_MAX_STEPS, DataArguments, ModelArguments, TrainArguments, check_block_size,  # noqa: F401
                        parse_args, parse_config_file, resolve_defaults, scratch_learning_rate, split_kwargs)

# ----------------------------------------------------------------------------------------------
# The training run, in the order of transformers' run_clm: arguments, data, model, Trainer, train,
# evaluate, save


def run(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> dict[str, Any]:
    """One training run from the three argument groups (parse_args, split_kwargs); see train() for the result."""
    # Arguments: defaults, the run folder, the checkpoint to resume from
    resolve_defaults(model_args, data_args, args)
    plan = estimate_run(model_args, data_args, args)  # may refuse: before the run folder, tokens or weights exist
    if args.estimate:
        return {"estimate": plan}
    resume_from = prepare_output_dir(args)

    tokenizer, train_ds, val_ds, data = load_data(model_args, data_args, args)
    finish_gpu_batch(args, plan, len(train_ds), data_args.block_size)
    choose_compile(args, plan, len(train_ds))
    model = build_model(model_args, data_args, args, tokenizer, resume_from)
    if plan.get("auto_batch"):
        verify_batch_size(model, args, data_args.block_size)
        plan["batch_size"], plan["gradient_accumulation_steps"] = args.per_device_train_batch_size, args.gradient_accumulation_steps

    # The arguments as this run uses them (load_data turns evaluation off without validation data).
    config = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "train": args.to_dict(),
              "estimate": plan}
    if "wandb" in args.report_to and args.should_save:
        start_wandb(args, config)
    trainer, stop = build_trainer(model, tokenizer, train_ds, val_ds, args)
    if plan:
        trainer.add_callback(EtaCallback(plan))

    train_result, eval_metrics = train_and_evaluate(trainer, stop, resume_from)
    result: dict[str, Any] = {"output_dir": str(Path(args.output_dir)), "global_step": trainer.state.global_step,
                              "train_metrics": train_result.metrics, "interrupted": stop.stopped}
    if stop.stopped:
        result["checkpoint"] = report_stop(trainer)
        finish_wandb()
        return result

    final_dir = Path(args.output_dir) / "final_model"
    save_final_model(trainer, final_dir, eval_metrics, manifest(config, data, trainer.state, args.world_size, eval_metrics))
    if args.should_save and args.sample_prompts:
        result["samples"] = print_samples(trainer.model, tokenizer, args.sample_prompts, args.sample_max_new_tokens, args.seed)
    finish_wandb()
    result.update(eval_metrics=eval_metrics, final_model=str(final_dir))
    return result


def estimate_run(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> dict[str, Any]:
    """The memory one training step will take at its peak (estimate.py) against the memory available, and the
    run's steps and tokens, printed before anything is tokenized; a run that would not fit stops here, saying
    what fits (--memory_check off tries anyway)."""
    config = model_config(model_args, data_args)
    if config is None:
        return {}
    device = args.device.type if args.device.type in ("cpu", "cuda") else "cpu"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    options = dict(precision=precision, fused_loss=args.fused_loss == "on", gradient_checkpointing=bool(args.gradient_checkpointing),
                   optimizer=str(getattr(args.optim, 'value', args.optim)), device_type=device)
    block = data_args.block_size
    available = available_memory(device, args.device.index or 0)
    auto = args.auto_find_batch_size
    if auto:
        choose_batch_size(config, block, available, args, options)
    elif args.batch_auto and device == "cuda":
        auto = choose_gpu_batch(config, block, available, args, options)
    batch = args.per_device_train_batch_size
    est = estimate_memory(config, batch, block, **options)
    tokens_per_step = batch * block * args.gradient_accumulation_steps * args.world_size
    plan = {"memory": {k: getattr(est, k) for k in ("weights", "gradients", "optimizer_state", "activations", "logits", "total")},
            "available": available, "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token(config, block),
            "batch_size": batch, "gradient_accumulation_steps": args.gradient_accumulation_steps, "auto_batch": auto}
    if args.max_steps > 0:
        plan["steps"], plan["tokens"] = args.max_steps, args.max_steps * tokens_per_step
    if args.should_log:
        print(est.table(available))
        print(f"  {tokens_per_step:,} tokens per optimizer step"
              + (f"; {plan['steps']} steps, {plan['tokens'] / 1e6:.2f}M tokens" if "steps" in plan else "; steps: from the data's size"))
    if est.total > available and args.memory_check == "on":
        raise UserError(what_fits(config, block, available, batch_size=batch, gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  **options) + " (--memory_check off tries anyway.)")
    return plan


def choose_batch_size(config, block: int, available: int, args: TrainArguments, options: dict) -> None:
    """--auto_find_batch_size, from the estimate instead of the Trainer's retry on CUDA out-of-memory (which
    cannot see a CPU's memory): the largest per-device batch whose estimated peak fits in 90% of the memory
    available, among the divisors of the effective batch, so that gradient accumulation keeps it exactly.
    verify_batch_size then runs one forward and backward at that batch."""
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
    largest = largest_batch(config, block, int(available * 0.9), limit=effective, **options)
    batch = max((d for d in range(1, effective + 1) if effective % d == 0 and d <= largest), default=1)
    args.per_device_train_batch_size, args.gradient_accumulation_steps = batch, effective // batch
    args.auto_find_batch_size = False  # chosen here; the Trainer's own search would start again from the original
    if args.should_log:
        print(f"--auto_find_batch_size: per-device batch {batch} x {effective // batch} accumulation steps "
              f"(effective batch {effective}; the estimate fits up to {largest}).")


def choose_gpu_batch(config, block: int, available: int, args: TrainArguments, options: dict) -> bool:
    """The default per-device batch on a GPU (--per_device_train_batch_size unset): the largest power of two whose
    estimated peak fits in estimate.GPU_MEMORY_SHARE of the free memory. False (the batch stays) when none fits: the
    memory check then says what to change."""
    batch = gpu_batch_size(config, block, available, **options)
    if batch == 0:
        return False
    args.per_device_train_batch_size = batch
    return True


def finish_gpu_batch(args: TrainArguments, plan: dict, n_blocks: int, block: int) -> None:
    """With the GPU's default batch: at most the training blocks there are, and gradient accumulation towards GPT-2's
    ~0.5M tokens per optimizer step where the data has that many (estimate.accumulation_steps); printed."""
    if not (plan.get("auto_batch") and args.batch_auto and args.device.type == "cuda"):
        return
    per_rank = max(1, n_blocks // args.world_size)
    if args.per_device_train_batch_size > per_rank:
        args.per_device_train_batch_size = 1 << (per_rank.bit_length() - 1)
    batch = args.per_device_train_batch_size
    if args.accumulation_auto:
        args.gradient_accumulation_steps = accumulation_steps(batch, block, args.world_size, n_blocks * block)
    tokens = batch * block * args.gradient_accumulation_steps * args.world_size
    plan.update(batch_size=batch, gradient_accumulation_steps=args.gradient_accumulation_steps, tokens_per_step=tokens)
    if args.max_steps > 0:
        plan["tokens"] = args.max_steps * tokens
    steps_per_epoch = n_blocks // (batch * args.gradient_accumulation_steps * args.world_size)
    if args.should_log:
        print(f"GPU batch: {batch} x {block} tokens per device (the largest power of two that fits in "
              f"{GPU_MEMORY_SHARE:.0%} of the free memory) x {args.gradient_accumulation_steps} accumulation step(s) x "
              f"{args.world_size} device(s) = {tokens:,} tokens per optimizer step; {steps_per_epoch} step(s) per epoch."
              + ("" if steps_per_epoch >= 20 else " For more, smaller steps, pass a smaller --per_device_train_batch_size."))


def choose_compile(args: TrainArguments, plan: dict, n_blocks: int) -> None:
    """--torch_compile auto: on for a CUDA run whose time, estimated at a third of the card's peak FLOP/s (100 TFLOP/s
    for a card without a known peak), is at least COMPILE_PAYS_AFTER_S; off on a CPU. Printed either way on a GPU."""
    if args.torch_compile != "auto":
        return
    args.torch_compile = False
    if args.device.type != "cuda" or not plan:
        if plan == {} and args.should_log and args.device.type == "cuda":
            print("--torch_compile auto: off (no estimate of the run's length for this model; --torch_compile on compiles).")
        return
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * n_blocks / per_step)
    peak = peak_flops(torch.cuda.get_device_name(args.device), "bf16" if args.bf16 or args.fp16 else "fp32") or 100e12
    seconds = steps * plan["tokens_per_step"] * plan["flops_per_token"] / (peak / 3)
    args.torch_compile = seconds >= COMPILE_PAYS_AFTER_S
    if args.torch_compile:
        args.torch_compile_backend = args.torch_compile_backend or "inductor"
    if args.should_log:
        print(f"--torch_compile auto: {'on' if args.torch_compile else 'off'} (about {seconds / 60:.1f} minutes of training "
              f"estimated; compiling pays off from {COMPILE_PAYS_AFTER_S // 60} minutes).")


def verify_batch_size(model, args: TrainArguments, block: int) -> None:
    """One forward and backward at the chosen batch; out of memory halves the batch and doubles the
    accumulation (the effective batch stays) until it runs."""
    model.to(args.device)
    while True:
        ids = torch.zeros(args.per_device_train_batch_size, block, dtype=torch.long, device=args.device)
        try:
            dtype = torch.bfloat16 if args.bf16 else torch.float16
            fused = isinstance(getattr(model, "_loss_function", None), FusedCausalLMLoss)
            with (torch.random.fork_rng(devices=[args.device] if args.device.type == "cuda" else []),  # training's RNG untouched
                  torch.autocast(args.device.type, dtype=dtype, enabled=args.bf16 or args.fp16), whole_blocks(model)):
                model(input_ids=ids, labels=ids, use_cache=False, **({"logits_to_keep": no_logits(args.device)} if fused else {})
                      ).loss.backward()
            return
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if "out of memory" not in str(e) and "can't allocate" not in str(e):
                raise
            if args.per_device_train_batch_size == 1 or args.per_device_train_batch_size % 2:
                raise UserError(f"--auto_find_batch_size: batch {args.per_device_train_batch_size} does not fit "
                                f"({first_line(e)}); use a smaller --block_size or model.") from None
            args.per_device_train_batch_size //= 2
            args.gradient_accumulation_steps *= 2
            print(f"--auto_find_batch_size: out of memory; trying batch {args.per_device_train_batch_size}.")
        finally:
            model.zero_grad(set_to_none=True)
            if args.device.type == "cuda":
                torch.cuda.empty_cache()


def model_config(model_args: ModelArguments, data_args: DataArguments):
    """The shape the run's model will have, without building it: the pretrained config, or the new model's with
    the tokenizer's padded vocabulary. None when a pretrained config cannot be read here (get_model says why later)."""
    if model_args.init_from:
        try:
            from transformers import GPT2Config

            return GPT2Config.from_pretrained(model_args.init_from)
        except (OSError, ValueError):
            return None
    n_tokens = len(load_tokenizer(data_args.tokenizer_name))
    return {"n_layer": model_args.n_layer, "n_embd": model_args.n_embd, "n_head": model_args.n_head,
            "n_positions": model_args.n_positions, "vocab_size": padded_vocab_size(n_tokens, model_args.vocab_multiple),
            "attn_pdrop": model_args.dropout, "resid_pdrop": model_args.dropout, "embd_pdrop": model_args.dropout}


def prepare_output_dir(args: TrainArguments) -> str | None:
    """Create the run folder and choose the checkpoint to resume from (None: start fresh), clearing partial
    checkpoints that training will write again."""
    if args.should_save:
        make_output_dir(Path(args.output_dir))
    resume_from = choose_checkpoint(args)
    if args.should_save:
        remove_partial_checkpoints(args.output_dir, resume_from)
    if resume_from and args.should_log:
        print(f"Resuming from {resume_from} (use --resume never to start fresh).")
    return resume_from


def load_data(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments):
    """(tokenizer, training blocks, validation blocks or None, the data's description for the manifest).
    Without validation blocks there is no evaluation, and no best checkpoint."""
    # Every rank asks: the first to come prepares the cache on all its cores, the others wait for it (no barrier,
    # so a rank that dies while preparing hands the work over instead of leaving the rest waiting), then read it.
    tokenizer, train_ds, val_ds = dataset.get_dataset_and_tokenizer(
        **dataclasses.asdict(data_args), seed=args.seed, context=None if model_args.init_from else model_args.n_positions)
    data = dataset.dataset_info(train_ds)
    if args.should_log:
        print(f"Data: {data.get('source', '?')}: {len(train_ds):,} training blocks of {data_args.block_size} tokens, "
              f"{len(val_ds) if val_ds is not None else 0:,} validation blocks.")
    if val_ds is None:
        args.eval_strategy = args.eval_strategy.__class__("no")
        args.metric_for_best_model = None
        args.load_best_model_at_end = False
        args.do_eval = False
    return tokenizer, train_ds, val_ds, data


def build_model(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments, tokenizer, resume_from):
    """A new or pretrained GPT-2 (model.get_model) for this vocabulary, checked against --block_size and the
    checkpoint to resume from."""
    set_seed(args.seed)  # the same initial weights on every rank and on every rerun
    eos = tokenizer.eos_token_id  # dataset.py has refused a tokenizer without one
    try:
        model = get_model(
            n_embd=model_args.n_embd, n_layer=model_args.n_layer, n_head=model_args.n_head,
            vocab_size=new_vocab_size(len(tokenizer), model_args.vocab_multiple, resume_from),
            n_positions=model_args.n_positions, dropout=model_args.dropout, init_from=model_args.init_from,
            bos_token_id=eos, eos_token_id=eos, verbose=args.should_log,
        )
        check_vocab(tokenizer, model, str(model_args.init_from or "the model"))
    except ModelError as e:
        raise UserError(str(e)) from None
    never_sample_padding(model, len(tokenizer))
    check_block_size(data_args.block_size, model.config.n_positions)
    # The saved tokenizer states the context the model has (pipelines truncate prompts to it), not GPT-2's 1024.
    tokenizer.model_max_length = model.config.n_positions
    if resume_from:
        check_checkpoint_fits(Path(resume_from), model)
    if args.fused_loss == "on":  # the model's own loss while it trains: train_and_evaluate removes it after training
        gemm = torch.bfloat16 if args.fused_loss_gemm == "bf16" else torch.float32
        FusedCausalLMLoss(model, sparse_embedding=args.world_size == 1 and args.device.type == "cpu", gemm_dtype=gemm)
    return model


def new_vocab_size(n_tokens: int, multiple: int, resume_from: str | None) -> int:
    """A new model's vocabulary: the tokenizer's length padded to `multiple` (--vocab_multiple); a checkpoint to
    resume from keeps the one it was trained with when that holds the tokenizer (e.g. one written before padding)."""
    if resume_from:
        try:
            saved = json.loads((Path(resume_from) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            saved = None  # no or no readable config.json: check_checkpoint_fits and the Trainer speak for it
        if isinstance(saved, int) and not isinstance(saved, bool) and saved >= n_tokens:
            return saved
    return padded_vocab_size(n_tokens, multiple)


def never_sample_padding(model, n_tokens: int) -> None:
    """The vocabulary rows beyond the tokenizer (padding) are suppressed in the saved generation_config.json, so
    model.generate and transformers' pipelines never pick an id the tokenizer cannot decode (generate.py's own
    sampler never computes those logits)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab > n_tokens:
        model.generation_config.suppress_tokens = list(range(n_tokens, vocab))


def build_trainer(model, tokenizer, train_ds, val_ds, args: TrainArguments) -> tuple[GPT2Trainer, StopOnSignalCallback]:
    """The Trainer with this project's callbacks (metrics file and plot, Ctrl-C, early stopping) and loss."""
    stop = StopOnSignalCallback()
    callbacks = [LocalMetricsCallback(args.output_dir), stop]
    if args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    sampler = sample_callback(tokenizer, args)
    if sampler is not None:
        callbacks.append(sampler)
    trainer = GPT2Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                          data_collator=default_data_collator, callbacks=callbacks)
    if val_ds is not None:
        trainer.val_bytes_per_token = val_bytes_per_token(val_ds, tokenizer)
    if sampler is not None:
        sampler.callbacks = trainer.callback_handler.callbacks  # TensorBoard's writer, once it is open
    return trainer, stop


def sample_callback(tokenizer, args: TrainArguments) -> SampleCallback | None:
    """Samples during training (--sample_every; default at each evaluation), or None: no prompts, --sample_every 0,
    or weights sharded across processes (FSDP, DeepSpeed), which the main process alone cannot sample from."""
    if not args.sample_prompts or args.sample_every == 0:
        return None
    if args.fsdp or args.deepspeed is not None:
        if args.should_log:
            print("Samples during training are off under FSDP/DeepSpeed (sharded weights); the final samples stay.")
        return None
    return SampleCallback(args.output_dir, tokenizer, args.sample_prompts, args.sample_max_new_tokens, args.seed,
                          every=args.sample_every)


def val_bytes_per_token(val_ds, tokenizer) -> float | None:
    """UTF-8 bytes per token the validation loss scores (every token of a block but its first), for
    eval_bits_per_byte: the validation loss per byte of text, which compares runs on different tokenizers
    (a per-token loss does not: a token of an 8k vocabulary is less text than one of GPT-2's)."""
    import numpy as np

    lengths = token_byte_lengths(tokenizer)
    targets = np.asarray(val_ds.with_format("numpy")["input_ids"])[:, 1:]
    n_bytes = int(lengths[targets].sum())
    return n_bytes / targets.size if n_bytes and targets.size else None


def train_and_evaluate(trainer: GPT2Trainer, stop: StopOnSignalCallback, resume_from: str | None):
    """trainer.train(), then the final evaluation unless stopped early ({} without validation data)."""
    stop.install()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
        eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None and not stop.stopped else {}
    finally:
        stop.uninstall()
        fused_loss = getattr(trainer.model, "_loss_function", None)
        if isinstance(fused_loss, FusedCausalLMLoss):
            fused_loss.remove()  # the model is plain Hugging Face again: it samples with its logits
    eval_metrics["step"] = trainer.state.global_step
    if trainer.args.should_log and "eval_loss" in eval_metrics and not stop.stopped:
        bpb = f", {eval_metrics['eval_bits_per_byte']:.4f} bits per byte" if "eval_bits_per_byte" in eval_metrics else ""
        print(f"Validation loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['eval_perplexity']:.2f}{bpb} "
              f"after {trainer.state.global_step} steps.")
    return train_result, eval_metrics


def report_stop(trainer: GPT2Trainer) -> str | None:
    """After Ctrl-C/SIGTERM: the checkpoint just saved, which a rerun resumes from."""
    latest = latest_complete_checkpoint(trainer.args.output_dir)
    if trainer.args.should_log:
        print(f"Stopped at step {trainer.state.global_step}; saved {latest}. Rerun the same command to resume.")
    return str(latest) if latest else None


def save_final_model(trainer: Trainer, final_dir: Path, eval_metrics: dict, manifest: dict) -> None:
    """final_model/ is written aside and renamed into place (atomic.py), so it is never half-written.

    Every rank calls this (FSDP gathers the full weights collectively) and saves into the main process's temporary
    folder; only the main process writes."""
    tmp = [str(temp_beside(final_dir, folder=True)) if trainer.args.should_save else None]
    if trainer.accelerator.num_processes > 1:
        broadcast_object_list(tmp)
    trainer.save_model(tmp[0])  # weights, config.json, generation_config.json, tokenizer files
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        tmp = Path(tmp[0])
        (tmp / "eval_results.json").write_text(json.dumps(eval_metrics, indent=2) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        (tmp / "training_args.bin").unlink(missing_ok=True)
        install(tmp, final_dir)
    if trainer.args.should_log:
        print(f"Final model saved in {final_dir} (load it with transformers.pipeline('text-generation', model='{final_dir}')).")


def print_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """Sample each prompt from the trained model with the toolkit's one sampler (generate.generate, top-k 50,
    temperature 0.8; tracking.draw_samples, as the samples during training), print and return prompt + continuation."""
    model.eval()
    completions = draw_samples(model, tokenizer, prompts, max_new_tokens, seed)
    for c in completions:
        print(f"--- {c.prompt!r}\n{c.text}\n")
    return [c.text for c in completions]


# ----------------------------------------------------------------------------------------------
# Entry points and errors


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


# How gloo and NCCL say that a peer is gone, when they raise a plain RuntimeError
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "Broken pipe")


def explain_error(e: BaseException, args: TrainArguments | None) -> str | None:
    """A message that says what to change, for errors the user can fix; None for real bugs."""
    out = args.output_dir if args else "logs"
    latest = latest_complete_checkpoint(out)
    resume_hint = f" The last complete checkpoint, {latest}, is intact; rerun to resume from it." if latest else ""
    text = str(e)
    if isinstance(e, GPT2ToolkitError):
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
    if isinstance(e, getattr(torch.distributed, "DistError", ())) or any(s in text for s in PEER_LOST):
        return (f"Another process of this distributed job stopped (killed, or its node lost), so this one cannot go on "
                f"({text.strip().splitlines()[-1][:200] if text.strip() else type(e).__name__}). Find why in that "
                f"node's log, then rerun the same command on every node: it resumes from "
                f"{latest or 'the start (no checkpoint was complete yet)'}.")
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
    parsed: list = []

    def body() -> int:
        parsed.extend(parse_args(argv))
        result = run(*parsed)
        return 130 if result.get("interrupted") else 0

    def interrupted() -> str:  # Ctrl-C outside the training loop (tokenizing, loading), or a second Ctrl-C
        latest = latest_complete_checkpoint(parsed[2].output_dir if parsed else "logs")
        return f"interrupted; rerun the same command to {f'resume from {latest}' if latest else 'start again'}."

    return run_main(body, explain=lambda e: explain_error(e, parsed[2] if parsed else None), interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
