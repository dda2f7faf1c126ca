"""evaluation.py's bridge to EleutherAI's lm-evaluation-harness (`lm-eval`, pinned in requirements.txt): the
--tasks names, checked and loaded once before any model, and one `simple_evaluate` run per model, whose scores
become columns of evaluation.py's table (`hellaswag acc_norm`, `lambada_openai acc`, ...).

Model folders go through the harness's own `hf` model (pretrained=<folder>, as `lm_eval --model hf` loads them),
quantize.py's int8/int4 folders through an HFLM wrapped around generate.load_model's model. Errors are
EvaluationErrors that say what to do, offline above all (the Hub tasks download their data once).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import first_line
from perplexity import EvaluationError, _device_of




def task_names(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


LOCAL_COPY_HINT = ("to run it offline, download it once where there is network (the harness caches it in "
                   "~/.cache/huggingface/datasets), or write a task YAML over local JSON files (copy the task's YAML from "
                   "lm_eval/tasks/, set `dataset_path: json` and `dataset_kwargs: {data_files: {test: my_copy.jsonl}}`) "
                   "into a folder and pass it with --include_path")


class Harness:
    """The harness's tasks (checked and loaded once, before any model) and one run per model."""

    def __init__(self, args):
        """args: evaluation.EvalArguments (tasks, include_path; run() reads num_fewshot, limit, batch_size and
        tokenizer_name)."""
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise EvaluationError(f"--tasks needs lm-evaluation-harness ({first_line(e)}): pip install -r requirements.txt.") from None
        _quiet_harness()
        self.version = lm_eval.__version__
        self.names = task_names(args.tasks)
        self.include_path = str(Path(args.include_path).expanduser()) if args.include_path else None
        self.manager = TaskManager(include_path=self.include_path)
        unknown = [t for t in self.names if not self.manager.match_tasks([t])]
        if unknown:
            where = f" nor in --include_path {args.include_path}" if args.include_path else ""
            raise EvaluationError(f"--tasks: {', '.join(unknown)} is not a task of lm-evaluation-harness {self.version}"
                                  f"{where} (`lm-eval ls tasks` lists them; a task of your own needs --include_path).")
        for name in self.names:  # one at a time, so that the error names the task
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    self.manager.load([name])
            except Exception as e:  # datasets' and huggingface_hub's errors, a bad YAML, a missing data file
                raise EvaluationError(_task_error(name, e)) from None

    def describe(self) -> dict:
        return {"lm_eval": self.version, "tasks": self.names, "include_path": self.include_path}

    def run(self, path: str, model, tokenizer, args) -> tuple[dict, str]:
        """({task: {metric: value, metric_stderr: ..., samples: N}}, the harness's own table) of one model."""
        import lm_eval
        from lm_eval.utils import make_table

        lm = self.model(path, model, tokenizer, args)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the harness prints ("bootstrapping ..."): stdout is the table's
                out = lm_eval.simple_evaluate(model=lm, tasks=list(self.names), task_manager=self.manager,
                                              num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                                              log_samples=False, verbosity="ERROR")
        except Exception as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            raise EvaluationError(f"lm-evaluation-harness failed on {path}: {first_line(e, limit=500)}") from None
        finally:
            del lm
        scores = {}
        for task, values in out["results"].items():
            row: dict[str, Any] = {}
            for key, value in values.items():
                if "," not in key or not isinstance(value, (int, float)):
                    continue  # alias, name, sample_len
                metric, filt = key.split(",", 1)
                if filt != "none":
                    metric = f"{metric} ({filt})"
                row[metric] = None if isinstance(value, float) and not np.isfinite(value) else value
            n = out.get("n-samples", {}).get(task, {})
            if n:
                row["samples"] = n.get("effective")
            shots = out.get("n-shot", {}).get(task)
            if shots is not None:
                row["num_fewshot"] = shots
            scores[task] = row
        return scores, make_table(out)

    @staticmethod
    def model(path: str, model, tokenizer, args):
        """The harness's HFLM: for a model folder or Hub name its own loading (pretrained=<folder>, as
        `lm_eval --model hf` does), for a quantize.py folder around our loader's model (from_pretrained cannot
        read quantize.py's format)."""
        from lm_eval.models.huggingface import HFLM

        import quantize

        try:
            if quantize.is_quantized_folder(Path(path).expanduser()):
                return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
            folder = Path(path).expanduser()
            own_tokenizer = not args.tokenizer_name and (not folder.is_dir() or any(
                (folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")))
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            return HFLM(pretrained=str(folder) if folder.is_dir() else path, tokenizer=None if own_tokenizer else tokenizer,
                        device=str(_device_of(model)), dtype=dtype, batch_size=args.batch_size)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"lm-evaluation-harness could not load {path}: {first_line(e, limit=500)}") from None


def _task_error(name: str, e: Exception) -> str:
    text = first_line(e, limit=300)
    network = isinstance(e, ConnectionError) or any(w in f"{type(e).__name__} {e}".lower() for w in (
        "offline", "connect", "couldn't reach", "could not reach", "network", "resolve", "timed out", "timeout",
        "max retries", "doesn't exist on the hub", "localentrynotfound"))
    if network:
        return (f"--tasks {name}: its data could not be downloaded from the Hugging Face Hub (no network, or "
                f"HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set; {text}): {LOCAL_COPY_HINT}.")
    return f"--tasks {name}: the harness could not load the task ({text}); if its data is a local copy, check the YAML and its data_files."


def _quiet_harness() -> None:
    """The harness logs every request batch and config at INFO/WARNING: keep only its errors (ours say what is
    going on)."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
