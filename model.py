"""The GPT-2 model: a Hugging Face GPT2LMHeadModel, built from a size preset or loaded to fine-tune.

    from model import get_model
    model = get_model(preset="small")                  # 4 layers, 256 wide: trains on a laptop CPU
    model = get_model(n_layer=2, n_embd=64, n_head=2)  # any shape
    model = get_model(init_from="path/to/hf_model")    # fine-tune pretrained weights (folder or Hub name)
    model = get_model(vocab_size=padded_vocab_size(len(tok)), bos_token_id=eos, eos_token_id=eos)  # train.py's, any tokenizer
    loss = lm_head_loss(hidden, model.lm_head.weight, labels)  # the model's loss without its logits (training)
    FusedCausalLMLoss(model); model(ids, labels=ids, logits_to_keep=no_logits(ids.device)).loss  # the same, as its loss

The model is plain Hugging Face, so anything saved from it loads with `from_pretrained`
or `transformers.pipeline` without this file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from errors import GPT2ToolkitError

# The four OpenAI GPT-2 sizes, and one small enough to train on a CPU in minutes.
PRESETS: dict[str, dict[str, int]] = {
    "small": dict(n_layer=4, n_head=4, n_embd=256),  # ~16M parameters, most of them the 50257-token embedding
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

GPT2_VOCAB_SIZE = 50257
GPT2_CONTEXT = 1024
VOCAB_MULTIPLE = 64  # train.py pads a new model's vocabulary to a multiple of this (nanoGPT: 50257 -> 50304)


class ModelError(GPT2ToolkitError, ValueError):
    """A model shape or folder that cannot be used; the message names it and says what to do."""


def count_parameters(model, non_embedding: bool = False) -> int:
    """Number of parameters; non_embedding leaves out the position embedding, as nanoGPT reports it.

    (The token embedding is tied to the output layer, so it does count as compute.)"""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.transformer.wpe.weight.numel()
    return n


def check_shape(n_embd: int | None = None, n_layer: int | None = None, n_head: int | None = None,
                n_positions: int | None = None, dropout: float | None = None) -> None:
    """Raise ModelError unless the given values make a GPT-2 (train.py checks them before it tokenizes anything)."""
    for name, value in (("n_embd", n_embd), ("n_layer", n_layer), ("n_head", n_head), ("n_positions", n_positions)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelError(f"{name}={value!r} must be a whole number of at least 1.")
    if n_embd is not None and n_head is not None and n_embd % n_head != 0:
        raise ModelError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head}): each head gets n_embd / n_head dims.")
    if dropout is not None and not 0 <= dropout < 1:  # also refuses nan
        raise ModelError(f"dropout={dropout} must be in [0, 1).")


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`n_tokens` (a tokenizer's length) rounded up to a multiple of `multiple`: the vocabulary train.py gives a new
    model, as nanoGPT pads 50257 to 50304 for matmul-friendly shapes. The rows beyond the tokenizer are never a
    training target and generate.py never samples them; multiple=1 turns padding off."""
    for name, value in (("n_tokens", n_tokens), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{name}={value!r} must be a whole number of at least 1.")
    return -(-n_tokens // multiple) * multiple


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def first_line(e: BaseException, limit: int = 240) -> str:
    """A library error's message on one line, cut at `limit` characters."""
    text = " ".join(str(e).split())
    return (text[:limit] + " ..." if len(text) > limit else text) or type(e).__name__


def load_folder(cls, path: str | os.PathLike, dtype=None, config_overrides: dict | None = None, **kwargs):
    """`cls.from_pretrained(path, dtype=dtype, **kwargs)` for a local model folder, quietly (no progress bar or
    load report on stderr), with each way the folder can be broken (a corrupt config.json, truncated or garbage
    weights, a pickle torch's safe loader refuses, weights of another model, which transformers would fill with
    random values) raised as ModelError naming the file, instead of a library traceback."""
    import pickle
    import warnings

    import quiet_imports  # noqa: F401, I001
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, **(config_overrides or {}))
    except Exception as e:  # OSError (bad JSON), ValueError (unknown model type, wrong field types), ...
        raise ModelError(f"{path / 'config.json'} is not a valid model config ({first_line(e)}): restore it "
                         "from the training run's folder, or point --model_path at a complete model.") from None
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), path)
    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its report of missing weights becomes our error below
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol would precede our one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model, info = cls.from_pretrained(str(path), dtype=dtype, config=config, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError:
        raise ModelError(
            f"{weights} was refused by torch's safe loader (weights_only): it holds Python objects besides tensors, "
            "and unpickling them could run code. Use a safetensors copy of the model; if you trust where the file "
            "came from, convert it once (README, Generate: a pickled model)."
        ) from None
    except Exception as e:  # SafetensorError, shape mismatches (RuntimeError), OSError ...
        raise ModelError(f"{weights} cannot be loaded ({type(e).__name__}: {first_line(e)}): it is truncated, corrupt "
                         "or from another model; copy it again or point --model_path at a complete model "
                         "(e.g. a checkpoint-N folder).") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in info["missing_keys"] if k not in tied]
    if missing:
        raise ModelError(f"{weights} lacks {len(missing)} of the weights config.json describes ({', '.join(sorted(missing)[:3])}, ...): "
                         "the weights and config.json come from different models; copy the whole folder again.")
    return model


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _looks_local(name: str, local_hint: str | None) -> bool:
    # "org/name" is a Hub name unless "org" is a folder here (e.g. "logs/final_model").
    return name == local_hint or name.startswith((".", "/", "~")) or (os.sep in name.rstrip(os.sep) and Path(name).expanduser().parent.exists())


def load_pretrained(model_dir: str | os.PathLike, dtype=None, local_hint: str | None = None):
    """(tokenizer, GPT2LMHeadModel) of a model folder (train.py's final_model, a checkpoint-N folder, any
    Hugging Face GPT-2 folder) or a Hub name, on the CPU; the one fp32/bf16 loader that generate.py and
    quantize.py's CLI share. Raises FileNotFoundError or ModelError saying what is wrong and what to do.
    `local_hint` is a name that is always a local path (the CLIs' default, e.g. logs/final_model)."""
    import quiet_imports  # noqa: F401, I001
    from transformers import AutoTokenizer, GPT2LMHeadModel

    name = str(model_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json, so it is not a model folder. Pass the folder train.py wrote "
                                    "(logs/final_model) or one of its checkpoint-N folders.")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): the save was "
                                    "interrupted or the folder was copied partially; point --model_path at a complete model.")
        model = load_folder(GPT2LMHeadModel, path, dtype)
        tokenizer = folder_tokenizer(path)
    elif path.exists():
        raise FileNotFoundError(f"{path} is a file, not a model folder: pass the folder holding config.json and the weights.")
    elif _looks_local(name, local_hint):
        raise FileNotFoundError(f"model folder {path} does not exist: train one with `python train.py` (it writes "
                                "logs/final_model) or pass --model_path to a folder holding config.json and model.safetensors.")
    else:  # a Hub name such as "gpt2"
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = GPT2LMHeadModel.from_pretrained(name, dtype=dtype)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{name!r} is neither a local folder nor a model on the Hugging Face Hub that could be "
                                    f"loaded (offline or no such repo): {first_line(e)}") from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    check_vocab(tokenizer, model, name)
    check_finite_weights(model, name)
    return tokenizer, model


def check_finite_weights(model, name: str) -> None:
    """Weights holding NaN or inf (a diverged run) are a ModelError naming the tensor: every score would be NaN,
    sampling would crash deep inside torch, and an export or a quantized copy would carry them silently."""
    with torch.no_grad():
        for key, weight in model.named_parameters():
            if type(weight.data) is not torch.Tensor:  # a quantized weight (quantize.py): integers, and no isfinite
                continue
            if weight.is_floating_point() and not torch.isfinite(weight).all():
                raise ModelError(f"{name}: the weight {key} holds NaN or inf values (a diverged training run?): use an "
                                 "earlier checkpoint-N folder, or retrain with a lower --learning_rate.")


def check_vocab(tokenizer, model, name: str) -> None:
    """A tokenizer larger than the model's vocabulary is a ModelError (else an IndexError in the first forward)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab} (vocab_size in "
                         "config.json): the tokenizer files do not belong to this model; copy the model's own.")


def folder_tokenizer(path: Path):
    """The folder's own tokenizer, else (a checkpoint-N folder has none) the official GPT-2 one."""
    from gpt2_tokenizer import load_tokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return load_tokenizer(None)
    try:
        return load_tokenizer(path)
    except Exception as e:  # a corrupt tokenizer.json / vocab.json
        raise ModelError(f"{path}: its tokenizer files cannot be loaded ({first_line(e)}): copy them again "
                         "(tokenizer.json, vocab.json, merges.txt) or delete them to use the official GPT-2 tokenizer.") from None


def get_model(
    n_embd: int = 768,
    n_layer: int = 12,
    n_head: int = 12,
    vocab_size: int = GPT2_VOCAB_SIZE,
    *,
    preset: str | None = None,
    n_positions: int = GPT2_CONTEXT,
    dropout: float | None = None,
    init_from: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
    bos_token_id: int = 50256,
    eos_token_id: int = 50256,
    verbose: bool = True,
    **config_kwargs,
):
    """A GPT2LMHeadModel.

    From scratch: the shape comes from `preset` (one of PRESETS) when given, else from
    n_embd / n_layer / n_head; n_positions is the context length; `dropout` sets the residual,
    embedding and attention dropout (GPT-2's 0.1 when None); extra keyword args go to GPT2Config.

    With `init_from` (a local Hugging Face model folder or a Hub name) the pretrained weights and
    shape are loaded instead, to fine-tune; only `dropout` and `config_kwargs` are applied on top.

    bos_token_id / eos_token_id (and the pad id, which is the EOS) go into config.json and
    generation_config.json of a new model: pass the tokenizer's EOS id for a tokenizer other than GPT-2's.
    vocab_size is taken as given (train.py pads it with `padded_vocab_size`).

    Raises ModelError (a ValueError) for a bad shape, or a folder that holds no usable GPT-2.
    """
    if init_from is not None:
        model = _pretrained(init_from, dropout, attn_implementation, config_kwargs, verbose)
    else:
        model = _from_scratch(n_embd, n_layer, n_head, vocab_size, preset, n_positions, dropout, attn_implementation,
                              bos_token_id, eos_token_id, config_kwargs)

    # transformers cannot map the class name GPT2LMHeadModel to its loss and warns at the first step; name it.
    model.loss_type = "ForCausalLM"
    # GPT-2 has no pad token; batching and generation pad with EOS, as the tokenizer does.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    if verbose:
        c = model.config
        print(
            f"GPT-2 model: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.n_positions}; "
            f"{count_parameters(model) / 1e6:.2f}M parameters "
            f"({count_parameters(model, non_embedding=True) / 1e6:.2f}M without position embeddings)"
        )
    return model


def _pretrained(init_from, dropout, attn_implementation: str, config_kwargs: dict, verbose: bool):
    """get_model(init_from=...): a pretrained GPT-2 from a folder or the Hub, with dropout and config_kwargs on top."""
    import quiet_imports  # noqa: F401, I001  (first: transformers imports torchao, whose import-time warnings it hides)
    from transformers import GPT2LMHeadModel

    check_shape(dropout=dropout)
    overrides = dict(config_kwargs)
    if dropout is not None:
        overrides.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    advice = ("Pass a folder saved with save_pretrained (it holds config.json and model.safetensors), "
              "or a Hub name such as 'gpt2' (needs the network the first time, or HF_HUB_OFFLINE=0).")
    try:
        if (Path(init_from) / "config.json").is_file():
            model = load_folder(GPT2LMHeadModel, init_from, config_overrides=overrides, attn_implementation=attn_implementation)
        else:  # a Hub name, or a folder that is not a model (its OSError is explained below)
            model = GPT2LMHeadModel.from_pretrained(str(init_from), attn_implementation=attn_implementation, **overrides)
    except (OSError, ModelError) as e:
        where = "folder" if Path(init_from).exists() else "folder or Hub model name"
        raise ModelError(f"Could not load a model from init_from={str(init_from)!r} ({where}): {e}\n{advice}") from None
    if verbose:
        print(f"Loaded pretrained weights from {init_from}")
    return model


def _from_scratch(n_embd, n_layer, n_head, vocab_size, preset, n_positions, dropout, attn_implementation, bos_token_id,
                  eos_token_id, config_kwargs: dict):
    """get_model() without init_from: a new GPT-2 of the preset's or the given shape."""
    import quiet_imports  # noqa: F401, I001
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset is not None:
        if preset not in PRESETS:
            raise ModelError(f"Unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        n_layer, n_head, n_embd = (PRESETS[preset][k] for k in ("n_layer", "n_head", "n_embd"))
    check_shape(n_embd, n_layer, n_head, n_positions, dropout)
    p = 0.1 if dropout is None else dropout
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        **{"activation_function": "gelu_pytorch_tanh", **config_kwargs},  # GPT-2's tanh GELU as one fused op
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)


# oneDNN ISAs (ONEDNN_MAX_CPU_ISA) that include its native bf16 GEMM kernels (AVX512-BF16 and AMX and later).
_ONEDNN_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


def native_bf16_cpu() -> bool:
    """True when this CPU runs bf16 GEMMs natively (AVX512-BF16 or AMX) and torch uses them: the flags in
    /proc/cpuinfo, torch's own kernels at AVX512, and oneDNN (which runs torch's bf16 matmuls) not capped below
    its bf16 kernels (read from public APIs and /proc, without a trial GEMM).

    ATEN_CPU_CAPABILITY=avx2 turns it off, standing for an AVX2-only CPU (the tests use it so): oneDNN ignores
    that variable and would still run AMX, but on a real AVX2 CPU bf16 is emulated. ONEDNN_MAX_CPU_ISA=AVX2
    (or AVX512_CORE) does cap oneDNN: bf16 is then emulated, 5x slower than fp32 for the LM head's GEMM."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not torch.backends.mkldnn.is_available():
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in _ONEDNN_BF16_ISAS:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class _LMHeadLoss(torch.autograd.Function):
    """Cross-entropy of logits = hidden @ weight.T, computed a cache-sized vocabulary chunk at a time.

    The loss is the last node of the graph, so its gradients are formed here, in the forward pass,
    while each chunk's probabilities are at hand; backward only scales them. Nothing of size
    tokens x vocabulary outlives the call, and the chunks' exponentials are taken once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator, chunk_size, need_grad, gemm_dtype):
        valid = labels != -100
        safe = torch.where(valid, labels, 0)
        starts = range(0, weight.shape[0], chunk_size)
        # The GEMMs' operands: fp32, or bf16 copies made once per call (not per chunk). A bf16 matmul
        # accumulates in fp32 on CPU (its result is the fp32 product rounded once); all else stays fp32.
        low = gemm_dtype != hidden.dtype
        h_gemm = hidden.to(gemm_dtype) if low else hidden
        w_gemm = weight.to(gemm_dtype) if low else weight
        chunks, maxima, sums = [], [], []
        for i in starts:
            z = h_gemm @ w_gemm[i:i + chunk_size].t()
            m = z.amax(1).float()
            # exp(logit - chunk max): no overflow, rescaled below. In fp32: the subtraction widens a bf16 chunk
            # (one pass instead of a separate conversion).
            z = (z - m[:, None] if low else z.sub_(m[:, None])).exp_()
            sums.append(z.sum(1))
            chunks.append(z.to(gemm_dtype) if low else z), maxima.append(m)  # values in [0, 1]: bf16 keeps 3 digits
        maxima, sums = torch.stack(maxima), torch.stack(sums)  # [chunks, tokens]
        top = maxima.amax(0)
        logsumexp = top + (sums * torch.exp(maxima - top)).sum(0).log()
        target_logit = (hidden * weight[safe]).sum(1)
        loss = torch.where(valid, logsumexp - target_logit, 0.0).sum() / denominator
        if need_grad:
            # d loss / d logits = (softmax - onehot) * scale; softmax = chunk * exp(chunk max - logsumexp).
            scale = valid.to(hidden.dtype) / denominator
            row_scale = torch.exp(maxima - logsumexp) * scale  # [chunks, tokens]
            grad_hidden = (weight[safe] * -scale[:, None])  # the onehot part, for every chunk at once
            # bf16: the GEMMs write a bf16 table, widened once at the end (faster than widening each chunk).
            grad_weight = torch.empty_like(w_gemm)
            for j, i in enumerate(starts):
                r = row_scale[j][:, None]
                grad_hidden.addcmul_(chunks[j] @ w_gemm[i:i + chunk_size], r)
                # r scales the tokens' rows, in fp32 before any rounding to bf16
                torch.mm(chunks[j].t(), (hidden * r).to(gemm_dtype), out=grad_weight[i:i + chunk_size])
            grad_weight = grad_weight.to(weight.dtype)
            grad_weight.index_add_(0, safe, hidden * -scale[:, None])
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled on the device whatever grad_loss is (1.0 unless accumulating or loss scaling): reading it on the
        # host would make a GPU's queue drain at every step.
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None, None, None


class _TokenChunkedLMHeadLoss(torch.autograd.Function):
    """The same loss and gradients as _LMHeadLoss, a chunk of tokens at a time with the whole vocabulary: for GPUs,
    where the GEMMs want every vocabulary row at once and caches do not decide. One chunk's logits exist at a time
    (widened to fp32 for the softmax; under torch.compile the widening fuses into the softmax's kernels), and the
    gradients are formed in the forward pass, so backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator, chunk_size, need_grad, gemm_dtype):
        w_gemm = weight.to(gemm_dtype)
        total = hidden.new_zeros(())
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight) if need_grad else None
        for i in range(0, hidden.shape[0], chunk_size):
            h = hidden[i:i + chunk_size].to(gemm_dtype)
            target = labels[i:i + chunk_size]
            logits = (h @ w_gemm.t()).float()  # a bf16 GEMM accumulates in fp32 and rounds its result once
            logsumexp = torch.logsumexp(logits, dim=1)
            valid = target != -100
            safe = torch.where(valid, target, 0)
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            total = total + torch.where(valid, logsumexp - target_logit, 0.0).sum()
            if need_grad:
                # d loss / d logits = (softmax - onehot) * scale, in fp32 before rounding to the GEMMs' dtype
                scale = valid.float() / denominator
                grad = (logits - logsumexp[:, None]).exp_().mul_(scale[:, None])
                grad.scatter_add_(1, safe[:, None], -scale[:, None])
                grad = grad.to(gemm_dtype)
                grad_hidden[i:i + chunk_size] = (grad @ w_gemm).float()
                grad_weight += (grad.t() @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        return total / denominator

    backward = staticmethod(_LMHeadLoss.backward)


# Tokens per chunk of the GPU loss: a chunk's fp32 logits (2048 x 50304 x 4 bytes = 412 MB for GPT-2) stay a small
# part of a GPU's memory, while each chunk's GEMMs still fill the card.
GPU_LOSS_CHUNK_TOKENS = 2048


def lm_head_loss(hidden, weight, labels, num_items_in_batch=None, chunk_size: int | None = None, gemm_dtype=torch.float32,
                 by_tokens: bool | None = None):
    """GPT2LMHeadModel's training loss from the final hidden states, without materializing the logits.

    hidden: [batch, seq, n_embd] (the output of model.transformer); weight: model.lm_head.weight;
    labels: [batch, seq], shifted inside as the model does, -100 ignored. Returns the mean over the
    predicted tokens, or their sum / num_items_in_batch (the Trainer's normalization under gradient
    accumulation), equal to the model's own loss and gradients up to float rounding (tested). Computed in fp32;
    gemm_dtype=torch.bfloat16 runs its three GEMMs (logits, and the gradients of hidden and weight) on bf16
    copies of their operands with fp32 accumulation, the softmax and logsumexp still in fp32: on GPUs, and on
    CPUs with native bf16 (native_bf16_cpu()). Nothing on the host reads a tensor: no synchronisation with a GPU.

    On a CPU the vocabulary is cut into chunks of `chunk_size` rows (default 1024), each chunk's logits staying in
    cache while they are used: on a 2-core AVX2 CPU 1.5x faster than logits followed by cross_entropy for 256
    tokens and 1.8x for 2048; on a 2-core AMX Xeon the bf16 GEMMs ran the whole loss forward and backward 1.7x
    faster than fp32 for 256 tokens. torch's own F.linear_cross_entropy (its chunked path) takes 4x to 66x as long
    as this on that CPU (bench/loss_bench.py: fp32 and bf16, 256 and 2048 tokens), so this stays. On a GPU the tokens are cut into
    chunks of `chunk_size` (default GPU_LOSS_CHUNK_TOKENS) with the whole vocabulary each; by_tokens chooses
    either way on any device (None: by the device).
    """
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
    denominator = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    denominator = torch.as_tensor(denominator, device=hidden.device).clamp(min=1).float()
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    by_tokens = hidden.device.type != "cpu" if by_tokens is None else by_tokens
    loss = _TokenChunkedLMHeadLoss if by_tokens else _LMHeadLoss
    chunk_size = chunk_size or (GPU_LOSS_CHUNK_TOKENS if by_tokens else 1024)
    with torch.autocast(hidden.device.type, enabled=False):
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        return loss.apply(flat, weight.float(), labels, denominator, chunk_size, need_grad, gemm_dtype)


class FusedCausalLMLoss:
    """GPT-2's training loss by lm_head_loss from the final hidden states, installed as the model's own loss.

    Once installed, model(input_ids=..., labels=..., logits_to_keep=NO_LOGITS) returns this loss and computes
    logits for no position, so the loss runs inside the model's forward: torch.compile compiles it with the
    model, DDP's gradient sync and the Trainer's loss scaling and accumulation stay as they are. A forward hook
    on model.transformer hands over the hidden states. Call remove() after training: the model is plain
    Hugging Face again.

    With a tied embedding in a single process on a CPU, the embedding's gradient is made sparse: the loss
    already forms the table's dense gradient, and the looked-up rows are added into it, instead of a second
    dense table of zeros (DDP expects the layout it saw when wrapping, and torch.compile on a GPU traces dense
    gradients, so not there). gemm_dtype: lm_head_loss's (bf16 on GPUs and where native_bf16_cpu())."""

    def __init__(self, model, sparse_embedding: bool = True, gemm_dtype=torch.float32):
        self.model, self.hidden, self.gemm_dtype = model, None, gemm_dtype
        self.hook = model.transformer.register_forward_hook(self._keep)
        model.loss_function = self  # transformers' PreTrainedModel.loss_function setter: the model calls it with labels
        wte = model.transformer.wte
        self.sparse_embedding = sparse_embedding and wte.weight is model.lm_head.weight and not wte.sparse
        if self.sparse_embedding:
            wte.sparse = True

    def _keep(self, module, args, output):
        self.hidden = output.last_hidden_state

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, **kwargs):
        hidden, self.hidden = self.hidden, None
        return lm_head_loss(hidden, self.model.lm_head.weight, labels, num_items_in_batch, gemm_dtype=self.gemm_dtype)

    def remove(self):
        self.hook.remove()
        del self.model._loss_function  # back to transformers' ForCausalLM loss
        if self.sparse_embedding:
            self.model.transformer.wte.sparse = False


def no_logits(device) -> torch.Tensor:
    """logits_to_keep for a forward whose loss comes from FusedCausalLMLoss: logits for no position."""
    return torch.empty(0, dtype=torch.long, device=device)


# SDPA's causal kernel with no mask: transformers builds no mask (and checks nothing) for an attention function that
# has no mask function registered beside it (masking_utils: "custom attention without equivalent mask creation").
BLOCK_ATTENTION = "sdpa_causal_blocks"


@contextlib.contextmanager
def whole_blocks(model):
    """Within: the model trains on whole, unpadded blocks, as train.py's are. Attention is SDPA's causal kernel without
    a mask, and transformers' per-forward checks of the input for padding and for packed sequences are skipped: each
    reads a tensor on the host, which on a GPU makes the CPU wait for the queue to drain, every step. The same
    numbers as the model's sdpa attention on such blocks (tested); padded batches (generation) need the masks, so
    this is for training steps only."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(BLOCK_ATTENTION, sdpa_attention_forward)  # idempotent: one entry in a dict
    config, inner = model.config, model.transformer
    swap = config._attn_implementation == "sdpa"
    if swap:
        config._attn_implementation = BLOCK_ATTENTION
    inner.warn_if_padding_and_no_attention_mask = _unpadded
    try:
        yield model
    finally:
        del inner.warn_if_padding_and_no_attention_mask
        if swap:
            config._attn_implementation = "sdpa"


def _unpadded(input_ids, attention_mask):
    """whole_blocks' stand-in for transformers' padding check: a block holds no padding."""
