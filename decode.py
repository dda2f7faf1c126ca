"""The fast decode path under generate.py: a KV-cache GPT-2 forward over a model's own weights.

For the small models this toolkit trains, a CPU decode step is fixed costs, not transformer math, so
`FastGPT2` runs functional ops over the layers' tensors with a preallocated KV cache, and computes the
50257-wide LM head only for the positions sampled from. On CPU it
  - finds the top-k (and greedy) tokens through an int8 screen of the LM head with a proven error
    bound, then computes exact fp32 logits for the few survivors (`FastGPT2.top_logits`),
  - keeps a (hidden, vocab) copy of the tied LM-head weight: in fp32 that layout runs 2-3x faster
    than nn.Linear's, exactly. The head computes in the model's own dtype: an fp32 model samples
    exactly what its fp32 forward gives, on every CPU. `lm_head_dtype=torch.bfloat16` is the
    approximate opt-in (generate.py's `--lm_head_dtype bf16`),
  - runs quantize.py's int8/int4 models through PyTorch's weight-only kernels (`_quantized_projection`).

The LM head has only the tokenizer's rows (`n_tokens`): a vocabulary padded beyond the tokenizer
(train.py pads to a multiple of 64) is never sampled from, and its rows are never computed.

`unsupported(model)` names what this forward does not implement; generate.py then samples with
`model.generate` instead, so nothing else is ever computed silently. tests/test_decode.py checks the
per-step logits against the Hugging Face forward on random GPT-2 configs.

`Steps` runs one batch's decode steps. On CUDA each step is one replay of a captured CUDA graph over
a static KV cache (`static_hidden`: fixed shapes, the cache written at a position held in a tensor,
attention over the whole cache under a "may attend" mask), because a small model's decode step on a
GPU is bound by its ~100 kernel launches, not by memory or arithmetic. Elsewhere, or where capture
fails (said once, with the reason), the steps run eagerly. tests/test_decode.py proves the static
step equals the eager one on CPU; only the capture itself is CUDA-only.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import quantize


def unsupported(model) -> str | None:
    """Why `FastGPT2` cannot run `model` exactly as its Hugging Face forward does, or None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "gpt2" or not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        return f"it is not a GPT-2 language model (model_type {getattr(cfg, 'model_type', None)!r})"
    if getattr(cfg, "add_cross_attention", False):
        return "it has cross-attention layers"
    if getattr(model, "quantization", None):
        return None
    if getattr(cfg, "reorder_and_upcast_attn", False) and model.transformer.wpe.weight.dtype != torch.float32:
        return "reorder_and_upcast_attn upcasts attention to fp32 in a half-precision model"
    for block in model.transformer.h:
        for proj in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            if type(proj).__name__ != "Conv1D":  # GPT-2's layout: x @ W + b with W stored (in, out)
                return f"its projections are {type(proj).__name__}, not GPT-2's Conv1D"
    return None


@dataclass
class _Layer:
    """One transformer block as plain tensors and callables: projections map (rows, in) -> (rows, out)."""

    ln_1: tuple  # (weight, bias, eps) for F.layer_norm
    qkv: Callable
    attn_out: Callable
    ln_2: tuple
    fc: Callable
    act: Callable
    mlp_out: Callable


def _conv1d(module) -> Callable:
    w, b = module.weight, module.bias
    return lambda x: torch.addmm(b, x, w)


class FastGPT2:
    """Inference-only GPT-2 forward over an HF GPT2LMHeadModel's own modules and weights.

    Differences from `model(...)`: a preallocated KV cache (no cache objects or mask factories per
    step), dropout never applied (sampling is inference even if the model is in train mode), and an
    LM head that only runs on the positions that are sampled from. `lm_head_dtype` forces the LM
    head's precision and `screen=False` turns the int8 screen off (for tests and benchmarks).
    `n_tokens` (the tokenizer's length; default the model's vocabulary) keeps the LM head's first
    n_tokens rows: logits, top-k and greedy picks cover only ids the tokenizer has.
    """

    def __init__(self, model, lm_head_dtype: torch.dtype | None = None, screen: bool = True, n_tokens: int | None = None):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"the fast decode path cannot run this model: {reason}")
        cfg = model.config
        self.model = model
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.n_positions = cfg.n_positions
        rows = model.lm_head.weight.shape[0]
        if n_tokens is not None and not 1 <= n_tokens <= rows:
            raise ValueError(f"n_tokens={n_tokens} must be from 1 to the model's {rows} vocabulary rows")
        self.vocab = rows if n_tokens is None else n_tokens  # the ids this forward can produce: 0 .. vocab - 1
        self.scales = []
        for i in range(cfg.n_layer):
            s = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            self.scales.append(s / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else s)
        self.quantized = bool(getattr(model, "quantization", None))
        self.cuda_graphs = True  # on CUDA, decode steps replay captured graphs (`Steps`); False runs them eagerly
        self.graph_problem = None  # why capture failed, once it has
        self._graphs: OrderedDict = OrderedDict()  # (batch, columns) -> _Graph, the few most recent
        # Direct functional calls over the layers' tensors: a decode step is ~60 tiny ops, and
        # nn.Module dispatch plus HF's 6-op NewGELU cost as much as the arithmetic (measured).
        gelu = _functional_gelu(cfg.activation_function)
        project = _quantized_projection if self.quantized else _conv1d
        self.layers = [
            _Layer(
                (b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), project(b.attn.c_attn), project(b.attn.c_proj),
                (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps), project(b.mlp.c_fc), gelu or b.mlp.act, project(b.mlp.c_proj),
            )
            for b in model.transformer.h
        ]
        self.exact_rows = self.approx_logits = None
        w = model.lm_head.weight
        if self.quantized:  # the LM head runs the library's F.linear and the int8 kernel's screen
            self.weight_key = id(w)
            self.lm_head_dtype, self.transposed, self.lm_head = torch.float32, False, None
            self.screen, self.exact_rows, self.approx_logits = _quantized_lm_head(model, self.vocab)
            return
        self.weight_key = (w.data_ptr(), w._version)
        self.lm_head_dtype = lm_head_dtype or w.dtype  # exact unless asked otherwise
        with torch.no_grad():
            w = w[: self.vocab]  # the tokenizer's rows (a view): padding rows are never computed
            weight = w.detach().to(self.lm_head_dtype)
            # fp32 on CPU: x @ W^T with W^T stored (hidden, vocab) is 2-3x faster than nn.Linear's
            # (vocab, hidden) layout. bf16 is the other way round (40 ms vs 4 ms measured).
            self.transposed = w.device.type == "cpu" and self.lm_head_dtype == torch.float32
            self.lm_head = weight.t().contiguous() if self.transposed else weight
            self.screen = _int8_screen(w) if self.transposed and screen else None

    def is_stale(self, model) -> bool:
        w = model.lm_head.weight
        if self.quantized:
            return id(w) != self.weight_key
        return (w.data_ptr(), w._version) != self.weight_key  # weights were trained or moved since

    def new_cache(self, batch: int, length: int, zeros: bool = False):
        """(keys, values), each (layers, batch, heads, length, head_dim). `zeros` for a cache read beyond what
        was written (`static_hidden`): masked columns weigh 0, but 0 x NaN from uninitialised memory is NaN."""
        tr = self.model.transformer
        p = tr.wpe.weight
        shape = (len(tr.h), batch, self.n_head, length, self.head_dim)
        new = torch.zeros if zeros else torch.empty
        return new(shape, dtype=p.dtype, device=p.device), new(shape, dtype=p.dtype, device=p.device)

    def hidden(self, ids, pos, cache, start: int, mask=None):
        """Final hidden states (after ln_f) of `ids` (B, T) at positions `pos`, written into `cache` at `start`.

        `mask` is a bool (B, 1, T, start+T) "may attend" tensor, or None for an unpadded batch.
        """
        tr = self.model.transformer
        B, T = ids.shape
        end = start + T
        if mask is None and T > 1 and start > 0:
            raise ValueError("multi-token steps after the first need an explicit mask")
        causal = mask is None and T > 1
        x = tr.wte(ids) + tr.wpe(pos)
        C = x.shape[-1]
        k_cache, v_cache = cache
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(F.layer_norm(x, (C,), *layer.ln_1).view(B * T, C)).view(B, T, 3, self.n_head, self.head_dim)
            k_cache[i, :, :, start:end] = qkv[:, :, 1].transpose(1, 2)
            v_cache[i, :, :, start:end] = qkv[:, :, 2].transpose(1, 2)
            y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), k_cache[i, :, :, :end], v_cache[i, :, :, :end],
                                               attn_mask=mask, is_causal=causal, scale=self.scales[i])
            x = x + layer.attn_out(y.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
            x = x + layer.mlp_out(layer.act(layer.fc(F.layer_norm(x, (C,), *layer.ln_2).view(B * T, C)))).view(B, T, C)
        return tr.ln_f(x)

    def static_hidden(self, ids, pos, cache, at, valid):
        """`hidden` for one decode step with fixed shapes, as a CUDA graph needs: `ids`, `pos` (B, 1), the
        position to write `at` a (1,) long tensor, `valid` (B, T) bool "may attend", True up to `at`.

        Attention covers the whole cache (T columns) under the mask, so nothing depends on `at` but
        tensor values: one captured graph serves every step of a batch.
        """
        tr = self.model.transformer
        B = ids.shape[0]
        x = tr.wte(ids) + tr.wpe(pos)
        C = x.shape[-1]
        k_cache, v_cache = cache
        mask = valid[:, None, None, :]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(F.layer_norm(x, (C,), *layer.ln_1).view(B, C)).view(B, 1, 3, self.n_head, self.head_dim)
            k_cache[i].index_copy_(2, at, qkv[:, :, 1].transpose(1, 2))
            v_cache[i].index_copy_(2, at, qkv[:, :, 2].transpose(1, 2))
            y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), k_cache[i], v_cache[i], attn_mask=mask, scale=self.scales[i])
            x = x + layer.attn_out(y.transpose(1, 2).reshape(B, C)).view(B, 1, C)
            x = x + layer.mlp_out(layer.act(layer.fc(F.layer_norm(x, (C,), *layer.ln_2).view(B, C)))).view(B, 1, C)
        return tr.ln_f(x)[:, -1]

    def steps(self, valid, padded: bool, mode: str | None = None) -> "Steps":
        """The decode steps of one batch (see `Steps`)."""
        return Steps(self, valid, padded, mode)

    def logits(self, h):
        """Float32 logits of hidden states `h` (N, hidden)."""
        if self.quantized:  # the library's F.linear: fp32 activations, exact for the quantized weights
            return F.linear(h.float(), self.model.lm_head.weight)[:, : self.vocab].float()
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


class Steps:
    """The decode steps of one left-padded batch over `fast`: `prefill` the prompts, then `step` once per new token.

    `valid` (B, T) marks real tokens (T: the prompt width plus the new tokens); `padded` says whether any
    prompt is padded (else no mask is needed). `mode`: "graph" (the default on CUDA) replays a captured
    CUDA graph of `FastGPT2.static_hidden` over a static cache, "static" runs that same step eagerly
    (how tests prove it on CPU), "eager" (elsewhere) runs `FastGPT2.hidden` on a cache sized to the batch.
    """

    def __init__(self, fast: FastGPT2, valid, padded: bool, mode: str | None = None):
        self.fast, self.padded, self.graph = fast, padded, None
        B, T = valid.shape
        if mode is None:
            mode = "graph" if valid.device.type == "cuda" and fast.cuda_graphs and not fast.quantized else "eager"
        if mode == "graph":
            self.graph = _graph(fast, B, T, valid.device)
            mode = "graph" if self.graph is not None else "eager"
        self.mode = mode
        if self.graph is not None:
            self.cache, self.valid = self.graph.cache, self.graph.valid
            self.valid.zero_()
            self.valid[:, :T] = valid
        else:
            self.cache, self.valid = fast.new_cache(B, T, zeros=mode == "static"), valid

    def prefill(self, ids, pos, mask):
        """Final hidden states (B, hidden) at the prompts' last positions."""
        return self.fast.hidden(ids, pos, self.cache, 0, mask)[:, -1]

    def step(self, tokens, pos, at: int):
        """Final hidden states (B, hidden) after `tokens` (B,) at positions `pos` (B,), written to column `at`."""
        if self.padded or self.mode != "eager":  # an unpadded eager batch needs no mask
            self.valid[:, at] = True
        if self.graph is not None:
            return self.graph.run(tokens, pos, at)
        if self.mode == "static":
            return self.fast.static_hidden(tokens[:, None], pos[:, None], self.cache, torch.tensor([at], device=tokens.device), self.valid)
        mask = self.valid[:, None, None, : at + 1] if self.padded else None
        return self.fast.hidden(tokens[:, None], pos[:, None], self.cache, at, mask)[:, -1]

    @property
    def can_keep(self) -> bool:
        return self.graph is None  # a graph's shapes are fixed: its rows stay, and no row joins

    def keep(self, rows) -> int:
        """Drop every batch row but `rows` (a long tensor, in order), so that ended rows cost no more steps, and the
        leading columns none of them uses; returns how many columns were dropped (column c is now c - that)."""
        valid = self.valid.index_select(0, rows)
        used = valid.any(0)
        first = int(used.int().argmax()) if bool(used.any()) else 0
        self.valid = valid[:, first:]
        self.cache = tuple(c.index_select(1, rows)[:, :, :, first:] for c in self.cache)
        return first

    def join(self, ids, pos, mask, valid, end: int, columns: int):
        """New rows at the end of the batch: prompts `ids` (B2, P2), with the `pos`, `mask` and `valid` of
        `sampling.left_padded`, prefilled into columns [end - P2, end) (P2 <= end), the cache grown to at least
        `columns` columns. Returns their final hidden states (B2, hidden)."""
        B2, P2 = ids.shape
        part = self.fast.new_cache(B2, P2)
        h = self.fast.hidden(ids, pos, part, 0, mask)[:, -1]
        if not self.padded:  # unpadded eager steps keep no mask: every column so far is a real token
            self.valid[:, :end] = True
        B, T = self.valid.shape
        width = max(T, columns)
        grown = []
        for old, new in zip(self.cache, part):
            # zeros: the new rows' columns before their prompt are masked, and 0 x NaN from fresh memory is NaN
            c = old.new_zeros(old.shape[0], B + B2, old.shape[2], width, old.shape[4])
            c[:, :B, :, :T] = old
            c[:, B:, :, end - P2 : end] = new
            grown.append(c)
        v = self.valid.new_zeros(B + B2, width)
        v[:B, :T] = self.valid
        v[B:, end - P2 : end] = valid[:, :P2]
        self.cache, self.valid, self.padded = tuple(grown), v, True
        return h

    def close(self):
        if self.graph is not None:
            self.graph.lock.release()
            self.graph = None


class _Graph:
    """One captured decode step for `batch` rows over a static cache of `columns` positions."""

    def __init__(self, fast: FastGPT2, batch: int, columns: int, device):
        self.lock = threading.Lock()  # one batch at a time replays it: its buffers are the batch's state
        self.cache = fast.new_cache(batch, columns, zeros=True)
        self.valid = torch.zeros(batch, columns, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)
        self.step = lambda: fast.static_hidden(self.tokens, self.pos, self.cache, self.at, self.valid)
        self._capture(device)

    def _capture(self, device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up (kernel selection, workspaces) outside the capture
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step()

    def _replay(self):
        self.graph.replay()
        return self.out

    def run(self, tokens, pos, at: int):
        self.tokens.copy_(tokens[:, None])
        self.pos.copy_(pos[:, None])
        self.at.fill_(at)
        return self._replay()


def _graph(fast: FastGPT2, batch: int, columns: int, device) -> "_Graph | None":
    """A free captured step for `batch` rows and at least `columns` positions (taken: release its lock), or None
    where capture is not possible here (said once) or every fitting graph is in use by another thread."""
    if fast.graph_problem is not None:
        return None
    columns = min(-(-columns // 128) * 128, fast.n_positions)  # a few sizes serve every length
    key = (batch, columns)
    graph = fast._graphs.get(key)
    if graph is None:
        try:
            graph = _Graph(fast, batch, columns, device)
        except Exception as e:  # noqa: BLE001  (any failure to capture means: run eagerly)
            fast.graph_problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"CUDA graph capture failed ({fast.graph_problem}): decoding step by step, which is slower.", stacklevel=4)
            return None
        fast._graphs[key] = graph
        while len(fast._graphs) > 4:  # each holds a KV cache: keep the most recent few
            fast._graphs.popitem(last=False)
    fast._graphs.move_to_end(key)
    return graph if graph.lock.acquire(blocking=False) else None


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


def _quantized_projection(lin) -> Callable:
    """x (rows, in) fp32 -> x @ W^T + b (fp32) for a quantize.py projection, via PyTorch's CPU kernels.

    Activations go in as bf16: the weight-only kernels are ~10x slower with fp32 activations on CPUs
    without native bf16 (measured), and the output is converted back to fp32. Where the int8 kernel
    failed its self-test (`quantize.kernel_ok`), torchao's own F.linear (plain torch.mm) runs.
    """
    w, b = lin.weight, lin.bias
    bias = (lambda y: y.float()) if b is None else (lambda y: y + b)
    if "zero" not in lin.quant_plain:  # int8
        if not quantize.kernel_ok("int8"):
            return lambda x: F.linear(x, w, b)
        q, s = quantize.aligned(w.qdata), quantize.aligned(lin.quant_plain["scale"].bfloat16())
        return lambda x: bias(quantize.int8_mm(x, q, s))
    packed, g, n = quantize.aligned(w.qdata), w.block_size[1], w.shape[0]
    sz = quantize.aligned(w.scale_and_zero.bfloat16())
    if n % 16:  # padded rows (the LM head)
        return lambda x: bias(quantize.int4_mm(x, packed, g, sz)[:, :n].float())
    return lambda x: bias(quantize.int4_mm(x, packed, g, sz))


def _quantized_lm_head(model, n_tokens: int):
    """(screen, exact_rows, approx_logits) for `top_logits` on a quantized LM head, over its first n_tokens rows.

    int8: screen = (int8 weight, bf16-exact scales, zero weight-rounding error) for `quantize.int8_mm`
    (None where the kernel failed its self-test), exact_rows(ids) -> the fp32 rows the quantized
    model computes with. int4: no proven screen; approx_logits(h) -> fp32 logits from the int4 kernel.
    """
    lin = model.lm_head
    plain, mode, g = lin.quant_plain, model.quantization["mode"], model.quantization["group_size"]

    def exact_rows(ids):
        return quantize.dequantize_rows(plain, mode, g, ids)

    if mode == "int8":
        scale = plain["scale"][:n_tokens].float()
        screen = (quantize.aligned(plain["qdata"][:n_tokens]), scale, torch.zeros_like(scale)) if quantize.kernel_ok("int8") else None
        return screen, exact_rows, None
    project = _quantized_projection(lin)
    return None, exact_rows, (project if n_tokens == lin.weight.shape[0] else lambda h: project(h)[:, :n_tokens])


def _functional_gelu(name: str):
    """A one-op equivalent of GPT-2's activation (HF's NewGELU is 6 ops), or None to call the module."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return functools.partial(F.gelu, approximate="tanh")  # same tanh formula, within 3e-7
    if name == "gelu":
        return F.gelu
    return None


_FAST = weakref.WeakKeyDictionary()


def forget_fast_forward(model) -> None:
    """Drop `model`'s cached fast forward and its LM-head copies (train.py samples mid-run, then trains on)."""
    _FAST.pop(model, None)


def fast_forward(model, n_tokens: int | None = None, lm_head_dtype: torch.dtype | None = None) -> FastGPT2:
    """The cached fast forward for `model` over its first `n_tokens` vocabulary rows (the tokenizer's; default all),
    with its LM head in `lm_head_dtype` (default: the model's dtype, exact); rebuilt when any of these changed."""
    fast = _FAST.get(model)
    vocab = model.lm_head.weight.shape[0] if n_tokens is None else n_tokens
    want = lm_head_dtype or model.lm_head.weight.dtype
    if fast is None or fast.is_stale(model) or fast.vocab != vocab or (not fast.quantized and fast.lm_head_dtype != want):
        fast = _FAST[model] = FastGPT2(model, lm_head_dtype, n_tokens=n_tokens)
    return fast


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int | None):
    """Run with `n` intra-op threads on CPU (default 1), restoring the process setting after.

    A decode step is a chain of ~50 tiny ops plus one memory-bound GEMV: splitting them over
    OpenMP threads saves nothing and costs a team sync per op, which turns into scheduler
    waits when the cores are shared (measured 10x slower with 2 threads on a busy 2-core box).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"threads must be an integer >= 0 (0 keeps torch's setting), got {n!r}")
    if torch.device(device).type != "cpu" or n == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
