"""Sample text from a trained GPT-2: the API (`load_model`, `generate`, `generate_once`, `generate_batch`,
`stream`) and the CLI.

    python generate.py --model_path logs/final_model --prompt "To be, or not" --length 100
    python generate.py --help

As a library:

    tokenizer, model, device = load_model("logs/final_model")
    generate_once(tokenizer, model, device, "To be, or not")            # -> str, prompt + completion
    generate_batch(tokenizer, model, device, "Once upon", max_length=60)   # -> [{"generated_text": ...}, ...]

`generate` is the one sampler of the toolkit (the CLI, the web demo, evaluation's continuations and
train.py's samples use it), with HF's semantics: repetition penalty, then temperature, top-k, top-p.
It runs decode.py's fast KV-cache forward over the model's own weights, which is compared with the
Hugging Face forward in tests/test_decode.py; a model that forward does not implement
(`decode.unsupported`) is sampled with `model.generate` instead. bench/generate_bench.py measures it
against the original model.generate / pipeline code. Folders written by quantize.py (int8/int4) load
and sample the same way, on the CPU.
"""

import contextlib
import json
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
import decode
import quantize
from model import check_vocab, folder_tokenizer, load_pretrained

DEFAULT_MODEL_PATH = "logs/final_model"


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


def load_model(model_dir: str | os.PathLike = DEFAULT_MODEL_PATH, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a GPT-2 for generation; returns `(tokenizer, model, device)`.

    `model_dir` is a folder written by train.py (`logs/final_model`), a Trainer `checkpoint-N`
    folder (which has no tokenizer files: the official GPT-2 tokenizer in ./gpt2_tokenizer is used),
    any Hugging Face GPT-2 folder, or a Hub name (`model.load_pretrained`). The device is picked
    automatically (CUDA, MPS, CPU) unless given; the model is in eval mode, in bf16/fp16 on GPUs and
    fp32 on CPU. A folder written by quantize.py (int8/int4, it holds quantization.json) is loaded by
    quantize.load_quantized, on the CPU. Errors: FileNotFoundError, or a ValueError (model.ModelError,
    quantize.QuantizationError) naming the file and what to do.
    """
    path = Path(str(model_dir)).expanduser()
    if quantize.is_quantized_folder(path):
        device = torch.device(device) if device is not None else torch.device("cpu")
        if dtype not in (None, torch.float32):
            raise ValueError(f"{path} is quantized: it computes in float32, not {dtype}.")
        model = quantize.load_quantized(path, device)
        tokenizer = folder_tokenizer(path)
        check_vocab(tokenizer, model, str(path))
        return tokenizer, model, device
    device = pick_device(device)
    tokenizer, model = load_pretrained(model_dir, dtype or default_dtype(device), local_hint=DEFAULT_MODEL_PATH)
    model.to(device).eval()
    return tokenizer, model, device


# ----------------------------------------------------------------------------- sampling


@dataclass
class Completion:
    prompt: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    # The sampled token ids, without EOS (with a stop string: up to the token that completed it).
    completion_ids: list[int] = field(default_factory=list, repr=False)

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


def _encode_prompt(tokenizer, prompt: str | list[int], context: int, max_new_tokens: int, vocab: int) -> list[int]:
    """The prompt's token ids (text is encoded; a list is token ids already), cut to fit the context."""
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate is not text: the tokenizer would fail deep inside
            raise ValueError(f"the prompt holds a lone surrogate ({prompt[e.start]!r} at character {e.start}), which is not "
                             "text: pass valid Unicode (UTF-8)") from None
        # verbose=False: the tokenizer's "longer than the maximum sequence length" notice is moot, we cut below.
        ids = tokenizer.encode(prompt, verbose=False) if prompt else []
    else:
        ids = list(prompt)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"a prompt of token ids must hold integers from 0 to {vocab - 1} (the model's vocabulary)")
    if not ids:  # an empty prompt samples unconditionally, as GPT-2 was trained: after <|endoftext|>
        return [tokenizer.eos_token_id]
    keep = context - max_new_tokens
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
    prompts: str | list[str] | list[list[int]],
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

    `prompts`: a str, or a list of prompts, each a str or a list of token ids. Returns prompt-major
    Completions (a token-id prompt's `prompt` is its decoded text; `completion_ids` are the sampled
    ids). Generation of a row ends at EOS (not included in the text), at the first stop string (cut, not included) or after `max_new_tokens`.
    `temperature=0` is greedy decoding. `seed` makes sampling reproducible without touching the
    global RNG. `on_text(row, text)` is called with each new printable piece of each row.
    `threads`: CPU intra-op threads while sampling (default 1, see `decode.cpu_threads`; 0 leaves
    torch's setting alone).
    """
    with decode.cpu_threads(torch.device(device), threads):
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
    if any(isinstance(p, int) for p in prompts):
        raise ValueError("prompts are a str, or a list of prompts each a str or a list of token ids; got a list of ints: wrap it in a list")
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    context = _context(model)
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens (--length) must be below the model's context of {context} tokens, got {max_new_tokens}")
    device = torch.device(device)
    if decode.unsupported(model):
        return _generate_hf(tokenizer, model, device, prompts, max_new_tokens, top_k, top_p, temperature, repetition_penalty,
                            no_repeat_ngram_size, num_return_sequences, seed, stop, on_text)
    vocab = model.get_input_embeddings().weight.shape[0]
    encoded = [_encode_prompt(tokenizer, p, context, max_new_tokens, vocab) for p in prompts]
    prompts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    rows = [ids for ids in encoded for _ in range(num_return_sequences)]
    penalties = _Penalties(rows, model.lm_head.weight.shape[0], device, repetition_penalty, no_repeat_ngram_size)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new_tokens, finish, texts = _decode_rows(tokenizer, decode.fast_forward(model), device, rows, max_new_tokens, top_k, top_p,
                                             temperature, penalties, generator, stop, on_text)
    out = []
    for b, r in enumerate(rows):
        if texts is not None:
            rest = texts[b].rest()
            if on_text is not None and rest:
                on_text(b, rest)
            completion = texts[b].text
        else:
            completion = tokenizer.decode(new_tokens[b], skip_special_tokens=True)
        out.append(Completion(prompts[b // num_return_sequences], completion, len(r), len(new_tokens[b]), finish[b] or "length",
                              new_tokens[b]))
    return out


def _left_padded(rows: list[list[int]], pad: int, max_new_tokens: int, device):
    """(ids (B, P), valid (B, P + max_new_tokens) "is a real token", positions (B, P), attention mask or None)."""
    B, P = len(rows), max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=device)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        valid[b, P - len(r) : P] = True
    pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    mask = None
    if any(len(r) != P for r in rows):  # causal & not padding; a pad query attends to itself so no softmax row is all -inf
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        mask = ((causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device))[:, None]
    return ids, valid, pos, mask


class _Penalties:
    """HF's repetition penalty and n-gram ban as one adjustment of the logits, `self(z, ids)`, which is
    non-decreasing in z per token, as decode's `top_logits` needs (ids None: all tokens)."""

    def __init__(self, rows, vocab: int, device, repetition_penalty: float, no_repeat_ngram_size: int):
        self.penalty, self.n, self.vocab, self.device = repetition_penalty, no_repeat_ngram_size, vocab, device
        self.seen = self.banned = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
            for b, r in enumerate(rows):
                self.seen[b, r] = True
        self.histories = [list(r) for r in rows] if no_repeat_ngram_size else None

    def start_step(self) -> None:
        if self.histories is not None:
            self.banned = torch.zeros(len(self.histories), self.vocab, dtype=torch.bool, device=self.device)
            for b, hist in enumerate(self.histories):
                self.banned[b, _banned_ngram_tokens(hist, self.n)] = True

    def __call__(self, z, ids):
        if self.seen is not None:  # HF's rule: divide positive logits, multiply negative ones
            penalized = torch.where(z > 0, z / self.penalty, z * self.penalty)
            z = torch.where(self.seen if ids is None else self.seen.gather(1, ids), penalized, z)
        if self.banned is not None:
            z = z.masked_fill(self.banned if ids is None else self.banned.gather(1, ids), float("-inf"))
        return z

    def add(self, row: int, token: int) -> None:
        if self.histories is not None:
            self.histories[row].append(token)

    def end_step(self, tokens) -> None:
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=self.device), tokens] = True


def _decode_rows(tokenizer, fast, device, rows, max_new_tokens, top_k, top_p, temperature, penalties, generator, stop, on_text):
    """The decode loop over one left-padded batch: (new tokens per row, finish reason per row or None,
    the rows' _RowText when stop strings or on_text need the text as it grows, else None)."""
    eos, B = tokenizer.eos_token_id, len(rows)
    ids, valid, pos, mask = _left_padded(rows, eos, max_new_tokens, device)
    P = ids.shape[1]
    texts = [_RowText(tokenizer, stop) for _ in rows] if stop or on_text is not None else None
    finish, new_tokens = [None] * B, [[] for _ in rows]
    cache = fast.new_cache(B, P + max_new_tokens)
    h = fast.hidden(ids, pos, cache, 0, mask)[:, -1]
    next_pos = pos[:, -1] + 1
    k = 1 if temperature == 0 else top_k
    for step in range(max_new_tokens):
        penalties.start_step()
        if 0 < k < fast.vocab:  # the top-k warper only ever looks at the k largest logits
            token = _sample_top(*fast.top_logits(h, k, penalties), top_p, temperature, generator)
        else:
            token = _sample(penalties(fast.logits(h), None), top_k, top_p, temperature, generator)
        for b, t in enumerate(token.tolist()):
            if finish[b] is not None:
                continue
            if t == eos:
                finish[b] = "eos"
                continue
            new_tokens[b].append(t)
            penalties.add(b, t)
            if texts is not None:
                piece = texts[b].add(t)
                if piece and on_text is not None:
                    on_text(b, piece)
                if texts[b].stopped:
                    finish[b] = "stop"
        if all(f is not None for f in finish) or step == max_new_tokens - 1:
            break
        penalties.end_step(token)
        at = P + step
        step_mask = None
        if mask is not None:
            valid[:, at] = True
            step_mask = valid[:, None, None, : at + 1]
        h = fast.hidden(token[:, None], next_pos[:, None], cache, at, step_mask)[:, -1]
        next_pos = next_pos + 1
    return new_tokens, finish, texts


def _context(model) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings


def _generate_hf(tokenizer, model, device, prompts, max_new_tokens, top_k, top_p, temperature, repetition_penalty,
                 no_repeat_ngram_size, num_return_sequences, seed, stop, on_text) -> list[Completion]:
    """`_generate` through `model.generate`, for a model decode.py's forward does not implement
    (`decode.unsupported`): the same sampling settings, prompt handling, stop strings and Completions,
    one prompt at a time, without the fast path's speed."""
    warnings.warn(f"the fast decode path cannot run this model ({decode.unsupported(model)}): sampling with model.generate.",
                  stacklevel=3)
    eos = tokenizer.eos_token_id
    sampling = dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None else contextlib.nullcontext()
    out = []
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for prompt in prompts:
            ids = _encode_prompt(tokenizer, prompt, _context(model), max_new_tokens, model.get_input_embeddings().weight.shape[0])
            prompt = prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt), skip_special_tokens=True)
            inputs = torch.tensor([ids], device=device)
            seqs = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, pad_token_id=eos,
                                  eos_token_id=eos, repetition_penalty=repetition_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_return_sequences, **sampling)
            for seq in seqs[:, len(ids):].tolist():
                row, text, finish, kept = len(out), _RowText(tokenizer, stop), "length", []
                for token in seq:
                    if token == eos:
                        finish = "eos"
                        break
                    kept.append(token)
                    piece = text.add(token)
                    if piece and on_text is not None:
                        on_text(row, piece)
                    if text.stopped:
                        finish = "stop"
                        break
                rest = text.rest()
                if on_text is not None and rest:
                    on_text(row, rest)
                out.append(Completion(prompt, text.text, len(ids), len(kept), finish, kept))
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
        context = _context(model)
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
