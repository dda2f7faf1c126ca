"""Comparison experiments: train a grid of train.py configurations, then compare them in one table and one plot.

    python experiments.py sweeps/example.yaml              # run the sweep (finished runs are skipped)
    python experiments.py sweeps/example.yaml --dry_run    # list the expanded runs and their state
    python experiments.py --compare logs/a logs/b --out logs/ab   # compare existing run folders, no training
    python experiments.py --help

    from experiments import load_sweep, run_sweep, compare
    rows = run_sweep("sweeps/example.yaml")                # -> one dict per run, as in the table

Sweep file (YAML or JSON, read and checked by sweep_spec.py); the keys under base, grid and runs are
train.py arguments, with the values its command line takes:

    name: lr-vs-depth                   # the sweep: default output_dir and WandB group
    output_dir: logs/sweeps/lr-vs-depth # optional (default logs/sweeps/NAME); run R trains in OUTPUT_DIR/R
    base:                               # overrides shared by every run
      max_steps: 50
      report_to: none
    grid:                               # the cartesian product of these lists, on top of base;
      learning_rate: [3e-4, 1e-3]       # runs are named after their values: lr=3e-4,n_layer=2
      n_layer: [2, 4]
    runs:                               # and/or explicit runs on top of base (name optional)
      - {name: wide, n_embd: 384, n_head: 6}

The grid's runs and the explicit runs are all run, grid first. A null value leaves train.py's default.
output_dir, resume and resume_from_checkpoint are managed here: each run has its folder, and a rerun of
the sweep skips finished runs (final_model/ exists) and resumes interrupted ones from their latest
complete checkpoint (train.py --resume auto). Every run's arguments are checked before the first run
starts: an unknown name (with close matches) or an invalid value stops the sweep, naming the file, run
and key.

Outputs in the sweep's folder: comparison.md (with each run's last samples under the table), comparison.csv,
comparison.png (validation loss of every run on shared axes; tokens/s per run). Each run folder also gets experiment.json: its arguments and one
entry per session (start step, wall time, outcome). Tokens/s is measured by the Trainer in every
session that ended (train_samples_per_second x train_runtime, summed, x block_size, over the summed
train_runtime: the training loop including its periodic evaluations and checkpoints); time lost to a
kill -9 is not in it.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import os
import shutil
import struct
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from atomic import write_atomic
from errors import run_main
from sweep_spec import Run, SweepError, _file_in_the_way, _one_line, load_sweep, parse_run, to_argv, validate
from sweep_spec import ABBREVIATIONS, DEFAULT_SWEEPS_DIR, MANAGED, MAX_NAME_BYTES, SWEEP_KEYS, expand, known_arguments, run_name  # noqa: F401  (importable from here as before)

DEFAULT_COMPARE_DIR = "logs/comparison"
RECORD = "experiment.json"  # per run folder: arguments and sessions, written by this module


# ----------------------------------------------------------------------------------------------
# Running the sweep


def _check_out(out_dir: Path) -> None:
    blocking = _file_in_the_way(out_dir)
    if blocking is not None:
        raise SweepError(f"--out {out_dir}: {blocking} is a file, not a folder; choose another --out.")


def run_state(run_dir: str | Path) -> str:
    """finished, interrupted (started, not finished), or new."""
    run_dir = Path(run_dir)
    if _read_json(run_dir / "final_model" / "eval_results.json"):  # a damaged one is no proof: resume the run
        return "finished"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "interrupted"
    return "new"


def run_sweep(sweep: str | Path | list[Run], *, only: list[str] | None = None, force: bool = False,
              group: str | None = None, stop_on_error: bool = False, out: str | Path | None = None,
              x_axis: str = "auto") -> list[dict[str, Any]]:
    """Validate every run, train the unfinished ones one after another, then write the comparison.

    Returns the comparison rows; a failed run is recorded (its row says so) and the others go on,
    unless stop_on_error. A Ctrl-C stops the sweep after a checkpoint; rerun it to continue."""
    runs = load_sweep(sweep) if isinstance(sweep, (str, Path)) else list(sweep)
    selected = select(runs, only)
    resolved = validate(selected)
    group = group or os.environ.get("WANDB_RUN_GROUP") or (runs[0].sweep if runs else "sweep")
    sweep_dir = Path(out) if out else Path(runs[0].output_dir).parent
    _check_out(sweep_dir)  # now, not when the comparison is written after the last run

    outcomes = {}
    for i, run in enumerate(selected, 1):
        outcome = _run_one(run, f"[{i}/{len(selected)}]", resolved[run.name], force, group)
        outcomes[run.name] = outcome
        if outcome == "interrupted" or (outcome == "failed" and stop_on_error):
            break

    rows = compare([r.output_dir for r in runs if Path(r.output_dir).is_dir()], sweep_dir, x_axis=x_axis)
    kinds = ("trained", "resumed", "skipped", "failed", "interrupted")
    counts = {kind: sum(o == kind for o in outcomes.values()) for kind in kinds}
    print(f"\nSweep {runs[0].sweep}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
          + f"; comparison in {sweep_dir / 'comparison.md'}")
    for run in selected:
        if outcomes.get(run.name) == "failed":
            print(f"  failed: {run.name}: {read_record(Path(run.output_dir)).get('error', '?')}")
    if outcomes and list(outcomes.values())[-1] == "interrupted":
        print("  interrupted: rerun the same command to resume.")
    for row in rows:
        row["outcome"] = outcomes.get(row["run"], "")
    return rows


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs named by --only (all when None), in the sweep's order."""
    missing = [n for n in only or [] if n not in {r.name for r in runs}]
    if missing:
        raise SweepError(f"--only {', '.join(missing)}: no such run; runs: {', '.join(r.name for r in runs)}.")
    return [r for r in runs if not only or r.name in only]


def _run_one(run: Run, counter: str, resolved: dict, force: bool, group: str) -> str:
    """Train (or resume, or skip) one run; returns trained, resumed, skipped, failed or interrupted."""
    import tracking
    import train

    out = Path(run.output_dir)
    state = run_state(out)
    record = read_record(out)
    if record.get("overrides") not in (None, run.overrides) and state != "new" and not force:
        print(f"{counter} {run.name}: warning: its arguments changed since it started ({out / RECORD}); "
              f"use --force --only {run.name} to retrain it with the new ones.")
    if state == "finished" and not force:
        print(f"{counter} {run.name}: finished, skipped ({out}/final_model).")
        return "skipped"
    if force and state != "new":
        _clear(out)
        state, record = "new", {}
    latest = train.latest_complete_checkpoint(out)
    start_step = train.checkpoint_step(latest) if latest else 0
    last = (record.get("sessions") or [{}])[-1]
    if last.get("outcome") == "failed" and not latest:
        print(f"{counter} {run.name}: retrying (it failed last time: {last.get('error', '?')}).")
    elif state == "interrupted":
        print(f"{counter} {run.name}: resuming from {latest}." if latest else
              f"{counter} {run.name}: restarting (interrupted before its first complete checkpoint).")
    else:
        print(f"{counter} {run.name}: starting in {out}.")

    record = {"sweep": run.sweep, "name": run.name, "source": run.source, "overrides": run.overrides, **resolved,
              "sessions": record.get("sessions", [])}
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": start_step, "outcome": "running"}
    record["sessions"].append(session)
    write_record(out, record)

    previous_group = os.environ.get("WANDB_RUN_GROUP")
    if "wandb" in resolved["report_to"]:
        os.environ["WANDB_RUN_GROUP"] = group  # wandb.init reads it: the sweep's runs appear as one group
    t0 = time.time()
    model_args, data_args, args = parse_run(run)  # fresh: train.run fills in defaults in place
    try:
        result = train.run(model_args, data_args, args)
        outcome = "interrupted" if result["interrupted"] else ("resumed" if latest else "trained")
        session.update(end_step=result["global_step"], outcome="interrupted" if result["interrupted"] else "finished")
    except KeyboardInterrupt:
        outcome = "interrupted"
        session.update(outcome="interrupted")
    except Exception as e:
        explained = train.explain_error(e, args)
        if explained is None:  # a bug rather than a bad setting: the traceback is what helps
            traceback.print_exc()
        message = explained or "".join(traceback.format_exception_only(e)).strip()
        print(f"{counter} {run.name}: FAILED: {message}", file=sys.stderr)
        outcome = "failed"
        session.update(outcome="failed", error=message)
        record["error"] = message
    finally:
        tracking.finish_wandb()  # after a failure: else the next run would log into this one's WandB run
        if previous_group is None:
            os.environ.pop("WANDB_RUN_GROUP", None)
        else:
            os.environ["WANDB_RUN_GROUP"] = previous_group
        session["wall_s"] = round(time.time() - t0, 2)
        write_record(out, record)
        gc.collect()  # the previous run's model and optimizer go before the next one is built
    return outcome


def _clear(out: Path) -> None:
    """--force: a fresh folder, or train.py would resume from (or keep) the old checkpoints."""
    if not (out / RECORD).is_file() and any(out.iterdir()):
        raise SweepError(f"--force: {out} was not made by experiments.py (no {RECORD}); move it away yourself.")
    shutil.rmtree(out)


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(record, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        problem = _one_line(e)
    if problem:  # write_record is atomic: only damage from outside leads here
        warnings.warn(f"{path} is damaged ({problem}): the run's earlier sessions are not known; a rerun starts a "
                      "new record.", stacklevel=2)
        return {}
    return record


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RECORD, json.dumps(record, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Comparing run folders


COLUMNS = [  # (key, Markdown header); the CSV uses the keys
    ("run", "run"), ("status", "status"), ("steps", "steps"), ("final_val_loss", "final val loss"),
    ("perplexity", "perplexity"), ("final_val_bpb", "val bits/byte"), ("best_step", "best step"), ("best_val_loss", "best val loss"),
    ("tokens_per_s", "tokens/s"), ("wall_time_s", "wall time"), ("parameters", "parameters"),
]


def compare(run_dirs: list[str | Path], out_dir: str | Path = DEFAULT_COMPARE_DIR, x_axis: str = "auto") -> list[dict[str, Any]]:
    """Summarise run folders (finished or not) into out_dir/comparison.{md,csv,png}; returns the rows."""
    run_dirs = [Path(d) for d in run_dirs]
    for d in run_dirs:
        if not ((d / "metrics.jsonl").is_file() or (d / "final_model").is_dir() or (d / RECORD).is_file()):
            raise SweepError(f"{d} is not a run folder (no metrics.jsonl, final_model/ or {RECORD}).")
    out_dir = Path(out_dir)
    _check_out(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no permission, a read-only disk
        raise SweepError(f"--out {out_dir}: cannot make the folder ({e.strerror or e}); choose another --out.") from None
    summaries = [summarize(d) for d in run_dirs]
    names = [s["row"]["run"] for s in summaries]
    for s in summaries:  # two folders with the same name (logs/a/x, logs/b/x): show their paths
        if names.count(s["row"]["run"]) > 1:
            s["row"]["run"] = str(s["dir"])
    rows = [s["row"] for s in summaries]
    write_atomic(out_dir / "comparison.md", comparison_table(rows) + samples_section(summaries))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[k for k, _ in COLUMNS] + ["run_dir"])
    writer.writeheader()
    for s in summaries:
        writer.writerow({**{k: s["row"].get(k) for k, _ in COLUMNS}, "run_dir": str(s["dir"])})
    write_atomic(out_dir / "comparison.csv", table.getvalue())
    plot_comparison(summaries, out_dir / "comparison.png", x_axis=x_axis)
    print(comparison_table(rows), end="")
    return rows


def summarize(run_dir: Path) -> dict[str, Any]:
    """One run folder -> its table row, its validation curve and its tokens per step."""
    import train

    record = read_record(run_dir)
    lines = read_metrics(run_dir / "metrics.jsonl")
    final = run_dir / "final_model"
    manifest = _read_json(final / "manifest.json")
    results = _read_json(final / "eval_results.json")
    latest = train.latest_complete_checkpoint(run_dir)

    sessions = record.get("sessions", [])
    ends = [l for l in lines if "train_runtime" in l and "train_samples_per_second" in l]
    if results:
        status, steps = "finished", results.get("step", manifest.get("global_step"))
        if len(sessions) > 1 or len(ends) > 1:
            status = "finished (resumed)"  # its tokens/s and wall time leave out what a kill -9 lost
    elif sessions and sessions[-1].get("outcome") == "failed":
        status, steps = "failed", train.checkpoint_step(latest) if latest else 0
    elif latest or lines or sessions:
        status = f"interrupted at {train.checkpoint_step(latest)}" if latest else "interrupted"
        steps = train.checkpoint_step(latest) if latest else 0
    else:
        status, steps = "not started", 0

    # Validation curve: the last evaluation at each step (the final evaluate() repeats the last step's).
    curve, bpb = {}, None
    for line in lines:
        if "eval_loss" in line and (not latest or results or line["step"] <= steps):
            curve[line["step"]] = line["eval_loss"]
            bpb = line.get("eval_bits_per_byte", bpb)
    curve = sorted(curve.items())
    final_loss = results.get("eval_loss") if results else (curve[-1][1] if curve else None)
    final_bpb = results.get("eval_bits_per_byte") if results else bpb
    best = min(curve, key=lambda p: p[1]) if curve else (None, None)

    block_size = record.get("block_size") or manifest.get("arguments", {}).get("data", {}).get("block_size")
    tokens_per_step = record.get("tokens_per_step") or _tokens_per_step(manifest)
    # Every session that ended logged the Trainer's speed metrics for its own steps (killed ones did not).
    runtime = sum(l["train_runtime"] for l in ends)
    samples = sum(l["train_samples_per_second"] * l["train_runtime"] for l in ends)
    tokens_per_s = samples * block_size / runtime if runtime and block_size else None
    walls = [s["wall_s"] for s in sessions if "wall_s" in s]
    wall = sum(walls) if walls else (runtime or None)

    row = {
        "run": record.get("name") or run_dir.resolve().name,
        "status": status,
        "steps": steps,
        "final_val_loss": _round(final_loss, 4),
        "perplexity": _round(math.exp(min(final_loss, 50.0)), 2) if final_loss is not None else None,
        "final_val_bpb": _round(final_bpb, 4),
        "best_step": best[0],
        "best_val_loss": _round(best[1], 4),
        "tokens_per_s": _round(tokens_per_s, 1),
        "wall_time_s": _round(wall, 1),
        "parameters": saved_parameter_count(final if results else latest) if (results or latest) else None,
    }
    return {"dir": run_dir, "row": row, "curve": curve, "tokens_per_step": tokens_per_step,
            "samples": last_samples(run_dir, None if results or not latest else steps)}


def last_samples(run_dir: Path, up_to: int | None = None) -> tuple[int, list[dict[str, Any]]] | None:
    """(step, rows) of the last step in the run's samples.jsonl (up to step `up_to`: an interrupted run's
    checkpoint, which a resumed run continues from), or None without samples."""
    import tracking

    rows = [r for r in tracking.read_samples(run_dir / tracking.SAMPLES_FILE) if up_to is None or r["step"] <= up_to]
    if not rows:
        return None
    step = max(r["step"] for r in rows)
    last: dict[str, dict] = {}
    for r in rows:
        if r["step"] == step:
            last[r.get("prompt", "")] = r  # a prompt written twice (a rerun's samples appended): the later one
    return step, list(last.values())


SAMPLE_CHARS = 200


def samples_section(summaries: list[dict[str, Any]]) -> str:
    """comparison.md's part under the table: each run's last samples during training (samples.jsonl), one line
    per prompt, cut to SAMPLE_CHARS characters; empty when no run has samples."""
    import tracking

    parts = []
    for s in summaries:
        if not s.get("samples"):
            continue
        step, rows = s["samples"]
        lines = [f"- {_markdown_text(tracking.one_line(r['text'], SAMPLE_CHARS))}" for r in rows]
        parts.append(f"**{_markdown_text(str(s['row']['run']))}** (step {step}):\n\n" + "\n".join(lines) + "\n")
    return "\n## Last samples\n\n" + "\n".join(parts) if parts else ""


def _markdown_text(text: str) -> str:
    """Model text shown as itself in Markdown: its markup characters escaped."""
    return "".join("\\" + c if c in "\\`*_{}[]<>#|!~" else c for c in text)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    import tracking

    return tracking.read_metrics(path) if path.is_file() else []  # a line cut short by a kill -9 is skipped


def saved_parameter_count(model_dir: Path | None) -> int | None:
    """The parameters of a saved model folder, from its safetensors header alone (shapes), without loading the
    weights (model.count_parameters counts a loaded model's)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size - 8:  # garbage or truncated: do not try to read 2**63 bytes
                raise ValueError(f"its header claims {size} bytes")
            header = json.loads(f.read(size))
        return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError) as e:
        warnings.warn(f"{path} is damaged ({_one_line(e)}): its parameter count is left out.", stacklevel=2)
        return None


def _tokens_per_step(manifest: dict) -> int | None:
    args = manifest.get("arguments", {})
    try:
        return (args["data"]["block_size"] * args["train"]["per_device_train_batch_size"]
                * args["train"]["gradient_accumulation_steps"] * manifest.get("world_size", 1))
    except (KeyError, TypeError):
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """comparison.md's table: one row per run."""
    right = {"steps", "final_val_loss", "perplexity", "final_val_bpb", "best_step", "best_val_loss", "tokens_per_s", "wall_time_s", "parameters"}
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join("---:" if k in right else "---" for k, _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "parameters":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    if key == "wall_time_s":
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
    if key in ("final_val_loss", "best_val_loss", "final_val_bpb"):
        return f"{value:.4f}"
    if key == "perplexity":
        return f"{value:.2f}"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def plot_comparison(summaries: list[dict[str, Any]], png: Path, x_axis: str = "auto") -> None:
    """Left: every run's validation loss on shared axes; right: tokens/s per run."""
    import tracking

    plt = tracking.pyplot()

    if x_axis == "auto":  # tokens seen compare runs of different batch or block sizes fairly
        x_axis = "tokens" if all(s["tokens_per_step"] for s in summaries) else "step"
    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        color = colors[i % len(colors)]
        if s["curve"]:
            steps, losses = zip(*s["curve"])
            xs = [x * s["tokens_per_step"] for x in steps] if x_axis == "tokens" else steps
            finished = s["row"]["status"].startswith("finished")
            style = "o-" if finished else "o--"
            label = s["row"]["run"] if finished else f"{s['row']['run']} ({s['row']['status']})"
            loss_ax.plot(xs, losses, style, color=color, markersize=3, label=label)
    loss_ax.set_xlabel("tokens seen" if x_axis == "tokens" else "step")
    loss_ax.set_ylabel("validation loss")
    loss_ax.set_title("Validation loss")
    loss_ax.grid(alpha=0.3)
    if any(s["curve"] for s in summaries):
        loss_ax.legend(fontsize=8)

    names = [s["row"]["run"] for s in summaries]
    speeds = [s["row"]["tokens_per_s"] or 0 for s in summaries]
    bars = speed_ax.barh(range(len(names)), speeds, color=[colors[i % len(colors)] for i in range(len(names))])
    speed_ax.set_yticks(range(len(names)), names, fontsize=8)
    speed_ax.invert_yaxis()  # the same order as the table
    speed_ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "n/a" for v in speeds], fontsize=8, padding=2)
    speed_ax.set_xlabel("training tokens/s")
    speed_ax.set_title("Throughput")
    speed_ax.margins(x=0.15)
    tracking.save_figure(fig, png)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="experiments.py",
        description="Run a sweep of train.py configurations (rerun to skip finished runs and resume interrupted "
                    "ones), or compare existing run folders; writes comparison.md, .csv and .png.",
        epilog="Sweep file format: see the top of experiments.py or the README.",
    )
    parser.add_argument("sweep", nargs="?", help="YAML or JSON sweep file (name, output_dir, base, grid, runs).")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="Compare these run folders (train.py --output_dir's) without training anything.")
    parser.add_argument("--out", help=f"Folder for comparison.md/.csv/.png (default: the sweep's output_dir; "
                                      f"with --compare, {DEFAULT_COMPARE_DIR}).")
    parser.add_argument("--dry_run", action="store_true", help="Check every run's arguments, list the runs and their state, train nothing.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Run only these runs of the sweep (the comparison still shows all).")
    parser.add_argument("--force", action="store_true", help="Retrain the selected runs from scratch, deleting their folders.")
    parser.add_argument("--group", help="WandB group for the runs that --report_to wandb (default: the sweep's name).")
    parser.add_argument("--stop_on_error", action="store_true", help="Stop at the first failed run instead of going on with the others.")
    parser.add_argument("--x_axis", choices=("auto", "step", "tokens"), default="auto",
                        help="x axis of the loss plot (auto: tokens seen when known for every run, else step).")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    if bool(opts.sweep) == bool(opts.compare):
        parser.error("give either a sweep file or --compare RUN_DIR...")
    return run_main(lambda: _run(opts))


def _run(opts) -> int:
    if opts.compare:
        compare(opts.compare, opts.out or DEFAULT_COMPARE_DIR, x_axis=opts.x_axis)
        return 0
    if opts.dry_run:
        selected = select(load_sweep(opts.sweep), opts.only)
        validate(selected)
        for i, run in enumerate(selected, 1):
            print(f"[{i}/{len(selected)}] {run.name}  ({run_state(run.output_dir)}, {run.output_dir})  "
                  + " ".join(to_argv(run.overrides)))
        return 0
    rows = run_sweep(opts.sweep, only=opts.only, force=opts.force, group=opts.group,
                     stop_on_error=opts.stop_on_error, out=opts.out, x_axis=opts.x_axis)
    outcomes = [r["outcome"] for r in rows]
    if "interrupted" in outcomes:
        return 130
    return 1 if "failed" in outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
