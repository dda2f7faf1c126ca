"""Sample text from a trained GPT-2.

    python generate.py --model_path logs/final_model --prompt "To be, or not" --length 100
    python generate.py --help

As a library:

    tokenizer, model, device = load_model("logs/final_model")
    generate_once(tokenizer, model, device, "To be, or not")            # -> str, prompt + completion
    generate_batch(tokenizer, model, device, "Once upon", max_length=60)   # -> [{"generated_text": ...}, ...]

Why not `model.generate` or a pipeline: for the small models this toolkit trains, a CPU decode
step is fixed costs, not transformer math. `_FastGPT2` runs functional ops over the model's own weights
with a preallocated KV cache and samples with HF's semantics (repetition penalty, then
temperature, top-k, top-p), and on CPU it
  - finds the top-k (and greedy) tokens through an int8 screen of the LM head with a proven
    error bound, then computes exact fp32 logits for the few survivors (`top_logits`),
  - keeps a (hidden, vocab) copy of the tied LM-head weight: the 50257-wide product, most of a
    step, runs 2-3x faster than in nn.Linear's layout, and exactly (fp32); on CPUs with native
    bf16 matmul it uses bf16 instead (see `_lm_head_dtype`),
  - computes logits only for the positions sampled from, one row at a time (faster than MKL's
    GEMM for a few rows),
  - samples with one intra-op thread (see `_cpu_threads`).
bench/generate_bench.py measures it against the original model.generate / pipeline code.
Folders written by quantize.py (int8/int4) load and sample the same way, on the CPU.
"""

import contextlib
import functools
import json
import math
import numbers
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
import quantize
from model import WEIGHT_FILES, ModelError, first_line, load_folder

DEFAULT_MODEL_PATH = "logs/final_model"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ----------------------------------------------------------------------------- loading


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA, then Apple MPS, then CPU. A device that is not there is a ValueError."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}): use --device cpu, or install a CUDA build of torch")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError(f"device {device} asked for, but Apple MPS is not available here: use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision halves memory traffic on accelerators; on CPU fp32 is exact and,
    # with the transposed LM head, as fast as bf16 on CPUs without native bf16 matmul.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def _looks_local(path: str) -> bool:
    p = Path(path).expanduser()
    # "org/name" is a Hub name unless "org" is a folder here (e.g. "logs/final_model").
    return path == DEFAULT_MODEL_PATH or path.startswith((".", "/", "~")) or (os.sep in path.rstrip(os.sep) and p.parent.exists())


def load_model(model_dir: str | os.PathLike = DEFAULT_MODEL_PATH, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a GPT-2 for generation; returns `(tokenizer, model, device)`.

    `model_dir` is a folder written by train.py (`logs/final_model`), a Trainer `checkpoint-N`
    folder (which has no tokenizer files: the official GPT-2 tokenizer in ./gpt2_tokenizer is used),
    any Hugging Face GPT-2 folder, or a Hub name. The device is picked automatically (CUDA, MPS,
    CPU) unless given; the model is in eval mode, in bf16/fp16 on GPUs and fp32 on CPU.
    A folder written by quantize.py (int8/int4, it holds quantization.json) is loaded by
    quantize.load_quantized, on the CPU.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    name = str(model_dir)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "quantization.json").is_file():
        return _load_quantized(path, device, dtype)
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model folder. Pass the folder train.py wrote "
                f"(logs/final_model) or one of its checkpoint-N folders."
            )
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(
                f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): "
                f"the save was interrupted or the folder was copied partially; point --model_path at a complete model."
            )
        model = load_folder(GPT2LMHeadModel, path, dtype)
        tokenizer = _folder_tokenizer(path)
    elif path.exists():
        raise FileNotFoundError(f"{path} is a file, not a model folder: pass the folder holding config.json and the weights.")
    elif _looks_local(name):
        raise FileNotFoundError(
            f"model folder {path} does not exist: train one with `python train.py` (it writes {DEFAULT_MODEL_PATH}) "
            f"or pass --model_path to a folder holding config.json and model.safetensors."
        )
    else:  # a Hub name such as "gpt2"
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = GPT2LMHeadModel.from_pretrained(name, dtype=dtype)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"{name!r} is neither a local folder nor a model on the Hugging Face Hub that could be loaded "
                f"(offline or no such repo): {str(e).splitlines()[0]}"
            ) from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    _check_vocab(tokenizer, model, name)
    model.to(device).eval()
    return tokenizer, model, device


def _check_vocab(tokenizer, model, name: str) -> None:
    # A token id beyond the embedding table is an IndexError deep inside the first forward.
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab} (vocab_size in "
                             "config.json): the tokenizer files do not belong to this model; copy the model's own.")


def _load_quantized(path: Path, device, dtype):
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype not in (None, torch.float32):
        raise ValueError(f"{path} is quantized: it computes in float32, not {dtype}.")
    model = quantize.load_quantized(path, device)  # QuantizationError is a ValueError
    tokenizer = _folder_tokenizer(path)
    _check_vocab(tokenizer, model, str(path))
    return tokenizer, model, device


def _folder_tokenizer(path: Path):
    """The folder's own tokenizer, else (a checkpoint-N folder has none) the official GPT-2 one."""
    from gpt2_tokenizer import load_tokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer(None)
    try:
        return load_tokenizer(path)
    except Exception as e:  # a corrupt tokenizer.json / vocab.json
        raise ModelError(f"{path}: its tokenizer files cannot be loaded ({first_line(e)}): copy them again "
                             "(tokenizer.json, vocab.json, merges.txt) or delete them to use the official GPT-2 tokenizer.") from None


# ----------------------------------------------------------------------------- model forward


class _FastGPT2:
    """Inference-only GPT-2 forward over an HF GPT2LMHeadModel's own modules and weights.

    Differences from `model(...)`: a preallocated KV cache (no cache objects or mask
    factories per step), dropout never applied (sampling is inference even if the model is
    in train mode), and an LM head that only runs on the positions that are sampled from.
    """

    def __init__(self, model, lm_head_dtype: torch.dtype | None = None):
        cfg = model.config
        if getattr(cfg, "model_type", None) != "gpt2" or getattr(cfg, "add_cross_attention", False):
            raise ValueError(f"generate.py samples from GPT-2 models; got model_type={cfg.model_type!r}.")
        self.model = model
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.n_positions = cfg.n_positions
        self.scales = []
        for i in range(cfg.n_layer):
            s = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            self.scales.append(s / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else s)
        # Direct functional calls over the layers' tensors: a decode step is ~60 tiny ops, and
        # nn.Module dispatch plus HF's 6-op NewGELU cost as much as the arithmetic (measured).
        gelu = _functional_gelu(cfg.activation_function)
        self.layers = []
        self.vocab = cfg.vocab_size
        self.exact_rows = self.approx_logits = None
        self.quantized = bool(getattr(model, "quantization", None))
        if self.quantized:  # quantize.py's int8/int4 model: projections and LM head run PyTorch's CPU kernels
            self._init_quantized(model, gelu)
            return
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            self.layers.append((
                block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight,
                a.c_proj.bias, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, m.c_fc.weight, m.c_fc.bias,
                gelu or m.act, m.c_proj.weight, m.c_proj.bias,
            ))
        w = model.lm_head.weight
        self.weight_key = (w.data_ptr(), w._version)
        self.lm_head_dtype = lm_head_dtype or _lm_head_dtype(w)
        with torch.no_grad():
            weight = w.detach().to(self.lm_head_dtype)
            # fp32 on CPU: x @ W^T with W^T stored (hidden, vocab) is 2-3x faster than nn.Linear's
            # (vocab, hidden) layout. bf16 is the other way round (40 ms vs 4 ms measured).
            self.transposed = w.device.type == "cpu" and self.lm_head_dtype == torch.float32
            self.lm_head = weight.t().contiguous() if self.transposed else weight
            self.screen = _int8_screen(w) if self.transposed and os.environ.get("GENERATE_SCREEN", "1") != "0" else None

    def _init_quantized(self, model, gelu):
        for block in model.transformer.h:
            a, m = block.attn, block.mlp
            self.layers.append((
                block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, quantize.projection(a.c_attn), quantize.projection(a.c_proj),
                block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, quantize.projection(m.c_fc), gelu or m.act,
                quantize.projection(m.c_proj),
            ))
        self.weight_key = id(model.lm_head.weight)
        self.lm_head_dtype, self.transposed, self.lm_head = torch.float32, False, None
        self.screen, self.exact_rows, self.approx_logits = quantize.lm_head_ops(model)

    def is_stale(self, model) -> bool:
        w = model.lm_head.weight
        if self.quantized:
            return id(w) != self.weight_key
        return (w.data_ptr(), w._version) != self.weight_key  # weights were trained or moved since

    def new_cache(self, batch: int, length: int):
        tr = self.model.transformer
        p = tr.wpe.weight
        shape = (len(tr.h), batch, self.n_head, length, self.head_dim)
        return torch.empty(shape, dtype=p.dtype, device=p.device), torch.empty(shape, dtype=p.dtype, device=p.device)

    def hidden(self, ids, pos, cache, start: int, mask=None):
        """Final hidden states (after ln_f) of `ids` (B, T) at positions `pos`, written into `cache` at `start`.

        `mask` is a bool (B, 1, T, start+T) "may attend" tensor, or None for an unpadded batch.
        """
        tr = self.model.transformer
        B, T = ids.shape
        end = start + T
        x = tr.wte(ids) + tr.wpe(pos)
        k_cache, v_cache = cache
        causal = mask is None and T > 1
        if mask is None and T > 1 and start > 0:
            raise ValueError("multi-token steps after the first need an explicit mask")
        C = x.shape[-1]
        if self.quantized:
            return self._hidden_quantized(x, B, T, C, start, end, k_cache, v_cache, mask, causal)
        for i, (l1w, l1b, l1e, aw, ab, pw, pb, l2w, l2b, l2e, fw, fb, act, mw, mb) in enumerate(self.layers):
            # GPT-2's Conv1D is x @ W + b with W stored (in, out): addmm on the flattened rows.
            qkv = torch.addmm(ab, F.layer_norm(x, (C,), l1w, l1b, l1e).view(B * T, C), aw).view(B, T, 3, self.n_head, self.head_dim)
            q = qkv[:, :, 0].transpose(1, 2)
            k_cache[i, :, :, start:end] = qkv[:, :, 1].transpose(1, 2)
            v_cache[i, :, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            y = F.scaled_dot_product_attention(
                q, k_cache[i, :, :, :end], v_cache[i, :, :, :end], attn_mask=mask, is_causal=causal, scale=self.scales[i]
            )
            x = x + torch.addmm(pb, y.transpose(1, 2).reshape(B * T, C), pw).view(B, T, C)
            hid = act(torch.addmm(fb, F.layer_norm(x, (C,), l2w, l2b, l2e).view(B * T, C), fw))
            x = x + torch.addmm(mb, hid, mw).view(B, T, C)
        return tr.ln_f(x)

    def _hidden_quantized(self, x, B, T, C, start, end, k_cache, v_cache, mask, causal):
        # As `hidden`, with each projection a callable (rows, in) -> (rows, out) over the quantized weight.
        for i, (l1w, l1b, l1e, attn, proj, l2w, l2b, l2e, fc, act, mproj) in enumerate(self.layers):
            qkv = attn(F.layer_norm(x, (C,), l1w, l1b, l1e).view(B * T, C)).view(B, T, 3, self.n_head, self.head_dim)
            q = qkv[:, :, 0].transpose(1, 2)
            k_cache[i, :, :, start:end] = qkv[:, :, 1].transpose(1, 2)
            v_cache[i, :, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            y = F.scaled_dot_product_attention(
                q, k_cache[i, :, :, :end], v_cache[i, :, :, :end], attn_mask=mask, is_causal=causal, scale=self.scales[i]
            )
            x = x + proj(y.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
            x = x + mproj(act(fc(F.layer_norm(x, (C,), l2w, l2b, l2e).view(B * T, C)))).view(B, T, C)
        return self.model.transformer.ln_f(x)

    def logits(self, h):
        """Float32 logits of hidden states `h` (N, hidden)."""
        if self.quantized:  # the library's F.linear: fp32 activations, exact for the quantized weights
            return F.linear(h.float(), self.model.lm_head.weight).float()
        h = h.to(self.lm_head_dtype)
        if h.device.type == "cpu" and 1 < h.shape[0] <= 16:
            # MKL's GEMM for a few rows against a 50257-wide matrix costs several times one GEMV
            # per row (measured 30 ms vs 3 x 3.5 ms for 3 rows), so decode steps go row by row.
            return torch.cat([self._product(row[None]) for row in h]).float()
        return self._product(h).float()

    def _product(self, h):
        return h @ self.lm_head if self.transposed else F.linear(h, self.lm_head)

    def top_logits(self, h, k: int, adjust=None):
        """The k largest logits per row of `h` (after `adjust`), sorted, and their token ids.

        The same values and ids as `topk(adjust(logits(h)), k)`, found with about half the LM-head
        memory traffic when an int8 screen is available: int8 logits with a proven error bound
        keep only the tokens that can still be among the k largest (~60 of 50257 for k=50), whose
        exact fp32 logits are then computed from their rows of the fp32 weight. `adjust(z, ids)`
        (penalties, bans) must be non-decreasing in z for each token; ids None means all tokens.
        """
        adjust = adjust or (lambda z, ids: z)
        if self.screen is None or k * 8 > self.vocab:
            if self.approx_logits is not None and k * 8 <= self.vocab:
                return self._top_logits_int4(h, k, adjust)
            return torch.topk(adjust(self.logits(h), None), k)
        q, scale, half_scale = self.screen
        h = h.float()
        hb = h.bfloat16()
        approx = quantize.int8_mm(hb, q, scale).float()
        # |exact - approx| <= weight rounding (|h|_1 * scale/2) + activation rounding to bf16
        # + bf16 rounding of the output; 4x slack over the worst case measured on real text.
        act_err = (h - hb.float()).abs().sum(-1, keepdim=True)
        err = h.abs().sum(-1, keepdim=True) * half_scale + act_err * (127 * scale) + approx.abs() * 2**-8 + 1e-4
        lower, upper = adjust(approx - err, None), adjust(approx + err, None)
        threshold = lower.topk(k).values[:, -1:]
        n = int((upper >= threshold).sum(-1).max())
        ids = upper.topk(n).indices  # every token whose exact logit can reach the k-th largest
        # (B, n, hidden): rows of the fp32 weight, or of the quantized one as the model computes with it
        rows = self.model.lm_head.weight.detach()[ids] if self.exact_rows is None else self.exact_rows(ids)
        exact = adjust(torch.bmm(rows, h[:, :, None])[..., 0], ids)
        vals, pick = torch.topk(exact, k)
        return vals, ids.gather(1, pick)

    def _top_logits_int4(self, h, k: int, adjust):
        # The int4 kernel with bf16 activations gives logits within ~0.5% of the int4 model's; the
        # top 4k of those are rescored exactly (fp32) from their dequantized rows. Not a proven
        # bound as for int8: a token near rank k whose logit is within that rounding may be swapped.
        h = h.float()
        approx = self.approx_logits(h)
        ids = adjust(approx, None).topk(min(4 * k, self.vocab)).indices
        exact = adjust(torch.bmm(self.exact_rows(ids), h[:, :, None])[..., 0], ids)
        vals, pick = torch.topk(exact, k)
        return vals, ids.gather(1, pick)


def _int8_screen(weight):
    """(int8 weight, bf16-exact fp32 row scales, half scales) for `top_logits`, or None where the int8
    kernel failed its self-test (`quantize.kernel_ok`)."""
    if not quantize.kernel_ok("int8"):
        return None
    with torch.no_grad():
        w = weight.detach().float()
        # Scales are rounded up to bf16 values, which the kernel takes, so no weight clips at 127.
        scale = ((w.abs().amax(1) / 127).clamp(min=1e-12) * (1 + 2**-7)).bfloat16().float()
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return quantize.aligned(q), scale, scale / 2


def _functional_gelu(name: str):
    """A one-op equivalent of GPT-2's activation (HF's NewGELU is 6 ops), or None to call the module."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return functools.partial(F.gelu, approximate="tanh")  # same tanh formula, within 3e-7
    if name == "gelu":
        return F.gelu
    return None


def _lm_head_dtype(weight) -> torch.dtype:
    """bf16 for the LM head on CPUs with native bf16 matmul (AVX-512 BF16 / AMX), else the weight's dtype.

    The LM head is most of a small model's decode step and is memory-bound; bf16 halves its
    traffic. Without native support bf16 is emulated and slower than fp32, so fp32 stays exact.
    GENERATE_LM_HEAD_DTYPE=float32|bfloat16 overrides the choice.
    """
    forced = os.environ.get("GENERATE_LM_HEAD_DTYPE")
    if forced:
        return getattr(torch, forced)
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return weight.dtype


_FAST = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int | None):
    """Run with `n` intra-op threads on CPU (default 1), restoring the process setting after.

    A decode step is a chain of ~50 tiny ops plus one memory-bound GEMV: splitting them over
    OpenMP threads saves nothing and costs a team sync per op, which turns into scheduler
    waits when the cores are shared (measured 10x slower with 2 threads on a busy 2-core box).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"threads must be an integer >= 0 (0 keeps torch's setting), got {n!r}")
    if device.type != "cpu" or n == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fast(model) -> _FastGPT2:
    """The cached fast forward for `model`, rebuilt when its LM-head weights changed."""
    fast = _FAST.get(model)
    if fast is None or fast.is_stale(model):
        fast = _FAST[model] = _FastGPT2(model)
    return fast


# ----------------------------------------------------------------------------- sampling


@dataclass
class Completion:
    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length"

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def check_sampling_args(max_new_tokens=50, top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_return_sequences=1):
    """Raise ValueError naming the bad argument and the accepted range."""

    def bad(name, value, want):
        raise ValueError(f"{name} must be {want}, got {value!r}")

    def number(name, value, want):  # NaN passes every comparison, so non-finite values are refused first
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            bad(name, value, want)
        return float(value)

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        bad("max_new_tokens (--length)", max_new_tokens, "a positive integer")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        bad("top_k", top_k, "an integer >= 0 (0 disables top-k)")
    if not 0.0 < number("top_p", top_p, "in (0, 1]") <= 1.0:
        bad("top_p", top_p, "in (0, 1] (1 disables nucleus sampling)")
    if number("temperature", temperature, "a finite number >= 0") < 0.0:
        bad("temperature", temperature, ">= 0 (0 means greedy decoding)")
    if not 1e-3 <= number("repetition_penalty", repetition_penalty, "a number from 0.001 to 1000") <= 1e3:
        # beyond these, penalized float32 logits overflow to inf or vanish to 0 (and NaN in the softmax)
        bad("repetition_penalty", repetition_penalty, "from 0.001 to 1000 (1 disables it; 1.1-1.5 is usual)")
    if isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        bad("no_repeat_ngram_size", no_repeat_ngram_size, "an integer >= 0 (0 disables it)")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        bad("num_return_sequences", num_return_sequences, "a positive integer")


def _encode_prompt(tokenizer, prompt: str, context: int, max_new_tokens: int) -> list[int]:
    keep = context - max_new_tokens
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate is not text: the tokenizer would fail deep inside
        raise ValueError(f"the prompt holds a lone surrogate ({prompt[e.start]!r} at character {e.start}), which is not "
                         "text: pass valid Unicode (UTF-8)") from None
    # verbose=False: the tokenizer's "longer than the maximum sequence length" notice is moot, we cut below.
    ids = tokenizer.encode(prompt, verbose=False) if prompt else []
    if not ids:  # an empty prompt samples unconditionally, as GPT-2 was trained: after <|endoftext|>
        return [tokenizer.eos_token_id]
    if len(ids) > keep:
        warnings.warn(
            f"The prompt has {len(ids)} tokens but only {keep} fit in the model's {context}-token context "
            f"with {max_new_tokens} new ones: keeping its last {keep} tokens (shorten it or lower --length).",
            stacklevel=3,
        )
        ids = ids[-keep:]
    return ids


def _banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    # Same rule as HF's NoRepeatNGramLogitsProcessor: ban tokens that would repeat an n-gram.
    if len(seq) < n:
        return []
    prefix = tuple(seq[len(seq) - n + 1 :])
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]


def _sample(logits, top_k: int, top_p: float, temperature: float, generator):
    """Next token per row of float `logits` (B, V), with HF's warper order: temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    if 0 < top_k < logits.shape[-1]:
        vals, idx = torch.topk(logits, top_k)
    elif top_p < 1.0:
        vals, idx = torch.sort(logits, descending=True)
    else:
        return torch.multinomial(torch.softmax(_tempered(logits, temperature), -1), 1, generator=generator).squeeze(1)
    return _sample_top(vals, idx, top_p, temperature, generator)


def _tempered(logits, temperature: float):
    """`logits / temperature`, shifted so that each row's largest is 0 and in float64 when scaled, so any
    positive temperature, however small (1e-320) or large, gives finite probabilities; the order is kept."""
    if temperature == 1.0:
        return logits
    logits = logits.double()
    return (logits - logits.amax(-1, keepdim=True)) / temperature


def _sample_top(vals, idx, top_p: float, temperature: float, generator):
    """Sample among the largest logits `vals` (B, k, sorted descending) of tokens `idx`."""
    if temperature == 0:
        return idx[:, 0]
    vals = _tempered(vals, temperature)  # scaling keeps the order: top-k first is the same
    if top_p < 1.0:
        probs = torch.softmax(vals, -1)
        # Keep the smallest prefix whose mass reaches top_p; the top token always survives (even for a
        # top_p below float32's smallest number, which compares as 0).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(torch.softmax(vals, -1), 1, generator=generator)
    return idx.gather(1, choice).squeeze(1)


class _StopMatcher:
    """The first of several stop strings in a text that arrives piece by piece.

    Knuth-Morris-Pratt: each stop string keeps the length of its longest prefix that ends the text
    so far, so a piece costs O(its length) per stop string, whatever the stop strings' lengths.
    (Searching the whole text and testing every prefix of a stop string at each token cost its
    length squared per token: one 65 KB stop string held a server's worker for a minute.)
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fallback = [self._table(s) for s in stops]
        self.state = [0] * len(stops)
        self.length = 0  # characters fed so far

    @staticmethod
    def _table(s: str) -> list[int]:
        # fallback[i]: length of the longest proper prefix of s[: i + 1] that is also its suffix
        table, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = table[k - 1]
            if s[i] == s[k]:
                k += 1
            table[i] = k
        return table

    def feed(self, piece: str) -> int | None:
        """Add `piece` to the text; the index where the earliest stop string now in it starts, or None."""
        found = None
        for j, s in enumerate(self.stops):
            k, table = self.state[j], self.fallback[j]
            for i, ch in enumerate(piece):
                while k and s[k] != ch:
                    k = table[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    start = self.length + i + 1 - k
                    found = start if found is None else min(found, start)
                    k = table[k - 1]
                    break
            self.state[j] = k
        self.length += len(piece)
        return found

    def pending(self) -> int:
        """How many characters at the end of the text may be the start of a stop string."""
        return max(self.state, default=0)


class _RowText:
    """Decoded completion of one row: applies stop strings and yields printable increments."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.matcher = _StopMatcher(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character split across tokens: wait for its last byte
        if text.startswith(self.text):
            cut = self.matcher.feed(text[len(self.text) :])
        else:  # decoding changed earlier text (not seen with byte-level BPE): match all of it again
            self.matcher = _StopMatcher(self.stop)
            cut = self.matcher.feed(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            safe = cut
        else:
            self.text = text
            safe = len(text) - self.matcher.pending()  # a possible start of a stop string is never printed
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def rest(self) -> str:
        """The text not yet returned by `add`, including a trailing partial character."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def generate(
    tokenizer,
    model,
    device,
    prompts: str | list[str],
    max_new_tokens: int = 50,
    top_k: int = 50,
    top_p: float = 0.95,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    on_text=None,
    threads: int | None = None,
) -> list[Completion]:
    """Sample `num_return_sequences` completions for each prompt, in one left-padded batch.

    Returns prompt-major Completions. Generation of a row ends at EOS (not included in the
    text), at the first stop string (cut, not included) or after `max_new_tokens`.
    `temperature=0` is greedy decoding. `seed` makes sampling reproducible without touching the
    global RNG. `on_text(row, text)` is called with each new printable piece of each row.
    `threads`: CPU intra-op threads while sampling (default 1, see `_cpu_threads`; 0 leaves
    torch's setting alone).
    """
    with _cpu_threads(torch.device(device), threads):
        return _generate(tokenizer, model, device, prompts, max_new_tokens, top_k, top_p, temperature, repetition_penalty,
                         no_repeat_ngram_size, num_return_sequences, seed, stop, on_text)


@torch.inference_mode()
def _generate(tokenizer, model, device, prompts, max_new_tokens, top_k, top_p, temperature, repetition_penalty,
              no_repeat_ngram_size, num_return_sequences, seed, stop, on_text) -> list[Completion]:
    check_sampling_args(max_new_tokens, top_k, top_p, temperature, repetition_penalty, no_repeat_ngram_size, num_return_sequences)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be an integer from -2**63 to 2**64-1, got {seed!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    fast = _fast(model)
    context = fast.n_positions
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens (--length) must be below the model's context of {context} tokens, got {max_new_tokens}")
    device = torch.device(device)
    eos = tokenizer.eos_token_id

    encoded = [_encode_prompt(tokenizer, p, context, max_new_tokens) for p in prompts]
    rows = [ids for ids in encoded for _ in range(num_return_sequences)]
    B, P = len(rows), max(len(r) for r in rows)
    ids = torch.tensor([[eos] * (P - len(r)) + r for r in rows], device=device)  # left padding
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        valid[b, P - len(r) : P] = True
    padded = any(len(r) != P for r in rows)
    pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    mask = None
    if padded:  # causal & not padding; a pad query attends to itself so no softmax row is all -inf
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        mask = mask[:, None]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    texts = [_RowText(tokenizer, stop) for _ in rows]
    decode_live = bool(stop) or on_text is not None
    vocab = model.lm_head.weight.shape[0]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, r] = True
    histories = [list(r) for r in rows] if no_repeat_ngram_size else None
    finish = [None] * B
    new_tokens: list[list[int]] = [[] for _ in rows]

    cache = fast.new_cache(B, P + max_new_tokens)
    h = fast.hidden(ids, pos, cache, 0, mask)[:, -1]
    next_pos = pos[:, -1] + 1
    for step in range(max_new_tokens):
        banned = None
        if histories is not None:
            banned = torch.zeros(B, vocab, dtype=torch.bool, device=device)
            for b, hist in enumerate(histories):
                banned[b, _banned_ngram_tokens(hist, no_repeat_ngram_size)] = True

        def adjust(z, ids):
            if seen is not None:  # HF's rule: divide positive logits, multiply negative ones
                penalized = torch.where(z > 0, z / repetition_penalty, z * repetition_penalty)
                z = torch.where(seen if ids is None else seen.gather(1, ids), penalized, z)
            if banned is not None:
                z = z.masked_fill(banned if ids is None else banned.gather(1, ids), float("-inf"))
            return z

        k = 1 if temperature == 0 else top_k
        if 0 < k < vocab:  # the top-k warper only ever looks at the k largest logits
            vals, idx = fast.top_logits(h, k, adjust)
            token = _sample_top(vals, idx, top_p, temperature, generator)
        else:
            token = _sample(adjust(fast.logits(h), None), top_k, top_p, temperature, generator)
        tokens = token.tolist()
        for b, t in enumerate(tokens):
            if finish[b] is not None:
                continue
            if t == eos:
                finish[b] = "eos"
                continue
            new_tokens[b].append(t)
            if histories is not None:
                histories[b].append(t)
            if decode_live:
                piece = texts[b].add(t)
                if piece and on_text is not None:
                    on_text(b, piece)
                if texts[b].stopped:
                    finish[b] = "stop"
        if all(f is not None for f in finish) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        step_mask = None
        at = P + step
        if padded:
            valid[:, at] = True
            step_mask = valid[:, None, None, : at + 1]
        h = fast.hidden(token[:, None], next_pos[:, None], cache, at, step_mask)[:, -1]
        next_pos = next_pos + 1

    out = []
    for b, r in enumerate(rows):
        if decode_live:
            rest = texts[b].rest()
            if on_text is not None and rest:
                on_text(b, rest)
            completion = texts[b].text
        else:
            completion = tokenizer.decode(new_tokens[b], skip_special_tokens=True)
        prompt = prompts[b // num_return_sequences]
        out.append(Completion(prompt, completion, len(r), len(new_tokens[b]), finish[b] or "length"))
    return out


def generate_once(tokenizer, model, device, prompt, max_new_tokens=50, top_k=50, top_p=0.95, temperature=1.0, **kwargs) -> str:
    """One sampled continuation of `prompt`, returned with the prompt in front.

    Extra keyword arguments: repetition_penalty, no_repeat_ngram_size, seed, stop (str or list).
    temperature=0 decodes greedily.
    """
    (c,) = generate(tokenizer, model, device, prompt, max_new_tokens, top_k, top_p, temperature, num_return_sequences=1, **kwargs)
    return c.text


def generate_batch(tokenizer, model, device, prompt, max_length=100, num_return_sequences=3, top_p=0.9, **kwargs) -> list[dict]:
    """`num_return_sequences` continuations of `prompt`, as the original's text-generation pipeline
    returned them: a list of `{"generated_text": prompt + completion}` dicts, or for a list of
    prompts one such list per prompt.

    As the original, `max_length` counts the prompt tokens too (of the longest prompt); pass
    `max_new_tokens=N` instead to ask for N new tokens. All sequences run as one left-padded batch.
    Other keyword arguments as in `generate` (top_k defaults to 50 as in HF).
    """
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if max_new_tokens is None:
        context = _fast(model).n_positions
        longest = max((len(tokenizer.encode(p, verbose=False)) if p else 1) for p in prompts) if prompts else 0
        max_new_tokens = max_length - min(longest, context - 1)
        if max_new_tokens < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for new tokens after the {longest}-token prompt; "
                f"raise max_length or pass max_new_tokens."
            )
        max_new_tokens = min(max_new_tokens, context - 1)
    completions = generate(tokenizer, model, device, prompts, max_new_tokens, top_p=top_p, num_return_sequences=num_return_sequences, **kwargs)
    outputs = [{"generated_text": c.text} for c in completions]
    if isinstance(prompt, str):
        return outputs
    return [outputs[i : i + num_return_sequences] for i in range(0, len(outputs), num_return_sequences)]


def stream(tokenizer, model, device, prompt: str, **kwargs):
    """Yield the completion of `prompt` piece by piece as tokens are sampled (prompt not included)."""
    import queue
    import threading

    pieces: queue.Queue = queue.Queue()
    done = object()
    errors = []

    def run():
        try:
            generate(tokenizer, model, device, prompt, on_text=lambda _, piece: pieces.put(piece), **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
        finally:
            pieces.put(done)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while (piece := pieces.get()) is not done:
        yield piece
    worker.join()
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- CLI


@dataclass
class GenerateArguments:
    """Sample text from a GPT-2 trained by train.py (or any Hugging Face GPT-2)."""

    model_path: str = field(
        default=DEFAULT_MODEL_PATH,
        metadata={"help": "Model folder (train.py's logs/final_model, a checkpoint-N folder) or a Hub name."},
    )
    prompt: str | None = field(default=None, metadata={"help": "Prompt text. Without --prompt/--prompt_file, prompts are read from stdin when it is piped, else one unconditional sample is drawn."})
    prompt_file: str | None = field(
        default=None, metadata={"help": "File of prompts: one per line, or JSONL with a 'prompt' or 'text' field. '-' reads stdin."}
    )
    length: int = field(default=100, metadata={"aliases": ["--max_new_tokens"], "help": "Number of new tokens to sample per sequence."})
    num_return_sequences: int = field(default=1, metadata={"help": "Completions per prompt (sampled as one batch)."})
    top_k: int = field(default=50, metadata={"help": "Sample among the k most likely tokens; 0 disables."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: smallest token set with this much probability, in (0, 1]."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; 0 means greedy decoding."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty > 1 for tokens already in the text (CTRL paper), from 0.001 to 1000; 1 disables."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Never repeat an n-gram of this size; 0 disables."})
    seed: int | None = field(default=None, metadata={"help": "Random seed; the same seed gives the same text."})
    stop: list[str] = field(default_factory=list, metadata={"help": "Stop strings: a completion ends before the first one it contains."})
    stream: bool | None = field(default=None, metadata={"nargs": "?", "const": True, "help": "Print tokens as they are sampled; when unset, on if stdout is a terminal and --json is off."})
    json: bool = field(default=False, metadata={"help": "Write JSON lines: prompt, completion, prompt_tokens, completion_tokens, finish_reason."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu; when unset, the best available."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads while sampling; when unset, 1 (fastest for small models); 0 keeps torch's setting."})


def read_prompts(args: GenerateArguments, stdin=None) -> list[str]:
    """Prompts from --prompt, --prompt_file or piped stdin; [''] (one unconditional sample) if none."""
    stdin = stdin or sys.stdin
    if args.prompt is not None:  # bytes that are not UTF-8 arrive as surrogate escapes
        return [_decode_prompts(args.prompt.encode("utf-8", "surrogateescape"), "--prompt")]
    if args.prompt_file == "-" or (args.prompt_file is None and not stdin.isatty()):
        source, data = "stdin", stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    elif args.prompt_file is not None:
        path = Path(args.prompt_file)
        if path.is_dir():
            raise ValueError(f"prompt file {path} is a directory: pass a text file with one prompt per line")
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        try:
            source, data = f"prompt file {path}", path.read_bytes()
        except OSError as e:
            raise ValueError(f"prompt file {path} cannot be read: {e.strerror or e}") from None
    else:
        return [""]
    lines = _decode_prompts(data, source).splitlines()
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}, line {n}: looks like JSON but does not parse ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt", record.get("text")), str):
                raise ValueError(f"{source}, line {n}: JSON without a string 'prompt' or 'text' field")
            prompts.append(record.get("prompt", record.get("text")))
        else:
            prompts.append(line)
    return prompts or [""]


def _decode_prompts(data: bytes, source: str) -> str:
    """UTF-8 text (a BOM is dropped), or a ValueError naming `source` and where it is not text."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{source} holds NUL bytes (at byte {nul}): it is binary or UTF-16, not UTF-8 text; "
                         "pass a text file (convert with `iconv -f UTF-16 -t UTF-8`)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): "
                         "pass UTF-8 text (convert with `iconv -f <its encoding> -t UTF-8`)") from None


def parse_args(argv=None) -> GenerateArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(GenerateArguments, description=GenerateArguments.__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        kwargs = dict(
            max_new_tokens=args.length,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            num_return_sequences=args.num_return_sequences,
            seed=args.seed,
            stop=args.stop,
            threads=args.threads,
        )
        check_sampling_args(**{k: v for k, v in kwargs.items() if k not in ("seed", "stop", "threads")})
        do_stream = args.stream if args.stream is not None else (sys.stdout.isatty() and not args.json)
        if do_stream and args.json:
            raise ValueError("--stream and --json do not mix: JSON lines are written once a completion is done")
        if do_stream and args.num_return_sequences > 1:
            if args.stream:
                raise ValueError("--stream prints one sequence at a time: use --num_return_sequences 1")
            do_stream = False
        prompts = read_prompts(args)
        tokenizer, model, device = load_model(args.model_path, device=args.device)
        for i, prompt in enumerate(prompts):
            if do_stream:
                sys.stdout.write(prompt)
                sys.stdout.flush()

                def on_text(_, piece):
                    sys.stdout.write(piece)
                    sys.stdout.flush()

                generate(tokenizer, model, device, prompt, on_text=on_text, **kwargs)
                sys.stdout.write("\n")
                continue
            for j, c in enumerate(generate(tokenizer, model, device, prompt, **kwargs)):
                if args.json:
                    print(json.dumps({"prompt": c.prompt, "completion": c.completion, "prompt_tokens": c.prompt_tokens,
                                      "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}, ensure_ascii=False))
                else:
                    if i or j:
                        print("-" * 40)
                    print(c.text)
            sys.stdout.flush()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
