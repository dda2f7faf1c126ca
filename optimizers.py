"""Muon for GPT-2's hidden weight matrices, AdamW for everything else, as one optimizer the Trainer can step,
schedule, clip, scale (fp16) and checkpoint.

    from optimizers import muon_with_adamw
    optimizer = muon_with_adamw(model, lr=1e-3, muon_lr=0.02, weight_decay=0.01)

Muon (Jordan et al. 2024, torch.optim.Muon) orthogonalises each hidden matrix's momentum, so that every
direction of the matrix moves by about the same amount; it is the split modded-nanogpt and nanochat train
with. It is made for the matrices inside the transformer blocks (attention's qkv and output projection,
the MLP's two layers). The embedding (tied to the LM head), the position embedding, the LayerNorms and the
biases are not such matrices and stay with AdamW (Muon's authors: "the embedding and head should be
optimized by AdamW").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from errors import GPT2ToolkitError
from model import native_bf16_cpu

# Muon's peak learning rate, with torch's (Keller Jordan's) update scale. Val loss after 75 steps x 2048 WebText tokens,
# small preset, warmup-stable-decay: 7.197 at 0.005, 7.161 at 0.01, 7.182 at 0.02, 7.221 at 0.04 (AdamW's part at
# 1e-3); 7.042 at both 0.01 and 0.02 with AdamW's part at 3e-3 (bench/train_bench.py --loss_steps 75 --sweep ...).
MUON_LR = 0.02
MUON_MOMENTUM = 0.95


class OptimizerError(GPT2ToolkitError, ValueError):
    pass


def muon_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """The hidden matrices Muon trains: (name, parameter, transposed) for every 2-D weight of a Linear or of
    GPT-2's Conv1D inside the transformer blocks. transposed: Conv1D stores its weight as (in, out), the
    transpose of nn.Linear's (out, in); Muon's learning-rate scale depends on which side is the output."""
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    found = []
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if kind not in ("Linear", "Conv1D") or not hasattr(module, "weight") or id(module.weight) in embeddings:
            continue
        weight = module.weight
        if weight.ndim == 2 and weight.requires_grad:
            found.append((f"{module_name}.weight", weight, kind == "Conv1D"))
    return found


def muon_lr_scale(shape: torch.Size, transposed: bool) -> float:
    """The factor that corrects torch.optim.Muon's learning-rate scale for a Conv1D weight.

    torch scales a matrix's update by sqrt(max(1, rows/cols)), reading rows as the output side (nn.Linear's
    (out, in) layout): an MLP's 256->1024 layer gets 2x. A Conv1D weight is (in, out), so torch would give the
    1024->256 layer that 2x instead; this factor moves it back, so that both layouts train alike."""
    rows, cols = shape
    out, inp = (cols, rows) if transposed else (rows, cols)
    return math.sqrt(max(1.0, out / inp)) / math.sqrt(max(1.0, rows / cols))


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic Newton-Schulz)


def newton_schulz(updates: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation of a stack of same-shaped matrices [n, rows, cols] at once, in dtype.

    torch runs it one matrix at a time in bf16: on a CPU without native bf16 (AVX2) that is emulated, and a step
    of the small preset's 16 matrices took 4.8 s instead of 0.09 s in fp32. Stacking the matrices of each shape
    makes 4 batched GEMMs of the 16 (22 against 42 ms in bf16 on an AMX CPU)."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively (GPUs, AVX512-BF16/AMX CPUs: model.native_bf16_cpu), else fp32."""
    return torch.bfloat16 if device.type != "cpu" or native_bf16_cpu() else torch.float32


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its update computed for all same-shaped matrices at once, and in fp32 on CPUs
    without native bf16 (newton_schulz). In bf16 the update equals torch's (tested)."""

    def _dtype(self, device: torch.device) -> torch.dtype:
        """newton_schulz_dtype, asked once per device (it reads /proc/cpuinfo), not at every step."""
        cache = self.__dict__.setdefault("_dtypes", {})
        if device not in cache:
            cache[device] = newton_schulz_dtype(device)
        return cache[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            momentum, lr, weight_decay = group["momentum"], group["lr"], group["weight_decay"]
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None:
                # A step to skip on the device (see attach_found_inf): each gradient reads as the momentum itself, so
                # the momentum stays, and the weights keep their values, all without the host reading the flag.
                skip = found_inf > 0
                grads = [torch.where(skip, b, g) for b, g in zip(buffers, grads)]
            for buffer, grad in zip(buffers, grads):
                buffer.lerp_(grad, 1 - momentum)
            updates = [g.lerp(m, momentum) for g, m in zip(grads, buffers)] if group["nesterov"] else buffers
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((tuple(p.shape), p.device), []).append(i)
            for (shape, device), index in by_shape.items():
                orthogonal = newton_schulz(torch.stack([updates[i] for i in index]), group["ns_steps"],
                                           self._dtype(device), group["eps"])
                scaled_lr = lr * math.sqrt(max(1.0, shape[0] / shape[1]))  # torch's "original" adjust_lr_fn
                for i, o in zip(index, orthogonal):
                    if found_inf is None:
                        params[i].mul_(1 - lr * weight_decay)
                        params[i].add_(o.to(params[i].dtype), alpha=-scaled_lr)
                    else:  # the same arithmetic, kept only where the flag is clear
                        updated = params[i].mul(1 - lr * weight_decay).add_(o.to(params[i].dtype), alpha=-scaled_lr)
                        params[i].copy_(torch.where(skip, params[i], updated))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and torch.optim.AdamW as one torch Optimizer.

    Both keep their own param groups (each with its own learning rate, which the scheduler scales alike)
    and share one state table, so that state_dict() and load_state_dict() are the standard ones: a
    checkpoint holds both optimizers' state, and the Trainer saves and resumes it as it does AdamW's."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, momentum: float = MUON_MOMENTUM,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.muon = Muon(muon_groups, momentum=momentum, nesterov=True)
        # fused: one kernel for the whole table (2x faster than foreach on CPU; the Trainer's default AdamW too)
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas, eps=eps, fused=True)
        # AdamW's groups first: the Trainer logs param_groups[0]'s learning rate, --learning_rate's.
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._share()

    def _share(self):
        """Point both optimizers at this one's groups and state (again after load_state_dict replaced them)."""
        n_adamw = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n_adamw], self.param_groups[n_adamw:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._share()

    def step(self, closure=None):
        loss = self.adamw.step(closure)  # evaluates the closure, if any, once
        self.muon.step()
        return loss

    @property
    def found_inf(self):
        return getattr(self.muon, "found_inf", None)

    @found_inf.setter
    def found_inf(self, flag):
        self.adamw.found_inf = self.muon.found_inf = flag


def attach_found_inf(optimizer, flag: torch.Tensor) -> bool:
    """Have `optimizer` skip every step while `flag` (a float32 scalar on the parameters' device) is non-zero, decided
    on the device: torch's fused Adam/AdamW take such a flag from GradScaler (they then leave weights, moments and step
    count as they were), and MuonWithAdamW honours it too. False, attaching nothing, for other optimizers (and under
    a GradScaler, which sets and removes the flag itself). Unwraps accelerate's AcceleratedOptimizer."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, MuonWithAdamW):
        optimizer = optimizer.optimizer
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
    if not (fused or isinstance(optimizer, MuonWithAdamW)):
        return False
    optimizer.found_inf = flag
    return True


def muon_with_adamw(model: nn.Module, *, lr: float, muon_lr: float = MUON_LR, weight_decay: float = 0.0,
                    momentum: float = MUON_MOMENTUM, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    no_decay: set[str] | None = None) -> MuonWithAdamW:
    """Muon (muon_lr) for the hidden matrices (muon_matrices), AdamW (lr) for the rest; weight decay on the
    matrices and on the other parameters not named in no_decay (the Trainer's: biases and LayerNorms)."""
    matrices = muon_matrices(model)
    if not matrices:
        raise OptimizerError("Muon found no hidden weight matrices (Linear or Conv1D layers besides the embedding) in "
                             "this model; use --optim adamw_torch.")
    in_muon = {id(p) for _, p, _ in matrices}
    no_decay = set() if no_decay is None else no_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_muon]
    adamw_groups = [{"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay, "lr": lr},
                    {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0, "lr": lr}]
    by_scale: dict[float, list] = {}
    for _, p, transposed in matrices:
        by_scale.setdefault(muon_lr_scale(p.shape, transposed), []).append(p)
    muon_groups = [{"params": params, "lr": muon_lr * scale, "weight_decay": weight_decay}
                   for scale, params in sorted(by_scale.items())]
    return MuonWithAdamW(muon_groups, [g for g in adamw_groups if g["params"]], momentum=momentum,
                         betas=betas, eps=eps)
