"""Evaluate GPT-2 models on any data dataset.py reads.

    python evaluation.py --model_path logs/final_model --dataset_path my_texts/
    python evaluation.py --model_path run_a/final_model run_b/final_model --dataset_name webtext --split test \\
        --num_samples 50 --train_data data/webtext.train.jsonl --output_json eval.json --output_md eval.md
    python evaluation.py --help

What it measures, per model (one row each in the Markdown table, so several models or checkpoints
compare side by side):

  - perplexity with the sliding-window method of https://huggingface.co/docs/transformers/perplexity:
    windows of the model's context, moved by `stride` tokens; each window scores only its new tokens
    (with stride == context the windows do not overlap). Documents are joined with <|endoftext|>, as in
    training, and a start token is put in front so that every token of the text is scored;
  - bits per byte: the total negative log-likelihood in bits over the UTF-8 bytes of the text, which
    compares models with different tokenizers fairly;
  - the generation metrics, only with --num_samples N (default 0: perplexity and bits per byte only):
    the first --prompt_tokens tokens of N documents are the prompt, the next --reference_tokens the
    reference; a continuation of as many tokens is sampled by generate.py's sampler (--temperature,
    --top_k, --top_p, with generate.py's defaults; --seed; or --greedy) and scored with BLEU
    (sacrebleu, corpus level, 0-100) and ROUGE-1/2/L (rouge-score, mean F1, 0-1), plus distinct-1/2,
    the 4-gram repetition rate and the mean length; with
    --train_data, the share of generated 8-grams of token ids that occur verbatim in the training
    data (the copy rate).

With --tasks hellaswag,lambada_openai,... EleutherAI's lm-evaluation-harness (the `lm-eval` library, pinned
in requirements.txt) scores each model on those tasks too, and their scores become columns of the same table
(`hellaswag acc_norm`, `lambada_openai acc`, `lambada_openai perplexity`, ...): the numbers papers, llm.c and
nanoGPT quote. Model folders go through the harness's own `hf` model (pretrained=<folder>), quantize.py's
int8/int4 folders through an HFLM wrapped around our loader's model. --limit, --num_fewshot and
--batch_size pass through; --include_path adds task YAMLs of your own (e.g. a Hub task over local JSON files:
`dataset_path: json` with `dataset_kwargs: {data_files: ...}`). The Hub tasks download their data once; without
network, point --include_path at such a local copy. --tasks alone (no --dataset_path) runs only the harness:

    python evaluation.py --model_path logs/final_model --tasks hellaswag,lambada_openai --limit 500

As a library (the scoring functions take any Hugging Face causal LM):

    from evaluation import evaluate_perplexity, evaluate_texts
    evaluate_perplexity(model, tokenizer, val_dataset)   # fixed blocks, as Trainer.evaluate() scores them
    evaluate_texts(model, tokenizer, ["some text", ...], stride=512)   # sliding window over documents

Memory stays flat however large the data: documents are read, tokenized and scored as a stream,
and only running sums are kept.
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import quiet_imports  # noqa: F401, I001  (before transformers: keeps torchao's import-time warnings off stderr)
import generate
from metrics import bleu, copy_rate, distinct_n, find_ngrams, ngram_hashes, ngrams, repetition_rate, rouge, text_metrics  # noqa: F401  (part of evaluation's API)
from atomic import destination_problem, write_atomic
from errors import run_main
from lm_eval_bridge import Harness, task_names
from model import count_parameters, first_line
from perplexity import (EvaluationError, TextCounter, _device_of, encoder_for, iter_token_chunks, model_context,
                        sliding_window_nll)
from perplexity import evaluate_perplexity, evaluate_texts, iter_windows, token_byte_lengths  # noqa: F401  (part of evaluation's API)


# ----------------------------------------------------------------------------------------------
# Models: generate.load_model, with evaluation's --device, --precision and --tokenizer_name


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "auto": None}  # auto: generate.default_dtype (bf16, else fp16, on a GPU; fp32 on a CPU)


def _load(path: str, args: EvalArguments):
    """(model, tokenizer) of one --model_path, its problems as EvaluationErrors."""
    try:
        device = generate.pick_device(None if args.device in (None, "", "auto") else args.device)
        tokenizer, model, _ = generate.load_model(path, device, PRECISIONS[args.precision], args.tokenizer_name)
    except (ValueError, OSError) as e:  # ModelError and QuantizationError are ValueErrors; a missing folder an OSError
        raise EvaluationError(first_line(e, limit=1000)) from None
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Data sources (dataset.py's readers), with a choice of split


@dataclass
class EvalData:
    """Which documents to evaluate on."""

    dataset_path: Optional[str] = None
    dataset_name: Optional[str] = None
    split: str = "test"
    text_field: str = "text"
    dataset_config: Optional[str] = None
    data_dir: str = "data"
    skip_bad_lines: bool = False
    max_documents: Optional[int] = None


def resolve_source(data: EvalData, what: str = "--dataset_path or --dataset_name"):
    """A dataset.Source for files, a gpt-2-output-dataset name + split, 'builtin', or a Hub name + split."""
    import dataset

    if not data.dataset_path and not data.dataset_name:
        raise EvaluationError(f"no data to evaluate on: pass {what}.")
    args = dataset.DataArguments(dataset_name=data.dataset_name, dataset_path=data.dataset_path, text_field=data.text_field,
                                 dataset_config=data.dataset_config, data_dir=data.data_dir)
    return dataset.resolve_split(args, data.split)


def iter_source_pieces(source, data: EvalData, desc: str, progress: bool = True) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of a source, read with dataset.py's readers, with a progress bar."""
    import dataset

    args = dataset.DataArguments(text_field=data.text_field, skip_bad_lines=data.skip_bad_lines)
    total, unit = source.total()
    with tempfile.TemporaryDirectory(prefix="gpt2-eval-") as tmp, \
            tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=None if progress else True) as bar:
        yield from dataset.iter_pieces(source, args, bar, tmp)


def iter_documents(source, data: EvalData, max_chars: Optional[int] = None, desc: str = "Reading",
                   progress: bool = True) -> Iterator[str]:
    """Whole documents (only their first `max_chars` characters, when given) of a source."""
    parts: list[str] = []
    size = 0
    for text, ends in iter_source_pieces(source, data, desc, progress):
        if max_chars is None or size < max_chars:
            parts.append(text)
            size += len(text)
        if ends:
            doc = "".join(parts)
            parts, size = [], 0
            if doc.strip():
                yield doc[:max_chars] if max_chars else doc


def perplexity_on_source(model, tokenizer, source, data: EvalData, *, stride=None, context=None, batch_size=8,
                         add_start_token=True, progress=True, desc="Perplexity") -> dict:
    counter = TextCounter()
    pieces = iter_source_pieces(source, data, f"{desc}: reading", progress)
    chunks = iter_token_chunks(pieces, tokenizer, counter, add_start_token, data.max_documents)
    try:
        result = sliding_window_nll(model, chunks, context=context, stride=stride, batch_size=batch_size,
                                    n_bytes=lambda: counter.bytes, progress=progress, desc=desc)
    except EvaluationError:
        if counter.documents == 0:
            raise EvaluationError(f"{source.describe()} contains no text: nothing to evaluate.") from None
        raise
    result["documents"] = counter.documents
    return result


# temperature, top_k and top_p default to generate.generate's (documented there), so that BLEU and ROUGE
# score the sampling generate.py and the web demo serve.
SAMPLER_DEFAULTS = {k: p.default for k, p in inspect.signature(generate.generate).parameters.items()
                    if k in ("temperature", "top_k", "top_p")}


@dataclass
class SamplingSettings:
    prompt_tokens: int = 32
    reference_tokens: int = 32
    greedy: bool = False  # the same as temperature 0
    temperature: float = SAMPLER_DEFAULTS["temperature"]
    top_k: int = SAMPLER_DEFAULTS["top_k"]
    top_p: float = SAMPLER_DEFAULTS["top_p"]
    seed: int = 42
    batch_size: int = 8

    def sampler_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature

    def check(self, context: Optional[int] = None) -> None:
        if self.prompt_tokens < 1 or self.reference_tokens < 1:
            raise EvaluationError("--prompt_tokens and --reference_tokens must be at least 1.")
        if context is not None and self.prompt_tokens + self.reference_tokens > context:
            raise EvaluationError(
                f"the prompt ({self.prompt_tokens} tokens) plus the continuation ({self.reference_tokens} tokens) is "
                f"longer than the model's context of {context} tokens: lower --prompt_tokens or --reference_tokens.")
        try:
            generate.check_sampling_args(self.reference_tokens, self.top_k, self.top_p, self.sampler_temperature())
        except ValueError as e:  # it names the argument: --temperature, --top_k or --top_p
            raise EvaluationError(str(e)) from None
        if self.batch_size < 1:
            raise EvaluationError(f"batch size {self.batch_size} must be at least 1.")


def make_prompts(documents: Iterable[str], tokenizer, num_samples: int, prompt_tokens: int, reference_tokens: int):
    """[(prompt ids, reference ids)] from the first documents with at least prompt + reference tokens,
    and the number of documents skipped as too short."""
    encode = encoder_for(tokenizer)
    need = prompt_tokens + reference_tokens
    pairs, skipped = [], 0
    for doc in documents:
        ids = encode([doc])[0]
        if len(ids) < need:
            skipped += 1
            continue
        pairs.append((list(ids[:prompt_tokens]), list(ids[prompt_tokens:need])))
        if len(pairs) >= num_samples:
            break
    return pairs, skipped


def generate_continuations(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           settings: SamplingSettings, progress: bool = True, desc: str = "Generating") -> list[list[int]]:
    """The token ids of a continuation of each prompt (token ids), sampled by generate.generate, without the
    <|endoftext|> that ends one early. Each batch of settings.batch_size prompts has its own seed,
    settings.seed + its first prompt's index.
    """
    device = _device_of(model)
    out: list[list[int]] = []
    with tqdm(total=len(prompts), desc=desc, unit="sample", disable=None if progress else True) as bar:
        for i in range(0, len(prompts), settings.batch_size):
            batch = [list(p) for p in prompts[i:i + settings.batch_size]]
            completions = generate.generate(tokenizer, model, device, batch, max_new_tokens, top_k=settings.top_k,
                                            top_p=settings.top_p, temperature=settings.sampler_temperature(),
                                            seed=settings.seed + i)
            out.extend(c.completion_ids for c in completions)
            bar.update(len(batch))
    return out


def generation_metrics(model, tokenizer, pairs, settings: SamplingSettings, progress: bool = True,
                       desc: str = "Generating") -> tuple[dict, list[dict]]:
    """Generate for (prompt ids, reference ids) pairs and score; returns (metrics, samples)."""
    settings.check(model_context(model))
    prompts = [p for p, _ in pairs]
    generated = generate_continuations(model, tokenizer, prompts, settings.reference_tokens, settings, progress, desc)
    hyps = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    refs = [tokenizer.decode(r, skip_special_tokens=True) for r in (r for _, r in pairs)]
    metrics = {"samples": len(pairs), **text_metrics(hyps, refs),
               "mean_length_tokens": float(np.mean([len(g) for g in generated])) if generated else None}
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r, "generated": h,
                "generated_ids": g, "reference_ids": list(ref_ids)}
               for (p, ref_ids), r, h, g in zip(pairs, refs, hyps, generated)]
    return metrics, samples


# ----------------------------------------------------------------------------------------------
# Reports


COLUMNS = [  # (key path, header, format)
    ("parameters", "params", lambda v: f"{v / 1e6:.1f}M"),
    ("vocab", "vocab", "{:,}"),
    ("perplexity.tokens", "tokens", lambda v: f"{v:,}"),
    ("perplexity.loss", "loss", "{:.4f}"),
    ("perplexity.perplexity", "perplexity", "{:.2f}"),
    ("perplexity.bits_per_byte", "bits/byte", "{:.4f}"),
    ("generation.bleu", "BLEU", "{:.2f}"),
    ("generation.rouge1", "ROUGE-1", "{:.4f}"),
    ("generation.rouge2", "ROUGE-2", "{:.4f}"),
    ("generation.rougeL", "ROUGE-L", "{:.4f}"),
    ("generation.distinct_1", "distinct-1", "{:.4f}"),
    ("generation.distinct_2", "distinct-2", "{:.4f}"),
    ("generation.repetition_4", "rep-4", "{:.4f}"),
    ("generation.mean_length_tokens", "len (tok)", "{:.1f}"),
    ("generation.copy_rate", "copy rate", "{:.4f}"),
]


def _get(d: dict, path):
    for part in path.split(".") if isinstance(path, str) else path:  # a tuple: task names hold dots
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def task_columns(rows: list) -> list:
    """(key path, header, format) of the harness's scores the rows hold: `<task> <metric>` in the order they
    come; perplexities with 2 decimals, accuracies and the rest with 4."""
    cols, seen = [], set()
    for r in rows:
        for task, scores in (r.get("tasks") or {}).items():
            for metric in scores:
                if metric in HARNESS_INFO_KEYS or metric.endswith("_stderr") or (task, metric) in seen:
                    continue
                seen.add((task, metric))
                fmt = "{:.2f}" if "perplexity" in metric else "{:.4f}"
                cols.append(((("tasks", task, metric)), f"{task} {metric}", fmt))
    return cols


HARNESS_INFO_KEYS = ("samples", "num_fewshot")  # in a task's scores, but not a score


def markdown_table(results: dict) -> str:
    """One row per model; only the columns some model has a value for (then the harness's task scores)."""
    rows = results["models"]
    cols = [c for c in COLUMNS if any(_get(r, c[0]) is not None for r in rows)] + task_columns(rows)
    lines = ["| model | " + " | ".join(h for _, h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = _get(r, key)
            cells.append("–" if v is None else (fmt(v) if callable(fmt) else fmt.format(v)))
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    if len({r.get("vocab") for r in rows}) > 1:
        lines.append("\nThe models have different tokenizers: a token is not the same amount of text, so compare "
                     "bits/byte, not loss or perplexity (both per token).")
    reference = _get(results, "reference.copy_rate")
    if reference is not None:
        n = _get(results, "reference.copy_ngram")
        lines.append(f"\nCopy rate: share of generated {n}-grams of tokens found verbatim in "
                     f"{_get(results, 'reference.train_data')}; the human reference continuations: {reference:.4f}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


@dataclass
class EvalArguments:
    """python evaluation.py --model_path MODEL [MODEL ...] (--dataset_path PATH | --dataset_name NAME) [options]"""

    model_path: list[str] = field(
        default_factory=list,
        metadata={"help": "One or more model folders (train.py's logs/final_model, checkpoint-N folders, any Hugging "
                  "Face GPT-2 folder, quantize.py's int8/int4 folders) or Hub names; each gets one row of the report."})
    dataset_path: Optional[str] = field(
        default=None, metadata={"help": "File, folder or glob of .txt/.json/.jsonl/.csv/.parquet (optionally .gz) to evaluate on."})
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Instead of --dataset_path: a gpt-2-output-dataset name in --data_dir (webtext, "
                                "small-117M, ...), 'builtin', or a Hugging Face Hub dataset name; --split picks the split."})
    split: str = field(default="test", metadata={"help": "Split of --dataset_name: test, valid or train (Hub: any split name)."})
    text_field: str = field(default="text", metadata={"help": "JSON field, CSV/Parquet column or Hub column holding the text."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    data_dir: str = field(default="data", metadata={"help": "Folder where download_dataset.py puts gpt-2-output-dataset files."})
    skip_bad_lines: bool = field(default=False, metadata={"help": "Skip malformed JSON lines instead of stopping with an error."})
    max_documents: Optional[int] = field(default=None, metadata={"help": "Evaluate perplexity on the first N documents only."})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder or Hub name for models that have none (default: the model "
                                "folder's own, else the official GPT-2 tokenizer)."})
    stride: Optional[int] = field(
        default=None, metadata={"help": "Sliding-window step in tokens (default: half the context). Each window scores "
                                "only its last `stride` tokens; stride == context means non-overlapping windows."})
    context: Optional[int] = field(default=None, metadata={"help": "Window length in tokens (default and maximum: the model's context)."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass (perplexity); requests per batch of the harness (--tasks)."})
    add_start_token: bool = field(
        default=True, metadata={"help": "Put <|endoftext|> in front of the text so that its first token is scored too "
                                "(False: as the Hugging Face perplexity guide does)."})
    skip_perplexity: bool = field(default=False, metadata={"help": "Only the generation metrics."})
    num_samples: int = field(
        default=0, metadata={"help": "Documents to prompt for the generation metrics: BLEU, ROUGE-1/2/L, distinct-1/2, "
                             "4-gram repetition and length of the sampled continuations, and with --train_data the copy "
                             "rate (0: none, only perplexity and bits per byte)."})
    prompt_tokens: int = field(default=32, metadata={"help": "Prompt: the first N tokens of each document."})
    reference_tokens: int = field(
        default=32, metadata={"help": "Reference: the next M tokens; as many tokens are generated (fewer if <|endoftext|> comes first)."})
    greedy: bool = field(default=False, metadata={"help": "Greedy decoding instead of sampling (the same as --temperature 0)."})
    temperature: float = field(default=SAMPLER_DEFAULTS["temperature"],
                               metadata={"help": "Sampling temperature (0: greedy; default: generate.py's)."})
    top_k: int = field(default=SAMPLER_DEFAULTS["top_k"],
                       metadata={"help": "Sample from the k most likely tokens (0: off; default: generate.py's)."})
    top_p: float = field(default=SAMPLER_DEFAULTS["top_p"],
                         metadata={"help": "Nucleus sampling: smallest set of tokens with this much probability (1.0: off; "
                                   "default: generate.py's)."})
    seed: int = field(default=42, metadata={"help": "Random seed of the sampling (the same for every model)."})
    gen_batch_size: int = field(default=8, metadata={"help": "Prompts generated at once."})
    train_data: Optional[str] = field(
        default=None, metadata={"help": "Training data for the copy rate (share of generated 8-grams of tokens found "
                                "verbatim in it): a file, folder or glob, or a dataset name as --dataset_name (its train split)."})
    copy_ngram: int = field(default=8, metadata={"help": "n of the copy rate's n-grams."})
    tasks: Optional[str] = field(
        default=None, metadata={"help": "lm-evaluation-harness tasks, comma-separated (hellaswag,lambada_openai,arc_easy,"
                                "piqa,wikitext, ... or your own from --include_path): their scores become columns of the "
                                "table. The Hub tasks download their data once (network needed)."})
    include_path: Optional[str] = field(
        default=None, metadata={"help": "Folder of task YAMLs of your own for --tasks (e.g. a Hub task over local JSON "
                                "files: dataset_path: json, dataset_kwargs: {data_files: ...})."})
    limit: Optional[float] = field(
        default=None, metadata={"help": "--tasks: only the first N examples of each task (a fraction below 1: that share); "
                                "the harness's own --limit."})
    num_fewshot: Optional[int] = field(default=None, metadata={"help": "--tasks: examples put in front of each question "
                                                               "(default: each task's own, usually 0)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, ..."})
    precision: str = field(default="fp32", metadata={"help": "Weights' precision: fp32, bf16, fp16, or auto (bf16/fp16 on a GPU, fp32 on CPU)."})
    output_json: Optional[str] = field(default=None, metadata={"help": "Write all results (and the samples) to this JSON file."})
    output_md: Optional[str] = field(default=None, metadata={"help": "Write the Markdown table to this file."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars (on a terminal)."})

    def eval_data(self) -> EvalData:
        return EvalData(dataset_path=self.dataset_path, dataset_name=self.dataset_name, split=self.split,
                        text_field=self.text_field, dataset_config=self.dataset_config, data_dir=self.data_dir,
                        skip_bad_lines=self.skip_bad_lines, max_documents=self.max_documents)

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.prompt_tokens, self.reference_tokens, self.greedy, self.temperature, self.top_k,
                                self.top_p, self.seed, self.gen_batch_size)


def check_arguments(args: EvalArguments) -> None:
    if not args.model_path:
        raise EvaluationError("pass --model_path with one or more model folders (e.g. logs/final_model).")
    if args.precision not in PRECISIONS:
        raise EvaluationError(f"--precision {args.precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if not args.dataset_path and not args.dataset_name and not args.tasks:
        raise EvaluationError("no data to evaluate on: pass --dataset_path (a file, folder or glob) or --dataset_name, "
                              "or harness tasks with --tasks.")
    if args.tasks is not None and not task_names(args.tasks):
        raise EvaluationError("--tasks is empty: name harness tasks, e.g. --tasks hellaswag,lambada_openai.")
    if not args.tasks and (args.include_path or args.limit is not None or args.num_fewshot is not None):
        raise EvaluationError("--include_path, --limit and --num_fewshot are for the harness: add --tasks.")
    if args.limit is not None and args.limit <= 0 or args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvaluationError("--limit must be above 0 and --num_fewshot at least 0.")
    if args.include_path and not Path(args.include_path).expanduser().is_dir():
        raise EvaluationError(f"--include_path {args.include_path} is not a folder: pass the folder holding the task YAMLs.")
    has_data = bool(args.dataset_path or args.dataset_name)
    if args.train_data and args.num_samples <= 0:
        raise EvaluationError("--train_data is for the copy rate of generated samples: add --num_samples N.")
    if args.skip_perplexity and args.num_samples <= 0 and not args.tasks:
        raise EvaluationError("--skip_perplexity with --num_samples 0 leaves nothing to evaluate.")
    for name in ("stride", "context", "max_documents"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvaluationError(f"--{name} {value} must be at least 1.")
    if args.batch_size < 1 or args.num_samples < 0 or args.copy_ngram < 1:
        raise EvaluationError("--batch_size and --copy_ngram must be at least 1, --num_samples at least 0.")
    if args.num_samples:
        if not has_data:
            raise EvaluationError("--num_samples prompts with documents: add --dataset_path or --dataset_name.")
        args.sampling().check()


def evaluate(args: EvalArguments) -> dict:
    """Run everything the arguments ask for; returns the results (what --output_json holds)."""
    check_arguments(args)
    data = args.eval_data()
    source = resolve_source(data) if data.dataset_path or data.dataset_name else None
    harness = Harness(args) if args.tasks else None  # the tasks and their data load now, before any model
    train = _train_data(args) if args.train_data else None
    train_source = resolve_source(train, "--train_data") if train else None  # bad --train_data fails now, not at the end
    settings = args.sampling()
    results: dict[str, Any] = {"data": source.describe() if source else None, "settings": _settings(args), "models": []}
    if harness:
        results["harness"] = harness.describe()
    generated: dict[str, tuple[str, list]] = {}  # model -> (tokenizer fingerprint, generated ids), for the copy rate
    references: dict[str, list] = {}  # tokenizer fingerprint -> reference ids
    tokenizers: dict[str, Any] = {}  # tokenizer fingerprint -> tokenizer
    for path in args.model_path:
        model, tokenizer = _load(path, args)
        context = model_context(model)
        row: dict[str, Any] = {"model": path, "parameters": count_parameters(model),
                               "context": context, "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer)}
        if args.context and args.context > context:
            raise EvaluationError(f"--context {args.context} is longer than {path}'s context of {context} tokens.")
        win = args.context or context
        if args.stride and args.stride > win:
            raise EvaluationError(f"--stride {args.stride} is larger than the window of {win} tokens: tokens would be skipped.")
        if args.num_samples:
            settings.check(context)  # before the perplexity run, not after it
        if source is not None and not args.skip_perplexity:
            row["perplexity"] = perplexity_on_source(
                model, tokenizer, source, data, stride=args.stride, context=args.context, batch_size=args.batch_size,
                add_start_token=args.add_start_token, progress=args.progress, desc=f"Perplexity {path}")
        if args.num_samples:
            docs = iter_documents(source, data, max_chars=64 * (settings.prompt_tokens + settings.reference_tokens),
                                  desc=f"Prompts from {source.describe()}", progress=args.progress)
            pairs, skipped = make_prompts(docs, tokenizer, args.num_samples, settings.prompt_tokens, settings.reference_tokens)
            if not pairs:
                raise EvaluationError(f"no document of {source.describe()} has the {settings.prompt_tokens} + "
                                      f"{settings.reference_tokens} tokens a prompt and its reference need: lower "
                                      "--prompt_tokens / --reference_tokens.")
            if len(pairs) < args.num_samples:  # fewer samples than asked: say so, the table would not
                warnings.warn(f"--num_samples {args.num_samples}: {source.describe()} has only {len(pairs)} document(s) "
                              f"with the {settings.prompt_tokens} + {settings.reference_tokens} tokens a prompt and its "
                              f"reference need ({skipped} shorter one(s) skipped): the generation metrics of {path} use "
                              f"{len(pairs)} samples.", stacklevel=2)
            metrics, samples = generation_metrics(model, tokenizer, pairs, settings, args.progress, f"Generating {path}")
            metrics["skipped_short_documents"] = skipped
            row["generation"], row["samples"] = metrics, samples
            fp = _tokenizer_key(tokenizer)
            generated[path] = (fp, [s["generated_ids"] for s in samples])
            references.setdefault(fp, [s["reference_ids"] for s in samples])
            tokenizers.setdefault(fp, tokenizer)
        if harness:
            row["tasks"], row["harness_table"] = harness.run(path, model, tokenizer, args)
        results["models"].append(row)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if train_source is not None and generated:
        add_copy_rates(results, args, train, train_source, generated, references, tokenizers)
    return results


def _tokenizer_key(tokenizer) -> str:
    from dataset import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer)


def add_copy_rates(results: dict, args: EvalArguments, train: EvalData, source, generated: dict, references: dict,
                   tokenizers: dict) -> None:
    """Copy rates of every model's samples (and of the references); the training data is streamed
    once per distinct tokenizer, past the small set of generated n-gram hashes."""
    n = args.copy_ngram
    found = {}
    for fp, tokenizer in tokenizers.items():
        samples = [ids for f, rows in generated.values() if f == fp for ids in rows] + references[fp]
        queries = np.concatenate([ngram_hashes(ids, n) for ids in samples])
        pieces = iter_source_pieces(source, train, f"Copy rate: scanning {source.describe()}", args.progress)
        found[fp] = find_ngrams(queries, iter_token_chunks(pieces, tokenizer, add_start_token=False), n)
    key = "copy_rate"
    for row in results["models"]:
        if row["model"] in generated:
            fp, rows = generated[row["model"]]
            row["generation"][key] = copy_rate(rows, found[fp], n)
    fp0 = next(iter(references))
    results["reference"] = {key: copy_rate(references[fp0], found[fp0], n), "copy_ngram": n, "train_data": source.describe()}


def _train_data(args: EvalArguments) -> EvalData:
    import glob as globmod

    spec = args.train_data
    is_path = os.path.exists(spec) or bool(globmod.glob(spec))
    return EvalData(dataset_path=spec if is_path else None, dataset_name=None if is_path else spec, split="train",
                    text_field=args.text_field, dataset_config=args.dataset_config, data_dir=args.data_dir,
                    skip_bad_lines=args.skip_bad_lines)


def _settings(args: EvalArguments) -> dict:
    s = asdict(args)
    for k in ("model_path", "output_json", "output_md", "progress"):
        s.pop(k)
    return s


def parse_args(argv: Optional[list[str]] = None) -> EvalArguments:
    from transformers import HfArgumentParser

    # The docstring up to the library part: the examples and what each metric is (--help is where users look).
    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\nAs a library")[0],
                              formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: ours say what is going on
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    return run_main(lambda: _run(args), explain=_explain, interrupted="interrupted")


def _run(args: EvalArguments) -> int:
    import json

    outputs = [(Path(p).expanduser(), kind) for p, kind in ((args.output_json, "json"), (args.output_md, "md")) if p]
    for out, kind in outputs:  # now, not after an hour of evaluation
        problem = destination_problem(out, folder=False, replaceable=lambda p: True)
        if problem:
            raise EvaluationError(f"--output_{kind} {out}: {problem}: choose another path"
                                  + (f", e.g. {out / f'eval.{kind}'}." if out.is_dir() else "."))
    results = evaluate(args)
    table = markdown_table(results)
    print(table)  # first: if a file cannot be written (a full disk), the results are still on screen
    for out, kind in outputs:
        try:
            write_atomic(out, json.dumps(results, indent=2) + "\n" if kind == "json" else table + "\n")
        except OSError as e:
            raise EvaluationError(f"{out} could not be written ({e.strerror or e}): free some space or choose another "
                                  f"--output_{kind}; the table above has the results.") from None
    return 0


def _explain(e: BaseException) -> str | None:
    from dataset import DataError

    if isinstance(e, DataError):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of GPU memory: lower --batch_size / --gen_batch_size, or use --precision bf16."
    return None


if __name__ == "__main__":
    sys.exit(main())
