"""experiments.py and sweep_spec.py: sweep files, validation before any run, a sweep interrupted and resumed, the comparison.

Runs use a tiny model on a small text file, as in test_train.py."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import experiments
import train as train_mod
from experiments import compare, main, run_sweep
from sweep_spec import SweepError, expand, load_sweep, parse_run, validate

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS, KILL_AT = 12, 4, 6
torch.set_num_threads(1)  # tiny models: one thread is fastest, and much faster on a busy machine
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000], encoding="utf-8")
    return path


def tiny_base(corpus, cache_dir):
    return dict(
        dataset_path=str(corpus), cache_dir=str(cache_dir), val_split=0.05, n_layer=1, n_embd=32, n_head=2,
        block_size=16, per_device_train_batch_size=4, per_device_eval_batch_size=32, max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS, eval_steps=SAVE_STEPS, logging_steps=2, warmup_steps=2, report_to="none",
        sample_prompts=["none"], disable_tqdm=True, seed=7,
    )


def write_sweep(path, spec):
    path.write_text(json.dumps(spec) if path.suffix == ".json" else yaml.safe_dump(spec, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# The sweep file


def test_grid_expands_to_named_runs_on_top_of_base(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: demo\nbase: {max_steps: 5, n_layer: 1}\n"
                    "grid: {learning_rate: [3e-4, 1.0e-3], n_layer: [2, 4]}\n"
                    "runs:\n  - {name: wide, n_embd: 384, n_head: 6}\n  - {block_size: 64}\n")
    runs = load_sweep(path)
    assert [r.name for r in runs] == ["lr=3e-4,n_layer=2", "lr=3e-4,n_layer=4", "lr=1e-3,n_layer=2",
                                      "lr=1e-3,n_layer=4", "wide", "block_size=64"]
    assert runs[1].overrides == {"max_steps": 5, "n_layer": 4, "learning_rate": "3e-4"}  # YAML 1.1 reads 3e-4 as text
    assert runs[4].overrides == {"max_steps": 5, "n_layer": 1, "n_embd": 384, "n_head": 6}
    assert runs[0].output_dir == str(Path("logs/sweeps/demo/lr=3e-4,n_layer=2")) and runs[0].sweep == "demo"
    # Values reach train.py converted as on its command line.
    _, _, args = parse_run(runs[0])
    assert args.learning_rate == 3e-4 and args.max_steps == 5

    as_json = write_sweep(tmp_path / "s.json", {"output_dir": str(tmp_path / "out"), "grid": {"learning_rate": [0.0003]}})
    (run,) = load_sweep(as_json)
    assert (run.name, run.output_dir, run.sweep) == ("lr=3e-4", str(tmp_path / "out" / "lr=3e-4"), "s")


@pytest.mark.parametrize("text, message", [
    ("grid: {learning_rate: 3e-4}", "grid.learning_rate must be a non-empty list"),
    ("runs: [{name: a}, {name: a}]", "two runs are named 'a'"),
    ("gird: {n_layer: [1]}", "unknown top-level key(s) gird (did you mean grid?)"),
    ("runs: [{name: a/b}]", "cannot be a folder name"),
    ("base: [1, 2]", "base must be a mapping"),
    ("grid: {n_layer: [1, 2]\n", "not valid YAML"),
])
def test_malformed_sweep_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_every_bad_argument_is_reported_before_any_run_starts(tmp_path, monkeypatch, capsys):
    def must_not_train(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(train_mod, "run", must_not_train)
    path = write_sweep(tmp_path / "s.yaml", {
        "output_dir": str(tmp_path / "out"),
        "base": {"max_steps": 2, "report_to": "none", "lerning_rate": 1e-3},
        "runs": [{"name": "ok"}],
    })
    with pytest.raises(SweepError, match=r"every run|run 'ok'") as e:
        run_sweep(path)
    assert "unknown argument 'lerning_rate' (did you mean learning_rate" in str(e.value) and str(path) in str(e.value)

    path = write_sweep(tmp_path / "s.yaml", {
        "output_dir": str(tmp_path / "out"),
        "base": {"max_steps": 2, "report_to": "none"},
        "runs": [{"name": "fine"}, {"name": "bad-precision", "precision": "fp8"},
                 {"name": "bad-float", "warmup_steps": "abc"}, {"name": "heads", "n_embd": 30, "n_head": 4},
                 {"name": "mine", "output_dir": "elsewhere"}],
    })
    assert main([str(path)]) == 2  # bad input
    err = capsys.readouterr().err
    assert "The sweep was not started" in err and "Traceback" not in err
    assert f"{path}: run 'bad-precision': precision='fp8': --precision 'fp8': choose auto, fp32" in err
    assert "run 'bad-float': warmup_steps='abc'" in err and "invalid float value" in err
    (heads,) = [line for line in err.splitlines() if "run 'heads': " in line]  # train.py's or our own wording
    assert "n_head" in heads and "n_embd" in heads and "30" in heads
    assert "run 'mine': output_dir is not allowed here" in err
    assert "'fine'" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


# ----------------------------------------------------------------------------------------------
# Two tiny runs: one killed and resumed, both compared, and skipped on a rerun


def test_interrupted_sweep_resumes_skips_finished_runs_and_compares(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "sweep"
    group = "experiments-test-group"
    path = write_sweep(tmp_path / "sweep.yaml", {
        "name": "tiny", "output_dir": str(out), "base": tiny_base(corpus, tmp_path / "cache"),
        "runs": [{"name": "a", "learning_rate": 3e-3, "report_to": "wandb"}, {"name": "b", "learning_rate": 1e-3}],
    })
    a, b = out / "a", out / "b"

    # Run b alone as the command line would, and kill -9 it in the middle (after its first checkpoint).
    # tests/run_with_faults.py runs experiments.py's main() with the kill injected from the test side.
    proc = subprocess.run([sys.executable, "tests/run_with_faults.py", "experiments", str(path), "--only", "b"], cwd=ROOT, text=True,
                          capture_output=True, timeout=240,
                          env={**os.environ, **ONE_THREAD, "GPT2_DEBUG_KILL_AT_STEP": str(KILL_AT)})
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "[1/1] b: starting" in proc.stdout
    assert (b / f"checkpoint-{SAVE_STEPS}" / train_mod.COMPLETE).is_file() and not (b / "final_model").exists()

    (row,) = compare([b], tmp_path / "before")
    assert row["status"] == f"interrupted at {SAVE_STEPS}" and row["steps"] == SAVE_STEPS
    assert row["final_val_loss"] is not None and row["tokens_per_s"] is None  # a killed session has no speed metrics
    assert "interrupted at 4" in (tmp_path / "before" / "comparison.md").read_text()

    # The whole sweep: a is trained, b resumes from its checkpoint.
    capsys.readouterr()
    rows = run_sweep(path, group=group)
    log = capsys.readouterr().out
    assert "[1/2] a: starting" in log and f"[2/2] b: resuming from {b / f'checkpoint-{SAVE_STEPS}'}" in log
    assert f"Resuming from {b / f'checkpoint-{SAVE_STEPS}'}" in log  # train.py's own resume
    assert [r["run"] for r in rows] == ["a", "b"] and [r["outcome"] for r in rows] == ["trained", "resumed"]
    sessions = json.loads((b / "experiment.json").read_text())["sessions"]
    assert [(s["start_step"], s["outcome"]) for s in sessions] == [(0, "running"), (SAVE_STEPS, "finished")]

    for row, folder in zip(rows, (a, b)):
        results = json.loads((folder / "final_model" / "eval_results.json").read_text())
        assert row["status"] == ("finished (resumed)" if folder == b else "finished") and row["steps"] == MAX_STEPS
        assert row["final_val_loss"] == round(results["eval_loss"], 4)
        assert row["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-4)
        from safetensors.torch import load_file

        assert row["parameters"] == sum(t.numel() for t in load_file(folder / "final_model" / "model.safetensors").values())
        lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        evals = {l["step"]: l["eval_loss"] for l in lines if "eval_loss" in l}
        assert row["best_step"] == min(evals, key=evals.get)
        # Tokens/s is the Trainer's measurement of the session(s) that ended; for b only the resumed one,
        # whose metrics count its own steps, not the whole run's.
        (end,) = [l for l in lines if "train_runtime" in l]
        steps = MAX_STEPS - (SAVE_STEPS if folder == b else 0)
        assert round(end["train_steps_per_second"] * end["train_runtime"]) == steps
        assert row["tokens_per_s"] == pytest.approx(end["train_samples_per_second"] * 16, rel=1e-3)
        assert row["wall_time_s"] > 0
    assert rows[0]["final_val_loss"] != rows[1]["final_val_loss"]

    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["steps"]) for r in table] == [("a", "finished", "12"), ("b", "finished (resumed)", "12")]
    assert "| a | finished | 12 |" in (out / "comparison.md").read_text()
    # WandB (offline here): run a went to the sweep's group.
    (wandb_file,) = (a / "wandb").glob("offline-run-*/run-*.wandb")
    assert group.encode() in wandb_file.read_bytes()
    assert "WANDB_RUN_GROUP" not in os.environ

    # A rerun trains nothing: both runs are finished.
    mtimes = [(f / "final_model" / "model.safetensors").stat().st_mtime_ns for f in (a, b)]
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: pytest.fail("a finished run was retrained"))
    capsys.readouterr()
    assert main([str(path)]) == 0
    log = capsys.readouterr().out
    assert "[1/2] a: finished, skipped" in log and "[2/2] b: finished, skipped" in log and "2 skipped" in log
    assert [(f / "final_model" / "model.safetensors").stat().st_mtime_ns for f in (a, b)] == mtimes
    assert main([str(path), "--dry_run"]) == 0
    assert f"[2/2] b  (finished, {b})" in capsys.readouterr().out

    # --compare on existing folders, without training.
    assert main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"comparison.md", "comparison.csv", "comparison.png"}
    assert main(["--compare", str(tmp_path)]) == 2 and "is not a run folder" in capsys.readouterr().err


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, corpus, monkeypatch, capsys):
    real_run = train_mod.run

    def fail_for_broken(model_args, data_args, args):
        if Path(args.output_dir).name == "broken":
            raise RuntimeError("something went wrong in this run")
        return real_run(model_args, data_args, args)

    monkeypatch.setattr(train_mod, "run", fail_for_broken)
    base = {**tiny_base(corpus, tmp_path / "cache"), "max_steps": 2, "save_steps": 2, "eval_steps": 2}
    path = write_sweep(tmp_path / "s.yaml", {"output_dir": str(tmp_path / "out"), "base": base,
                                             "runs": [{"name": "broken"}, {"name": "good"}]})
    assert main([str(path), "--stop_on_error"]) == 1
    assert not (tmp_path / "out" / "good").exists()
    capsys.readouterr()
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    assert "[1/2] broken: FAILED: RuntimeError: something went wrong in this run" in captured.err
    assert "1 trained, 1 failed" in captured.out and "failed: broken: RuntimeError" in captured.out
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "| broken | failed |" in table and "| good | finished | 2 |" in table


def test_the_sweep_file_api_is_still_importable_from_experiments():
    import sweep_spec

    for name in ("SweepError", "Run", "load_sweep", "expand", "run_name", "known_arguments", "to_argv", "parse_run", "validate"):
        assert getattr(experiments, name) is getattr(sweep_spec, name), name


def test_help_documents_every_flag():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = experiments.build_parser().format_help()
    for flag in ("--compare", "--out", "--dry_run", "--only", "--force", "--group", "--stop_on_error", "--x_axis"):
        assert flag in text, flag


def test_validate_returns_what_the_comparison_needs(tmp_path, corpus):
    runs = expand({"output_dir": str(tmp_path), "base": tiny_base(corpus, tmp_path),
                   "grid": {"gradient_accumulation_steps": [1, 2]}})
    resolved = validate(runs)
    assert [resolved[r.name]["tokens_per_step"] for r in runs] == [16 * 4, 16 * 4 * 2]


def test_ctrl_c_stops_the_sweep_and_force_retrains_from_scratch(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(model_args, data_args, args):
        calls.append(Path(args.output_dir).name)
        (Path(args.output_dir) / "checkpoint-2").mkdir(parents=True)
        return {"interrupted": True, "global_step": 2}  # what train.run returns after Ctrl-C

    monkeypatch.setattr(train_mod, "run", fake_run)
    path = write_sweep(tmp_path / "s.yaml", {"output_dir": str(tmp_path / "out"), "base": {"report_to": "none"},
                                             "grid": {"max_steps": [2, 3]}})
    assert main([str(path)]) == 130
    assert calls == ["steps=2"]  # the sweep stopped with the interrupted run
    assert "rerun the same command to resume" in capsys.readouterr().out

    stale = tmp_path / "out" / "steps=2" / "checkpoint-2"
    monkeypatch.setattr(train_mod, "run", lambda m, d, args: calls.append(Path(args.output_dir).name) or
                        {"interrupted": False, "global_step": 2})
    assert main([str(path), "--only", "steps=2", "--force"]) == 0
    assert calls == ["steps=2", "steps=2"] and not stale.exists()  # a fresh folder: nothing old to resume from
    assert "[1/1] steps=2: starting" in capsys.readouterr().out
    assert main([str(path), "--only", "nope"]) == 2 and "--only nope: no such run" in capsys.readouterr().err


def test_the_example_sweep_is_valid_and_in_the_docs():
    runs = load_sweep(ROOT / "sweeps" / "example.yaml")
    resolved = validate(runs)
    assert len(runs) == 4 and all(r["block_size"] == 128 for r in resolved.values())
    page = (ROOT / "docs" / "experiments.md").read_text()
    assert "![experiments](experiments.png)" in page and (ROOT / "docs" / "experiments.png").is_file()
    assert "python experiments.py sweeps/example.yaml" in (ROOT / "README.md").read_text()
    for run in runs:
        assert f"| {run.name} | finished |" in page


# ----------------------------------------------------------------------------------------------
# More bad inputs (issue 13: faults, not only values)


@pytest.mark.parametrize("name, text, message", [
    ("grid.yaml", "base: {max_steps: 2}\ngrid: {learning_rate: [1e-3, 3e-3]}\ngrid: {n_layer: [1, 2]}\n",
     "line 3: key 'grid' is given twice"),
    ("run.yaml", "runs:\n  - {name: a, n_layer: 1, n_layer: 2}\n", "line 2: key 'n_layer' is given twice"),
    ("s.json", '{"base": {"max_steps": 2}, "base": {"n_layer": 1}}', "key(s) 'base' given twice"),
], ids=["grid twice", "run key twice", "json key twice"])
def test_a_key_given_twice_is_refused_not_dropped(tmp_path, name, text, message):
    """YAML and JSON parsers keep the last of two equal keys: a whole grid vanished without a word."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    merged = tmp_path / "merge.yaml"  # a YAML merge key, then a key overridden: what merge keys are for
    merged.write_text("base: &b {max_steps: 2, n_layer: 1}\nruns:\n  - {<<: *b, n_layer: 2, name: x}\n")
    assert load_sweep(merged)[0].overrides == {"max_steps": 2, "n_layer": 2}


def test_unreadable_sweep_files_are_one_line_errors(tmp_path, capsys):
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("base: {max_steps: 2}\n", encoding="utf-16")
    (tmp_path / "folder.yaml").mkdir()
    bom = tmp_path / "bom.yaml"
    bom.write_text("\ufeffbase: {max_steps: 2}\n", encoding="utf-8")
    for path, expected in [(utf16, "byte 0 is not UTF-8 text: save the sweep file as UTF-8"),
                           (tmp_path / "folder.yaml", "is a folder: pass the sweep's YAML or JSON file")]:
        assert main([str(path), "--dry_run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}") and expected in err and len(err.splitlines()) == 1, err
    assert load_sweep(bom)[0].overrides == {"max_steps": 2}


def test_run_names_longer_than_a_folder_name_are_refused(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {"runs": [{"name": "x" * 300}]})
    with pytest.raises(SweepError, match="is 300 bytes, longer than a folder name may be"):
        load_sweep(path)


def test_a_file_where_a_folder_goes_stops_the_sweep_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "run", lambda *a, **k: pytest.fail("a run started"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b").write_text("not a folder")
    path = write_sweep(tmp_path / "s.yaml", {"output_dir": str(tmp_path / "out"), "base": {"report_to": "none"},
                                             "runs": [{"name": "a"}, {"name": "b"}]})
    assert main([str(path), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert f"run 'b': its folder {tmp_path / 'out' / 'b'} cannot be made: {tmp_path / 'out' / 'b'} is a file" in err
    assert "Traceback" not in err and "run 'a'" not in err
    (tmp_path / "out" / "b").unlink()
    assert main([str(path), "--out", str(tmp_path / "afile" / "cmp")]) == 2
    assert f"--out {tmp_path / 'afile' / 'cmp'}: {tmp_path / 'afile'} is a file" in capsys.readouterr().err
    path = write_sweep(tmp_path / "s.yaml", {"output_dir": str(tmp_path / "afile"), "base": {"report_to": "none"}})
    with pytest.raises(SweepError, match=f"{tmp_path / 'afile'} is a file"):
        run_sweep(path)


def _finished_run(folder, eval_loss=3.0):
    (folder / "final_model").mkdir(parents=True)
    (folder / "final_model" / "eval_results.json").write_text(json.dumps({"eval_loss": eval_loss, "step": 4}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval_loss": eval_loss}) + "\n")
    return folder


def test_damaged_files_in_run_folders_are_said_not_taken_for_good_ones(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
    (run / "final_model" / "model.safetensors").write_bytes(os.urandom(100))  # its header length is garbage
    (run / "experiment.json").write_text('{"name": "run", "sessions": [{"outc')  # damaged from outside
    with pytest.warns(UserWarning) as caught:
        (row,) = compare([run], tmp_path / "cmp")
    messages = " ".join(str(w.message) for w in caught)
    assert f"{run / 'final_model' / 'model.safetensors'} is damaged" in messages
    assert f"{run / 'experiment.json'} is damaged" in messages
    assert row["status"] == "finished" and row["parameters"] is None and row["final_val_loss"] == 3.0
    # A cut eval_results.json is no proof that the run finished: the sweep resumes it instead of skipping it forever.
    assert experiments.run_state(run) == "finished"
    (run / "final_model" / "eval_results.json").write_text('{"eval_loss": 3.0, "st')
    assert experiments.run_state(run) == "interrupted"


def test_comparison_files_are_replaced_whole(tmp_path, monkeypatch):
    """A crash (or a full disk) while the comparison is written leaves the previous files, not half of new ones."""
    runs = [_finished_run(tmp_path / "a", 3.0), _finished_run(tmp_path / "b", 2.0)]
    out = tmp_path / "cmp"
    compare(runs, out)
    before = {name: (out / name).read_bytes() for name in ("comparison.md", "comparison.csv")}
    (runs[1] / "final_model" / "eval_results.json").write_text(json.dumps({"eval_loss": 1.0, "step": 4}))
    real_writerow, calls = csv.DictWriter.writerow, []

    def crash_on_second_row(self, row):
        calls.append(row)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_writerow(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", crash_on_second_row)
    with pytest.raises(OSError):
        compare(runs, out)
    assert (out / "comparison.csv").read_bytes() == before["comparison.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.png"]


def test_the_comparison_shows_each_runs_last_samples(tmp_path):
    a, b = _finished_run(tmp_path / "a", 3.0), _finished_run(tmp_path / "b", 2.0)
    long = "Once " + "upon a time " * 40
    rows = [{"step": 2, "prompt": "The", "text": "The early text"}, {"step": 4, "prompt": "The", "text": "The cat\nsat"},
            {"step": 4, "prompt": "Once", "text": long}]
    (a / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "prompt": "The", "te')
    compare([a, b], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    table, samples = md.split("## Last samples")
    assert "| a | finished | 4 |" in table
    assert "**a** (step 4):" in samples and "- The cat sat\n" in samples and "early text" not in samples
    (cut,) = [l for l in samples.splitlines() if l.startswith("- Once")]
    assert len(cut) <= 2 + 200 and cut.endswith("\u2026")
    assert "**b**" not in samples  # no samples.jsonl: no entry
    compare([b], tmp_path / "cmp_b")
    assert "Last samples" not in (tmp_path / "cmp_b" / "comparison.md").read_text()
