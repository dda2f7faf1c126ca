"""train.py: arguments, the run's outputs, exact resume after kill -9 / Ctrl-C, guards, tracking, DDP.

Every run uses a tiny model on a small text file, so the whole file takes a minute or two on 2 cores."""

import collections
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import checkpoints
import dataset
import model
import optimizers
import tracking
import train as train_mod
import train_args
from run_with_faults import weights_hash
from train import COMPLETE, main, parse_args, resolve_defaults, train

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 16, 4
# Tiny models run fastest on one thread, and much faster so on a busy machine (no OpenMP spin-waiting).
torch.set_num_threads(1)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# train.py's main() with test-only faults (GPT2_DEBUG_* in env: a sleep per step, a kill while saving, weight hashes)
WITH_FAULTS = (sys.executable, "tests/run_with_faults.py", "train")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small .txt file (Python's own documentation text: always there, no download)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


def tiny_kwargs(out, corpus, cache_dir, **overrides):
    kwargs = dict(
        output_dir=str(out), dataset_path=str(corpus), cache_dir=str(cache_dir), val_split=0.05,
        n_layer=2, n_embd=32, n_head=2, block_size=16, per_device_train_batch_size=4, per_device_eval_batch_size=32,
        max_steps=MAX_STEPS, save_steps=SAVE_STEPS, eval_steps=SAVE_STEPS, logging_steps=2, learning_rate=3e-3,
        warmup_steps=2, report_to="none", sample_prompts=["none"], disable_tqdm=True, seed=7,
    )
    kwargs.update(overrides)
    return kwargs


def to_argv(kwargs):
    argv = []
    for k, v in kwargs.items():
        argv += [f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return argv


def cli(kwargs, env=None, launcher=(sys.executable, "train.py"), **popen):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, **(env or {})}
    # A session of its own, so that a hung run (and torchrun's workers) can be killed as a group.
    return subprocess.Popen([*launcher, *to_argv(kwargs)], cwd=ROOT, env=full_env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the run took over {timeout}s:\n{out}")
    return proc.returncode, out


def wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.communicate()[0]}"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


def final_state(out):
    final = Path(out) / "final_model"
    return load_file(final / "model.safetensors"), json.loads((final / "eval_results.json").read_text())


def assert_same_result(out, reference):
    weights, metrics = final_state(out)
    ref_weights, ref_metrics = reference
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=0, atol=1e-6, msg=name)
    assert abs(metrics["eval_loss"] - ref_metrics["eval_loss"]) < 1e-6
    assert metrics["step"] == ref_metrics["step"] == MAX_STEPS


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """An uninterrupted run, as a subprocess like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference")
    rc, log = finish(cli(tiny_kwargs(out, corpus, cache_dir)))
    assert rc == 0, log
    return final_state(out)


# ----------------------------------------------------------------------------------------------
# Arguments


def test_help_lists_every_flag_with_help():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for flag in ("dataset_name", "dataset_path", "val_split", "block_size", "n_embd", "n_layer", "n_head", "init_from",
                 "text_field", "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                 "learning_rate", "save_steps", "eval_steps", "report_to", "seed", "resume", "resume_from_checkpoint",
                 "early_stopping_patience", "preset", "ddp_backend", "fsdp"):
        assert f"--{flag} " in out.stdout or f"--{flag}\n" in out.stdout, flag
    help_text = " ".join(out.stdout.split())
    assert "6e-4 at 768 (GPT-2 124M)" in help_text and "5e-5 with --init_from" in help_text


def test_config_file_json_and_yaml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"max_steps": 7, "n_layer": 3, "dataset_path": "x.txt", "report_to": "none"}))
    (tmp_path / "c.yaml").write_text("max_steps: 9\nblock_size: 64\nlearning_rate: 0.001\nreport_to: none\n")
    m, d, t = parse_args([str(tmp_path / "c.json")])
    assert (t.max_steps, m.n_layer, d.dataset_path) == (7, 3, "x.txt")
    m, d, t = parse_args([str(tmp_path / "c.yaml")])
    assert (t.max_steps, d.block_size, t.learning_rate) == (9, 64, 0.001)


def test_defaults_on_cpu():
    m, d, t = parse_args([])
    assert t.output_dir == "logs" and t.report_to == ["wandb"] and t.weight_decay == 0.01
    assert t.lr_scheduler_type.value == "warmup_stable_decay" and not (t.fp16 or t.bf16)
    resolve_defaults(m, d, t)
    assert (m.preset, m.n_layer, m.n_embd, m.n_head, d.block_size) == ("small", 4, 256, 4, 128)
    assert t.learning_rate == pytest.approx(3e-3) and t.max_steps == train_mod.CPU_MAX_STEPS  # 3x AdamW's with Muon
    # From scratch the learning rate follows the width, as in GPT-3's table.
    assert [train_mod.scratch_learning_rate(w) for w in (64, 768, 1024, 1280, 1600)] == [1e-3, 6e-4, 3e-4, 2.5e-4, 2e-4]
    # Warmup: 500 steps, but never more than 10% of the run.
    assert t.get_warmup_steps(100) == 10 and t.get_warmup_steps(100_000) == 500
    m, d, t = parse_args(["--optim", "adamw_torch_fused"])
    resolve_defaults(m, d, t)
    assert t.learning_rate == 1e-3
    m, d, t = parse_args(["--init_from", "some/model"])
    resolve_defaults(m, d, t)
    assert t.learning_rate == 5e-5
    m, d, t = parse_args(["--learning_rate", "2e-3"])  # not the default, so the explicit value is seen to win
    resolve_defaults(m, d, t)
    assert t.learning_rate == 2e-3


def test_optimizer_defaults_muon_from_scratch_adamw_to_fine_tune():
    m, d, t = parse_args([])
    resolve_defaults(m, d, t)
    assert (t.optim, t.muon_learning_rate) == ("muon", optimizers.MUON_LR)
    m, d, t = parse_args(["--init_from", "some/model"])
    resolve_defaults(m, d, t)
    assert t.optim == "adamw_torch_fused"  # fine-tuning keeps the Trainer's default AdamW
    m, d, t = parse_args(["--init_from", "some/model", "--optim", "muon"])
    resolve_defaults(m, d, t)
    assert t.optim == "muon"  # unless asked
    m, d, t = parse_args(["--optim", "adafactor"])
    resolve_defaults(m, d, t)
    assert t.optim == "adafactor"


def test_muon_refuses_sharded_weights():
    m, d, t = parse_args(["--optim", "muon"])
    t.fsdp = [True]  # as transformers parses --fsdp full_shard (it needs a distributed launch to get this far)
    with pytest.raises(train_mod.UserError, match="FSDP and DeepSpeed shard.*adamw_torch_fused"):
        resolve_defaults(m, d, t)
    m, d, t = parse_args([])  # auto: AdamW where Muon cannot run
    t.deepspeed = "ds.json"
    resolve_defaults(m, d, t)
    assert t.optim == "adamw_torch_fused"


def test_bad_schedule_and_muon_flags_are_refused():
    for argv, match in ((["--decay_fraction", "0"], "decay_fraction"), (["--decay_fraction", "1.5"], "decay_fraction"),
                        (["--muon_learning_rate", "-1"], "muon_learning_rate"), (["--optim", "nope"], "nope")):
        with pytest.raises(train_mod.UserError, match=match):
            parse_args(argv)


@pytest.mark.parametrize("argv", [["--weight_decay", "nan"], ["--weight_decay", "-0.1"], ["--max_grad_norm", "nan"],
                                  ["--max_grad_norm", "inf"], ["--adam_beta1", "1.5"], ["--adam_beta2", "1"],
                                  ["--adam_epsilon", "0"], ["--warmup_steps", "nan"], ["--label_smoothing_factor", "-1"],
                                  ["--save_steps", "0"], ["--max_warmup_fraction", "nan"]])
def test_numeric_flags_must_be_finite_and_in_range(argv):
    # Each was taken as it came: --max_grad_norm nan meant no clipping, --weight_decay nan NaN weights from step 1.
    with pytest.raises(train_mod.UserError, match=rf"^{argv[0]} {argv[1]}: must be "):
        parse_args(argv)
    parse_args([argv[0], "0.5"])  # a value in range is taken


def test_muon_trains_with_both_optimizers_and_a_warmup_stable_decay_schedule(tmp_path, corpus, cache_dir):
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=10, warmup_steps=2, logging_steps=1,
                                 save_strategy="no", eval_strategy="no", optim="muon",
                                 lr_scheduler_type="warmup_stable_decay", decay_fraction=0.3))
    lrs = [row["learning_rate"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
           if "learning_rate" in row]
    peak = 3e-3
    # The rate each step trained with: warmup (1 step: capped at 10% of the run), constant, then down linearly over
    # the last 3 steps (transformers' schedules start at 0 and end one step before 0, for linear decay too).
    assert lrs == pytest.approx([0.0, peak, peak, peak, peak, peak, peak, peak, peak * 2 / 3, peak / 3], abs=1e-9)
    manifest = json.loads((tmp_path / "final_model" / "manifest.json").read_text())
    assert manifest["arguments"]["train"]["optim"] == "muon"
    assert result["global_step"] == 10


def test_fused_loss_is_used_on_a_gpu_and_in_fp32_on_a_cpu():
    gpu = types.SimpleNamespace(fused_loss="auto", fsdp="", deepspeed=None, label_smoothing_factor=0.0, use_liger_kernel=False,
                                device=torch.device("cuda"), bf16=True, fp16=False)
    assert train_args.use_fused_loss(gpu) and not train_args.use_fused_loss(types.SimpleNamespace(**{**vars(gpu), "fsdp": "full_shard"}))
    assert train_args.use_fused_loss(parse_args([])[2])
    assert not train_args.use_fused_loss(parse_args(["--precision", "bf16", "--use_cpu", "true"])[2])
    assert not train_args.use_fused_loss(parse_args(["--fused_loss", "off"])[2])
    assert not train_args.use_fused_loss(parse_args(["--label_smoothing_factor", "0.1"])[2])
    with pytest.raises(train_mod.UserError, match="label smoothing"):
        train_args.use_fused_loss(parse_args(["--fused_loss", "on", "--label_smoothing_factor", "0.1"])[2])


@pytest.mark.parametrize("native", [True, False])
def test_auto_runs_the_fused_loss_gemms_in_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(train_args, "native_bf16_cpu", lambda: native)
    t = resolved(["--use_cpu", "true"])
    assert (t.precision, t.fused_loss, t.fused_loss_gemm) == ("fp32", "on", "bf16" if native else "fp32")
    assert t.to_dict()["fused_loss_gemm"] == t.fused_loss_gemm  # the manifest records what ran
    # An explicit fp32 keeps every GEMM in fp32; bf16 autocast and a fused loss turned off have no such GEMMs.
    for argv in (["--precision", "fp32"], ["--precision", "bf16"], ["--fused_loss", "off"]):
        assert resolved(["--use_cpu", "true", *argv]).fused_loss_gemm == "fp32", argv
    assert resolved(["--use_cpu", "true", "--fused_loss_gemm", "bf16", "--precision", "fp32"]).fused_loss_gemm == "bf16"
    t = parse_args(["--use_cpu", "true", "--precision", "fp16"])[2]
    train_args.resolve_training_defaults(t, on_gpu=False)  # a CPU under autocast: the Trainer's loss
    assert (t.fused_loss, t.fused_loss_gemm) == ("off", "fp32")
    with pytest.raises(train_mod.UserError, match="--fused_loss_gemm bf16 .* add --fused_loss on"):
        resolved(["--use_cpu", "true", "--fused_loss", "off", "--fused_loss_gemm", "bf16"])
    with pytest.raises(train_mod.UserError, match="--fused_loss_gemm 'fp16': choose auto, fp32 or bf16"):
        parse_args(["--fused_loss_gemm", "fp16"])


def test_unknown_train_kwarg_is_refused():
    with pytest.raises(train_mod.UserError, match="Unknown argument"):
        train(n_layers=2)


def test_user_errors_are_short_messages(tmp_path, corpus, cache_dir, capsys):
    rc = main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir, block_size=2048)))
    err = capsys.readouterr().err
    assert rc == 2 and "--block_size 2048" in err and "Traceback" not in err
    rc = main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir, resume=str(tmp_path / "nope"))))
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def not_tokenized(**kwargs):
    pytest.fail("the data was tokenized before the arguments were checked")


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": -1}, "--learning_rate -1: must be a positive number"),
    ({"learning_rate": 0}, "--learning_rate 0: must be a positive number"),  # was taken for "unset": 1e-3
    ({"max_steps": 0}, "--max_steps 0: give a positive number of optimizer steps, or -1"),  # was the 80-step default
    ({"n_embd": 65, "n_head": 2}, "n_embd (65) must be a multiple of n_head (2)"),
    ({"n_head": 0}, "n_head=0 must be a whole number of at least 1"),
    ({"dropout": 1.5}, "dropout=1.5 must be in [0, 1)"),
    ({"per_device_train_batch_size": 0}, "--per_device_train_batch_size 0: must be at least 1"),
    ({"block_size": 0}, "--block_size 0: must be at least 2"),
    ({"n_positions": 8}, "--block_size 16 exceeds the model's context of 8 tokens"),
    ({"warmup_steps": -3}, "--warmup_steps -3: must be a number of steps at least 0"),
    ({"vocab_multiple": 0}, "--vocab_multiple 0: must be a whole number of at least 1"),
])
def test_bad_values_are_one_line_errors_before_any_work(tmp_path, corpus, cache_dir, capsys, monkeypatch, overrides, message):
    monkeypatch.setattr(dataset, "get_dataset_and_tokenizer", not_tokenized)
    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir, **overrides)
    assert main(to_argv(kwargs)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(train_mod.UserError, match=re.escape(message)):
        train(**kwargs)


def test_val_split_out_of_range_is_a_one_line_error(tmp_path, corpus, cache_dir, capsys):
    assert main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir, val_split=1.5))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "val_split=1.5 must be in [0, 1)" in err


def resolved(argv):
    """parse_args, then resolve_defaults: the training arguments as run() uses them."""
    m, d, t = parse_args(argv)
    resolve_defaults(m, d, t)
    return t


def test_max_steps_default_is_a_cpu_budget_and_minus_one_means_epochs():
    cpu = ["--use_cpu", "true"]
    assert parse_args(cpu)[2].max_steps is None  # unset until resolved
    assert resolved(cpu).max_steps == train_mod.CPU_MAX_STEPS
    for argv in (["--max_steps", "-1"], ["--num_train_epochs", "2"]):
        t = resolved(cpu + argv)
        assert t.max_steps == -1 and t.num_train_epochs == (2 if "2" in argv else 3), argv
    assert resolved(cpu + ["--max_steps", "5"]).max_steps == 5
    with pytest.raises(train_mod.UserError, match="--num_train_epochs 0.0: must be more than 0"):
        resolved(["--num_train_epochs", "0"])


def test_resolving_twice_changes_nothing():
    m, d, t = parse_args(["--use_cpu", "true"])
    resolve_defaults(m, d, t)
    before = (repr(m), repr(d), t.to_dict())
    resolve_defaults(m, d, t)
    assert (repr(m), repr(d), t.to_dict()) == before
    assert (t.precision, t.fused_loss) == ("fp32", "on")  # "auto" resolved, so the manifest records what ran


def test_config_file_values_are_read_like_flags(tmp_path):
    # YAML reads 1e-3 as a string; a wrong type or name is a message naming the file, not a traceback.
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-3\nsample_prompts: [a, b]\nuse_cpu: true\ndropout: null\n")
    m, d, t = parse_args([str(tmp_path / "c.yaml")])
    assert t.learning_rate == 0.001 and t.sample_prompts == ["a", "b"] and t.use_cpu and m.dropout is None
    for text, message in [("max_stepz: 3\n", "unknown key(s) max_stepz"), ("max_steps: abc\n", "invalid int value: 'abc'"),
                          ("n_layer: 2.5\n", "invalid int value: '2.5'"), ("max_steps: [3\n", "cannot read it as YAML"),
                          ("- 1\n- 2\n", "expected a mapping of flag names to values")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(train_mod.UserError, match=f"^{re.escape(str(tmp_path / 'bad.yaml'))}: .*{re.escape(message)}"):
            parse_args([str(tmp_path / "bad.yaml")])


def test_output_dir_that_cannot_be_a_folder(tmp_path, corpus, cache_dir, capsys, monkeypatch):
    monkeypatch.setattr(dataset, "get_dataset_and_tokenizer", not_tokenized)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert main(to_argv(tiny_kwargs(afile, corpus, cache_dir))) == 2
    assert f"--output_dir {afile} is a file, not a folder" in capsys.readouterr().err
    assert main(to_argv(tiny_kwargs(afile / "run", corpus, cache_dir))) == 2  # cannot be created (as on a read-only disk)
    assert f"Cannot write to --output_dir {afile / 'run'}" in capsys.readouterr().err


def test_bf16_without_a_gpu_trains_on_the_cpu(tmp_path, corpus, cache_dir):
    args = parse_args(["--precision", "bf16"])[2]  # transformers alone refuses bf16 without a GPU unless --use_cpu
    assert args.bf16 and (args.use_cpu or torch.accelerator.is_available())
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, precision="bf16", max_steps=2, save_strategy="no"))
    assert result["global_step"] == 2 and result["eval_metrics"]["eval_loss"] < 20


def test_a_new_models_context_is_its_n_positions(tmp_path, corpus, cache_dir):
    # The saved tokenizer states the model's context (pipelines truncate prompts to it), not GPT-2's 1024.
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, n_positions=64, max_steps=1, save_strategy="no"))
    tokenizer_config = json.loads((tmp_path / "final_model" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 64


def test_block_size_beyond_1024_with_a_larger_n_positions(tmp_path, corpus, cache_dir):
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, n_positions=2048, block_size=1500, per_device_train_batch_size=1,
                                 val_split=0.2, max_steps=1, save_strategy="no"))
    assert result["global_step"] == 1


def test_init_from_a_folder_without_weights(tmp_path, corpus, cache_dir, capsys):
    (tmp_path / "model").mkdir()
    assert main(to_argv(tiny_kwargs(tmp_path / "out", corpus, cache_dir, init_from=str(tmp_path / "model")))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not load a model from init_from") and "save_pretrained" in err


def test_ctrl_c_before_training_is_one_line(tmp_path, corpus, cache_dir, capsys, monkeypatch):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "get_dataset_and_tokenizer", interrupted)  # Ctrl-C while tokenizing
    assert main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir))) == 130
    assert capsys.readouterr().err == "error: interrupted; rerun the same command to start again.\n"


def test_a_tokenizer_other_than_gpt2s_sets_the_vocabulary_and_special_ids(tmp_path, corpus, cache_dir, small_bpe_folder):
    # A 300-token BPE whose <|endoftext|> is id 0: the vocabulary is padded to 320, the saved configs name id 0 as
    # BOS, EOS and pad (not GPT-2's 50256), and the saved generation config never samples the 20 padding rows.
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, tokenizer_name=str(small_bpe_folder), max_steps=2,
                                 save_strategy="no", sample_prompts=["The"], sample_max_new_tokens=8))
    final = tmp_path / "final_model"
    config = json.loads((final / "config.json").read_text())
    generation = json.loads((final / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 0, 0)
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 0, 0)
    assert config["vocab_size"] == 320
    assert generation["suppress_tokens"] == list(range(300, 320))
    assert load_file(final / "model.safetensors")["transformer.wte.weight"].shape == (320, 32)
    assert result["samples"][0].startswith("The")


def test_vocab_multiple_one_turns_padding_off_and_a_checkpoint_keeps_its_vocabulary(tmp_path, corpus, cache_dir):
    # A run from before padding (50257 rows) resumes with its own vocabulary, not the 50304 a new model gets.
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, vocab_multiple=1, max_steps=4, save_steps=4, eval_steps=4))
    assert json.loads((tmp_path / "final_model" / "config.json").read_text())["vocab_size"] == 50257
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=6, save_steps=4, eval_steps=4))
    assert result["global_step"] == 6
    assert json.loads((tmp_path / "final_model" / "config.json").read_text())["vocab_size"] == 50257


# ----------------------------------------------------------------------------------------------
# A whole run: final model, metrics, checkpoints


def test_full_run_outputs(tmp_path, corpus, cache_dir):
    from transformers import pipeline

    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, sample_prompts=["The"], sample_max_new_tokens=5))
    final = tmp_path / "final_model"
    assert result["final_model"] == str(final) and result["global_step"] == MAX_STEPS
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "eval_results.json", "manifest.json"):
        assert (final / name).is_file(), name
    assert not any(p.name.startswith("final_model.") for p in tmp_path.iterdir())  # no temp folder left
    assert json.loads((final / "config.json").read_text())["vocab_size"] == 50304  # GPT-2's 50257, padded to 64

    metrics = json.loads((final / "eval_results.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(result["eval_metrics"]["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-4)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["arguments"]["model"]["n_layer"] == 2 and manifest["data"]["fingerprint"]
    assert {"torch", "transformers", "python"} <= manifest["versions"].keys() and "git" in manifest

    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
    assert len(evals) >= MAX_STEPS // SAVE_STEPS and evals[-1] < evals[0]  # validation loss falls
    assert any("loss" in l for l in lines) and (tmp_path / "loss_curve.png").stat().st_size > 1000

    # The last 2 complete checkpoints are kept, plus the best (here the last one is also the best).
    ckpts = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-12", "checkpoint-16"]
    assert all((tmp_path / c / COMPLETE).is_file() for c in ckpts)
    assert len(result["samples"]) == 1 and result["samples"][0].startswith("The")

    generator = pipeline("text-generation", model=str(final))  # no code of ours needed
    text = generator("Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello") and len(text) > len("Hello")


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fused_loss_trains_like_the_models_own_loss(tmp_path, corpus, cache_dir, accumulation, monkeypatch):
    calls = []
    real = model.lm_head_loss
    monkeypatch.setattr(model, "lm_head_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for fused in ("on", "off"):
        out, calls[:] = tmp_path / fused, []
        train(**tiny_kwargs(out, corpus, cache_dir, max_steps=6, save_strategy="no", fused_loss=fused,
                            fused_loss_gemm="fp32", gradient_accumulation_steps=accumulation,
                            optim="adamw_torch_fused"))  # Muon's bf16 orthogonalisation would amplify float rounding
        runs[fused] = final_state(out)
        assert bool(calls) == (fused == "on")
    (on_weights, on_metrics), (off_weights, off_metrics) = runs["on"], runs["off"]
    assert on_metrics["eval_loss"] == pytest.approx(off_metrics["eval_loss"], abs=1e-4)
    for name in on_weights:
        torch.testing.assert_close(on_weights[name], off_weights[name], rtol=0, atol=1e-4, msg=name)


def test_two_steps_with_the_fused_loss_gemms_in_bf16(tmp_path, corpus, cache_dir, monkeypatch):
    monkeypatch.setattr(train_args, "native_bf16_cpu", lambda: True)  # as on an AMX / AVX512-BF16 CPU
    dtypes, real = [], model.lm_head_loss
    monkeypatch.setattr(model, "lm_head_loss", lambda *a, **k: dtypes.append(k.get("gemm_dtype")) or real(*a, **k))
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=2, save_strategy="no"))
    assert result["global_step"] == 2 and 0 < result["eval_metrics"]["eval_loss"] < 20
    assert dtypes and set(dtypes) == {torch.bfloat16}
    manifest = json.loads((tmp_path / "final_model" / "manifest.json").read_text())
    assert (manifest["arguments"]["train"]["fused_loss_gemm"], manifest["arguments"]["train"]["precision"]) == ("bf16", "fp32")


# ----------------------------------------------------------------------------------------------
# Samples during training


def sample_rows(out):
    return [json.loads(l) for l in (Path(out) / "samples.jsonl").read_text().splitlines()]


def test_samples_at_every_evaluation_in_the_console_and_samples_jsonl(tmp_path, corpus, cache_dir, capsys):
    # fp32 on CPU: the fused loss is on (it asks the model for no logits), and sampling mid-run works beside it.
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, sample_prompts=["The", "In the"], sample_max_new_tokens=5))
    rows = sample_rows(tmp_path)
    steps = list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))  # every evaluation during training, once
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in steps for p in ("The", "In the")]
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in rows)
    out = capsys.readouterr().out
    for r in rows:
        assert f"[step {r['step']}] {' '.join(r['text'].split())}" in out
    # The final model's samples (same weights, seed and sampler) are those of the last step's.
    assert result["samples"] == [r["text"] for r in rows[-2:]]

    train(**tiny_kwargs(tmp_path / "every", corpus, cache_dir, sample_prompts=["The"], sample_max_new_tokens=3,
                        max_steps=6, sample_every=3, save_strategy="no"))
    assert [r["step"] for r in sample_rows(tmp_path / "every")] == [3, 6]
    train(**tiny_kwargs(tmp_path / "never", corpus, cache_dir, sample_prompts=["The"], max_steps=4, sample_every=0,
                        save_strategy="no"))
    assert not (tmp_path / "never" / "samples.jsonl").exists()


def test_sampling_changes_neither_the_weights_nor_any_rng(tmp_path, corpus, cache_dir):
    import numpy as np

    # Dropout on, so that training draws from torch's RNG at every step; sampling after every step.
    runs = {}
    for name, prompts in (("on", ["The", "In the"]), ("off", ["none"])):
        train(**tiny_kwargs(tmp_path / name, corpus, cache_dir, max_steps=6, eval_steps=2, save_strategy="no", dropout=0.1,
                            sample_prompts=prompts, sample_every=1, sample_max_new_tokens=4))
        runs[name] = final_state(tmp_path / name)[0]
    assert [r["step"] for r in sample_rows(tmp_path / "on")] == [s for s in range(1, 7) for _ in range(2)]
    for name in runs["off"]:
        assert torch.equal(runs["on"][name], runs["off"][name]), name

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "gpt2_tokenizer")
    tiny = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32)).train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    texts = [c.text for c in tracking.draw_samples(tiny, tokenizer, ["The"], 5, seed=3)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all() and tiny.training
    assert [c.text for c in tracking.draw_samples(tiny, tokenizer, ["The"], 5, seed=3)] == texts


def test_bad_sample_every_is_refused(tmp_path, corpus, cache_dir, capsys):
    assert main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir, sample_every=-1))) == 2
    assert "--sample_every -1" in capsys.readouterr().err


def test_samples_go_to_a_growing_wandb_table(tmp_path, corpus, cache_dir, monkeypatch):
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tables, real_log = [], Run.log

    def log(self, data, *args, **kwargs):  # wandb.init binds wandb.log to the run's log
        if "samples" in data:
            tables.append((data["train/global_step"], data["samples"]))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(Run, "log", log)
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=8, report_to="wandb", sample_prompts=["The", "In the"],
                        sample_max_new_tokens=4))
    rows = [[r["step"], r["prompt"], r["text"]] for r in sample_rows(tmp_path)]
    assert [step for step, _ in tables] == [4, 8]
    assert all(t.columns == ["step", "prompt", "text"] for _, t in tables)
    assert tables[0][1].data == rows[:2] and tables[1][1].data == rows  # each table holds every sample so far
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("files/media/table/samples_*.table.json")), "the offline run holds no samples table"


def test_samples_go_to_tensorboard_as_text(tmp_path, corpus, cache_dir):
    if not tracking.tensorboard_installed():
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=4, eval_steps=2, save_strategy="no", report_to="tensorboard",
                        sample_prompts=["The", "In the"], sample_max_new_tokens=4))
    found = {}
    for events in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("samples/"):
                for e in acc.Tensors(tag):
                    found[(e.step, tag)] = e.tensor_proto.string_val[0].decode()
    expected = {(r["step"], f"samples/prompt_{i % 2}/text_summary"): r["text"] for i, r in enumerate(sample_rows(tmp_path))}
    assert found == expected and len(found) == 4


# ----------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path, corpus, cache_dir, reference):
    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir)
    proc = cli(kwargs, env={"GPT2_DEBUG_STEP_SLEEP": "0.25"}, launcher=WITH_FAULTS)
    wait_for(tmp_path / f"checkpoint-{SAVE_STEPS}" / COMPLETE, proc)
    time.sleep(random.uniform(0, 2.0))  # a random later step, sometimes in the middle of a save
    proc.kill()  # SIGKILL: no chance to clean up
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "final_model").exists()

    rc, log = finish(cli(kwargs))
    assert rc == 0, log
    assert "Resuming from" in log
    assert_same_result(tmp_path, reference)
    # The default from scratch is Muon with AdamW: the checkpoint holds both optimizers' state.
    assert json.loads((tmp_path / "final_model" / "manifest.json").read_text())["arguments"]["train"]["optim"] == "muon"
    state = torch.load(tmp_path / f"checkpoint-{MAX_STEPS}" / "optimizer.pt", weights_only=True)["state"]
    assert {frozenset(s) for s in state.values()} == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}


@pytest.mark.slow
def test_kill_9_with_samples_on_gives_the_result_without_samples(tmp_path, corpus, cache_dir, reference):
    """The reference run samples nothing: sampling changes no weight, and a resumed run writes each step's samples once."""
    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir, sample_prompts=["The", "In the"], sample_max_new_tokens=4)
    proc = cli(kwargs, env={"GPT2_DEBUG_STEP_SLEEP": "0.25"}, launcher=WITH_FAULTS)
    wait_for(tmp_path / f"checkpoint-{SAVE_STEPS}" / COMPLETE, proc)
    time.sleep(random.uniform(0, 2.0))  # a random later step: sometimes after a sample and before its checkpoint
    proc.kill()
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"

    rc, log = finish(cli(kwargs))
    assert rc == 0, log
    assert "Resuming from" in log
    assert_same_result(tmp_path, reference)
    rows = sample_rows(tmp_path)
    steps = list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in steps for p in ("The", "In the")]


@pytest.mark.slow
def test_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, corpus, cache_dir, reference):
    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir)
    rc, _ = finish(cli(kwargs, env={"GPT2_DEBUG_KILL_IN_SAVE": str(2 * SAVE_STEPS)}, launcher=WITH_FAULTS))
    assert rc == -signal.SIGKILL
    partial = tmp_path / f"checkpoint-{2 * SAVE_STEPS}"
    assert (partial / "model.safetensors").is_file() and not (partial / COMPLETE).exists()

    rc, log = finish(cli(kwargs))
    assert rc == 0, log
    assert f"Ignoring incomplete checkpoint {partial}" in log
    assert f"Resuming from {tmp_path / f'checkpoint-{SAVE_STEPS}'}" in log
    assert_same_result(tmp_path, reference)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_rerun_finishes_identically(tmp_path, corpus, cache_dir, reference):
    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir)
    proc = cli(kwargs, env={"GPT2_DEBUG_STEP_SLEEP": "0.25"}, launcher=WITH_FAULTS)
    wait_for(tmp_path / f"checkpoint-{SAVE_STEPS}" / COMPLETE, proc)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    rc, log = finish(proc)
    assert rc == 130, log
    assert "Rerun the same command to resume" in log
    latest = train_mod.latest_complete_checkpoint(tmp_path)
    step = train_mod.checkpoint_step(latest)
    assert SAVE_STEPS < step < MAX_STEPS and f"Stopped at step {step}; saved {latest}" in log
    assert not (tmp_path / "final_model").exists()

    rc, log = finish(cli(kwargs))
    assert rc == 0, log
    assert f"Resuming from {latest}" in log
    assert_same_result(tmp_path, reference)


def test_resume_skips_batches_without_loading_them(tmp_path, corpus, cache_dir, monkeypatch):
    """Reaching the data position samples indices only: skipped batches are never read or collated."""
    import dataset

    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=12, save_steps=8, eval_steps=8)
    train(**kwargs)
    for c in ("checkpoint-12", "final_model"):
        __import__("shutil").rmtree(tmp_path / c)

    reads = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            reads.append(i)
            return self.inner[i]

    real = dataset.get_dataset_and_tokenizer

    def counting_data(**kw):
        tok, tr, va = real(**kw)
        return tok, Counting(tr), va

    monkeypatch.setattr(dataset, "get_dataset_and_tokenizer", counting_data)
    monkeypatch.setattr(dataset, "dataset_info", lambda ds: {})
    result = train(**kwargs)
    assert result["global_step"] == 12
    # 4 remaining steps of batch 4, plus the one batch accelerate's DataLoaderShard reads ahead to spot the
    # end of the epoch; iterating over the 8 skipped batches would have read 32 more.
    assert len(reads) == (12 - 8) * 4 + 4


def test_resume_never_starts_fresh(tmp_path, corpus, cache_dir, capsys):
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=4))
    capsys.readouterr()
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=4, resume="never"))
    assert "Resuming" not in capsys.readouterr().out and result["global_step"] == 4
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=6, resume_from_checkpoint=str(tmp_path / "checkpoint-4")))
    assert "Resuming from" in capsys.readouterr().out and result["global_step"] == 6


# ----------------------------------------------------------------------------------------------
# Damaged, foreign and overwritten checkpoints; a cut metrics line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus, cache_dir):
    """A run of 8 steps that kept checkpoint-4 and checkpoint-8; tests copy it (run_copy) and break the copy."""
    out = tmp_path_factory.mktemp("finished")
    train(**tiny_kwargs(out, corpus, cache_dir, max_steps=8))
    shutil.rmtree(out / "final_model")
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign_torch_pickle(path):
    """A whole torch archive whose pickle holds an object weights-only loading refuses (other code wrote it)."""
    from fractions import Fraction

    torch.save({"state": Fraction(1, 3)}, path)


@pytest.mark.parametrize("name, damage", [
    ("optimizer.pt", cut_in_half), ("optimizer.pt", flip_a_middle_byte), ("scheduler.pt", lambda p: p.write_bytes(b"")),
    ("rng_state.pth", cut_in_half), ("trainer_state.json", cut_in_half), ("model.safetensors", lambda p: p.write_bytes(b"x" * 999)),
    ("optimizer.pt", foreign_torch_pickle), ("scheduler.pt", foreign_torch_pickle), ("rng_state.pth", foreign_torch_pickle),
])
def test_checkpoint_problem_names_the_damaged_file(run_copy, name, damage):
    checkpoint = run_copy / "checkpoint-8"
    assert checkpoints.checkpoint_problem(checkpoint) is None
    damage(checkpoint / name)
    assert checkpoints.checkpoint_problem(checkpoint).startswith(f"{name} is damaged (")


@pytest.mark.parametrize("damage", [cut_in_half, foreign_torch_pickle])
def test_damaged_latest_checkpoint_resumes_from_the_one_before(run_copy, corpus, cache_dir, capsys, damage):
    damage(run_copy / "checkpoint-8" / "optimizer.pt")  # COMPLETE, but cut short later (a copy that stopped), or foreign
    result = train(**tiny_kwargs(run_copy, corpus, cache_dir, max_steps=8))
    out = capsys.readouterr().out
    assert f"Checkpoint {run_copy / 'checkpoint-8'} cannot be resumed from: optimizer.pt is damaged" in out
    assert f"Moved the damaged {run_copy / 'checkpoint-8'} to {run_copy / 'checkpoint-8.damaged'}" in out
    assert f"Resuming from {run_copy / 'checkpoint-4'}" in out
    assert result["global_step"] == 8 and (run_copy / "checkpoint-8.damaged" / "model.safetensors").is_file()
    assert checkpoints.checkpoint_problem(run_copy / "checkpoint-8") is None  # written again, whole


def test_no_usable_checkpoint_says_what_to_do(run_copy, corpus, cache_dir, capsys, monkeypatch):
    monkeypatch.setattr(dataset, "get_dataset_and_tokenizer", not_tokenized)
    for step in (4, 8):
        cut_in_half(run_copy / f"checkpoint-{step}" / "trainer_state.json")
    assert main(to_argv(tiny_kwargs(run_copy, corpus, cache_dir))) == 2
    captured = capsys.readouterr()
    assert "checkpoint-4 cannot be resumed from: trainer_state.json is damaged" in captured.out
    assert f"error: No usable checkpoint in {run_copy}" in captured.err and "--resume never" in captured.err
    with pytest.raises(train_mod.UserError, match="cannot be resumed from: trainer_state.json is damaged"):
        train(**tiny_kwargs(run_copy, corpus, cache_dir, resume=str(run_copy / "checkpoint-8")))
    assert (run_copy / "checkpoint-8").is_dir()  # nothing set aside when there is nothing to resume instead


def test_checkpoint_of_another_model_shape(run_copy, corpus, cache_dir):
    with pytest.raises(train_mod.UserError, match=r"checkpoint-8 holds another model: n_embd 32 \(this run: 64\)"):
        train(**tiny_kwargs(run_copy, corpus, cache_dir, n_embd=64))


def test_resume_from_a_folder_of_any_name(run_copy, tmp_path, corpus, cache_dir):
    (tmp_path / "state_only").mkdir()
    shutil.copy(run_copy / "checkpoint-4" / "trainer_state.json", tmp_path / "state_only")
    with pytest.raises(train_mod.UserError, match="state_only cannot be resumed from: it holds no model weights"):
        train(**tiny_kwargs(tmp_path / "out", corpus, cache_dir, resume=str(tmp_path / "state_only")))
    shutil.copytree(run_copy / "checkpoint-4", tmp_path / "saved")  # a checkpoint kept under another name
    result = train(**tiny_kwargs(tmp_path / "out", corpus, cache_dir, max_steps=6, resume=str(tmp_path / "saved")))
    assert result["global_step"] == 6


def test_an_overwritten_checkpoint_is_incomplete_until_rewritten(run_copy, corpus, cache_dir, monkeypatch, capsys):
    # Resuming from checkpoint-4 rewrites checkpoint-8 in place; a failure half way must not leave the old marker.
    real = transformers.Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_8(self, output_dir):
        if self.state.global_step == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_8)
    assert main(to_argv(tiny_kwargs(run_copy, corpus, cache_dir, max_steps=8, resume=str(run_copy / "checkpoint-4")))) == 2
    assert "disk is full" in capsys.readouterr().err
    assert (run_copy / "checkpoint-8" / "model.safetensors").is_file() and not (run_copy / "checkpoint-8" / COMPLETE).exists()
    assert train_mod.latest_complete_checkpoint(run_copy) == run_copy / "checkpoint-4"


def test_rerun_after_the_last_checkpoint_trains_no_extra_step(run_copy, corpus, cache_dir):
    # The run stopped after its last checkpoint, during the final evaluation or save (run_copy has no final_model).
    result = train(**tiny_kwargs(run_copy, corpus, cache_dir, max_steps=8))
    assert result["global_step"] == 8
    final, last = load_file(run_copy / "final_model" / "model.safetensors"), load_file(run_copy / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(final[name], last[name]) for name in final)  # what the uninterrupted run saved


def test_a_cut_metrics_line_is_dropped_on_resume(run_copy, corpus, cache_dir, capsys):
    metrics = run_copy / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 8, "loss": 10.6, "ti')  # killed, or the disk filled, in the middle of an append
    result = train(**tiny_kwargs(run_copy, corpus, cache_dir, max_steps=8))
    assert result["global_step"] == 8
    line = len(whole.splitlines()) + 1
    assert f"{metrics}: line {line} is cut short or not a JSON object" in capsys.readouterr().out
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]  # whole JSON lines again, appended after
    assert len(rows) > line - 1 and rows[: line - 1] == [json.loads(l) for l in whole.splitlines()]


# ----------------------------------------------------------------------------------------------
# Guards


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    real = train_mod.GPT2Trainer.compute_loss

    def nan_after_step_5(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        if self.state.global_step >= 5:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod.GPT2Trainer, "compute_loss", nan_after_step_5)
    rc = main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir)))
    err = capsys.readouterr().err
    assert rc == 2
    assert "at step 6" in err and f"Last good checkpoint: {tmp_path / 'checkpoint-4'}" in err
    assert not (tmp_path / "final_model").exists()


def test_a_checkpoint_with_nan_weights_is_never_marked_complete(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    class PoisonAtStep8(transformers.TrainerCallback):  # after the step's loss was read as finite, before its save
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 8:
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    with_callback(monkeypatch, PoisonAtStep8())
    assert main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir))) == 2
    err = capsys.readouterr().err
    assert "The weights hold NaN/inf after step 8 (transformer.h.0.mlp.c_fc.weight)" in err
    assert f"Last good checkpoint: {tmp_path / 'checkpoint-4'}" in err
    assert not (tmp_path / "checkpoint-8" / COMPLETE).exists() and checkpoints.latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "final_model").exists()


def with_callback(monkeypatch, callback):
    """train()'s Trainer, with `callback` added after the toolkit's own."""
    real = train_mod.build_trainer

    def build(*args, **kwargs):
        trainer, stop = real(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer, stop

    monkeypatch.setattr(train_mod, "build_trainer", build)


HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


@pytest.mark.parametrize("overrides", [{}, {"optim": "adamw_torch_fused", "precision": "bf16", "gradient_accumulation_steps": 2},
                                       {"fused_loss": "off"}])
def test_a_training_step_that_does_not_log_reads_no_tensor_on_the_host(tmp_path, corpus, cache_dir, monkeypatch, overrides):
    # On a GPU each host read of a tensor makes the CPU wait for the queue to drain: the step's kernels stop queueing
    # ahead. Counted here on the CPU, where the same calls are made.
    reads, counting = collections.Counter(), [False]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if counting[0]:
                reads[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = []

    class Count(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            step = state.global_step + 1  # neither the first, nor one that logs, evaluates, saves or ends training
            counting[0] = 1 < step < args.max_steps and step % 5 != 0

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step) if counting[0] else None
            counting[0] = False

    with_callback(monkeypatch, Count())
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=12, logging_steps=5, eval_steps=5, save_steps=5, **overrides))
    assert steps == [2, 3, 4, 6, 7, 8, 9, 11]
    assert reads == {}, reads


class Weights(transformers.TrainerCallback):
    """The model's weights after each optimizer step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optim", ["muon", "adamw_torch_fused", "adamw_torch"])
def test_a_nan_loss_skips_every_step_from_it_and_stops_at_the_next_check(tmp_path, corpus, cache_dir, monkeypatch, capsys, optim):
    real = train_mod.GPT2Trainer.compute_loss

    def nan_from_step_6(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 5 else loss

    monkeypatch.setattr(train_mod.GPT2Trainer, "compute_loss", nan_from_step_6)
    weights = Weights()
    with_callback(monkeypatch, weights)
    # Nothing logs, evaluates or saves before step 12: fused AdamW and Muon skip steps 6-11 on the device and the guard
    # reads its flag at step 12, before that step's checkpoint; foreach AdamW cannot take the flag: read at every step.
    rc = main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir, logging_steps=12, eval_steps=12, save_steps=12, optim=optim)))
    err = capsys.readouterr().err
    assert rc == 2 and "The training loss became nan at step 6" in err and "Last good checkpoint: none yet" in err
    assert max(weights.after) == (11 if optim != "adamw_torch" else 5)  # the guard stops step 12 before this callback
    for step in range(6, max(weights.after) + 1):
        assert all(torch.equal(a, b) for a, b in zip(weights.after[5], weights.after[step])), step
    assert all(torch.isfinite(p).all() for p in weights.after[max(weights.after)])
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "final_model").exists()


def test_fp16_scaling_skips_overflowing_steps_and_training_goes_on(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    real = train_mod.GPT2Trainer.compute_loss
    trainers = []

    def inf_at_steps_3_and_4(self, model, inputs, *args, **kwargs):
        trainers.append(self) if not trainers else None
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("inf") if self.state.global_step in (2, 3) and model.training else loss

    monkeypatch.setattr(train_mod.GPT2Trainer, "compute_loss", inf_at_steps_3_and_4)

    class Scaled(train_mod.GPT2Trainer):  # fp16 on a CPU: autocast and a GradScaler, as accelerate gives them on a GPU
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.accelerator.native_amp = True
            self.accelerator.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(train_mod, "GPT2Trainer", Scaled)
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=8, logging_steps=4, save_strategy="no",
                                 optim="adamw_torch_fused"))
    assert result["global_step"] == 8 and trainers[0].guard.skipped() == 0  # reported at step 4, then counted afresh
    assert "Non-finite loss under fp16 loss scaling from step 3: 2 optimizer step(s) skipped so far." in capsys.readouterr().out
    assert math.isfinite(result["eval_metrics"]["eval_loss"])


def test_out_of_memory_says_what_to_change(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.Trainer, "training_step", oom)
    rc = main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir)))
    err = capsys.readouterr().err
    assert rc == 2 and "Out of memory" in err and "--per_device_train_batch_size" in err and "--block_size" in err


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    real = transformers.Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_8(self, output_dir):
        if self.state.global_step == 2 * SAVE_STEPS:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_8)
    rc = main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir)))
    err = capsys.readouterr().err
    assert rc == 2 and "disk is full" in err and "--output_dir" in err and "checkpoint-4, is intact" in err
    assert (tmp_path / "checkpoint-4" / COMPLETE).is_file()
    assert not (tmp_path / "checkpoint-8" / COMPLETE).exists()

    monkeypatch.undo()
    assert main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir))) == 0
    out = capsys.readouterr().out
    assert "Ignoring incomplete checkpoint" in out and "checkpoint-4" in out


def fake_disk(free):
    """shutil.disk_usage of a 100 GB disk with `free` bytes left."""
    usage = collections.namedtuple("usage", "total used free")
    return lambda path: usage(100 * 2**30, 100 * 2**30 - free, free)


TORCH_WRITE_FAILED = "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"


def test_torch_write_failure_on_a_full_disk_is_explained(run_copy, corpus, cache_dir, monkeypatch, capsys):
    real = transformers.Trainer._save_optimizer_and_scheduler

    def torch_save_fails_at_step_8(self, output_dir):
        if self.state.global_step == 8:
            raise RuntimeError(TORCH_WRITE_FAILED)  # what torch.save raises when the disk fills up
        return real(self, output_dir)

    shutil.rmtree(run_copy / "checkpoint-8")
    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", torch_save_fails_at_step_8)
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(2**20))
    assert main(to_argv(tiny_kwargs(run_copy, corpus, cache_dir, max_steps=8))) == 2
    err = capsys.readouterr().err
    assert f"error: The disk is full while writing to {run_copy} (0.00 GB free)." in err and "--output_dir" in err
    assert "checkpoint-4, is intact" in err


def test_other_write_failures_are_explained():
    args = parse_args(["--output_dir", "somewhere"])[2]
    full = Exception("No space left on device (os error 28)")  # tokenizers' and safetensors' own exception classes
    assert train_mod.explain_error(full, args).startswith("The disk is full while writing to somewhere.")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(shutil, "disk_usage", fake_disk(50 * 2**30))
        message = train_mod.explain_error(RuntimeError(TORCH_WRITE_FAILED), args)
    assert message.startswith("Writing a checkpoint to somewhere failed ([enforce fail") and "50.00 GB are free" in message
    assert "full" not in message
    denied = PermissionError(errno.EACCES, "Permission denied", "somewhere/checkpoint-4/optimizer.pt")
    assert train_mod.explain_error(denied, args).startswith("Cannot write somewhere/checkpoint-4/optimizer.pt: Permission denied.")
    assert train_mod.explain_error(RuntimeError("a bug"), args) is None


# ----------------------------------------------------------------------------------------------
# Tracking and early stopping


def test_wandb_offline_and_resumed_run_keeps_its_id(tmp_path, corpus, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=4, report_to="wandb"))
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=6, report_to="wandb"))  # resumes from checkpoint-4
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # Two runs started within one second share a folder name, and wandb then adds "-1" to the second.
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs), runs


def test_tensorboard_needs_its_package(tmp_path, corpus, cache_dir, capsys):
    if tracking.tensorboard_installed():
        result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=2, report_to="tensorboard"))
        assert result["global_step"] == 2
    else:
        assert main(to_argv(tiny_kwargs(tmp_path, corpus, cache_dir, report_to="tensorboard"))) == 2
        assert "pip install tensorboard" in capsys.readouterr().err


def test_early_stopping(tmp_path, corpus, cache_dir):
    # A huge learning rate makes the validation loss worse after the first evaluation.
    result = train(**tiny_kwargs(tmp_path, corpus, cache_dir, max_steps=40, eval_steps=2, save_steps=2,
                                 learning_rate=5.0, warmup_steps=0, early_stopping_patience=2))
    assert result["global_step"] < 40
    manifest = json.loads((tmp_path / "final_model" / "manifest.json").read_text())
    assert manifest["best_checkpoint"]  # the best model is the one kept


# ----------------------------------------------------------------------------------------------
# Scale-out


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["muon", "adamw_torch_fused"])
def test_torchrun_two_processes_one_final_model(tmp_path, corpus, cache_dir, optim):
    hashes = tmp_path / "hashes"
    kwargs = tiny_kwargs(tmp_path / "out", corpus, cache_dir, max_steps=6, save_steps=3, eval_steps=3,
                         ddp_backend="gloo", use_cpu=True, optim=optim)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *WITH_FAULTS[1:])
    rc, log = finish(cli(kwargs, env={"GPT2_DEBUG_HASH_DIR": str(hashes)}, launcher=launcher))
    assert rc == 0, log
    rank_hashes = {p.name: p.read_text() for p in hashes.iterdir()}
    assert set(rank_hashes) == {"rank0.sha256", "rank1.sha256"}
    assert len(set(rank_hashes.values())) == 1  # the ranks ended with identical weights
    assert log.count("Final model saved in") == 1  # written once, by the main process
    out = tmp_path / "out"
    assert (out / "final_model" / "model.safetensors").is_file()
    assert not any(p.name.startswith("final_model.") for p in out.iterdir())
    manifest = json.loads((out / "final_model" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["arguments"]["train"]["optim"] == optim

    from transformers import GPT2LMHeadModel

    final = GPT2LMHeadModel.from_pretrained(out / "final_model")
    assert weights_hash(final) == rank_hashes["rank0.sha256"]  # the saved model is the trained one


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(kwargs, hashes, node1_env=None, timeout=300):
    """A two-"node" job on this machine: two torchrun launches, one process each, rendezvous on localhost."""
    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = (sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "rehearsal",
                    "--max_restarts", "0", *WITH_FAULTS[1:])
        env = {"GPT2_DEBUG_HASH_DIR": str(hashes), **((node1_env or {}) if node else {})}
        procs.append(cli(kwargs, env=env, launcher=launcher))
    return [finish(p, timeout) for p in procs]


@pytest.mark.slow
def test_two_nodes_one_killed_stops_clearly_and_resumes_to_the_same_weights(tmp_path, corpus, cache_dir):
    kwargs = lambda out: tiny_kwargs(out, corpus, cache_dir, max_steps=8, save_steps=3, eval_steps=3,  # noqa: E731
                                     ddp_backend="gloo", use_cpu=True)
    results = two_nodes(kwargs(tmp_path / "whole"), tmp_path / "whole-hashes")
    assert all(rc == 0 for rc, _ in results), results
    reference = {p.read_text() for p in (tmp_path / "whole-hashes").iterdir()}
    assert len(reference) == 1

    out = tmp_path / "run"
    (rc0, log0), (rc1, _) = two_nodes(kwargs(out), tmp_path / "unused", node1_env={"GPT2_DEBUG_KILL_AT_STEP": "4"})
    assert rc0 != 0 and rc1 != 0  # the job stops: no node waits forever for the one that is gone
    assert "error: " in log0 and "rerun the same command on every node" in log0, log0
    assert (out / "checkpoint-3" / COMPLETE).exists() and not (out / "final_model").exists()

    results = two_nodes(kwargs(out), tmp_path / "resumed-hashes")  # --resume auto is the default
    assert all(rc == 0 for rc, _ in results), results
    assert "Resuming from" in results[0][1]
    assert {p.read_text() for p in (tmp_path / "resumed-hashes").iterdir()} == reference


def test_production_code_reads_no_debug_environment_variables():
    # Faults are injected from the test side (tests/run_with_faults.py, monkeypatch), never by the toolkit.
    for name in ("train.py", "checkpoints.py", "tracking.py", "model.py"):
        assert "GPT2_DEBUG" not in (ROOT / name).read_text(), name


@pytest.mark.parametrize("bf16_supported, precision", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu(monkeypatch, bf16_supported, precision):
    # The GPU defaults, resolved without a GPU: mixed precision where the Trainer's accelerator reads it, 3 epochs.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    t = parse_args([])[2]
    train_args.resolve_training_defaults(t, on_gpu=True)
    assert (t.precision, t.mixed_precision, t.bf16, t.fp16) == (precision, precision, bf16_supported, not bf16_supported)
    assert (t.max_steps, t.num_train_epochs, t.fused_loss) == (-1, 3.0, "off")


# ----------------------------------------------------------------------------------------------
# The estimate before training (estimate.py)


def _run_train(*argv):
    env = {**os.environ, **ONE_THREAD}
    return subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_estimate_prints_the_memory_and_trains_nothing(tmp_path, corpus):
    out = _run_train("--estimate", "--dataset_path", corpus, "--output_dir", tmp_path / "run", "--cache_dir", tmp_path / "cache",
                     "--n_layer", 2, "--n_embd", 32, "--n_head", 2, "--block_size", 16, "--report_to", "none")
    assert out.returncode == 0, out.stderr
    for line in ("weights", "gradients", "optimizer state", "activations", "peak (estimate)", "available"):
        assert line in out.stdout
    assert "tokens per optimizer step; 80 steps" in out.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing written, nothing tokenized


def test_a_run_that_does_not_fit_is_refused_before_tokenizing(tmp_path, corpus):
    out = _run_train("--dataset_path", corpus, "--output_dir", tmp_path / "run", "--cache_dir", tmp_path / "cache",
                     "--per_device_train_batch_size", 100000, "--block_size", 1024, "--report_to", "none")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Does not fit") and "--per_device_train_batch_size" in last and "--gradient_accumulation_steps" in last
    assert "(does not fit)" in out.stdout and "Traceback" not in out.stderr
    assert not (tmp_path / "cache").exists()


def test_the_manifest_holds_the_estimate_and_the_measured_speed(tmp_path, corpus, cache_dir):
    rc, log = finish(cli(tiny_kwargs(tmp_path, corpus, cache_dir)))
    assert rc == 0, log
    plan = json.loads((tmp_path / "final_model" / "manifest.json").read_text())["arguments"]["estimate"]
    assert plan["memory"]["total"] > plan["memory"]["weights"] > 0 and plan["steps"] == MAX_STEPS
    assert plan["tokens_per_step"] == 4 * 16 and plan["measured"]["tokens_per_s"] > 0
    assert f"After {plan['measured']['step']} steps: " in log and "tokens/s, ETA" in log


def test_auto_find_batch_size_on_cpu_keeps_the_effective_batch(tmp_path, corpus, cache_dir, monkeypatch, capsys):
    """--auto_find_batch_size picks the largest batch the estimate fits in the memory available (here made to be
    what batch 2 needs), with the accumulation steps that keep the effective batch, and trains with it."""
    import estimate
    import train
    from train_args import parse_args

    kwargs = tiny_kwargs(tmp_path, corpus, cache_dir, per_device_train_batch_size=8, max_steps=2, save_steps=2, eval_steps=2)
    shape = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 1024, "vocab_size": 50304,
             "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    need = estimate.estimate_memory(shape, 2, 16, fused_loss=True).total
    monkeypatch.setattr(train, "available_memory", lambda *a: int(need / 0.9) + 1)
    result = train.run(*parse_args([*to_argv(kwargs), "--auto_find_batch_size", "true"]))
    assert "per-device batch 2 x 4 accumulation steps (effective batch 8" in capsys.readouterr().out
    args = json.loads((Path(result["final_model"]) / "manifest.json").read_text())["arguments"]
    assert (args["train"]["per_device_train_batch_size"], args["train"]["gradient_accumulation_steps"]) == (2, 4)
    assert args["estimate"]["batch_size"] == 2 and args["estimate"]["tokens_per_step"] == 8 * 16


# ----------------------------------------------------------------------------------------------
# GPU defaults, decided on a CPU: torch.compile and the batch


def test_torch_compile_flag_auto_on_off():
    assert parse_args([])[2].torch_compile == "auto"
    assert resolved(["--use_cpu", "true"]).torch_compile == "auto"  # decided once the data is known (choose_compile)
    assert parse_args(["--torch_compile"])[2].torch_compile is True  # the Trainer's bare flag still means on
    assert parse_args(["--torch_compile", "off"])[2].torch_compile is False
    assert train_args.split_kwargs({"torch_compile": True})[2].torch_compile is True
    assert parse_args(["--torch_compile_backend", "aot_eager"])[2].torch_compile is True  # transformers' rule
    with pytest.raises(train_mod.UserError, match="--torch_compile 'maybe': choose auto, on or off"):
        parse_args(["--torch_compile", "maybe"])


def gpu_args(**overrides):
    """Training arguments as resolved on a GPU, for the functions that decide from them."""
    values = dict(device=torch.device("cuda", 0), world_size=1, bf16=True, fp16=False, max_steps=-1, num_train_epochs=3.0,
                  per_device_train_batch_size=8, gradient_accumulation_steps=1, batch_auto=True, accumulation_auto=True,
                  should_log=True, torch_compile="auto", torch_compile_backend=None, auto_find_batch_size=False)
    return types.SimpleNamespace(**{**values, **overrides})


GPT2_124M = dict(model.PRESETS["gpt2"], vocab_size=50304, n_positions=1024, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


@pytest.mark.parametrize("card_gib,batch", [(80, 128), (140, 256)])
def test_the_gpu_batch_is_the_largest_power_of_two_that_fits_and_accumulates_towards_half_a_million_tokens(card_gib, batch, capsys):
    import estimate

    options = dict(precision="bf16", fused_loss=True, gradient_checkpointing=False, optimizer="muon", device_type="cuda")
    args = gpu_args()
    assert train_mod.choose_gpu_batch(GPT2_124M, 1024, card_gib * 2**30, args, options)
    assert args.per_device_train_batch_size == batch
    assert estimate.estimate_memory(GPT2_124M, batch, 1024, **options).total <= 0.85 * card_gib * 2**30
    assert estimate.estimate_memory(GPT2_124M, 2 * batch, 1024, **options).total > 0.85 * card_gib * 2**30
    # OpenWebText-sized data: ~0.5M tokens per optimizer step; a small corpus: at most 1/100 of an epoch per step
    plan = {"auto_batch": True, "tokens_per_step": batch * 1024}
    train_mod.finish_gpu_batch(args, plan, n_blocks=9_000_000, block=1024)
    assert args.gradient_accumulation_steps * batch * 1024 == plan["tokens_per_step"] == 524288
    assert "GPU batch: " in capsys.readouterr().out
    small = gpu_args(per_device_train_batch_size=batch)
    train_mod.finish_gpu_batch(small, plan, n_blocks=25_600, block=1024)  # 26M tokens: 1/100 is 262,144 a step
    assert small.gradient_accumulation_steps == 262144 // (batch * 1024)
    tiny = gpu_args(per_device_train_batch_size=batch)
    train_mod.finish_gpu_batch(tiny, plan, n_blocks=100, block=1024)  # fewer blocks than the batch: at most the data
    assert (tiny.per_device_train_batch_size, tiny.gradient_accumulation_steps) == (64, 1)
    explicit = gpu_args(per_device_train_batch_size=12, batch_auto=False)
    train_mod.finish_gpu_batch(explicit, plan, n_blocks=9_000_000, block=1024)
    assert (explicit.per_device_train_batch_size, explicit.gradient_accumulation_steps) == (12, 1)


def test_compile_is_chosen_for_gpu_runs_long_enough_to_repay_it(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    plan = {"tokens_per_step": 524288, "flops_per_token": 6 * 124e6}
    long_run, short_run, cpu = gpu_args(max_steps=5000), gpu_args(max_steps=20), gpu_args(device=torch.device("cpu"))
    for args in (long_run, short_run, cpu):
        train_mod.choose_compile(args, plan, n_blocks=10**6)
    assert (long_run.torch_compile, long_run.torch_compile_backend) == (True, "inductor")
    assert short_run.torch_compile is False and cpu.torch_compile is False
    out = capsys.readouterr().out
    assert "--torch_compile auto: on" in out and "--torch_compile auto: off" in out
    epochs = gpu_args()  # 3 epochs of 10M blocks of 1024 tokens at 0.5M tokens a step: hours
    train_mod.choose_compile(epochs, plan, n_blocks=10**7)
    assert epochs.torch_compile is True
    asked = gpu_args(torch_compile=False, max_steps=5000)
    train_mod.choose_compile(asked, plan, n_blocks=10**6)
    assert asked.torch_compile is False
