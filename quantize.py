"""INT8 / INT4 weight-only quantization of a GPT-2 for CPU inference, saved in a safe format.

    python quantize.py --model_path logs/final_model --mode int8       # -> logs/final_model-int8
    python quantize.py --model_path logs/final_model --mode int4 --out small-int4
    python generate.py --model_path logs/final_model-int8               # loads like any model folder

As a library:

    from quantize import quantize_model, save_quantized, load_quantized
    model = quantize_model(model, "int8")          # in place; returns the model
    save_quantized(model, tokenizer, "out-int8", source_dir="logs/final_model")
    model = load_quantized("out-int8")             # a GPT2LMHeadModel whose forward/generate work as usual

What is quantized: every linear projection -- GPT-2's Conv1D layers (c_attn, c_proj, c_fc, mlp.c_proj,
converted to nn.Linear first, since quantization libraries target nn.Linear and
`torch.ao.quantization.quantize_dynamic(model, {nn.Linear})` silently skips Conv1D) -- and the LM head.
The LM head is tied to the token embedding, and that 50257-row table is most of a small model, so it
is stored ONCE, quantized; the embedding lookup dequantizes only the rows it looks up.

  - int8: symmetric per-row (per output channel) int8 weights, bf16-exact fp32 scales
    (torchao `Int8Tensor`, PerRow);
  - int4: asymmetric group-wise uint4 weights (groups of `group_size` input features) with bf16
    scales and zero points (torchao's CPU `Int4OpaqueTensor`, tinygemm layout, run by PyTorch's
    `_weight_int4pack_mm_for_cpu`).

Position embeddings, layer norms and biases stay fp32.

Folder format (`save_quantized`): `quantization.json` (format, mode, group size, library and torch
versions, the list of quantized weights), `model.safetensors` holding plain tensors only (for each
quantized weight `<name>.qdata` int8 (N, K) or uint8 (N, K/2, two 4-bit codes per byte, low nibble
first), `<name>.scale` and for int4 `<name>.zero`; all other tensors as they are), `config.json`,
the tokenizer files and `generation_config.json`. Loading reads the safetensors file (no pickle,
so no code from the file can run) and rebuilds the library's quantized tensors from those plain tensors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import quiet_imports  # noqa: F401, I001  (before torchao and transformers)
import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_path, destination_problem
from errors import GPT2ToolkitError, run_main
from model import load_pretrained

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # what torchao's CPU int4 tensor accepts
DEFAULT_GROUP_SIZE = 32
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "gpt2-toolkit-quantized"
FORMAT_VERSION = 1
LM_HEAD = "lm_head.weight"
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
COPIED_FILES = ("generation_config.json",)


class QuantizationError(GPT2ToolkitError, ValueError):
    """A bad mode, path or model, or a mode this machine cannot run; the message says what to do."""


# ----------------------------------------------------------------------------- library and kernels


def _torchao():
    """Import torchao (lazily: it pulls in torch._dynamo, a few seconds) or say how to install it."""
    try:
        import torchao
        import torchao.prototype.quantization.int4  # noqa: F401  (the CPU int4 tensor)
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise QuantizationError(f"quantization needs torchao (pip install -r requirements.txt): {e}") from e
    return torchao


def check_mode(mode: str, group_size: int | None = None) -> None:
    """Raise QuantizationError for an unknown mode or group size, or a mode this machine cannot run."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}: choose one of {', '.join(MODES)}.")
    if mode == "int4" and group_size is not None and group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}.")
    if mode == "int4" and not kernel_ok("int4"):  # int8 has a plain-torch fallback (torchao's own F.linear)
        raise QuantizationError(
            "int4 needs PyTorch's CPU int4 kernels (aten._convert_weight_to_int4pack_for_cpu and "
            "_weight_int4pack_mm_for_cpu), which failed their self-test on this torch build and CPU: use --mode int8."
        )


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` when it is contiguous and 64-byte aligned, else an aligned contiguous copy.

    PyTorch's private CPU kernels assume both. Tensors loaded from safetensors sit at any address,
    and on AVX-512 CPUs `_weight_int8pack_mm` segfaults on an int8 weight whose address is not a
    multiple of 16 when its row count is not a multiple of 16 (50257 vocabulary rows; measured at
    offsets 1, 8 and 10). PyTorch's CPU allocator aligns new storage to 64 bytes.
    """
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (rows, K) @ (q * scale[:, None])^T with PyTorch's int8 weight-only CPU kernel (bf16 activations
    and scales, bf16 output). Only call it where `kernel_ok("int8")`; q and scale are best aligned once
    by the caller (this checks, and copies what is not)."""
    return torch._weight_int8pack_mm(aligned(x.bfloat16()), aligned(q), aligned(scale.bfloat16()))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """x (rows, K) @ W^T for a tinygemm-packed int4 weight with PyTorch's CPU kernel (bf16 in and out)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(aligned(x.bfloat16()), aligned(packed), group_size, aligned(scale_and_zero))


# The kernels run once in a child process before this one uses them, on an LM head's shape (a row
# count that is not a multiple of 16) with aligned tensors as above, and are checked against plain
# torch: a kernel that crashes (a segfault cannot be caught) or computes wrong values on this CPU
# costs the child, and this process takes the plain path instead.
_PROBE = r"""
import sys, torch
torch.manual_seed(0)
mode, K = sys.argv[1], 64
with torch.no_grad():
    x = torch.randn(3, K).bfloat16()
    if mode == "int8":
        N = 50257
        scale = (torch.rand(N) / 64 + 1e-3).bfloat16()
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        w = q.float() * scale.float()[:, None]
        for rows in (1, 3):
            got = torch._weight_int8pack_mm(x[:rows].contiguous(), q, scale).float()
            torch.testing.assert_close(got, x[:rows].float() @ w.t(), rtol=2e-2, atol=2e-2)
    else:
        N, G = 50272, 32
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
        scale, zero = torch.rand(N, K // G) / 16 + 1e-3, torch.randn(N, K // G) / 16
        scale, zero = scale.bfloat16().float(), zero.bfloat16().float()
        w = ((codes.float().view(N, -1, G) - 8) * scale[..., None] + zero[..., None]).view(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
        for rows in (1, 3):
            got = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:rows].contiguous(), packed, G, sz).float()
            torch.testing.assert_close(got, x[:rows].float() @ w.t(), rtol=2e-2, atol=2e-2)
"""
_KERNEL_OK: dict[str, bool] = {}


def kernel_ok(mode: str) -> bool:
    """Whether PyTorch's private CPU kernel for `mode` ("int8", "int4") runs correctly here.

    Probed once per torch build, CPU and instruction set in a child process (about a second),
    remembered in this process and in ~/.cache/gpt2-toolkit/kernels.json.
    """
    if mode in _KERNEL_OK:
        return _KERNEL_OK[mode]
    import platform
    import subprocess

    key = f"{mode} torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} {_cpu_name() or platform.machine()}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-toolkit" / "kernels.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), bool):
        try:
            done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, timeout=300)
            ok = done.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            done, ok = None, False
        if not ok:
            why = "timed out" if done is None else (f"died with signal {-done.returncode}" if done.returncode < 0 else
                                                    (done.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1])
            logging.getLogger(__name__).warning("PyTorch's %s CPU kernel failed its self-test (%s): using plain torch ops instead.", mode, why)
        known = known if isinstance(known, dict) else {}
        known[key] = ok
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1) + "\n")
            tmp.replace(cache)
    _KERNEL_OK[mode] = known[key]
    return known[key]


def _cpu_name() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


# ----------------------------------------------------------------------------- weights <-> plain tensors


def _quantize_weight(w: torch.Tensor, mode: str, group_size: int) -> dict:
    """Plain tensors (what is saved) for an (out, in) float weight."""
    _torchao()
    w = w.detach().float().cpu()
    if mode == "int8":
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        # Scales rounded up to bf16 values: the CPU kernel takes bf16 scales, so it then computes
        # with exactly the saved weights, and rounding up keeps every weight inside [-127, 127].
        scale = ((w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12) * (1 + 2**-7)).bfloat16().float()
        t = Int8Tensor.from_hp(w, PerRow(), scale=scale)
        return {"qdata": t.qdata.contiguous(), "scale": t.scale.reshape(-1).bfloat16()}
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    N, K = w.shape
    if K % group_size:
        raise QuantizationError(f"int4 groups of {group_size} do not divide the {K} input features of a layer: pick another --group_size.")
    block = [1, group_size]
    scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, None, torch.float32)
    # Saved in bf16 (as tinygemm keeps them); the codes are computed against the rounded values.
    scale, zero = scale.reshape(N, -1).bfloat16(), zero.reshape(N, -1).bfloat16()
    codes = _quantize_affine_tinygemm(w, block, scale.float(), zero.float(), torch.int32, 0, 15).to(torch.uint8)
    return {"qdata": codes[:, 0::2] | (codes[:, 1::2] << 4), "scale": scale, "zero": zero}


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def _library_weight(plain: dict, mode: str, group_size: int, shape) -> torch.Tensor:
    """The torchao tensor for plain tensors: what nn.Linear / F.linear run with."""
    _torchao()
    N, K = shape
    if mode == "int8":
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        return Int8Tensor(plain["qdata"], plain["scale"].float()[:, None], [1, K], torch.float32)
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    codes = _unpack_int4(plain["qdata"]).to(torch.int32)
    scale, zero = plain["scale"].float(), plain["zero"].float()
    pad = -N % 16  # the CPU packing works on blocks of 16 rows (50257 vocabulary rows are not)
    if pad:
        codes = torch.cat([codes, torch.full((pad, K), 8, dtype=torch.int32)])
        scale = torch.cat([scale, torch.ones(pad, scale.shape[1])])
        zero = torch.cat([zero, torch.zeros(pad, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(aligned(codes), 1)
    return Int4OpaqueTensor(packed, pack_tinygemm_scales_and_zeros(scale, zero, torch.float32), [1, group_size], torch.Size(shape))


def dequantize_rows(plain: dict, mode: str, group_size: int, ids) -> torch.Tensor:
    """Float32 rows `ids` (a tensor of indices, or a slice) of a quantized (N, K) weight, without dequantizing the rest."""
    q = plain["qdata"][ids]
    if mode == "int8":
        return q.float() * plain["scale"][ids].float()[..., None]
    x = _unpack_int4(q).float()
    x = x.view(*x.shape[:-1], -1, group_size)
    return ((x - 8) * plain["scale"][ids].float()[..., None] + plain["zero"][ids].float()[..., None]).flatten(-2)


class QuantizedEmbedding(nn.Module):
    """Token embedding that reads the tied, quantized LM-head table (stored once) row by row."""

    def __init__(self, lm_head: nn.Linear, mode: str, group_size: int):
        super().__init__()
        self.__dict__["_lm_head"] = lm_head  # not a submodule: the table belongs to lm_head alone
        self.mode, self.group_size = mode, group_size
        self.num_embeddings, self.embedding_dim = lm_head.weight.shape

    @property
    def weight(self):
        return self._lm_head.weight

    def forward(self, ids):
        return dequantize_rows(self._lm_head.quant_plain, self.mode, self.group_size, ids)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.mode}, tied to lm_head"


class QuantizedLinear(nn.Linear):
    """nn.Linear whose weight is a torchao quantized tensor (F.linear dispatches to the library).

    One exception, for speed: an int4 layer given many rows at once (a prompt, perplexity windows)
    multiplies by its dequantized weight in fp32, the same numbers as the library's kernel computes
    with, since PyTorch's CPU int4 kernel is ~10x slower than fp32 GEMM with fp32 activations.
    """

    DEQUANTIZE_ROWS = 16

    def forward(self, x):
        if "zero" in self.quant_plain and x.numel() >= self.DEQUANTIZE_ROWS * x.shape[-1] and x.dtype == torch.float32:
            w = dequantize_rows(self.quant_plain, "int4", self.weight.block_size[1], slice(None))
            return F.linear(x, w, self.bias)
        return F.linear(x, self.weight, self.bias)


def _quantized_linear(plain: dict, mode: str, group_size: int, shape, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        lin = QuantizedLinear(shape[1], shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(_library_weight(plain, mode, group_size, shape), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().cpu().contiguous(), requires_grad=False)
    lin.quant_plain = plain  # the saved form; int8's tensors are the library tensor's own
    return lin


def _projection_weights(model):
    """(module path, parent module, attribute, (out, in) weight, bias) of every Conv1D / Linear projection."""
    for i, block in enumerate(model.transformer.h):
        for name in PROJECTIONS:
            owner_name, attr = name.split(".")
            owner = getattr(block, owner_name)
            mod = getattr(owner, attr)
            w = mod.weight.t() if type(mod).__name__ == "Conv1D" else mod.weight  # Conv1D stores (in, out)
            yield f"transformer.h.{i}.{name}", owner, attr, w, mod.bias


def _check_gpt2(model) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "lm_head") or not hasattr(model, "transformer"):
        kind = getattr(cfg, "model_type", type(model).__name__)
        raise QuantizationError(f"quantize.py quantizes GPT-2 language models (GPT2LMHeadModel); got {kind!r}.")
    if getattr(cfg, "add_cross_attention", False):
        raise QuantizationError("GPT-2 with cross-attention is not supported.")
    if getattr(model, "quantization", None):
        raise QuantizationError(f"the model is already quantized ({model.quantization['mode']}).")


# ----------------------------------------------------------------------------- public API


def quantize_model(model, mode: str = "int8", group_size: int = DEFAULT_GROUP_SIZE):
    """Quantize a GPT2LMHeadModel in place for CPU inference; returns it (in eval mode, on CPU).

    `mode`: "int8" (per-row) or "int4" (group-wise, `group_size` input features per scale).
    The model keeps working as a Hugging Face module: forward, generate, logits_to_keep.
    """
    check_mode(mode, group_size)
    _check_gpt2(model)
    if not model.config.tie_word_embeddings:
        raise QuantizationError("the LM head is not tied to the token embedding; quantize.py stores the tied table once.")
    model.to("cpu").float().eval()
    with torch.no_grad():
        for _, owner, attr, w, b in _projection_weights(model):
            plain = _quantize_weight(w, mode, group_size)
            setattr(owner, attr, _quantized_linear(plain, mode, group_size, tuple(w.shape), b))
        _install_head(model, _quantize_weight(model.lm_head.weight, mode, group_size), mode, group_size)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return model


def _install_head(model, plain: dict, mode: str, group_size: int) -> None:
    shape = (model.config.vocab_size, model.config.n_embd)
    model.lm_head = _quantized_linear(plain, mode, group_size, shape, None)
    model.transformer.wte = QuantizedEmbedding(model.lm_head, mode, group_size)


def is_quantized_folder(path) -> bool:
    """Whether `path` is a folder written by `save_quantized` (it holds quantization.json)."""
    return Path(path).expanduser().joinpath(QUANT_FILE).is_file()


def check_destination(out: Path) -> None:
    """A QuantizationError unless `out` can become the quantized folder: it would be replaced, so it may only be
    an earlier quantize.py output or an empty folder, and its parent must be writable."""
    problem = destination_problem(out, folder=True, replaceable=lambda p: is_quantized_folder(p) or not any(p.iterdir()))
    if problem:
        raise QuantizationError(f"--out {out}: {problem}: choose another --out"
                                + (", or move it away first." if out.exists() else "."))


def save_quantized(model, tokenizer, out_dir, source_dir=None) -> Path:
    """Write a quantized model (from `quantize_model`) as a loadable folder; atomic: a folder that
    exists afterwards is complete. Files from `source_dir` (generation_config.json) are copied."""
    import safetensors.torch
    import torchao

    recipe = getattr(model, "quantization", None)
    if not recipe:
        raise QuantizationError("the model is not quantized: call quantize_model(model, mode) first.")
    out = Path(out_dir).expanduser()
    check_destination(out)
    tensors, quantized = {}, []
    quantized_modules = {name: mod for name, mod in model.named_modules() if hasattr(mod, "quant_plain")}
    for name, mod in quantized_modules.items():
        quantized.append(f"{name}.weight")
        for key, t in mod.quant_plain.items():
            tensors[f"{name}.weight.{key}"] = t.contiguous()
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized_modules and name.endswith(".weight"):
            continue
        tensors[name] = t.detach().contiguous()
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": recipe["mode"],
        "group_size": recipe["group_size"],
        "library": "torchao",
        "library_version": torchao.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "tied_embedding": "transformer.wte reads the rows of lm_head.weight (stored once)",
        "quantized": quantized,
        "source": str(source_dir) if source_dir else None,
    }
    with atomic_path(out, folder=True) as tmp:  # an existing --out is replaced only by a complete folder
        safetensors.torch.save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "quantization": recipe["mode"]})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in COPIED_FILES:
            if source_dir and (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        (tmp / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_info(path) -> dict:
    """quantization.json of a quantized folder, checked."""
    path = Path(path).expanduser()
    try:
        info = json.loads((path / QUANT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QuantizationError(f"{path / QUANT_FILE} cannot be read: {e}") from e
    if not isinstance(info, dict):
        raise QuantizationError(f"{path / QUANT_FILE} is not a JSON object: copy the folder again, or quantize the fp32 model again.")
    if info.get("format") != FORMAT or info.get("format_version", 0) > FORMAT_VERSION:
        raise QuantizationError(f"{path / QUANT_FILE} is not a format this quantize.py reads "
                                f"(format {info.get('format')!r} version {info.get('format_version')!r}).")
    if info.get("mode") not in MODES:
        raise QuantizationError(f"{path / QUANT_FILE}: unknown quantization mode {info.get('mode')!r}.")
    if info["mode"] == "int4" and info.get("group_size") not in GROUP_SIZES:
        raise QuantizationError(f"{path / QUANT_FILE}: int4 group size {info.get('group_size')!r} is not one of "
                                f"{', '.join(map(str, GROUP_SIZES))}; quantize the fp32 model again.")
    return info


def load_quantized(path, device="cpu"):
    """The model of a folder written by `save_quantized`, in eval mode on the CPU.

    Reads only JSON and safetensors (no pickle). Raises QuantizationError when the folder is not a
    quantized model, or the machine cannot run its mode, FileNotFoundError when files are missing.
    """
    import safetensors.torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path).expanduser()
    if torch.device(device).type != "cpu":
        raise QuantizationError(f"quantized models run on the CPU (its int8/int4 kernels); got device {device}. "
                                "Load the fp32 model for GPUs.")
    if not is_quantized_folder(path):
        raise QuantizationError(f"{path} is not a quantized model folder (no {QUANT_FILE}): run quantize.py on it first.")
    info = read_info(path)
    mode, group_size = info["mode"], info.get("group_size") or DEFAULT_GROUP_SIZE
    check_mode(mode, group_size)
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} has {QUANT_FILE} but no {WEIGHTS_FILE}: the folder was copied partially.")
    try:
        config = GPT2Config.from_pretrained(path)
        with torch.device("meta"):
            model = GPT2LMHeadModel(config)
    except Exception as e:  # bad JSON, wrong field types, impossible shapes
        raise QuantizationError(f"{path / 'config.json'} is not a valid GPT-2 config ({' '.join(str(e).split())[:240]}): "
                                "copy the folder again, or quantize the fp32 model again.") from None
    try:
        # Copies of the tensors that safetensors placed at unaligned addresses (see `aligned`).
        tensors = {k: aligned(t) for k, t in safetensors.torch.load_file(path / WEIGHTS_FILE, device="cpu").items()}
    except Exception as e:  # SafetensorError: truncated, garbage
        raise QuantizationError(f"{path / WEIGHTS_FILE} cannot be read ({' '.join(str(e).split())[:240]}): it is truncated "
                                "or corrupt; copy it again or quantize the fp32 model again.") from None
    with torch.no_grad():
        for name, owner, attr, w, _ in _projection_weights(model):
            plain = _take(tensors, f"{name}.weight", path, mode, group_size, tuple(w.shape))
            bias = tensors.pop(f"{name}.bias", None)
            if bias is not None and tuple(bias.shape) != (w.shape[0],):
                raise QuantizationError(f"{path / WEIGHTS_FILE}: {name}.bias has shape {tuple(bias.shape)}, config.json says ({w.shape[0]},).")
            setattr(owner, attr, _quantized_linear(plain, mode, group_size, tuple(w.shape), bias))
        shape = (config.vocab_size, config.n_embd)
        _install_head(model, _take(tensors, LM_HEAD, path, mode, group_size, shape), mode, group_size)
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        except RuntimeError as e:  # shape mismatches
            raise QuantizationError(f"{path / WEIGHTS_FILE} does not match config.json: {' '.join(str(e).split())[:240]}") from None
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in _quantized_names(model)]  # those are set above
    if missing or unexpected:
        raise QuantizationError(f"{path / WEIGHTS_FILE} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    model.name_or_path = str(path)
    return model.eval()


def _take(tensors: dict, name: str, path, mode: str, group_size: int, shape) -> dict:
    """The saved tensors of quantized weight `name` (out, in), checked against the mode and shape that
    quantization.json and config.json announce (a mismatch is a QuantizationError, not a library crash)."""
    n, k = shape
    if mode == "int8":
        want = {"qdata": (torch.int8, (n, k)), "scale": (torch.bfloat16, (n,))}
    else:
        groups = k // group_size if k % group_size == 0 else None
        want = {"qdata": (torch.uint8, (n, k // 2)), "scale": (torch.bfloat16, (n, groups)), "zero": (torch.bfloat16, (n, groups))}
    plain = {}
    for key, (dtype, dims) in want.items():
        t = tensors.pop(f"{name}.{key}", None)
        if t is None or t.dtype != dtype or tuple(t.shape) != dims:
            found = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise QuantizationError(
                f"{path / WEIGHTS_FILE} does not match {QUANT_FILE} ({mode}" + (f", groups of {group_size}" if mode == "int4" else "")
                + f") and config.json: {name}.{key} is {found}, expected {dtype} {dims}. Quantize the fp32 model again."
            )
        plain[key] = t
    return plain


def _quantized_names(model) -> set:
    return {name for name, mod in model.named_modules() if hasattr(mod, "quant_plain")}


def folder_size(path) -> int:
    """Bytes of the weights file(s) of a model folder."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith(("model", "pytorch_model")) and f.is_file())


# ----------------------------------------------------------------------------- CLI


@dataclass
class QuantizeArguments:
    """Quantize a GPT-2 trained by train.py to int8 or int4 for CPU inference (see README, Quantize)."""

    model_path: str = field(default="logs/final_model", metadata={"help": "Model folder to quantize (train.py's logs/final_model, a checkpoint-N folder)."})
    mode: str = field(default="int8", metadata={"help": "int8: per-row int8 weights (~1/4 of fp32); int4: group-wise 4-bit weights (~1/6)."})
    out: str | None = field(default=None, metadata={"help": "Output folder; default <model_path>-<mode>. Replaced atomically if it exists."})
    group_size: int = field(default=DEFAULT_GROUP_SIZE, metadata={"help": f"int4 only: input features per scale/zero point, one of {', '.join(map(str, GROUP_SIZES))} (smaller: more accurate, larger file)."})


def parse_args(argv=None) -> QuantizeArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(QuantizeArguments, description=QuantizeArguments.__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def _check_source(path: Path) -> None:
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as e:
            raise QuantizationError(f"{config} cannot be read: {e}") from e
        if model_type != "gpt2":
            raise QuantizationError(f"{path} holds a {model_type!r} model; quantize.py quantizes GPT-2 models.")
    if is_quantized_folder(path):
        raise QuantizationError(f"{path} is already quantized; pass the fp32 model folder.")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _run(args), report=(ValueError, FileNotFoundError), explain=lambda e: _explain(e, args))


def _run(args) -> None:
    check_mode(args.mode, args.group_size)
    src = Path(args.model_path).expanduser()
    _check_source(src)
    out = Path(args.out).expanduser() if args.out else src.with_name(f"{src.name}-{args.mode}")
    if out.resolve() == src.resolve():
        raise QuantizationError("--out must differ from --model_path.")
    check_destination(out)  # before the model loads and quantizes, not after
    tokenizer, model = load_pretrained(src, torch.float32, local_hint=QuantizeArguments.model_path)
    quantize_model(model, args.mode, args.group_size)
    save_quantized(model, tokenizer, out, source_dir=src if src.is_dir() else None)
    before, after = folder_size(src) if src.is_dir() else None, folder_size(out)
    what = f"{args.mode}" + (f", groups of {args.group_size}" if args.mode == "int4" else "")
    if before:
        print(f"{src}: {before / 1e6:.1f} MB -> {out}: {after / 1e6:.1f} MB ({what}, {after / before:.1%} of the original)")
    else:
        print(f"{out}: {after / 1e6:.1f} MB ({what})")


def _explain(e: BaseException, args) -> str | None:
    """Writing the output failed: a full disk, a file where a folder should be, no permission."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return (f"cannot write {e.filename or args.out or 'the output'}: {e.strerror or e}"
                + (" (free some space, or pass --out on another disk)" if e.errno == errno.ENOSPC else ""))
    return None


if __name__ == "__main__":
    sys.exit(main())
