"""Sample text from a trained GPT-2: the API (`load_model`, `generate`, `generate_once`, `generate_batch`,
`stream`, and `score`: log-probabilities of given tokens) and the CLI.

    python generate.py --model_path logs/final_model --prompt "To be, or not" --length 100
    python generate.py --help

As a library:

    tokenizer, model, device = load_model("logs/final_model")
    generate_once(tokenizer, model, device, "To be, or not")            # -> str, prompt + completion
    generate_batch(tokenizer, model, device, "Once upon", max_length=60)   # -> [{"generated_text": ...}, ...]

`generate` is the one sampler of the toolkit (the CLI, the web demo, evaluation's continuations and
train.py's samples use it), with HF's semantics: repetition penalty, then temperature, top-k, top-p.
The rules live in sampling.py; it runs decode.py's fast KV-cache forward over the model's own
weights, which is compared with the Hugging Face forward in tests/test_decode.py; a model that
forward does not implement (`decode.unsupported`) is sampled with `model.generate` instead. An fp32 model samples exactly
what its fp32 forward gives (`--lm_head_dtype bf16` is the approximate opt-in; bench/exact_bench.py checks it);
`prepare` + `generate_many` sample several calls in one batch, each with its own settings (engine.py's batches).
bench/generate_bench.py measures it against the original model.generate / pipeline code. Folders written by quantize.py (int8/int4) load
and sample the same way, on the CPU.
"""

import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
import decode
import quantize
from errors import run_main
from model import ModelError, check_finite_weights, check_vocab, first_line, folder_tokenizer, load_pretrained
from sampling import Request, RowsOut, check_sampling_args, decode_rows  # noqa: F401  (check_sampling_args: part of the API)

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


def load_model(model_dir: str | os.PathLike = DEFAULT_MODEL_PATH, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, tokenizer_name: str | None = None):
    """Load a GPT-2 for generation; returns `(tokenizer, model, device)`.

    `model_dir` is a folder written by train.py (`logs/final_model`), a Trainer `checkpoint-N`
    folder (which has no tokenizer files: the official GPT-2 tokenizer in ./gpt2_tokenizer is used),
    any Hugging Face GPT-2 folder, or a Hub name (`model.load_pretrained`). The device is picked
    automatically (CUDA, MPS, CPU) unless given; the model is in eval mode, in bf16/fp16 on GPUs and
    fp32 on CPU. A folder written by quantize.py (int8/int4, it holds quantization.json) is loaded by
    quantize.load_quantized, on the CPU. Errors: FileNotFoundError, or a ValueError (model.ModelError,
    quantize.QuantizationError) naming the file and what to do. `tokenizer_name` (a folder or Hub name) replaces
    the folder's own tokenizer, for a model trained with train_tokenizer.py's tokenizer but saved without it.
    """
    path = Path(str(model_dir)).expanduser()
    if quantize.is_quantized_folder(path):
        device = torch.device(device) if device is not None else torch.device("cpu")
        if dtype not in (None, torch.float32):
            raise quantize.QuantizationError(f"{path} is quantized: it computes in float32, not {dtype}.")
        model = quantize.load_quantized(path, device)
        check_finite_weights(model, str(path))
        tokenizer = folder_tokenizer(path)
    else:
        device = pick_device(device)
        tokenizer, model = load_pretrained(model_dir, dtype or default_dtype(device), local_hint=DEFAULT_MODEL_PATH)
        model.to(device).eval()
    if tokenizer_name:
        tokenizer = _named_tokenizer(tokenizer_name, str(model_dir))
        check_vocab(tokenizer, model, f"{model_dir} with the tokenizer {tokenizer_name}")
    elif quantize.is_quantized_folder(path):
        check_vocab(tokenizer, model, str(path))  # load_pretrained checks its own
    return tokenizer, model, device


def _named_tokenizer(tokenizer_name: str, model_name: str):
    from gpt2_tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer_name)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer {tokenizer_name!r} for {model_name}: {first_line(e)}") from None


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
    # The prompt's token ids as the model saw them ([EOS] for an empty prompt).
    prompt_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        return self.prompt + self.completion


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
            raise ValueError(f"a prompt of token ids must hold integers from 0 to {vocab - 1} (the tokenizer's vocabulary)")
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


LM_HEAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_lm_head_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """`--lm_head_dtype` as a dtype: None (the model's own: exact), "fp32", or "bf16" (approximate: faster on some
    CPUs, but greedy text can differ from the fp32 model's after a few tokens)."""
    if name is None or isinstance(name, torch.dtype) and name in LM_HEAD_DTYPES.values():
        return name
    if isinstance(name, str) and name.lower() in LM_HEAD_DTYPES:
        return LM_HEAD_DTYPES[name.lower()]
    raise ValueError(f"lm_head_dtype must be one of {', '.join(LM_HEAD_DTYPES)} (or unset: the model's own dtype), got {name!r}")


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
    lm_head_dtype: str | torch.dtype | None = None,
) -> list[Completion]:
    """Sample `num_return_sequences` completions for each prompt, in one left-padded batch.

    `prompts`: a str, or a list of prompts, each a str or a list of token ids. Returns prompt-major
    Completions (a token-id prompt's `prompt` is its decoded text; `completion_ids` are the sampled
    ids). Generation of a row ends at EOS (not included in the text), at the first stop string (cut, not included) or after `max_new_tokens`.
    `temperature=0` is greedy decoding. `seed` makes sampling reproducible without touching the
    global RNG. `on_text(row, text)` is called with each new printable piece of each row.
    `threads`: CPU intra-op threads while sampling (default 1, see `decode.cpu_threads`; 0 leaves
    torch's setting alone). `lm_head_dtype`: see `parse_lm_head_dtype` (default: exact).
    """
    job = prepare(tokenizer, model, device, prompts, max_new_tokens, top_k, top_p, temperature, repetition_penalty,
                  no_repeat_ngram_size, num_return_sequences, seed, stop, on_text)
    return generate_many(tokenizer, model, device, [job], threads, lm_head_dtype)[0]


@dataclass
class Prepared:
    """One `generate` call, checked and tokenized: the rows and settings `sampling.decode_rows` samples, alone
    or in one batch with other calls' (`generate_many`, engine.py's batches)."""

    prompts: list[str]  # as the Completions show them (a token-id prompt decoded)
    num_return_sequences: int
    request: Request  # rows: each prompt's ids, num_return_sequences times
    seed: int | None

    def completions(self, out: RowsOut) -> list[Completion]:
        n, rows = self.num_return_sequences, self.request.rows
        return [Completion(self.prompts[b // n], text, len(rows[b]), len(tokens), finish, tokens, list(rows[b]))
                for b, (text, tokens, finish) in enumerate(out.results())]


def prepare(tokenizer, model, device, prompts, max_new_tokens=50, top_k=50, top_p=0.95, temperature=1.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, num_return_sequences=1, seed=None, stop=None, on_text=None) -> Prepared:
    """Check `generate`'s arguments and tokenize its prompts (ValueError naming what is wrong)."""
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
    vocab = _n_tokens(tokenizer, model)
    encoded = [_encode_prompt(tokenizer, p, context, max_new_tokens, vocab) for p in prompts]
    texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    request = Request([ids for ids in encoded for _ in range(num_return_sequences)], max_new_tokens, top_k, top_p, temperature,
                      repetition_penalty, no_repeat_ngram_size, generator, stop, on_text)
    return Prepared(texts, num_return_sequences, request, seed)


def generate_many(tokenizer, model, device, jobs: list[Prepared], threads: int | None = None,
                  lm_head_dtype: str | torch.dtype | None = None, admit=None) -> list[list[Completion]]:
    """The Completions of each prepared call, all sampled in one batch (each with its own settings and seed).

    `admit(columns, rows, room)` -> more `sampling.Request`s to join the running batch (see `sampling.decode_rows`;
    engine.py's waiting requests); their answers go to their own `on_done`.
    """
    dtype = parse_lm_head_dtype(lm_head_dtype)
    device = torch.device(device)
    with decode.cpu_threads(device, threads), torch.inference_mode():
        if decode.unsupported(model):
            outs = [_sample_hf(tokenizer, model, device, job, _n_tokens(tokenizer, model)) for job in jobs]
            for job, out in zip(jobs, outs):
                if job.request.on_done is not None:
                    job.request.on_done(out)
        else:
            fast = decode.fast_forward(model, _n_tokens(tokenizer, model), dtype)
            outs = decode_rows(tokenizer, fast, device, [job.request for job in jobs], admit=admit)
    return [job.completions(out) for job, out in zip(jobs, outs)]


def _n_tokens(tokenizer, model) -> int:
    # The ids the tokenizer has: a vocabulary padded beyond it (train.py's) is never sampled, and prompts stay within it.
    return min(len(tokenizer), model.get_input_embeddings().weight.shape[0])


def _context(model) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings


def _sample_hf(tokenizer, model, device, job: Prepared, n_tokens: int) -> RowsOut:
    """A prepared call sampled by `model.generate`, for a model decode.py's forward does not implement
    (`decode.unsupported`): the same settings, stop strings and seeds, one prompt at a time, without the speed.
    Ids from n_tokens (the tokenizer's length) up, a padded vocabulary's rows, are suppressed before any warper."""
    warnings.warn(f"the fast decode path cannot run this model ({decode.unsupported(model)}): sampling with model.generate.",
                  stacklevel=4)
    r, num_return_sequences = job.request, job.num_return_sequences
    eos = tokenizer.eos_token_id
    out = RowsOut(tokenizer, len(r.rows), r.stop, r.on_text, r.max_new_tokens)
    sampling = dict(do_sample=True, top_k=r.top_k, top_p=r.top_p, temperature=r.temperature) if r.temperature > 0 else dict(do_sample=False)
    n = num_return_sequences if r.temperature > 0 else 1  # greedy sequences are all the same, and HF refuses n > 1 there
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab > n_tokens:
        sampling["suppress_tokens"] = list(range(n_tokens, vocab))
    seed = job.seed
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for i, ids in enumerate(r.rows[::num_return_sequences]):
            inputs = torch.tensor([ids], device=device)
            seqs = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=r.max_new_tokens, pad_token_id=eos,
                                  eos_token_id=eos, repetition_penalty=r.repetition_penalty,
                                  no_repeat_ngram_size=r.no_repeat_ngram_size, num_return_sequences=n, **sampling)
            for j, seq in enumerate(seqs[:, len(ids):].repeat(num_return_sequences // n, 1).tolist()):
                for token in seq:
                    if not out.add(i * num_return_sequences + j, token):
                        break
    return out


@dataclass
class Scored:
    """Log-probabilities of one token sequence under the model (see `score`)."""

    ids: list[int]
    # log p(ids[t] | ids[:t]) for each position; None at position 0, which has no context.
    logprobs: list[float | None]
    # The `top_n` most likely tokens among the tokenizer's ids at each position, as (id, logprob), most
    # likely first; None at position 0.
    top: list[list[tuple[int, float]] | None]


def score(tokenizer, model, device, prompts: str | list[str] | list[list[int]], top_n: int = 0, threads: int | None = None,
          batch_size: int = 8) -> list[Scored]:
    """The model's log-probability of every token of each prompt given the tokens before it, and the
    `top_n` most likely alternatives at each position: a teacher-forced forward, no sampling.

    `prompts`: a str, or a list of prompts, each a str or a list of token ids (an empty one is [EOS],
    as in `generate`). A prompt longer than the model's context is a ValueError (never cut: that would
    change what is scored). Log-probabilities are `log_softmax` in float32 over all the model's output
    rows, as training's loss and perplexity normalize (a vocabulary padded beyond the tokenizer has
    rows no text can hold; a trained model gives them next to no mass); the alternatives are only the
    tokenizer's ids. No temperature or penalty applies. The forward is the model's own (its
    transformer, then its LM head, so int8/int4 models from quantize.py score with their kernels), in
    right-padded batches of `batch_size` with an attention mask. `threads` as in `generate`.
    """
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be an integer >= 0, got {top_n!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if any(isinstance(p, int) for p in prompts):
        raise ValueError("prompts are a str, or a list of prompts each a str or a list of token ids; got a list of ints: wrap it in a list")
    context = _context(model)
    vocab = _n_tokens(tokenizer, model)
    rows = []
    for i, p in enumerate(prompts):
        ids = _encode_prompt(tokenizer, p, 10**9, 0, vocab)  # checked against the context below, never cut
        if len(ids) > context:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the model's context of {context}: shorten it")
        rows.append(ids)
    device = torch.device(device)
    with decode.cpu_threads(device, threads), torch.inference_mode():
        out = []
        for start in range(0, len(rows), batch_size):
            out.extend(_score_batch(model, device, rows[start : start + batch_size], top_n, vocab))
        return out


def _score_batch(model, device, rows: list[list[int]], top_n: int, vocab: int, chunk: int = 256) -> list[Scored]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    base, head = getattr(model, model.base_model_prefix, None), model.get_output_embeddings()
    if base is not None and head is not None:  # GPT2LMHeadModel.forward is exactly head(base(...)[0])
        hidden = base(input_ids=ids, attention_mask=mask)[0]
    else:
        hidden, head = model(input_ids=ids, attention_mask=mask).logits, None
    out = []
    for b, r in enumerate(rows):
        logprobs, top = [None], [None]
        for s in range(0, len(r) - 1, chunk):  # position t predicts token t + 1; chunks bound the (t, V) logits
            e = min(s + chunk, len(r) - 1)
            logits = hidden[b, s:e] if head is None else head(hidden[b, s:e])
            lp = torch.log_softmax(logits.float(), -1)
            logprobs += lp.gather(1, ids[b, s + 1 : e + 1, None]).squeeze(1).tolist()
            if top_n:
                vals, idx = torch.topk(lp[:, :vocab], min(top_n, vocab), dim=-1)
                top += [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
            else:
                top += [[] for _ in range(e - s)]
        out.append(Scored(list(r), logprobs, top))
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
    lm_head_dtype: str | None = field(
        default=None,
        metadata={"choices": list(LM_HEAD_DTYPES), "help": "Precision of the LM head; when unset, the model's own (exact: an fp32 model "
                  "samples what its fp32 forward gives). bf16 is approximate: faster on some CPUs, but greedy text can differ."},
    )


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
    return run_main(lambda: _run(args), report=(ValueError, FileNotFoundError))


def _run(args: GenerateArguments) -> None:
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
        lm_head_dtype=args.lm_head_dtype,
    )
    check_sampling_args(**{k: v for k, v in kwargs.items() if k not in ("seed", "stop", "threads", "lm_head_dtype")})
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


if __name__ == "__main__":
    sys.exit(main())
