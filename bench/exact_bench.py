"""Does generate.py sample what the model's fp32 forward gives? Greedy and seeded top-k on held-out text.

    python bench/exact_bench.py --model_path logs/final_model
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/exact_bench.py    # the AVX2 kernels

Prompts: the first 16 tokens of the first 8 documents of webtext.test (../shared/data/gpt2-output), 60 new
tokens each. For each LM-head precision (the default, exact, and the `--lm_head_dtype bf16` opt-in):
- greedy: equal to transformers' `model.generate(do_sample=False)` on the fp32 model, token for token?
- seeded top-k (k=40): equal to replaying the same seeded generator over transformers' full fp32 logits
  (the top 40 of the logits of the text so far at each step, then `sampling.sample_top`)?
- ms per new token for one sequence (greedy, median of --reps), side by side in this run.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import generate as G  # noqa: E402
from sampling import sample_top  # noqa: E402

WEBTEXT = ROOT.parent / "shared" / "data" / "gpt2-output" / "webtext.test.head30.jsonl"


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    if not WEBTEXT.exists():
        sys.exit(f"error: {WEBTEXT} is missing: this bench needs the WebText sample (see ../shared/data/SOURCES.md)")
    docs = [json.loads(line)["text"] for line in WEBTEXT.read_text(encoding="utf-8").splitlines()]
    return [ids[:length] for ids in (tokenizer.encode(d) for d in docs) if len(ids) >= length][:n]


def hf_greedy(model, ids: list[int], new: int, eos: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    seq = out[0, len(ids):].tolist()
    return seq[: seq.index(eos)] if eos in seq else seq


def hf_topk_replay(model, ids: list[int], new: int, eos: int, n_tokens: int, k: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    seq = list(ids)
    for _ in range(new):
        logits = model(torch.tensor([seq])).logits[0, -1, :n_tokens].float()
        vals, idx = torch.topk(logits, k)
        token = int(sample_top(vals[None], idx[None], 1.0, 1.0, generator))
        if token == eos:
            break
        seq.append(token)
    return seq[len(ids):]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default="logs/final_model", help="A model folder (train.py's logs/final_model).")
    parser.add_argument("--prompts", type=int, default=8, help="How many held-out prompts.")
    parser.add_argument("--new", type=int, default=60, help="New tokens per prompt.")
    parser.add_argument("--reps", type=int, default=5, help="Timed repetitions of one sequence per variant.")
    args = parser.parse_args()
    tokenizer, model, device = G.load_model(args.model_path, device="cpu")
    eos, n_tokens = tokenizer.eos_token_id, G._n_tokens(tokenizer, model)
    rows = prompts(tokenizer, args.prompts, 16)
    print(f"CPU kernels: {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(unset)')}")
    with torch.inference_mode():
        greedy_ref = [hf_greedy(model, r, args.new, eos) for r in rows]
        topk_ref = [hf_topk_replay(model, r, args.new, eos, n_tokens, 40, seed) for seed, r in enumerate(rows)]
    print(f"{len(rows)} prompts of 16 tokens from {WEBTEXT.name}, {args.new} new tokens; reference: transformers, fp32\n")
    print("| LM head | greedy equal | first difference (token) | seeded top-k equal | ms / token, 1 sequence |")
    print("|---|---:|---|---:|---:|")
    for name in (None, "bf16"):
        greedy = [G.generate(tokenizer, model, device, [r], args.new, temperature=0, lm_head_dtype=name)[0].completion_ids for r in rows]
        topk = [G.generate(tokenizer, model, device, [r], args.new, top_k=40, top_p=1.0, seed=seed, lm_head_dtype=name)[0].completion_ids
                for seed, r in enumerate(rows)]
        diffs = [next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None if len(ours) == len(ref) else min(len(ours), len(ref)))
                 for ours, ref in zip(greedy, greedy_ref)]
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            c = G.generate(tokenizer, model, device, [rows[0]], args.new, temperature=0, lm_head_dtype=name)[0]
            times.append((time.perf_counter() - start) / max(1, c.completion_tokens))
        first = sorted(d for d in diffs if d is not None)
        print(f"| {name or 'default (model dtype: fp32)'} | {sum(d is None for d in diffs)}/{len(rows)} | "
              f"{', '.join(map(str, first)) or '-'} | {sum(a == b for a, b in zip(topk, topk_ref))}/{len(rows)} | "
              f"{statistics.median(times) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
