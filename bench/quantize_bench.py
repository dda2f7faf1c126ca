"""Size, generation speed and perplexity of one GPT-2 in fp32, bf16, int8 and int4, on CPU.

    python bench/quantize_bench.py                          # logs/final_model (train.py's output)
    python bench/quantize_bench.py --model_path path/to/model --reps 5 --group_size 32

One run: the fp32 folder is quantized with quantize.py (int8, int4) and saved in bf16 into a
temporary folder; all four are loaded the way generate.py loads them. Columns:
  - size: the weights file on disk;
  - tok/s: generate.generate_once (1 sequence x --length new tokens) and generate_batch (3 sequences,
    max_length=100), all variants interleaved in each repetition (so load from other processes hits
    them alike), medians of --reps runs; tokens counted by re-encoding the new text, as bench/generate_bench.py;
  - perplexity of held-out text through the model's Hugging Face forward (evaluation.py), the same
    tokens for every variant: the validation split train.py held out (from the folder's manifest.json),
    else the last 10% of tinyshakespeare, else a built-in paragraph.
Ratios are against fp32, and the issue's targets are checked: int8 <= 1/3 of the size, perplexity
within 2% and generation at least as fast; int4 <= 1/5 of the size, perplexity within 10%.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import evaluation as ev  # noqa: E402
import generate as G  # noqa: E402
import quantize as Q  # noqa: E402
from generate_bench import FALLBACK_TEXT, PROMPT, SHAKESPEARE, model_or_standin, new_tokens, race  # noqa: E402

VARIANTS = ("fp32", "bf16", "int8", "int4")


def held_out(path: Path, tokenizer):
    """(evaluate(model) -> perplexity result, description) on held-out text, the same for every variant."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            import dataset

            args = dict(json.loads(manifest.read_text())["data"]["data_args"])
            _, _, val = dataset.get_dataset_and_tokenizer(**args)
            if val is not None and len(val):
                desc = f"validation split of the training data ({len(val)} blocks of {args.get('block_size')} tokens, from manifest.json)"
                return (lambda model: ev.evaluate_perplexity(model, tokenizer, val, progress=False)), desc
        except Exception as e:  # noqa: BLE001  (a bench: fall back to text, and say why)
            print(f"held-out split from {manifest} unavailable ({type(e).__name__}: {e}); using text", file=sys.stderr)
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        docs, desc = [text[int(len(text) * 0.9) :]], "tinyshakespeare, last 10%"
    else:
        docs, desc = [FALLBACK_TEXT], "built-in paragraph"
    return (lambda model: ev.evaluate_texts(model, tokenizer, docs, stride=256, context=256, progress=False)), desc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=G.DEFAULT_MODEL_PATH)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per case (median reported)")
    ap.add_argument("--length", type=int, default=100, help="new tokens for the single sequence")
    ap.add_argument("--group_size", type=int, default=Q.DEFAULT_GROUP_SIZE, help="int4 group size")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = model_or_standin(args.model_path)
    tmp = Path(tempfile.mkdtemp(prefix="quantize_bench_"))
    try:
        run(args, path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, path: Path, tmp: Path):
    tokenizer, fp32, _ = G.load_model(path, device="cpu")
    folders = {"fp32": path}
    models = {"fp32": fp32}
    for v in args.variants:
        if v == "bf16":
            folders[v] = tmp / "bf16"
            _, m, _ = G.load_model(path, device="cpu")
            m.to(torch.bfloat16).save_pretrained(folders[v])
            tokenizer.save_pretrained(folders[v])
            models[v] = G.load_model(folders[v], device="cpu", dtype=torch.bfloat16)[1]
        elif v in Q.MODES:
            _, m, _ = G.load_model(path, device="cpu")
            t0 = time.perf_counter()
            Q.quantize_model(m, v, args.group_size)
            folders[v] = Q.save_quantized(m, tokenizer, tmp / v, source_dir=path)
            print(f"{v}: quantized and saved in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            models[v] = G.load_model(folders[v])[1]
    names = [v for v in VARIANTS if v in models]
    n_params = sum(p.numel() for p in fp32.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: {path} ({n_params / 1e6:.1f}M params); torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"sampling threads 1 (generate.py default), load average {load:.1f} at start", file=sys.stderr)

    sizes = {v: Q.folder_size(folders[v]) for v in names}
    evaluate, data_desc = held_out(path, tokenizer)
    ppl = {}
    for v in names:
        t0 = time.perf_counter()
        ppl[v] = evaluate(models[v])["perplexity"]
        print(f"perplexity {v}: {ppl[v]:.3f} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    L = args.length

    def once(model):
        return lambda: new_tokens(tokenizer, PROMPT, [G.generate_once(tokenizer, model, "cpu", PROMPT, max_new_tokens=L)])

    def batch(model):
        return lambda: new_tokens(tokenizer, PROMPT, G.generate_batch(tokenizer, model, "cpu", PROMPT, max_length=100, num_return_sequences=3))

    r1 = race({v: once(models[v]) for v in names}, args.reps)
    r3 = race({v: batch(models[v]) for v in names}, args.reps)

    print(f"\nheld-out text: {data_desc}; tokens/s: medians of {args.reps} interleaved runs; "
          f"int4 groups of {args.group_size}; load average {os.getloadavg()[0]:.1f} at end\n")
    print("| variant | size on disk | vs fp32 | tok/s, 1 sequence | vs fp32 | tok/s, 3 sequences | vs fp32 | perplexity | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in names:
        print(f"| {v} | {sizes[v] / 1e6:.1f} MB | {sizes[v] / sizes['fp32']:.2f} | {r1[v]:.0f} | {r1[v] / r1['fp32']:.2f}x | "
              f"{r3[v]:.0f} | {r3[v] / r3['fp32']:.2f}x | {ppl[v]:.2f} | {ppl[v] / ppl['fp32'] - 1:+.2%} |")
    print()
    checks = []
    if "int8" in names:
        checks += [("int8 size <= 1/3 of fp32", sizes["int8"] <= sizes["fp32"] / 3),
                   ("int8 perplexity within 2%", abs(ppl["int8"] / ppl["fp32"] - 1) <= 0.02),
                   ("int8 generation >= fp32 (1 sequence)", r1["int8"] >= r1["fp32"]),
                   ("int8 generation >= fp32 (3 sequences)", r3["int8"] >= r3["fp32"])]
    if "int4" in names:
        checks += [("int4 size <= 1/5 of fp32", sizes["int4"] <= sizes["fp32"] / 5),
                   ("int4 perplexity within 10%", abs(ppl["int4"] / ppl["fp32"] - 1) <= 0.10)]
    for what, ok in checks:
        print(f"- {what}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
