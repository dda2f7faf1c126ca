"""The Trainer of train.py and its callbacks: checkpoints marked COMPLETE only when whole, a loss from the hidden
states, no host read in a training step, a stop on a NaN/inf loss, Ctrl-C saves and stops, the first speed report.

GPT2Trainer is transformers' Trainer with public overrides only (create_optimizer, create_scheduler,
get_batch_samples, compute_loss, training_step, prediction_step, log) and callbacks for the rest, so that an
upgrade of transformers cannot silently change what an override of a private method means.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
from transformers import Trainer, TrainerCallback

from checkpoints import latest_complete_checkpoint, mark_complete, rotate_checkpoints, unmark
from errors import GPT2ToolkitError
from estimate import estimate_time, peak_flops
from model import FusedCausalLMLoss, no_logits, whole_blocks
from optimizers import attach_found_inf, muon_with_adamw


# ----------------------------------------------------------------------------------------------
# The Trainer: checkpoints marked COMPLETE last, guards, perplexity, Ctrl-C


class NonFiniteLossError(GPT2ToolkitError, RuntimeError):
    pass


class GPT2Trainer(Trainer):
    """Trainer whose checkpoints are marked COMPLETE last, whose loss comes from the hidden states (FusedCausalLMLoss
    installed on the model), whose training steps read nothing on the host, and which stops on a NaN/inf loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = NonFiniteGuard(self)
        self.add_callback(self.guard)
        self.add_callback(CompleteCheckpoints(self))

    def create_optimizer(self, model=None):
        """--optim muon: Muon for the hidden matrices, AdamW for the rest (optimizers.py); else the Trainer's."""
        if self.args.optim != "muon" or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))  # the Trainer's rule: no decay on biases and LayerNorms
        self.optimizer = muon_with_adamw(
            model, lr=self.args.learning_rate, muon_lr=self.args.muon_learning_rate, weight_decay=self.args.weight_decay,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            no_decay={n for n, _ in model.named_parameters() if n not in decay})
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """warmup_stable_decay decays linearly over the last --decay_fraction of the run, unless
        --lr_scheduler_kwargs says otherwise (transformers' own default is a cosine over a number of steps)."""
        if self.args.lr_scheduler_type == "warmup_stable_decay" and self.lr_scheduler is None:
            kwargs = dict(self.args.lr_scheduler_kwargs or {})
            kwargs.setdefault("num_decay_steps", math.ceil(self.args.decay_fraction * num_training_steps))
            kwargs.setdefault("decay_type", "linear")
            kwargs["num_decay_steps"] = min(kwargs["num_decay_steps"], num_training_steps - self.args.get_warmup_steps(num_training_steps))
            saved, self.args.lr_scheduler_kwargs = self.args.lr_scheduler_kwargs, kwargs
            try:
                return super().create_scheduler(num_training_steps, optimizer)
            finally:
                self.args.lr_scheduler_kwargs = saved
        return super().create_scheduler(num_training_steps, optimizer)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if 0 < self.state.max_steps <= self.state.global_step:
            # Resumed from the last step's checkpoint (the run stopped during its final evaluation or save):
            # transformers would train one step past --max_steps before its check, and change the final model.
            # No batches: the Trainer runs no step and stops at the flag.
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(getattr(self.model, "_loss_function", None), FusedCausalLMLoss) and "labels" in inputs:
            # The model's loss comes from its final hidden states; it computes logits for no position.
            inputs = {**inputs, "logits_to_keep": no_logits(inputs["labels"].device)}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with whole_blocks(self.model):  # training blocks are never padded: no mask, no checks that read the input
            loss = super().training_step(model, inputs, num_items_in_batch)
        return self.guard.observe(loss)

    def prediction_step(self, *args, **kwargs):
        with whole_blocks(self.model):  # validation blocks are whole too
            return super().prediction_step(*args, **kwargs)

    val_bytes_per_token: float | None = None  # UTF-8 bytes per scored validation token (val_bytes_per_token)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))  # capped: exp overflows past ~709
            if self.val_bytes_per_token:
                logs["eval_bits_per_byte"] = logs["eval_loss"] / math.log(2) / self.val_bytes_per_token
        super().log(logs, *args, **kwargs)


class CompleteCheckpoints(TrainerCallback):
    """A checkpoint is marked COMPLETE only after the Trainer has written all of it (on_save) and only if its weights
    are finite, and older ones are rotated only then, so a run killed mid-save always leaves the previous complete
    checkpoint and a NaN checkpoint is never resumed from. The Trainer's own rotation, which runs inside its save
    before the new checkpoint is whole, is turned off (its save_total_limit set to None); this callback keeps
    --save_total_limit checkpoints plus the best one."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.keep = trainer.args.save_total_limit
        trainer.args.save_total_limit = None

    def checkpoint(self, args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_step_end(self, args, state, control, **kwargs):
        # A folder left by an earlier run (resumed from an older checkpoint) is about to be written again: it must
        # not look complete while it holds a mix of old and new files.
        if control.should_save and args.should_save:
            unmark(self.checkpoint(args, state))

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()  # every rank's RNG state is on disk
        bad = non_finite_weights(self.trainer.model)
        if bad:  # every rank holds the same weights, so every rank stops here
            latest = latest_complete_checkpoint(args.output_dir)
            raise NonFiniteLossError(
                f"The weights hold NaN/inf after step {state.global_step} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): {self.checkpoint(args, state)} is not marked complete and is "
                f"never resumed from. Last good checkpoint: {latest or 'none yet'}. Try a lower --learning_rate or "
                f"--max_grad_norm 1.0, then resume with --resume {latest or 'never'}.")
        if args.should_save:
            mark_complete(self.checkpoint(args, state))
            rotate_checkpoints(args.output_dir, self.keep, state.best_model_checkpoint)


def non_finite_weights(model) -> list[str]:
    """Names of the parameters holding NaN/inf (one host read for the whole model when all are finite)."""
    params = [(n, p) for n, p in model.named_parameters() if p.numel()]
    if not params or torch.stack([p.detach().isfinite().all() for _, p in params]).all().item():
        return []
    return [n for n, p in params if not p.detach().isfinite().all().item()]


class NonFiniteGuard(TrainerCallback):
    """Stops training on a NaN/inf loss, with the step it happened at and the last good checkpoint, without reading
    the loss on the host at every step (each such read makes the CPU wait for a GPU's queue to drain).

    Each micro-step's loss is tested on the device. Under fp16 loss scaling the GradScaler skips an overflowing step
    itself; the guard counts skipped steps and stops after max_skipped_steps in a row (divergence). Otherwise the
    first non-finite loss sets a flag that the optimizer reads on the device (optimizers.attach_found_inf: torch's
    fused AdamW, Muon), skipping that step and every later one, so the weights stay those from before it. The host
    reads the guard only where the Trainer reads the loss anyway or is about to keep the weights: at steps that log,
    evaluate, save or end training, and at the end of each epoch. An optimizer that cannot take the flag is guarded
    the old way, with a host read at every step."""

    max_skipped_steps = 20  # fp16 loss scaling skips a few overflowing steps by design; many mean divergence

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.flags: dict[str, torch.Tensor] | None = None  # on the loss's device, made at the first step
        self.on_device = False  # the optimizer skips flagged steps itself

    def scaler(self):
        return self.trainer.accelerator.scaler

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Called with each micro-step's loss; returns the loss to log (0 for a step the fp16 scaler skips)."""
        bad = ~torch.isfinite(loss)
        if self.flags is None:
            zero = torch.zeros((), device=loss.device)
            self.flags = {"found_inf": zero.clone(), "first_step": zero.clone(), "first_loss": zero.clone(),
                          "step_bad": zero.clone(), "run": zero.clone(), "longest_run": zero.clone(), "skipped": zero.clone()}
            self.on_device = self.scaler() is None and attach_found_inf(self.trainer.optimizer, self.flags["found_inf"])
        s, step = self.flags, self.trainer.state.global_step + 1
        first = bad & (s["first_step"] == 0)
        s["first_step"] = torch.where(first, step, s["first_step"])
        s["first_loss"] = torch.where(first, loss.detach().float(), s["first_loss"])
        s["step_bad"] = torch.maximum(s["step_bad"], bad.float())
        if self.scaler() is not None:
            return torch.where(bad, torch.zeros_like(loss), loss)  # the scaler skips the step; log 0, not inf
        if self.on_device:
            s["found_inf"].copy_(torch.maximum(s["found_inf"], bad.float()))  # in place: the optimizer holds this tensor
        else:
            self.check()  # the optimizer would apply this step's gradients: read now
        return loss

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.flags is not None and args.world_size > 1 and torch.distributed.is_initialized():
            # The gradients are all-reduced: a non-finite loss on one rank is every rank's to skip and stop on
            # (a collective queued on the device, not a host read).
            s = self.flags
            flags = torch.stack([s["found_inf"], s["step_bad"], s["first_step"]])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            s["found_inf"].copy_(flags[0])
            s["step_bad"], s["first_step"] = flags[1], flags[2]

    def on_step_end(self, args, state, control, **kwargs):
        if self.flags is None:
            return
        s = self.flags
        s["run"] = (s["run"] + 1) * s["step_bad"]  # optimizer steps skipped in a row, on the device
        s["longest_run"] = torch.maximum(s["longest_run"], s["run"])
        s["skipped"] = s["skipped"] + s["step_bad"]
        s["step_bad"] = torch.zeros_like(s["step_bad"])
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self.check()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.flags is not None:
            self.check()

    def skipped(self) -> int:
        """Optimizer steps the fp16 scaler skipped so far (a host read)."""
        return 0 if self.flags is None else int(self.flags["skipped"].item())

    def check(self) -> None:
        """Read the guard on the host: raise NonFiniteLossError, or report the steps the fp16 scaler skipped."""
        s = self.flags
        first = int(s["first_step"].item())
        if not first:
            return
        if self.scaler() is not None:
            skipped, longest = self.skipped(), int(s["longest_run"].item())
            print(f"Non-finite loss under fp16 loss scaling from step {first}: {skipped} optimizer step(s) skipped so far.")
            s["first_step"].zero_()
            s["skipped"].zero_()
            if longest <= self.max_skipped_steps:
                return
            message = f"fp16 loss scaling skipped {longest} optimizer steps in a row (a non-finite loss first at step {first})"
        else:
            message = (f"The training loss became {s['first_loss'].item()} at step {first}; the optimizer skipped that step "
                       "and every one after it, so the weights are those from before it")
        latest = latest_complete_checkpoint(self.trainer.args.output_dir)
        raise NonFiniteLossError(
            f"{message}. Last good checkpoint: {latest or 'none yet'}. Try a lower --learning_rate, a longer --warmup_steps, "
            f"--max_grad_norm 1.0, or --precision fp32/bf16, then resume with --resume {latest or 'never'}.")


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


class EtaCallback(TrainerCallback):
    """After the first timed steps (the first step, which compiles and warms up, is not timed): tokens/s, the
    ETA of the remaining steps and, on a GPU whose peak is known, the FLOPs utilisation, printed once."""

    def __init__(self, plan: dict, timed_steps: int = 10):
        self.plan, self.timed_steps, self.start = plan, timed_steps, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 or self.start is None:
            self.start, self.start_step = time.perf_counter(), state.global_step
            return
        done = state.global_step - self.start_step
        if done == min(self.timed_steps, state.max_steps - self.start_step) and state.is_world_process_zero:
            speed = done * self.plan["tokens_per_step"] / (time.perf_counter() - self.start)
            name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None
            peak = peak_flops(name, "bf16" if args.bf16 or args.fp16 else "fp32")
            left = estimate_time(self.plan["tokens_per_step"], state.max_steps - state.global_step, speed,
                                 self.plan["flops_per_token"], peak)
            self.plan["measured"] = {"step": state.global_step, "tokens_per_s": speed, "eta_s": left.seconds,
                                     "utilization": left.utilization}
            memory = ""
            if args.device.type == "cuda":
                self.plan["measured"]["peak_memory"] = peak = torch.cuda.max_memory_allocated(args.device)
                memory = f"; peak GPU memory {peak / 2**30:.1f} GiB (estimated {self.plan['memory']['total'] / 2**30:.1f})"
            print(f"After {state.global_step} steps: {left.line()} to go{memory}.")
