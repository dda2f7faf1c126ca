"""Will a training run fit, and how long will it take: memory and time estimates before the first step.

    from estimate import estimate_memory, available_memory, what_fits, estimate_time
    est = estimate_memory(model.config, batch_size=8, block_size=512, fused_loss=True)
    print(est.table())                                    # weights, gradients, optimizer, activations, logits, peak
    print(what_fits(model.config, 512, available_memory("cpu"), batch_size=8, gradient_accumulation_steps=1))
    t = estimate_time(tokens_per_step=8 * 512, steps=5000, measured_tokens_per_s=9000.0,
                      flops_per_token=flops_per_token(model.config, 512), peak_flops=peak_flops("NVIDIA H100"))
    print(t.line())

The memory model follows what the Trainer really holds in one optimizer step (fp32 master weights,
fp32 gradients, AdamW's two fp32 states, the activations autograd saves, the loss's buffers), and its
per-token activation constants were calibrated against measured peak RSS on CPU (see ACT_LAYER_FLOATS):
`python bench/memory_bench.py` prints predicted against measured peaks. It estimates; it allocates nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from model import GPT2_CONTEXT, GPT2_VOCAB_SIZE, GPU_LOSS_CHUNK_TOKENS

MiB = 2**20
GiB = 2**30

# Bytes of optimizer state per parameter (the Trainer's --optim names). AdamW keeps exp_avg and exp_avg_sq
# in fp32 even under bf16/fp16 autocast, since the master weights are fp32. Unknown names count as AdamW.
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_apex_fused": 8, "adamw_torch_xla": 8,
    "adamw_anyprecision": 8, "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8,
    "lion_32bit": 4, "lion_8bit": 1, "sgd": 0, "adagrad": 4, "rmsprop": 4, "adafactor": 0,  # adafactor: row+column stats
}

# Activations autograd saves per token and per transformer block, in units of n_embd elements of the
# activation dtype (4 bytes in fp32, 2 under bf16/fp16 autocast). Counted from GPT2Block's graph:
# ln_1 input and output (2), c_attn's qkv (3) and SDPA's contiguous q/k/v (3), the attention output and its
# merged-heads copy (2), ln_2 input and output (2), c_fc output and GELU output (4 + 4): 20. CALIBRATED, not
# guessed: `bench/memory_bench.py` style runs on CPU (fp32, fused loss, 2 AdamW steps, peak RSS growth from
# /proc/self/status VmHWM in a child process) of 2 and 6 layers x 256 wide, batch 4 x 512 tokens, gave
# 40.6 MiB per extra block for 2048 tokens = 20.3 x n_embd x 4 bytes per token, which is the count above.
ACT_LAYER_FLOATS = 20
# Outside the blocks, per token: the embedding sum, ln_f input and output, the loss's gathered weight
# rows, its hidden-state gradient and temporaries: 12 x n_embd, fitted from the same runs (24 MiB at
# 2 layers x 256 wide, 2048 tokens, once the blocks, optimizer state and loss chunks were subtracted).
ACT_OUTSIDE_FLOATS = 12
# A dropout mask is one byte (bool) per element: after attention, after the MLP (per block), after the embedding.
# Attention dropout inside SDPA: on CUDA the flash / memory-efficient kernels keep no T x T matrix; on CPU,
# torch's flash kernel takes no dropout, so training (attn_pdrop > 0) falls back to the math path, which keeps
# the softmax (4 bytes), the dropout mask (1) and the dropped weights (4) of every head's T x T scores, plus
# the scores of the block being computed. Measured on CPU: 103 MiB for 2 blocks x 4 heads x 4 x 512 x 512,
# 12.9 bytes per element and block: ATTN_TT_BYTES (12 in fp32, half the float parts under autocast).
ATTN_TT_BYTES = {"fp32": 12, "bf16": 7, "fp16": 7}
# The logits without the fused loss: logits [tokens x vocab] then cross_entropy's log_softmax output and, in
# backward, the gradient of each (the logits themselves are freed once log_softmax has run): measured on CPU
# at 2.8 fp32 copies; 3 are counted. Under autocast the logits are 16-bit and upcast to fp32 for the loss.
LOGITS_BYTES = {"fp32": 12, "bf16": 14, "fp16": 14}
# The fused loss (model.lm_head_loss) keeps every vocabulary chunk's exponentials until its gradients are
# formed, inside the call: one fp32 tokens x vocab buffer at the loss, gone before backward (measured: 1 copy).
FUSED_LOSS_BYTES = 4
# On a GPU the fused loss takes a chunk of tokens at a time (model.GPU_LOSS_CHUNK_TOKENS) with the whole vocabulary:
# the chunk's logits in the GEMM's bf16, widened to fp32, its fp32 gradient and that gradient in bf16: 12 bytes.
GPU_FUSED_LOSS_BYTES = 12

# The default GPU batch (train.py): the largest power-of-two micro-batch whose estimated peak fits in this share of the
# GPU's free memory (the rest: the caching allocator's fragmentation, cuBLAS/cuDNN workspaces, torch.compile's
# autotuning, and the estimate's error), then gradient accumulation towards GPT-2's tokens per optimizer step, but
# never beyond 1/MIN_STEPS_PER_EPOCH of an epoch's tokens, so that small data still makes that many steps an epoch.
GPU_MEMORY_SHARE = 0.85
GPT2_TOKENS_PER_STEP = 512 * 1024  # GPT-2's ~0.5M (nanoGPT: 12 x 1024 x 40 accumulation steps = 491,520)
MIN_STEPS_PER_EPOCH = 100

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_inner: int
    attn_pdrop: float
    resid_pdrop: float
    embd_pdrop: float
    tied: bool


def shape_of(config) -> Shape:
    """The numbers the estimate needs from a GPT2Config, a model (its .config), a dict or a model.PRESETS entry."""
    config = getattr(config, "config", config)
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    n_embd = int(get("n_embd", 768))
    return Shape(int(get("n_layer", 12)), n_embd, int(get("n_head", 12)), int(get("vocab_size", GPT2_VOCAB_SIZE) or GPT2_VOCAB_SIZE),
                 int(get("n_positions", GPT2_CONTEXT) or GPT2_CONTEXT), int(get("n_inner", None) or 4 * n_embd),
                 float(get("attn_pdrop", 0.1)), float(get("resid_pdrop", 0.1)), float(get("embd_pdrop", 0.1)),
                 bool(get("tie_word_embeddings", True)))


def parameter_count(config) -> int:
    """Parameters of a GPT2LMHeadModel of this shape, without building it (equals model.count_parameters: tested)."""
    s = shape_of(config)
    e, f = s.n_embd, s.n_inner
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e)
    n = s.vocab_size * e + s.n_positions * e + s.n_layer * block + 2 * e
    return n if s.tied else n + s.vocab_size * e


@dataclass
class MemoryEstimate:
    """Bytes one training step holds at its peak. The parts do not all live at once: the activations and the
    loss's buffers are freed by the end of backward, when all gradients exist, so
    total = weights + optimizer_state + max(gradients, activations + logits + head_gradient),
    where head_gradient is the output layer's gradient, formed at the loss while its buffers are alive."""
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    head_gradient: int
    total: int
    parameters: int
    batch_size: int
    block_size: int
    options: dict = field(default_factory=dict)

    def table(self, available: int | None = None) -> str:
        rows = [("parameters", f"{self.parameters / 1e6:.1f}M"),
                ("weights", _size(self.weights)), ("gradients", _size(self.gradients)),
                ("optimizer state", _size(self.optimizer_state)), ("activations", _size(self.activations)),
                ("logits / loss buffers", _size(self.logits)),
                ("peak (estimate)", _size(self.total))]
        if available is not None:
            rows.append(("available", _size(available) + ("" if self.total <= available else "  (does not fit)")))
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        width = max(len(k) for k, _ in rows)
        head = f"Memory estimate, batch {self.batch_size} x block {self.block_size} ({opts}):"
        return "\n".join([head] + [f"  {k:<{width}}  {v:>10}" for k, v in rows])


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _check_options(precision: str, device_type: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}.")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type={device_type!r}: cpu or cuda.")


def activation_bytes(config, batch_size: int, block_size: int, *, precision: str = "fp32",
                     gradient_checkpointing: bool = False, device_type: str = "cpu") -> int:
    """What autograd saves for backward in the transformer, per step (see the constants above)."""
    s = shape_of(config)
    _check_options(precision, device_type)
    tokens = batch_size * block_size
    width = 4 if precision == "fp32" else 2
    layer = ((ACT_LAYER_FLOATS - 8) * s.n_embd + 2 * s.n_inner) * width
    layer += (s.resid_pdrop > 0) * 2 * s.n_embd  # two residual dropout masks per block
    if device_type == "cpu" and s.attn_pdrop > 0:  # the SDPA math path keeps T x T per head (CPU only)
        layer += ATTN_TT_BYTES[precision] * s.n_head * block_size
    outside = ACT_OUTSIDE_FLOATS * s.n_embd * 4 + (s.embd_pdrop > 0) * s.n_embd  # ln_f and the loss run in fp32
    if gradient_checkpointing:  # each block's input is kept; one block's activations are recomputed at a time
        return tokens * (s.n_layer * s.n_embd * width + layer + outside)
    return tokens * (s.n_layer * layer + outside)


def estimate_memory(config, batch_size: int, block_size: int, *, precision: str = "fp32", fused_loss: bool = False,
                    gradient_checkpointing: bool = False, optimizer: str = "adamw_torch",
                    device_type: str = "cpu") -> MemoryEstimate:
    """Peak bytes of one training step of a GPT-2 of this shape at this per-device batch and block size.

    precision: fp32, or bf16/fp16 autocast (fp32 master weights and optimizer state, 16-bit activations, plus
    autocast's 16-bit copy of the weights); fused_loss: model.lm_head_loss instead of logits + cross_entropy;
    optimizer: the Trainer's --optim name; device_type: cpu or cuda (attention's memory differs)."""
    _check_options(precision, device_type)
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size={batch_size} and block_size={block_size} must be at least 1.")
    s = shape_of(config)
    n = parameter_count(s.__dict__)
    weights = 4 * n + (2 * n if precision != "fp32" else 0)  # autocast caches a 16-bit copy of each weight per step
    gradients = 4 * n
    optimizer_state = OPTIMIZER_STATE_BYTES.get(optimizer, 8) * n
    if optimizer == "muon":  # Muon keeps one momentum buffer per hidden matrix; AdamW's two moments for the rest
        hidden = s.n_layer * (4 * s.n_embd * s.n_embd + 2 * s.n_embd * s.n_inner)
        optimizer_state = 4 * hidden + 8 * (n - hidden)
    if optimizer == "adafactor":  # factored second moments: a row and a column vector per matrix
        optimizer_state = 4 * (s.n_layer * (4 * s.n_embd + 6 * s.n_embd + 2 * s.n_inner) + s.vocab_size + 2 * s.n_embd)
    activations = activation_bytes(s.__dict__, batch_size, block_size, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, device_type=device_type)
    tokens = batch_size * block_size
    if fused_loss and device_type == "cuda":
        logits = min(tokens, GPU_LOSS_CHUNK_TOKENS) * s.vocab_size * GPU_FUSED_LOSS_BYTES + 4 * tokens * s.n_embd
    else:
        logits = tokens * s.vocab_size * (FUSED_LOSS_BYTES if fused_loss else LOGITS_BYTES[precision])
    head_gradient = 4 * s.vocab_size * s.n_embd
    total = weights + optimizer_state + max(gradients, activations + logits + head_gradient)
    return MemoryEstimate(weights, gradients, optimizer_state, activations, logits, head_gradient, total, n, batch_size,
                          block_size, dict(precision=precision, fused_loss=fused_loss,
                                           gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                                           device=device_type))


def available_memory(device_type: str = "cpu", device_index: int = 0) -> int:
    """Bytes free for training now: the CPU's available RAM (psutil), or a GPU's free memory (cudaMemGetInfo)."""
    if device_type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device_index)[0])
    raise ValueError(f"device_type={device_type!r}: cpu or cuda.")


def fits(config, batch_size: int, block_size: int, available: int, **options) -> bool:
    """Whether estimate_memory's peak is within `available` bytes."""
    return estimate_memory(config, batch_size, block_size, **options).total <= available


def largest_batch(config, block_size: int, available: int, *, limit: int = 1 << 20, **options) -> int:
    """The largest per-device batch whose estimated peak fits in `available` bytes; 0 when not even 1 does."""
    if not fits(config, 1, block_size, available, **options):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(config, hi, block_size, available, **options):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi): the estimate grows with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(config, mid, block_size, available, **options) else (lo, mid)
    return lo


def gpu_batch_size(config, block_size: int, available: int, *, limit: int = GPT2_TOKENS_PER_STEP, **options) -> int:
    """The default per-device batch on a GPU: the largest power of two whose estimated peak fits in GPU_MEMORY_SHARE of
    `available` bytes, and at most `limit` (e.g. the training blocks there are); 0 when not even 1 fits."""
    fit = largest_batch(config, block_size, int(available * GPU_MEMORY_SHARE), limit=max(1, limit), **options)
    return 1 << (fit.bit_length() - 1) if fit else 0


def accumulation_steps(batch_size: int, block_size: int, world_size: int, data_tokens: int) -> int:
    """Gradient accumulation steps towards GPT-2's ~0.5M tokens per optimizer step (GPT2_TOKENS_PER_STEP), where the
    data has that many: an optimizer step takes at most 1/MIN_STEPS_PER_EPOCH of an epoch's tokens. At least 1."""
    target = min(GPT2_TOKENS_PER_STEP, data_tokens // MIN_STEPS_PER_EPOCH)
    return max(1, target // (batch_size * block_size * world_size))


def what_fits(config, block_size: int, available: int, *, batch_size: int, gradient_accumulation_steps: int = 1,
              **options) -> str:
    """One message: fits as asked, or the largest batch that fits and the accumulation steps that keep the
    effective batch (batch_size x gradient_accumulation_steps), or what to change when nothing fits."""
    est = estimate_memory(config, batch_size, block_size, **options)
    if est.total <= available:
        return f"Fits: estimated peak {_size(est.total)} of {_size(available)} available at batch {batch_size}."
    best = largest_batch(config, block_size, available, limit=batch_size, **options)
    head = f"Does not fit: estimated peak {_size(est.total)} at batch {batch_size}, {_size(available)} available."
    if best == 0:
        tips = []
        if not options.get("fused_loss"):
            tips.append("--fused_loss on")
        if not options.get("gradient_checkpointing"):
            tips.append("--gradient_checkpointing")
        return (f"{head} Not even batch 1 fits (peak {_size(estimate_memory(config, 1, block_size, **options).total)}): "
                f"use a smaller --block_size or model" + (f", or {', '.join(tips)}" if tips else "") + ".")
    effective = batch_size * gradient_accumulation_steps
    steps = math.ceil(effective / best)
    keep = (f"--per_device_train_batch_size {best} --gradient_accumulation_steps {steps}"
            + ("" if best * steps == effective else f" (effective batch {best * steps}, was {effective})"))
    return f"{head} Largest batch that fits: {best}. To keep the effective batch of {effective}: {keep}."


# Dense bf16 peaks (FLOP/s, no sparsity), from the vendors' data sheets; matched against the device's name.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12,  # SXM; the PCIe H100 is 756e12
    "A100": 312e12, "RTX 4090": 165e12,  # 4090: with fp32 accumulation, as PyTorch's bf16 matmuls use
}


def peak_flops(device_name: str | None, precision: str = "bf16") -> float | None:
    """The device's dense bf16/fp16 peak from PEAK_BF16_FLOPS, or None (a CPU, an unknown GPU, or fp32)."""
    if not device_name or precision == "fp32":
        return None
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.upper() in name), None)


def flops_per_token(config, block_size: int) -> float:
    """Training FLOPs per token: 6 x parameters (the position table excluded: it is a lookup, and the tied
    embedding counts as the output layer) + 12 x layers x n_embd x block_size for attention (PaLM's count)."""
    s = shape_of(config)
    return 6 * (parameter_count(s.__dict__) - s.n_positions * s.n_embd) + 12 * s.n_layer * s.n_embd * block_size


@dataclass
class TimeEstimate:
    steps: int
    tokens: int
    tokens_per_s: float | None
    seconds: float | None
    flops_per_token: float | None
    utilization: float | None  # model FLOPs utilisation against the peak, 0..1; None without a peak or a speed

    def line(self) -> str:
        parts = [f"{self.steps} steps, {self.tokens / 1e6:.2f}M tokens"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s, ETA {format_duration(self.seconds)}")
        if self.utilization is not None:
            parts.append(f"FLOPs utilisation {100 * self.utilization:.1f}%")
        return "; ".join(parts)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d}d {h}h {m:02d}m" if d else f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s")


def estimate_time(tokens_per_step: int, steps: int, measured_tokens_per_s: float | None = None,
                  flops_per_token: float | None = None, peak: float | None = None) -> TimeEstimate:
    """Steps and tokens of a run; with a measured speed (after the first timed steps) its ETA, and with
    flops_per_token (see flops_per_token()) and a peak (see peak_flops()) the FLOPs utilisation."""
    if tokens_per_step < 1 or steps < 0:
        raise ValueError(f"tokens_per_step={tokens_per_step} must be at least 1 and steps={steps} at least 0.")
    tokens = tokens_per_step * steps
    speed = measured_tokens_per_s if measured_tokens_per_s and measured_tokens_per_s > 0 else None
    seconds = tokens / speed if speed else None
    mfu = speed * flops_per_token / peak if speed and flops_per_token and peak else None
    return TimeEstimate(steps, tokens, speed, seconds, flops_per_token, mfu)


# Measurement: one training step's real peak, for the tests and bench/memory_bench.py.

def measure_peak(config, batch_size: int, block_size: int, *, fused_loss: bool = True, steps: int = 2,
                 timeout: float = 600) -> dict:
    """Peak RSS growth of `steps` training steps (forward, backward, AdamW as the Trainer's adamw_torch_fused,
    zero_grad to None) of a fresh fp32 GPT-2 on CPU, in a child process: VmHWM from /proc/self/status after
    the steps, minus VmRSS once the model and optimizer exist (the high-water mark is reset there through
    /proc/self/clear_refs; ru_maxrss would carry the parent's peak across fork/exec). Two steps, because
    AdamW's state is created in the first and held through the forward of every later one.
    Returns {"growth": bytes, "baseline": bytes, "seconds": ...}. Linux only."""
    s = shape_of(config)
    spec = dict(s.__dict__, batch_size=batch_size, block_size=block_size, fused_loss=fused_loss, steps=steps)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(spec)], cwd=here,
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": here})
    if out.returncode != 0:
        raise RuntimeError(f"measurement child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure_child(spec: dict) -> dict:
    import gc
    import time

    import torch

    from model import FusedCausalLMLoss, get_model

    def build(n_layer, n_embd, n_head, batch, block):
        torch.manual_seed(0)
        model = get_model(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=spec["vocab_size"],
                          n_positions=max(block, spec["n_positions"]), verbose=False,
                          dropout=spec["attn_pdrop"])  # one rate for all three, as train.py's --dropout
        model.train()
        loss = FusedCausalLMLoss(model) if spec["fused_loss"] else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, spec["vocab_size"], (batch, block))
        return model, loss, opt, ids

    def step(model, loss_fn, opt, ids):  # as the Trainer: without labels in the fused case, logits for no position
        if loss_fn is not None:
            out = model(input_ids=ids, logits_to_keep=torch.empty(0, dtype=torch.long))
            loss = loss_fn(out, ids)
            del out
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm = build(1, 32, 2, 1, 16)  # pages in the kernels' code, so library pages are not counted as growth
    for _ in range(2):
        step(*warm)
    del warm
    gc.collect()
    run = build(spec["n_layer"], spec["n_embd"], spec["n_head"], spec["batch_size"], spec["block_size"])
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    baseline = _status("VmRSS")
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step(*run)
    return {"growth": _status("VmHWM") - baseline, "baseline": baseline, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(_measure_child(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python estimate.py --measure '<json spec>' (used by measure_peak; see bench/memory_bench.py)")
