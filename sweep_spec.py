"""The sweep file: read a YAML or JSON sweep file, expand its grid and runs into Runs, and check every run's
arguments with train.py's own parser before anything trains.

The format is described at the top of experiments.py, which runs the sweeps and compares them, and in the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import GPT2ToolkitError

DEFAULT_SWEEPS_DIR = "logs/sweeps"
SWEEP_KEYS = ("name", "output_dir", "base", "grid", "runs")
MAX_NAME_BYTES = 255  # the longest folder name ext4, APFS and NTFS take
# Set per run by the sweep itself: a run's folder is its identity, and rerunning relies on --resume auto.
MANAGED = {
    "output_dir": "each run trains in the sweep's output_dir/RUN_NAME; set the sweep's output_dir instead",
    "resume": "a rerun of the sweep resumes interrupted runs itself (--force retrains from scratch)",
    "resume_from_checkpoint": "a rerun of the sweep resumes interrupted runs itself (--force retrains from scratch)",
}
# Short names in run names built from a grid, so that folder names stay readable.
ABBREVIATIONS = {
    "learning_rate": "lr", "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "accum",
    "max_steps": "steps", "num_train_epochs": "epochs", "weight_decay": "wd", "warmup_steps": "warmup",
    "lr_scheduler_type": "sched", "dataset_name": "data", "dataset_path": "data",
}


class SweepError(GPT2ToolkitError):
    """Bad sweep input: the message names the file, the run and the key."""


@dataclass
class Run:
    name: str
    overrides: dict[str, Any]  # train.py arguments, base included, as written in the sweep file
    output_dir: str
    sweep: str = ""
    source: str = "<runs>"  # the sweep file, for error messages


# ----------------------------------------------------------------------------------------------
# The sweep file


def load_sweep(path: str | Path) -> list[Run]:
    """The runs of a YAML or JSON sweep file, in order (grid first); names and structure checked."""
    path = Path(path)
    if path.is_dir():
        raise SweepError(f"{path} is a folder: pass the sweep's YAML or JSON file (e.g. sweeps/example.yaml).")
    if not path.is_file():
        raise SweepError(f"Sweep file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the text
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: byte {e.start} is not UTF-8 text: save the sweep file as UTF-8.") from None
    except OSError as e:
        raise SweepError(f"{path} cannot be read: {e.strerror or e}.") from None
    try:
        spec = json.loads(text, object_pairs_hook=_unique_json_keys) if path.suffix == ".json" else _load_yaml(text)
    except SweepError as e:
        raise SweepError(f"{path}: {e}") from None
    except Exception as e:  # the parsers' messages carry the line and column
        raise SweepError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return expand(spec, source=str(path), default_name=path.stem)


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a key given twice is an error: YAML keeps the last one silently,
    which drops a whole grid or a setting without a word."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` then overriding a key is what merge keys are for
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (list, dict)):
                    continue  # unhashable: the parser's own error says so
                if key in seen:
                    raise SweepError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in the same "
                                     "mapping (only the last would count); merge them into one.")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SweepError(f"key(s) {', '.join(map(repr, twice))} given twice in the same object (only the last would "
                         "count); merge them into one.")
    return dict(pairs)


def expand(spec: Any, source: str = "<sweep>", default_name: str = "sweep") -> list[Run]:
    """A sweep spec (the file's content as a dict) -> its runs."""
    if not isinstance(spec, dict):
        raise SweepError(f"{source}: expected a mapping with keys {', '.join(SWEEP_KEYS)}; got {type(spec).__name__}.")
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        raise SweepError(f"{source}: unknown top-level key(s) {', '.join(map(str, unknown))}"
                         f"{_suggest(unknown[0], SWEEP_KEYS)}; train.py arguments go under base, grid or runs.")
    name = str(spec.get("name") or default_name)
    out = str(spec.get("output_dir") or Path(DEFAULT_SWEEPS_DIR) / name)
    base = _mapping(spec.get("base"), f"{source}: base")
    grid = _mapping(spec.get("grid"), f"{source}: grid")
    explicit = spec.get("runs") or []
    if not isinstance(explicit, list):
        raise SweepError(f"{source}: runs must be a list of mappings.")

    entries: list[tuple[str | None, dict]] = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{source}: grid.{key} must be a non-empty list of values (got {values!r}).")
    for combo in itertools.product(*grid.values()) if grid else []:  # product() of nothing is one empty run
        point = dict(zip(grid, combo))
        entries.append((run_name(point), point))
    for i, entry in enumerate(explicit):
        entry = dict(_mapping(entry, f"{source}: runs[{i}]"))
        label = entry.pop("name", None)
        entries.append((str(label) if label is not None else None, entry))
    if not entries:
        entries.append((name, {}))  # base alone is a one-run sweep

    runs, seen = [], {}
    for i, (label, overrides) in enumerate(entries):
        label = label or run_name(overrides) or f"run{i + 1}"
        if "/" in label or "\\" in label or label in (".", "..") or "\0" in label:
            raise SweepError(f"{source}: run name {label!r} cannot be a folder name; choose one without slashes.")
        if len(label.encode("utf-8")) > MAX_NAME_BYTES:  # the file system's limit for one folder name
            raise SweepError(f"{source}: run name {label[:60]!r}... is {len(label.encode('utf-8'))} bytes, longer than "
                             f"a folder name may be ({MAX_NAME_BYTES}); give the run a shorter name (grid runs: list "
                             "them under runs with a name).")
        if label in seen:
            raise SweepError(f"{source}: two runs are named {label!r}; give them distinct names.")
        seen[label] = True
        runs.append(Run(label, {**base, **overrides}, str(Path(out) / label), sweep=name, source=source))
    return runs


def run_name(overrides: dict[str, Any]) -> str:
    return ",".join(f"{ABBREVIATIONS.get(k, k)}={_format_value(v)}" for k, v in overrides.items())


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 0.0003 -> 3e-4
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(_format_value, value))
    return Path(str(value)).name if isinstance(value, str) and "/" in value else str(value)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping of train.py arguments (got {type(value).__name__}).")
    return value


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Validation: every run parsed as train.py would, before anything trains


@functools.lru_cache(maxsize=1)
def _parser():
    """train.py's HfArgumentParser, raising ValueError instead of printing usage and exiting."""
    from transformers import HfArgumentParser

    import train

    class RaisingParser(HfArgumentParser):
        def error(self, message):
            raise ValueError(message)

    return RaisingParser((train.ModelArguments, train.DataArguments, train.TrainArguments))


def known_arguments() -> set[str]:
    import train

    return {f.name for cls in (train.ModelArguments, train.DataArguments, train.TrainArguments)
            for f in dataclasses.fields(cls) if f.init}


def to_argv(overrides: dict[str, Any]) -> list[str]:
    """train.py command-line flags for these overrides, so values are converted exactly as on the command line."""
    argv = []
    for key, value in overrides.items():
        if value is None:
            continue  # null: train.py's default
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_run(run: Run) -> tuple[Any, Any, Any]:
    """train.py's (ModelArguments, DataArguments, TrainArguments) for a run, defaults not yet resolved."""
    argv = to_argv({**run.overrides, "output_dir": run.output_dir})
    return _parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=False)


def validate(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Check every run's arguments; raise SweepError listing every problem (file, run, key).

    Returns, per run name, what the comparison needs later: block_size and tokens per optimizer step."""
    import train

    known = known_arguments()
    problems: dict[tuple[str, str], list[str]] = {}  # (file, message) -> runs: a bad base key is reported once
    resolved = {}
    for run in runs:
        report = lambda message: problems.setdefault((run.source, message), []).append(run.name)
        bad = False
        for key in run.overrides:
            if key in MANAGED:
                report(f"{key} is not allowed here: {MANAGED[key]}.")
                bad = True
            elif key not in known:
                report(f"unknown argument {key!r}{_suggest(key, known)}; see `python train.py --help`.")
                bad = True
        blocking = _file_in_the_way(run.output_dir)
        if blocking is not None:  # else a traceback when the run starts, possibly hours into the sweep
            report(f"its folder {run.output_dir} cannot be made: {blocking} is a file; move it away or set the sweep's output_dir.")
            bad = True
        if bad:
            continue
        try:
            model_args, data_args, args = parse_run(run)
            train.resolve_defaults(model_args, data_args, args)
            _check_consistency(model_args, data_args)
        except Exception as e:  # argparse, the dataclasses' __post_init__ and train.py's UserError all land here
            report(f"{_culprit(run)}{_one_line(e)}")
            continue
        resolved[run.name] = {
            "block_size": data_args.block_size,
            "tokens_per_step": data_args.block_size * args.per_device_train_batch_size
            * args.gradient_accumulation_steps * args.world_size,
            "report_to": list(args.report_to or []),
        }
    if problems:
        lines = []
        for (source, message), names in problems.items():
            if len(names) == len(runs) > 1:
                which = "every run"
            else:
                which = ("run " if len(names) == 1 else "runs ") + ", ".join(map(repr, names))
            lines.append(f"{source}: {which}: {message}")
        raise SweepError("The sweep was not started:\n  " + "\n  ".join(lines))
    return resolved


def _check_consistency(model_args, data_args) -> None:
    """What train.py only finds once the model or the data is built: cheaper to say now."""
    if not model_args.init_from:
        if model_args.n_embd % model_args.n_head:
            raise ValueError(f"n_head={model_args.n_head} must divide n_embd={model_args.n_embd}.")
        if data_args.block_size > model_args.n_positions:
            raise ValueError(f"block_size={data_args.block_size} exceeds the context n_positions={model_args.n_positions}.")
    if data_args.dataset_path and not glob.glob(os.path.expanduser(data_args.dataset_path)):
        raise ValueError(f"dataset_path={data_args.dataset_path}: no such file or folder.")


def _file_in_the_way(folder: str | Path) -> Path | None:
    """The file at `folder` or above it that keeps the folder from being made, if any."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _culprit(run: Run) -> str:
    """The key(s) whose value fails on its own, so the message names them even when the error does not."""
    failing = []
    for key, value in run.overrides.items():
        try:
            parse_run(Run(run.name, {key: value}, run.output_dir))
        except Exception:
            failing.append(f"{key}={value!r}")
    return f"{', '.join(failing)}: " if failing else ""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__
