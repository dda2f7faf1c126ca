"""Tokens/s of generate.py against the original generate functions, on the same model.

    python bench/generate_bench.py                          # logs/final_model (train.py's output)
    python bench/generate_bench.py --model_path path/to/model --reps 5 --explore

The original functions are re-implemented below as they were (model.generate per call, a new
pipeline per batch call). Both sides sample 100 new tokens for one sequence, and
max_length=100 (prompt included) for three sequences, with the same sampling parameters. Runs are
interleaved (original, ours, original, ...) so that load from other processes hits both alike;
the table shows medians. Tokens are counted by re-encoding the new text, the same way for both.
When --model_path does not exist, a stand-in of the `small` preset (4 layers, 256 wide, 4 heads)
is trained for ~1 minute on tinyshakespeare and cached in $TMPDIR/generate_bench_standin
(not under logs/, which train.py may clear).

--explore adds the alternatives that were measured and dropped (see the printout), and the
perplexity of held-out text under each precision variant of the LM head / model.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import decode  # noqa: E402
import generate as G  # noqa: E402

STANDIN = Path(tempfile.gettempdir()) / "generate_bench_standin"
PROMPT = "ROMEO:\nBut soft, what light"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FALLBACK_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair."
)


# ----------------------------------------------------------------------------- the original functions


def original_generate_once(tokenizer, model, device, prompt, max_new_tokens=50, top_k=50, top_p=0.95, temperature=1.0):
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def original_generate_batch(tokenizer, model, device, prompt, max_length=100, num_return_sequences=3, top_p=0.9):
    from transformers import pipeline

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=device)
    return generator(prompt, max_length=max_length, num_return_sequences=num_return_sequences, do_sample=True, top_p=top_p)


# ----------------------------------------------------------------------------- stand-in model


def train_standin(out_dir: Path, seconds: float = 60.0) -> Path:
    """A `small`-preset GPT-2 trained briefly on tinyshakespeare, so that the bench runs before train.py has."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_tokenizer import load_tokenizer

    print(f"{out_dir} missing: training a stand-in small GPT-2 for ~{seconds:.0f}s (cached for later runs)", file=sys.stderr)
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=1024))
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else FALLBACK_TEXT * 200
    ids = torch.tensor(tokenizer.encode(text[: int(len(text) * 0.9)]))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    start, step = time.time(), 0
    while time.time() - start < seconds:
        # Small batches: the 50257-wide LM head dominates a step, and this only needs a plausible model.
        ix = torch.randint(0, len(ids) - 65, (4,))
        batch = torch.stack([ids[i : i + 64] for i in ix])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"stand-in: {step} steps, last loss {loss.item():.2f}", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def model_or_standin(model_path: str) -> Path:
    """The --model_path folder; for the default one before train.py has written it, the stand-in (trained once)."""
    path = Path(model_path)
    if not path.exists() and model_path == G.DEFAULT_MODEL_PATH:
        path = STANDIN
        if not (path / "config.json").is_file():
            train_standin(path)
    return path


# ----------------------------------------------------------------------------- measuring


def without_cuda_graphs(tokenizer, model, fn):
    """`fn` with generate.py's decode steps launched op by op: the CUDA graphs' baseline."""
    def run():
        fast = decode.fast_forward(model, G._n_tokens(tokenizer, model))
        fast.cuda_graphs = False
        try:
            return fn()
        finally:
            fast.cuda_graphs = True
    return run


def new_tokens(tokenizer, prompt, outputs):
    """New tokens in `outputs`: texts, or the pipeline's {"generated_text": ...} dicts (generate_batch's too)."""
    n_prompt = len(tokenizer.encode(prompt))
    texts = [o["generated_text"] if isinstance(o, dict) else o for o in outputs]
    return sum(max(len(tokenizer.encode(t)) - n_prompt, 0) for t in texts)


def race(cases: dict, reps: int) -> dict:
    """Median tokens/s per case; cases run interleaved, after one warm-up each."""
    for fn in cases.values():
        fn()
    rates = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


@torch.inference_mode()
def perplexity(fast: "decode.FastGPT2", ids: torch.Tensor, block: int = 256) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, block):
        x = ids[i : i + block + 1][None]
        if x.shape[1] < 2:
            break
        inp, tgt = x[:, :-1], x[:, 1:]
        h = fast.hidden(inp, torch.arange(inp.shape[1])[None], fast.new_cache(1, inp.shape[1]), 0)
        logits = fast.logits(h[0])
        nll += torch.nn.functional.cross_entropy(logits, tgt[0], reduction="sum").item()
        count += tgt.shape[1]
    return float(torch.exp(torch.tensor(nll / count)))


def held_out_ids(tokenizer, n_tokens: int) -> tuple[torch.Tensor, str]:
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        return torch.tensor(tokenizer.encode(text[int(len(text) * 0.9) :])[:n_tokens]), "tinyshakespeare, last 10%"
    return torch.tensor(tokenizer.encode(FALLBACK_TEXT)[:n_tokens]), "built-in paragraph"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=G.DEFAULT_MODEL_PATH)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per case (median reported)")
    ap.add_argument("--length", type=int, default=100, help="new tokens for the single sequence")
    ap.add_argument("--explore", action="store_true", help="also time the dropped alternatives and measure perplexity")
    ap.add_argument("--ppl_tokens", type=int, default=4096)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    path = model_or_standin(args.model_path)
    tokenizer, model, device = G.load_model(path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {path} ({n_params / 1e6:.1f}M params), device {device}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}", file=sys.stderr)
    L = args.length

    def once(fn, **kw):
        return lambda: new_tokens(tokenizer, PROMPT, [fn(tokenizer, model, device, PROMPT, max_new_tokens=L, **kw)])

    def batch(fn, **kw):
        return lambda: new_tokens(tokenizer, PROMPT, fn(tokenizer, model, device, PROMPT, max_length=100, num_return_sequences=3, **kw))

    cuda = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(device) if cuda else f'CPU ({torch.backends.cpu.get_cpu_capability()})'}, "
          f"model {path} ({n_params / 1e6:.1f}M params)")
    rows = []
    for name, make in ((f"generate_once, 1 sequence x {L} new tokens", once), ("generate_batch, 3 sequences, max_length=100", batch)):
        orig, ours = (original_generate_once, G.generate_once) if make is once else (original_generate_batch, G.generate_batch)
        cases = {"orig": make(orig), "ours": make(ours), **({"eager": without_cuda_graphs(tokenizer, model, make(ours))} if cuda else {})}
        r = race(cases, args.reps)
        rows.append((name, r["orig"], r["ours"], r.get("eager")))

    graphs = " ours without CUDA graphs tok/s |" if cuda else ""
    print(f"\n| {'case':<46} | original tok/s |{graphs} ours tok/s | speedup |")
    print(f"|{'-' * 48}|---------------:|{'---:|' if cuda else ''}-----------:|--------:|")
    for name, o, n, e in rows:
        print(f"| {name:<46} | {o:14.0f} |{f' {e:.0f} |' if cuda else ''} {n:10.0f} | {n / o:6.1f}x |")

    if not args.explore:
        return
    explore(args, path, tokenizer, model, device, once, batch)


def explore(args, path, tokenizer, model, device, once, batch):
    """Alternatives measured while building generate.py; numbers printed so they can be re-checked."""
    from transformers import pipeline

    L = args.length
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=device)

    def hf_generate(**extra):
        def run():
            inputs = tokenizer(PROMPT, return_tensors="pt").to(device)
            out = model.generate(**inputs, max_new_tokens=L, do_sample=True, top_k=50, top_p=0.95, pad_token_id=tokenizer.eos_token_id, **extra)
            return out.shape[1] - inputs.input_ids.shape[1]
        return run

    def with_fast(variant):
        def run():
            saved = decode._FAST.get(model)
            decode._FAST[model] = variant
            try:
                return once(G.generate_once)()
            finally:
                decode._FAST[model] = saved
        return run

    def one_thread(fn):
        def run():
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(before)
        return run

    fp32 = decode.FastGPT2(model)
    bf16_head = decode.FastGPT2(model, lm_head_dtype=torch.bfloat16)
    cases = {
        "original generate_once (HF generate)": once(original_generate_once),
        "original, 1 torch thread": one_thread(once(original_generate_once)),
        "HF generate, static KV cache, 1 thread": one_thread(hf_generate(cache_implementation="static")),
        "ours, torch's default threads": once(G.generate_once, threads=0),
        "ours, fp32 (default)": with_fast(fp32),
        "ours, bf16 LM head": with_fast(bf16_head),
    }
    res = race(cases, max(3, args.reps // 2))
    print("\n1 sequence:")
    for k, v in res.items():
        print(f"  {k:<40} {v:7.0f} tok/s")

    def cached_pipe():
        out = pipe(PROMPT, max_length=100, num_return_sequences=3, do_sample=True, top_p=0.9)
        return new_tokens(tokenizer, PROMPT, out)

    def ours_sequential():
        return new_tokens(tokenizer, PROMPT, [G.generate_once(tokenizer, model, device, PROMPT, max_new_tokens=100 - len(tokenizer.encode(PROMPT)), top_p=0.9) for _ in range(3)])

    res = race({"original (new pipeline per call)": batch(original_generate_batch), "pipeline cached": cached_pipe,
                "ours, 3 sequential generate_once": ours_sequential, "ours, one batch of 3": batch(G.generate_batch)},
               max(3, args.reps // 2))
    print("3 sequences:")
    for k, v in res.items():
        print(f"  {k:<40} {v:7.0f} tok/s")

    ids, source = held_out_ids(tokenizer, args.ppl_tokens)
    whole_bf16 = G.load_model(path, device="cpu", dtype=torch.bfloat16)[1]
    print(f"\nperplexity on {len(ids)} held-out tokens ({source}):")
    base = perplexity(fp32, ids)
    with torch.inference_mode():  # the reference: HF's own forward
        hf = torch.exp(torch.stack([model(ids[i : i + 257][None], labels=ids[i : i + 257][None]).loss for i in range(0, len(ids) - 1, 256) if len(ids[i : i + 257]) > 1]).mean()).item()
    for name, fast in (("fp32 (ours)", fp32), ("bf16 LM head", bf16_head), ("whole model bf16", decode.FastGPT2(whole_bf16))):
        p = perplexity(fast, ids) if fast is not fp32 else base
        print(f"  {name:<20} {p:9.3f}  ({(p / base - 1) * 100:+.3f}% vs fp32)")
    print(f"  {'HF forward, fp32':<20} {hf:9.3f}  (mean of per-block ppl, sanity check)")


if __name__ == "__main__":
    main()
