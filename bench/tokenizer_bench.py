"""Train your own tokenizer: training speed and memory, bytes per token, and the main job's budget, in one run.

    python bench/tokenizer_bench.py                          # all three parts, ~6-8 min on 2 cores
    python bench/tokenizer_bench.py --skip_training          # parts 1 and 2 only (~1-2 min)
    python bench/tokenizer_bench.py --corpora builtin --budget_steps 10 --calibration_steps 4   # a quick look

1. Tokenizer training speed and peak memory per corpus (the built-in corpus, the WebText sample and the 13
   Gutenberg books of ../shared/data): train_tokenizer.py at 8192 tokens against Hugging Face's own
   `tokenizers.ByteLevelBPETokenizer().train(files, vocab_size=8192, min_frequency=2)` on the same text
   written to plain .txt files (outside the timing). Each run is a fresh child process, so its peak RSS
   (VmHWM, see _peak_rss_mb) is its own; a child that only imports is shown for reference. MB/s = bytes trained / seconds
   (ours trains on the documents train.py does not hold out; the baseline on all of them). Then ours on the
   WebText sample x1 and x4 (4 copies under different names): bytes grow 4x, peak RSS should barely move.
2. Bytes per token on the held-out documents (train_tokenizer's report): ours at --vocab_sizes against GPT-2's
   BPE. A corpus too small for a size shows "n/a (corpus fills only N)".
3. The main job's budget (`python train.py`: small preset, 4 layers x 256, block 128, batch 8, 80 steps, the
   built-in corpus) trained with GPT-2's BPE and with an 8k tokenizer trained on its training split (the same
   val_split 0.05 and seed 42, so the same documents are held out), at equal wall time: seconds per optimizer
   step of both are calibrated by short interleaved runs (median), GPT-2 trains --budget_steps steps and the 8k
   model round(budget_steps * t_gpt2 / t_8k). In-loop evaluation and checkpoints are off in both runs (the
   train wall time is optimizer steps only); each is then scored on its own validation blocks (the same
   held-out documents): validation loss, bits per byte (perplexity.evaluate_perplexity) and bytes per token,
   plus three samples (generate.generate, train.py's prompts and settings, seed 42).

Every part prints a Markdown table; --out_json saves the numbers. Without ../shared/data the corpora from it
are skipped with a printed line. Temporary files (text copies, tokenizers, runs, token cache) go to a temporary
folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPORA = {  # name: (label, dataset path relative to SHARED, or None for the built-in corpus)
    "builtin": ("built-in corpus", None),
    "webtext": ("WebText sample", "gpt2-output/webtext.train.head1408.jsonl"),
    "gutenberg": ("Gutenberg 13 books", "gutenberg-nltk/gutenberg13.txt"),
}
TRAIN_VOCAB = 8192  # parts 1 and 3
PROMPTS = ["The", "In the beginning", "Python is"]  # train.py's default sample prompts
SEED = 42
MB = 1e6


# ----------------------------------------------------------------------------------------------
# Workers: each runs in a fresh child process and prints one "RESULT {json}" line


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, the high-water mark of its own address space. ru_maxrss is not used
    where VmHWM exists: Linux carries it over from the forked parent across exec, so a child of a parent that
    imported torch would report the parent's ~220 MB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _fills_only(message: str):
    m = re.search(r"only fills (\d+) of", message)
    return int(m.group(1)) if m else None


def worker_import(spec: dict) -> dict:
    if spec["which"] == "torch":
        import torch

        return {"version": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}
    if spec["which"] == "ours":
        sys.path.insert(0, str(ROOT))
        import tokenizers  # noqa: F401
        from transformers import GPT2TokenizerFast  # noqa: F401  (train_tokenizer imports it to wrap the result)

        import train_tokenizer  # noqa: F401
    else:
        from tokenizers import ByteLevelBPETokenizer  # noqa: F401
    return {"peak_rss_mb": _peak_rss_mb()}


def worker_ours(spec: dict) -> dict:
    """train_tokenizer at each size in spec["vocab_sizes"]; a size the corpus cannot fill is recorded as such
    (with spec["retry_filled"], trained again at the size it fills, for the speed table)."""
    sys.path.insert(0, str(ROOT))
    from readers import DataError
    from train_tokenizer import train_tokenizer

    results = {}
    for v in spec["vocab_sizes"]:
        out = Path(spec["out"]) / f"bpe{v}"
        start = time.perf_counter()
        try:
            _, report = train_tokenizer(vocab_size=v, out=out, min_frequency=spec.get("min_frequency", 2), **spec["data"])
            results[str(v)] = {"report": report, "call_seconds": time.perf_counter() - start}
        except DataError as e:
            filled = _fills_only(str(e))
            entry = {"error": str(e), "fills_only": filled, "call_seconds": time.perf_counter() - start}
            if filled and spec.get("retry_filled"):
                start = time.perf_counter()
                _, report = train_tokenizer(vocab_size=filled, out=out, min_frequency=spec.get("min_frequency", 2),
                                            **spec["data"])
                entry.update(report=report, call_seconds=time.perf_counter() - start)
            results[str(v)] = entry
    return {"results": results, "peak_rss_mb": _peak_rss_mb()}


def worker_hf(spec: dict) -> dict:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    start = time.perf_counter()
    tok.train(spec["files"], vocab_size=TRAIN_VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "vocab_size": tok.get_vocab_size(), "peak_rss_mb": _peak_rss_mb()}


def worker_train(spec: dict) -> dict:
    """One `python train.py` run of the main job (train_args.parse_args, train.run) with a step timer, then
    (spec["score"]) its final model scored on its validation blocks and sampled."""
    sys.path.insert(0, str(ROOT))
    import train as train_module
    from train_args import parse_args
    from transformers import TrainerCallback

    times = {"steps": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["steps"].append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            times["end"] = time.perf_counter()

    real_trainer = train_module.GPT2Trainer

    class TimedTrainer(real_trainer):  # the bench's only addition to train.py: a timing callback
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [Timer()]
            super().__init__(*a, **k)

    train_module.GPT2Trainer = TimedTrainer
    argv = ["--dataset_name", "builtin", "--preset", "small", "--block_size", "128", "--per_device_train_batch_size", "8",
            "--max_steps", str(spec["steps"]), "--output_dir", spec["out"], "--cache_dir", spec["cache_dir"],
            "--report_to", "none", "--eval_strategy", "no", "--save_strategy", "no", "--sample_prompts", "none",
            "--resume", "never", "--seed", str(SEED)]
    if spec.get("tokenizer"):
        argv += ["--tokenizer_name", spec["tokenizer"]]
    result = train_module.run(*parse_args(argv))
    stamps = times["steps"]
    warm = max(0, min(2, len(stamps) - 2))
    out = {"steps": result["global_step"], "train_wall_s": times["end"] - times["begin"],
           "train_runtime_s": result["train_metrics"].get("train_runtime"),
           "s_per_step": (stamps[-1] - stamps[warm]) / (len(stamps) - 1 - warm) if len(stamps) > 1 else None,
           "val_loss": result.get("eval_metrics", {}).get("eval_loss"),
           "step_seconds": [round(b - a, 4) for a, b in zip([times["begin"]] + stamps[:-1], stamps)]}
    if not spec.get("score"):
        return out

    import dataset
    import generate
    from perplexity import evaluate_perplexity

    try:
        tokenizer, model, device = generate.load_model(result["final_model"], device="cpu")
        out["tokenizer_len"], out["model_vocab"] = len(tokenizer), model.get_output_embeddings().weight.shape[0]
        out["eos_token_id"] = {"tokenizer": tokenizer.eos_token_id, "model_config": model.config.eos_token_id,
                               "generation_config": model.generation_config.eos_token_id}
        _, _, val_ds = dataset.get_dataset_and_tokenizer(dataset_name="builtin", tokenizer_name=spec.get("tokenizer"),
                                                          block_size=128, seed=SEED, cache_dir=spec["cache_dir"])
        out["perplexity"] = evaluate_perplexity(model, tokenizer, val_ds, progress=False)
    except Exception:
        out["score_error"] = traceback.format_exc()
        return out
    try:
        completions = generate.generate(tokenizer, model, device, PROMPTS, max_new_tokens=40, top_k=50, top_p=1.0,
                                        temperature=0.8, seed=SEED)
        out["samples"] = [c.text for c in completions]
    except Exception:
        out["sample_error"] = traceback.format_exc()
    return out


WORKERS = {"import": worker_import, "ours": worker_ours, "hf": worker_hf, "train": worker_train}


def child(kind: str, spec: dict) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)  # both tokenizer trainers use every core
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=spec.get("cwd", tempfile.gettempdir()))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[7:])


# ----------------------------------------------------------------------------------------------
# Inputs


def corpus_data(name: str) -> dict | None:
    """train_tokenizer's data arguments for a corpus, or None (with a printed line) when it is absent."""
    label, rel = CORPORA[name]
    if rel is None:
        return {"dataset_name": "builtin"}
    path = SHARED / rel
    if not path.is_file():
        print(f"skipped {label}: {path} not found (the shared corpora in ../shared/data are absent).")
        return None
    return {"dataset_path": str(path)}


def plain_text_files(name: str, data: dict, tmp: Path) -> list[str]:
    """The corpus as plain .txt files for the Hugging Face baseline (one document per block of lines)."""
    if "dataset_name" in data:
        from pydoc_data.topics import topics  # dataset.builtin_documents, without importing dataset here

        path = tmp / f"{name}.txt"
        path.write_text("\n".join(topics[k] for k in sorted(topics)) + "\n", encoding="utf-8")
        return [str(path)]
    src = Path(data["dataset_path"])
    if src.suffix == ".jsonl":
        path = tmp / f"{name}.txt"
        with open(src, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
            for line in f:
                if line.strip():
                    out.write(json.loads(line)["text"] + "\n")
        return [str(path)]
    return [str(src)]


def size(files: list[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


# ----------------------------------------------------------------------------------------------
# The three parts


def part_speed(corpora: dict, tmp: Path, results: dict) -> dict:
    """Part 1: ours and the baseline per corpus, the import-only children, and WebText x1 vs x4."""
    imports = {w: child("import", {"which": w})["peak_rss_mb"] for w in ("ours", "hf")}
    rows, reports = [], {}
    for name, data in corpora.items():
        files = plain_text_files(name, data, tmp)
        ours = child("ours", {"data": data, "vocab_sizes": [TRAIN_VOCAB], "out": str(tmp / f"speed-{name}"),
                              "retry_filled": True})
        entry = ours["results"][str(TRAIN_VOCAB)]
        hf = child("hf", {"files": files})
        hf_bytes = size(files)
        row = {"corpus": name, "ours_peak_rss_mb": ours["peak_rss_mb"], "hf_bytes": hf_bytes, "hf_seconds": hf["seconds"],
               "hf_mb_per_s": hf_bytes / MB / hf["seconds"], "hf_vocab": hf["vocab_size"], "hf_peak_rss_mb": hf["peak_rss_mb"],
               "ours_fills_only": entry.get("fills_only")}
        if "report" in entry:
            trained = entry["report"]["trained"]
            row.update(ours_bytes=trained["bytes"], ours_seconds=trained["seconds"], ours_mb_per_s=trained["bytes"] / MB / trained["seconds"],
                       ours_call_seconds=entry["call_seconds"], ours_vocab=entry["report"]["vocab_size"])
        reports[name] = {str(TRAIN_VOCAB): entry}  # reused by part 2
        rows.append(row)

    flat = []
    if "webtext" in corpora:
        x1 = next(r for r in rows if r["corpus"] == "webtext")
        folder = tmp / "webtext-x4"
        folder.mkdir()
        for i in range(4):
            shutil.copyfile(corpora["webtext"]["dataset_path"], folder / f"webtext-copy{i}.jsonl")
        x4 = child("ours", {"data": {"dataset_path": str(folder)}, "vocab_sizes": [TRAIN_VOCAB], "out": str(tmp / "speed-x4")})
        trained = x4["results"][str(TRAIN_VOCAB)]["report"]["trained"]
        flat = [{"input": "WebText sample x1", "bytes": x1["ours_bytes"], "seconds": x1["ours_seconds"],
                 "mb_per_s": x1["ours_mb_per_s"], "peak_rss_mb": x1["ours_peak_rss_mb"]},
                {"input": "WebText sample x4 (4 copies)", "bytes": trained["bytes"], "seconds": trained["seconds"],
                 "mb_per_s": trained["bytes"] / MB / trained["seconds"], "peak_rss_mb": x4["peak_rss_mb"]}]

    print(f"\n## 1. Tokenizer training at {TRAIN_VOCAB} tokens: speed and peak memory (each run a fresh process)\n")
    print(f"Reference, a child that only imports: ours (train_tokenizer, transformers, tokenizers) {imports['ours']:.0f} MB, "
          f"the baseline (tokenizers) {imports['hf']:.0f} MB peak RSS.\n")
    print("| corpus | ours: MB trained | s | MB/s | peak RSS MB | vocab | HF ByteLevelBPETokenizer: MB | s | MB/s | peak RSS MB | vocab |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ours_cells = (f"{r['ours_bytes'] / MB:.2f} | {r['ours_seconds']:.2f} | {r['ours_mb_per_s']:.2f} | "
                      f"{r['ours_peak_rss_mb']:.0f} | {r['ours_vocab']}" if "ours_bytes" in r else "- | - | - | - | -")
        if r["ours_fills_only"]:
            ours_cells += f" (fills only {r['ours_fills_only']} of {TRAIN_VOCAB})"
        print(f"| {CORPORA[r['corpus']][0]} | {ours_cells} | {r['hf_bytes'] / MB:.2f} | {r['hf_seconds']:.2f} | "
              f"{r['hf_mb_per_s']:.2f} | {r['hf_peak_rss_mb']:.0f} | {r['hf_vocab']} |")
    print("\nOurs trains on the documents train.py does not hold out (val_split 0.05, seed 42; its seconds include the "
          "counting pass that picks them), read through dataset.py; the baseline on all the text from plain files.")
    if any(r["ours_fills_only"] for r in rows):
        print(f"A corpus that cannot fill {TRAIN_VOCAB} tokens at min_frequency 2 raises DataError in train_tokenizer; "
              "its row shows a second run at the size it fills (the same merges), as the baseline silently stops there too.")
    if flat:
        print(f"\nMemory flat: ours at {TRAIN_VOCAB} tokens on the WebText sample and on 4 copies of it\n")
        print("| input | MB trained | s | MB/s | peak RSS MB |\n|---|---:|---:|---:|---:|")
        for f in flat:
            print(f"| {f['input']} | {f['bytes'] / MB:.2f} | {f['seconds']:.2f} | {f['mb_per_s']:.2f} | {f['peak_rss_mb']:.0f} |")
        print(f"\nBytes x{flat[1]['bytes'] / flat[0]['bytes']:.2f}, peak RSS x{flat[1]['peak_rss_mb'] / flat[0]['peak_rss_mb']:.2f}.")
    elif "webtext" not in corpora:
        print("\nMemory flat (WebText x1 vs x4): skipped, the WebText sample is not among the corpora.")
    results["part1"] = {"import_only_peak_rss_mb": imports, "rows": rows, "memory_flat": flat}
    return reports


def part_bytes_per_token(corpora: dict, sizes: list[int], tmp: Path, reports: dict, results: dict) -> None:
    """Part 2: bytes per token on held-out documents, ours at each size against GPT-2's BPE."""
    table = {}
    for name, data in corpora.items():
        have = reports.get(name, {})
        todo = [v for v in sizes if str(v) not in have]
        if todo:
            have.update(child("ours", {"data": data, "vocab_sizes": todo, "out": str(tmp / f"bpt-{name}")})["results"])
        table[name] = have
    print("\n## 2. Bytes per token on held-out documents (more is denser; the documents train.py holds out)\n")
    print("| corpus | held-out docs | held-out MB | GPT-2 BPE (50257) | " + " | ".join(f"ours {v}" for v in sizes) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(sizes))
    out = {}
    for name, entries in table.items():
        held = next((e["report"]["held_out"] for e in entries.values() if "report" in e and e.get("fills_only") is None), None)
        cells, row = [], {}
        for v in sizes:
            e = entries[str(v)]
            if e.get("fills_only") is not None or "report" not in e:
                cells.append(f"n/a (corpus fills only {e['fills_only']})" if e.get("fills_only") else "n/a (" + e.get("error", "?")[:60] + ")")
                row[str(v)] = None
            else:
                bpt = e["report"]["held_out"].get("bytes_per_token")
                cells.append(f"{bpt:.3f}" if bpt else "n/a (no held-out text)")
                row[str(v)] = bpt
        if held and held.get("bytes"):
            lead = f"{held['documents']} | {held['bytes'] / MB:.3f} | {held['gpt2_bytes_per_token']:.3f}"
            row["gpt2"] = held["gpt2_bytes_per_token"]
        else:
            lead = "- | - | -"
        print(f"| {CORPORA[name][0]} | {lead} | " + " | ".join(cells) + " |")
        out[name] = {"bytes_per_token": row, "held_out": held}
    results["part2"] = out


def part_budget(tmp: Path, budget_steps: int, calibration_steps: int, repeats: int, results: dict) -> None:
    """Part 3: the main job with GPT-2's BPE and with an 8k tokenizer of its training split, at equal wall time."""
    cache = str(tmp / "cache")
    tok_dir = tmp / "budget-tokenizer"
    min_frequency = 2
    made = child("ours", {"data": {"dataset_name": "builtin"}, "vocab_sizes": [TRAIN_VOCAB], "out": str(tok_dir)})
    entry = made["results"][str(TRAIN_VOCAB)]
    if "report" not in entry:
        print(f"\nPart 3: {entry['error']}")
        print(f"Part 3 trains its {TRAIN_VOCAB}-token tokenizer with min_frequency 1 instead (pairs seen once may merge).")
        min_frequency = 1
        made = child("ours", {"data": {"dataset_name": "builtin"}, "vocab_sizes": [TRAIN_VOCAB], "out": str(tok_dir),
                              "min_frequency": 1})
        entry = made["results"][str(TRAIN_VOCAB)]
    tok_report = entry["report"]
    tokenizer = str(tok_dir / f"bpe{TRAIN_VOCAB}")
    configs = {"gpt2": None, "8k": tokenizer}

    # Seconds per optimizer step, interleaved (this shared machine's speed drifts within minutes).
    per_step = {k: [] for k in configs}
    for i in range(repeats):
        for k, tok in configs.items():
            r = child("train", {"steps": calibration_steps, "out": str(tmp / f"calib-{k}-{i}"), "cache_dir": cache, "tokenizer": tok})
            per_step[k].append(r["s_per_step"])
    t = {k: statistics.median(v) for k, v in per_step.items()}
    steps = {"gpt2": budget_steps, "8k": max(1, round(budget_steps * t["gpt2"] / t["8k"]))}
    runs = {k: child("train", {"steps": steps[k], "out": str(tmp / f"run-{k}"), "cache_dir": cache, "tokenizer": tok,
                               "score": True}) for k, tok in configs.items()}

    labels = {"gpt2": "GPT-2 BPE", "8k": f"ours {TRAIN_VOCAB} (min_frequency {min_frequency})"}
    print("\n## 3. The main job's budget at equal wall time (built-in corpus, small preset, block 128, batch 8)\n")
    print(f"Calibration: {repeats} x {calibration_steps} steps each, interleaved; s/step medians GPT-2 {t['gpt2']:.3f}, "
          f"8k {t['8k']:.3f} (all: GPT-2 {', '.join(f'{x:.3f}' for x in per_step['gpt2'])}; "
          f"8k {', '.join(f'{x:.3f}' for x in per_step['8k'])}) -> 8k trains round({budget_steps} x {t['gpt2']:.3f} / "
          f"{t['8k']:.3f}) = {steps['8k']} steps.\n")
    print("| tokenizer | tokenizer / model vocabulary | steps | s/step (calibrated) | train wall s | val loss (nats/token) "
          "| val bits per byte | val bytes per token | val tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in runs.items():
        p = r.get("perplexity") or {}
        bpb = f"**{p['bits_per_byte']:.3f}**" if p.get("bits_per_byte") is not None else "error"
        bpt = f"{p['bytes'] / p['tokens']:.3f}" if p.get("tokens") else "-"
        print(f"| {labels[k]} | {r.get('tokenizer_len', '?')} / {r.get('model_vocab', '?')} | {r['steps']} | {t[k]:.3f} | "
              f"{r['train_wall_s']:.1f} | {r['val_loss']:.3f} | {bpb} | {bpt} | {p.get('tokens', '-')} |")
    ratio = runs["8k"]["train_wall_s"] / runs["gpt2"]["train_wall_s"]
    in_run = {k: statistics.median(r["step_seconds"][2:] or r["step_seconds"]) for k, r in runs.items()}
    print(f"\nMedian s/step inside the runs (after step 2): GPT-2 {in_run['gpt2']:.3f}, 8k {in_run['8k']:.3f} "
          f"(calibrated {t['gpt2']:.3f}, {t['8k']:.3f}: a large gap means the machine's load changed between them).")
    print(f"Train wall time 8k / GPT-2: {ratio:.2f}. Each model is scored on its own validation blocks of the same held-out "
          f"documents (train_tokenizer's report on them: ours {tok_report['held_out'].get('bytes_per_token')} bytes/token, "
          f"GPT-2 {tok_report['held_out'].get('gpt2_bytes_per_token')}).")
    for k, r in runs.items():
        print(f"\nSamples, {labels[k]} (generate.generate, top-k 50, temperature 0.8, 40 new tokens, seed {SEED}); "
              f"EOS ids: {r.get('eos_token_id')}:\n")
        for err in ("score_error", "sample_error"):
            if r.get(err):
                print(f"{err}:\n```\n{r[err].rstrip()}\n```")
        for text in r.get("samples", []):
            print(f"```\n{text}\n```")
    results["part3"] = {"min_frequency": min_frequency, "tokenizer_report": tok_report, "calibration_s_per_step": per_step,
                        "median_s_per_step": t, "steps": steps, "runs": runs, "wall_ratio_8k_over_gpt2": ratio}


def main(cli) -> int:
    names = [c.strip() for c in cli.corpora.split(",") if c.strip()]
    unknown = [c for c in names if c not in CORPORA]
    if unknown:
        raise SystemExit(f"error: --corpora {','.join(unknown)}: choose from {', '.join(CORPORA)}.")
    sizes = [int(v) for v in cli.vocab_sizes.split(",") if v.strip()]
    torch = child("import", {"which": "torch"})  # not imported here: this process stays small, its children fork from it
    print(f"CPU, {os.cpu_count()} cores, torch {torch['version']} ({torch['capability']}); "
          f"corpora: {', '.join(names)}; shared data: {SHARED if SHARED.is_dir() else 'absent'}.")
    corpora = {n: d for n in names if (d := corpus_data(n)) is not None}
    results = {"corpora": list(corpora), "vocab_sizes": sizes, "torch": torch}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenizer-bench-") as tmp:
        tmp = Path(tmp)
        reports = part_speed(corpora, tmp, results) if corpora else {}
        if corpora:
            part_bytes_per_token(corpora, sizes, tmp, reports, results)
        if cli.skip_training:
            print("\nPart 3 (training budget): skipped (--skip_training).")
        else:
            part_budget(tmp, cli.budget_steps, cli.calibration_steps, cli.calibration_repeats, results)
    results["bench_seconds"] = time.perf_counter() - start
    print(f"\nBench took {results['bench_seconds']:.0f} s.")
    if cli.out_json:
        Path(cli.out_json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"Numbers saved to {cli.out_json}.")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="builtin,webtext,gutenberg",
                        help="Comma-separated corpora for parts 1 and 2: builtin (Python's documentation text), webtext "
                             "(../shared/data WebText sample), gutenberg (../shared/data 13 Gutenberg books). "
                             "Default: all three. Part 1's memory-flat check runs when webtext is included.")
    parser.add_argument("--vocab_sizes", default="4096,8192,16384",
                        help="Comma-separated vocabulary sizes for part 2's bytes per token (default 4096,8192,16384).")
    parser.add_argument("--skip_training", action="store_true", help="Skip part 3 (the GPT-2 vs 8k training runs).")
    parser.add_argument("--budget_steps", type=int, default=80,
                        help="Part 3: optimizer steps of the GPT-2 BPE run (the main job's 80); the 8k run gets the same wall time.")
    parser.add_argument("--calibration_steps", type=int, default=8,
                        help="Part 3: steps per calibration run (seconds per step are timed after the first 2).")
    parser.add_argument("--calibration_repeats", type=int, default=3,
                        help="Part 3: calibration runs per configuration, interleaved; the median is used.")
    parser.add_argument("--out_json", help="Also save every number measured to this JSON file.")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print("RESULT " + json.dumps(WORKERS[cli.worker](json.loads(cli.spec)), default=str))
    else:
        sys.exit(main(cli))
