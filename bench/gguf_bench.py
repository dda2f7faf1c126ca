"""generate.py against llama.cpp on the CPU: the same GPT-2, side by side, at the same thread count.

    python bench/gguf_bench.py                                   # logs/final_model and a random GPT-2 124M
    python bench/gguf_bench.py --skip_124m --reps 1 --new_tokens 20 --explore --out_json bench.json

Models: --model_path (train.py's logs/final_model) and, unless --skip_124m, GPT-2 124M's shape with random
weights (model.get_model(preset="gpt2"), seed 0, saved with GPT-2's tokenizer). Engines per model:
  - generate.py fp32 (generate.generate on the fp32 folder) and generate.py int8 (a quantize.py int8 folder,
    loaded with generate.load_model);
  - llama.cpp f32, f16 and q8_0 (export_gguf.py files) through llama-cpp-python's llama_cpp.Llama. q8_0 runs
    with llama.cpp's weight repacking off (use_extra_bufts=False): with it on, on CPUs with AMX, llama.cpp's AMX
    buffer takes the Q8_0 weights and decoding fails or crashes (see tests/test_export_gguf.py). Unless
    --no_repack_probe, a child process tries q8_0 with the default repacking and the result is reported.

Measured per engine, all greedy (deterministic work), all with --threads threads (torch.set_num_threads and
generate(threads=...); llama.cpp n_threads and n_threads_batch):
  - new tokens/s for 1 sequence x N new tokens and B sequences x N (generate.py runs the B prompts as one batch;
    llama-cpp-python's high-level API has no batch, so llama.cpp runs them one after the other). Time covers
    prompt + N new tokens, for both. EOS never ends a row early: generate.py gets a tokenizer proxy whose EOS id
    is -1 (nothing else changes) and the returned token counts are what is counted; llama.cpp's token loop is
    driven here (llm.eval + argmax over the tokenizer's ids, as generate.py's greedy pick).
  - prompt tokens/s: a --prompt_tokens prompt processed once (generate.py with max_new_tokens=1, i.e. its first
    step; llama.cpp's llm.eval of the prompt, logits of the last position only).
  - file size: the folder's weights file(s) (quantize.folder_size) or the .gguf.
  - perplexity (trained model only): the same token ids for every engine (held-out WebText documents joined with
    <|endoftext|>), non-overlapping windows of --ppl_window tokens; generate.py's models through their Hugging Face
    forward (fp32 logits), llama.cpp with logits_all=True reading llm.scores; full vocabulary softmax for both.
Prompts are token ids cut from the held-out text, so both engines see exactly the same input; the B prompts have
the same length (no padding). Runs are interleaved (every engine once per repetition, after one short warm-up
each) and the table shows medians of --reps.

Then, per model: the ratios generate.py fp32 / llama.cpp f32 and generate.py int8 / llama.cpp q8_0 of new tokens/s
(the target: within 1.5x, i.e. a ratio >= 0.67), and a breakdown of generate.py's 1-sequence decode step (the
transformer blocks, the LM head + greedy pick, and the rest: Python, sampling bookkeeping, token handling),
timed with manual timers on decode.FastGPT2 as generate.py drives it, next to llama.cpp's time per token.
--explore adds variants measured through monkeypatches inside this process (generate.py itself unchanged).
--out_json writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import decode  # noqa: E402
import generate as G  # noqa: E402

HELD_OUT = ROOT.parent / "shared" / "data" / "gpt2-output" / "webtext.test.head30.jsonl"
CACHE = Path(tempfile.gettempdir()) / "gguf_bench_cache"
GGUF_DTYPES = ("f32", "f16", "q8_0")


# ----------------------------------------------------------------------------- setup: folders and files


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def folder_key(path: Path) -> str:
    st = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(path.iterdir()) if f.is_file()]
    return hashlib.sha256(repr((str(path.resolve()), st)).encode()).hexdigest()[:16]


def random_124m(cache: Path) -> Path:
    """GPT-2 124M's shape with random weights (seed 0) and GPT-2's tokenizer, saved once under `cache`."""
    out = cache / "gpt2-124m-random-seed0"
    if (out / "config.json").is_file():
        return out
    from gpt2_tokenizer import load_tokenizer
    from model import get_model

    log(f"writing a random GPT-2 124M to {out}")
    torch.manual_seed(0)
    model = get_model(preset="gpt2", verbose=False).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer().save_pretrained(tmp)
    tmp.rename(out)
    return out


def prepare(model_dir: Path, cache: Path) -> dict:
    """The int8 quantize.py folder and the three GGUF files of `model_dir`, made once per folder content."""
    from export_gguf import export_gguf
    from quantize import quantize_model, save_quantized

    work = cache / f"{model_dir.name}-{folder_key(model_dir)}"
    work.mkdir(parents=True, exist_ok=True)
    int8 = work / "int8"
    if not (int8 / "quantization.json").is_file():
        log(f"quantizing {model_dir} to int8 -> {int8}")
        tok, model, _ = G.load_model(model_dir, device="cpu")
        save_quantized(quantize_model(model, "int8"), tok, int8, source_dir=model_dir)
    files = {}
    for dtype in GGUF_DTYPES:
        f = work / f"model-{dtype}.gguf"
        if not f.is_file():
            log(f"exporting {model_dir} to {f}")
            t0 = time.perf_counter()
            export_gguf(model_dir, f, dtype, progress=False)
            log(f"  {time.perf_counter() - t0:.1f}s")
        files[dtype] = f
    return {"int8": int8, "gguf": files}


# ----------------------------------------------------------------------------- engines


class NoEOS:
    """The tokenizer, with an EOS id no token has: generate.py's rows then always run to max_new_tokens.
    (Only RowsOut and left_padded read eos_token_id; the bench's prompts have equal lengths, so nothing is padded.)"""

    eos_token_id = -1

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)


class TorchEngine:
    kind = "generate.py"

    def __init__(self, name, precision, folder: Path, threads: int):
        from quantize import folder_size

        self.name, self.precision, self.threads = name, precision, threads
        self.tok, self.model, self.device = G.load_model(folder, device="cpu")
        self.noeos = NoEOS(self.tok)
        self.n_tokens = min(len(self.tok), self.model.get_input_embeddings().weight.shape[0])
        self.file_bytes = folder_size(folder)

    def _gen(self, prompts, n):
        out = G.generate(self.noeos, self.model, self.device, prompts, max_new_tokens=n, temperature=0, threads=self.threads)
        return out

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return [c.completion_ids for c in self._gen(prompts, n)]

    def prompt(self, ids: list[int]) -> None:
        self._gen([ids], 1)

    @torch.inference_mode()
    def nll(self, window: list[int]) -> tuple[float, int]:
        x = torch.tensor([window])
        logits = self.model(x).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item(), len(window) - 1


class LlamaEngine:
    kind = "llama.cpp"

    def __init__(self, name, precision, path: Path, threads: int, n_tokens: int, n_ctx: int, repack: bool = True):
        self.name, self.precision, self.path, self.threads, self.n_tokens = name, precision, path, threads, n_tokens
        self.repack, self.n_ctx = repack, n_ctx
        self.file_bytes = path.stat().st_size
        self.llm = self._load(logits_all=False)
        self._ppl = None

    def _load(self, logits_all: bool):
        import llama_cpp

        with repacking(self.repack):
            return llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=512, n_ubatch=512, logits_all=logits_all,
                                   n_threads=self.threads, n_threads_batch=self.threads, seed=0, verbose=False)

    def _last_logits(self, llm):
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def one(self, ids: list[int], n: int) -> list[int]:
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        out = []
        for i in range(n):
            t = int(self._last_logits(llm)[: self.n_tokens].argmax())
            out.append(t)
            if i < n - 1:
                llm.eval([t])
        return out

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return [self.one(p, n) for p in prompts]  # no batch in the high-level API: one after the other

    def prompt(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def nll(self, window: list[int]) -> tuple[float, int]:
        if self._ppl is None:
            self._ppl = self._load(logits_all=True)
        llm = self._ppl
        llm.reset()
        llm.eval(window)
        z = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        m = z.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(z - m).sum(-1)))
        tgt = np.asarray(window[1:])
        return float((lse - z[np.arange(len(tgt)), tgt]).sum()), len(tgt)


@contextlib.contextmanager
def repacking(on: bool):
    """llama.cpp's weight repacking into extra buffer types (AMX etc.): on is llama.cpp's default."""
    import llama_cpp

    if on:
        yield
        return
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repacking
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


REPACK_PROBE = r"""
import sys, numpy as np, llama_cpp
path, threads, ids, n, n_tokens = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
llm.eval(ids)
out = []
for i in range(n):
    z = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    out.append(int(z[:n_tokens].argmax()))
    llm.eval([out[-1]])
print("TOKENS", ",".join(map(str, out)))
"""


def repack_probe(path: Path, threads: int, ids: list[int], n: int, n_tokens: int, want: list[int]) -> str:
    """q8_0 with llama.cpp's default repacking, in a child process (it may crash)."""
    try:
        r = subprocess.run([sys.executable, "-c", REPACK_PROBE, str(path), str(threads), ",".join(map(str, ids)), str(n), str(n_tokens)],
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "timed out after 300s"
    if r.returncode < 0:
        return f"crashed (signal {-r.returncode})"
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        return f"failed (exit {r.returncode}): {lines[-1][:200] if lines else ''}"
    got = [ln for ln in r.stdout.splitlines() if ln.startswith("TOKENS ")]
    if not got:
        return "ran, but printed no tokens"
    toks = [int(t) for t in got[0].split()[1].split(",")]
    same = sum(a == b for a, b in zip(toks, want))
    return f"ran: {same}/{len(want)} greedy tokens equal to q8_0 with repacking off"


# ----------------------------------------------------------------------------- data


def held_out_ids(tokenizer, n: int) -> tuple[list[int], str]:
    eos = tokenizer.eos_token_id
    if HELD_OUT.is_file():
        docs = [json.loads(line)["text"] for line in HELD_OUT.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = f"{HELD_OUT.name} ({len(docs)} documents)"
    else:
        print(f"{HELD_OUT} absent: held-out text falls back to dataset.builtin_documents()")
        from dataset import builtin_documents

        docs = builtin_documents()
        source = "dataset.builtin_documents()"
    ids = []
    for d in docs:
        ids += tokenizer.encode(d) + [eos]
        if len(ids) > n:
            break
    return ids[:n], source


# ----------------------------------------------------------------------------- measuring


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def bench_model(label: str, engines: list, prompts1, promptsB, prompt_long, args, ppl_ids) -> dict:
    N = args.new_tokens
    # warm-up: a short run of each case per engine (weights paged in, kernels and caches built)
    for e in engines:
        e.generate(prompts1, 4)
        e.generate(promptsB, 4)
        e.prompt(prompt_long)
    rates = {e.name: {"one": [], "batch": [], "prompt": []} for e in engines}
    outputs = {}
    for rep in range(args.reps):
        for e in engines:
            out, dt = timed(lambda: e.generate(prompts1, N))
            n = sum(len(o) for o in out)
            rates[e.name]["one"].append(n / dt)
            outputs.setdefault(e.name, {})["one"] = out
            out, dt = timed(lambda: e.generate(promptsB, N))
            n = sum(len(o) for o in out)
            rates[e.name]["batch"].append(n / dt)
            outputs[e.name]["batch"] = out
            _, dt = timed(lambda: e.prompt(prompt_long))
            rates[e.name]["prompt"].append(len(prompt_long) / dt)
        log(f"  {label}: repetition {rep + 1}/{args.reps} done")
    res = {}
    for e in engines:
        r = rates[e.name]
        counts = [len(o) for o in outputs[e.name]["one"] + outputs[e.name]["batch"]]
        res[e.name] = {
            "engine": e.kind, "precision": e.precision, "file_bytes": e.file_bytes,
            "prompt_tok_s": statistics.median(r["prompt"]), "one_tok_s": statistics.median(r["one"]),
            "batch_tok_s": statistics.median(r["batch"]), "runs": r,
            "new_token_counts": counts, "tokens_one": outputs[e.name]["one"][0],
        }
    if ppl_ids is not None:
        W = args.ppl_window
        windows = [ppl_ids[i : i + W + 1] for i in range(0, len(ppl_ids) - 1, W) if len(ppl_ids[i : i + W + 1]) > 1]
        for e in engines:
            nll = cnt = 0
            for w in windows:
                a, b = e.nll(w)
                nll, cnt = nll + a, cnt + b
            res[e.name]["perplexity"] = float(np.exp(nll / cnt))
            res[e.name]["ppl_tokens"] = cnt
            log(f"  {label}: perplexity {e.name} {res[e.name]['perplexity']:.3f}")
    return res


def decode_breakdown(e: TorchEngine, prompt: list[int], n: int, batch: int = 1, tries: int = 3) -> dict:
    """decode_breakdown_once `tries` times; each part's minimum (the least disturbed by other load on the machine)."""
    runs = [decode_breakdown_once(e, prompt, n, batch) for _ in range(tries)]
    out = {k: (min(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]) for k in runs[0]}
    out["rest_ms"] = out["step_ms"] - out["blocks_ms"] - out["lm_head_ms"]
    return out


@torch.inference_mode()
def decode_breakdown_once(e: TorchEngine, prompt: list[int], n: int, batch: int = 1) -> dict:
    """ms per decode step of generate.py's fast path, split: transformer blocks (FastGPT2.hidden, one token per row),
    LM head + greedy pick (FastGPT2.top_logits with k=1, as decode_rows calls it) and the rest of the measured step."""
    from sampling import Penalties

    rows = [prompt] * batch
    with decode.cpu_threads(e.device, e.threads):
        fast = decode.fast_forward(e.model, e.n_tokens)
        pen = Penalties(rows, e.n_tokens, e.device, 1.0, 0)
        P = len(prompt)
        cache = fast.new_cache(batch, P + n)
        ids = torch.tensor(rows)
        pos = torch.arange(P)[None].expand(batch, P)
        h = fast.hidden(ids, pos, cache, 0)[:, -1]
        t_blocks = t_head = 0.0
        tok = torch.zeros(batch, dtype=torch.long)
        for step in range(n):
            t0 = time.perf_counter()
            pen.start_step()
            _, tok_ids = fast.top_logits(h, 1, pen)
            tok = tok_ids[:, 0]
            t1 = time.perf_counter()
            h = fast.hidden(tok[:, None], torch.full((batch, 1), P + step), cache, P + step)[:, -1]
            t2 = time.perf_counter()
            t_head += t1 - t0
            t_blocks += t2 - t1
        # the whole generate() call for the same work, for "the rest"
        _, dt = timed(lambda: e.generate(rows, n))
        prefill = min(timed(lambda: fast.hidden(ids, pos, fast.new_cache(batch, P + 1), 0))[1] for _ in range(3))
    step_ms = (dt - prefill) / n * 1e3
    blocks, head = t_blocks / n * 1e3, t_head / n * 1e3
    return {"step_ms": step_ms, "blocks_ms": blocks, "lm_head_ms": head, "rest_ms": step_ms - blocks - head,
            "prefill_ms": prefill * 1e3, "lm_head_dtype": str(getattr(fast, "lm_head_dtype", None)),
            "int8_screen": fast.screen is not None}


def op_profile(e: TorchEngine, prompt: list[int], n: int, top: int = 8) -> list[tuple[str, float, int]]:
    """torch.profiler over a generate() call: the top ops by self CPU time, (name, ms per decode step, calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        e.generate([prompt], n)
    rows = sorted(prof.key_averages(), key=lambda k: k.self_cpu_time_total, reverse=True)[:top]
    return [(k.key, k.self_cpu_time_total / 1e3 / n, round(k.count / n, 1)) for k in rows]


@torch.inference_mode()
def llama_breakdown(e: LlamaEngine, prompt: list[int], n: int, tries: int = 3) -> dict:
    """ms per llama.cpp decode step: llm.eval of one token vs the argmax read of the logits (minimum of `tries`)."""
    runs = [llama_breakdown_once(e, prompt, n) for _ in range(tries)]
    return {k: min(r[k] for r in runs) for k in runs[0]}


def llama_breakdown_once(e: LlamaEngine, prompt: list[int], n: int) -> dict:
    llm = e.llm
    llm.reset()
    llm.eval(prompt)
    t_eval = t_pick = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        t = int(e._last_logits(llm)[: e.n_tokens].argmax())
        t1 = time.perf_counter()
        llm.eval([t])
        t2 = time.perf_counter()
        t_pick += t1 - t0
        t_eval += t2 - t1
    return {"eval_ms": t_eval / n * 1e3, "argmax_ms": t_pick / n * 1e3}


# ----------------------------------------------------------------------------- explore: monkeypatched variants


def explore(label, torch_engines, prompts1, args) -> dict:
    """generate.py variants, each through a monkeypatch in this process: 1x new tokens/s, medians of --reps."""
    N = args.new_tokens
    fp32 = torch_engines[0]
    vocab = fp32.n_tokens
    variants = {}

    def with_fast(engine, fast):
        def run():
            saved = decode._FAST.get(engine.model)
            decode._FAST[engine.model] = fast
            try:
                return engine.generate(prompts1, N)
            finally:
                decode._FAST[engine.model] = saved
        return run

    def with_threads(engine, n):
        def run():
            saved = engine.threads
            engine.threads = n
            try:
                return engine.generate(prompts1, N)
            finally:
                engine.threads = saved
        return run

    variants["fp32, as benched"] = lambda: fp32.generate(prompts1, N)
    variants["fp32, fp32 LM head (+int8 screen)"] = with_fast(fp32, decode.FastGPT2(fp32.model, lm_head_dtype=torch.float32, n_tokens=vocab))
    variants["fp32, fp32 LM head, no screen"] = with_fast(fp32, decode.FastGPT2(fp32.model, lm_head_dtype=torch.float32, screen=False, n_tokens=vocab))
    if args.threads != 1:
        variants["fp32, 1 thread (generate.py's default)"] = with_threads(fp32, 1)
    for e in torch_engines[1:]:
        variants[f"{e.precision}, as benched"] = lambda e=e: e.generate(prompts1, N)
        if args.threads != 1:
            variants[f"{e.precision}, 1 thread"] = with_threads(e, 1)
    for fn in variants.values():
        fn()
    rates = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, fn in variants.items():
            out, dt = timed(fn)
            rates[k].append(sum(len(o) for o in out) / dt)
    return {k: statistics.median(v) for k, v in rates.items()}


# ----------------------------------------------------------------------------- output


def table(label: str, res: dict, args) -> str:
    B, N = args.batch, args.new_tokens
    lines = [f"| engine | precision | file MB | prompt tok/s | 1x{N} new tok/s | {B}x{N} new tok/s | perplexity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res.values():
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "n/a"
        lines.append(f"| {r['engine']} | {r['precision']} | {r['file_bytes'] / 1e6:.1f} | {r['prompt_tok_s']:.0f} | "
                     f"{r['one_tok_s']:.1f} | {r['batch_tok_s']:.1f} | {ppl} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=G.DEFAULT_MODEL_PATH, help="the trained model folder (default %(default)s)")
    ap.add_argument("--skip_124m", action="store_true", help="skip the random-weight GPT-2 124M model")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every engine (default: all cores, %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case, interleaved across engines; medians shown (default 3)")
    ap.add_argument("--new_tokens", type=int, default=100, help="new tokens per sequence (default 100)")
    ap.add_argument("--batch", type=int, default=4, help="sequences in the batched case (default 4)")
    ap.add_argument("--prompt_len", type=int, default=16, help="prompt tokens of the generation cases (default 16)")
    ap.add_argument("--prompt_tokens", type=int, default=256, help="prompt tokens of the prompt-throughput case (default 256)")
    ap.add_argument("--ppl_tokens", type=int, default=4096, help="held-out tokens scored for perplexity (default 4096)")
    ap.add_argument("--ppl_window", type=int, default=256, help="tokens per perplexity window, non-overlapping (default 256)")
    ap.add_argument("--cache_dir", default=str(CACHE), help="where the int8 folders, GGUF files and the random 124M are kept "
                    "between runs, keyed on the model folder's files (default %(default)s)")
    ap.add_argument("--no_repack_probe", action="store_true", help="do not try q8_0 with llama.cpp's default weight repacking in a child process")
    ap.add_argument("--explore", action="store_true", help="also time generate.py variants (fp32 LM head, 1 thread) via monkeypatches")
    ap.add_argument("--out_json", help="write every measurement to this JSON file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    import llama_cpp

    header = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "llama_cpp_python": llama_cpp.__version__, "args": vars(args),
    }
    print(f"CPU: {header['cpu']} ({header['cores']} cores), torch {header['torch']} "
          f"(cpu capability {header['torch_cpu_capability']}), llama-cpp-python {header['llama_cpp_python']}, "
          f"threads {args.threads} for every engine; load average {os.getloadavg()[0]:.2f}")
    models = [("trained", Path(args.model_path), True)]
    if not args.skip_124m:
        models.append(("GPT-2 124M, random weights", random_124m(cache), False))
    report = {"header": header, "models": {}}
    for label, path, with_ppl in models:
        if not (path / "config.json").is_file():
            print(f"\n{label}: {path} is not a model folder, skipped")
            continue
        made = prepare(path, cache)
        tq = [TorchEngine("generate.py fp32", "fp32", path, args.threads),
              TorchEngine("generate.py int8", "int8", made["int8"], args.threads)]
        tok, n_tokens = tq[0].tok, tq[0].n_tokens
        cfg = tq[0].model.config
        n_ctx = min(cfg.n_positions, max(512, args.prompt_tokens + 8, args.ppl_window + 8, args.prompt_len + args.new_tokens + 8))
        ll = [LlamaEngine(f"llama.cpp {d}", d, made["gguf"][d], args.threads, n_tokens, n_ctx, repack=(d != "q8_0")) for d in GGUF_DTYPES]
        need = max(args.prompt_tokens, args.batch * args.prompt_len) + (args.ppl_tokens if with_ppl else 0) + 1
        ids, source = held_out_ids(tok, need)
        prompt_long = ids[: args.prompt_tokens]
        prompts = [ids[i * args.prompt_len : (i + 1) * args.prompt_len] for i in range(args.batch)]
        ppl_ids = ids[-args.ppl_tokens:] if with_ppl else None
        n_params = sum(p.numel() for p in tq[0].model.parameters())
        log(f"{label}: {path}, {n_params / 1e6:.1f}M params")
        res = bench_model(label, tq + ll, prompts[:1], prompts, prompt_long, args, ppl_ids)
        one = {k: v["one_tok_s"] for k, v in res.items()}
        bat = {k: v["batch_tok_s"] for k, v in res.items()}
        r32 = (one["generate.py fp32"] / one["llama.cpp f32"], bat["generate.py fp32"] / bat["llama.cpp f32"])
        r8 = (one["generate.py int8"] / one["llama.cpp q8_0"], bat["generate.py int8"] / bat["llama.cpp q8_0"])
        entry = {"path": str(path), "params": n_params, "held_out": source, "results": res,
                 "ratios": {"fp32/f32": r32, "int8/q8_0": r8}}
        # greedy agreement (same prompt, same ids): how many of the 1x tokens equal llama.cpp f32's
        ref = res["llama.cpp f32"]["tokens_one"]
        entry["greedy_agreement_with_llama_f32"] = {k: sum(a == b for a, b in zip(v["tokens_one"], ref)) for k, v in res.items()}
        print(f"\n### {label} ({n_params / 1e6:.1f}M params, {path})\n")
        print(table(label, res, args))
        ppl_note = (f"perplexity: {res['generate.py fp32']['ppl_tokens']} tokens of {source}, windows of {args.ppl_window}"
                    if with_ppl else "perplexity: n/a (random weights)")
        print(f"\n{ppl_note}; llama.cpp q8_0 with weight repacking off (use_extra_bufts=False); llama.cpp runs the "
              f"{args.batch} sequences one after the other (no batch in llama-cpp-python's high-level API), generate.py as one batch.")
        print(f"new tok/s ratios: generate.py fp32 / llama.cpp f32 = {r32[0]:.2f} (1x{args.new_tokens}), {r32[1]:.2f} "
              f"({args.batch}x{args.new_tokens}); generate.py int8 / llama.cpp q8_0 = {r8[0]:.2f}, {r8[1]:.2f}  "
              f"(target >= {1 / 1.5:.2f})")
        print("greedy tokens equal to llama.cpp f32's (1x): " + ", ".join(
            f"{k} {v}/{args.new_tokens}" for k, v in entry["greedy_agreement_with_llama_f32"].items()))
        # where the time goes
        bd = {e.name: decode_breakdown(e, prompts[0], args.new_tokens) for e in tq}
        bdB = {e.name: decode_breakdown(e, prompts[0], args.new_tokens, args.batch) for e in tq}
        lb = {e.name: llama_breakdown(e, prompts[0], args.new_tokens) for e in ll}
        entry["breakdown"] = {"generate_1": bd, f"generate_{args.batch}": bdB, "llama_1": lb}
        print("\ndecode step, ms per token (1 sequence; generate.py via manual timers on decode.FastGPT2; each part the "
              "minimum of 3 runs):")
        for name, b in bd.items():
            print(f"  {name}: step {b['step_ms']:.2f} = blocks {b['blocks_ms']:.2f} + LM head & greedy pick {b['lm_head_ms']:.2f} "
                  f"(LM head {b['lm_head_dtype'].replace('torch.', '')}, int8 screen {'on' if b['int8_screen'] else 'off'}) "
                  f"+ rest (Python, token bookkeeping) {b['rest_ms']:.2f}; prefill {b['prefill_ms']:.1f} ms")
        for name, b in bdB.items():
            print(f"  {name}, {args.batch} rows: step {b['step_ms']:.2f} = blocks {b['blocks_ms']:.2f} + LM head & pick "
                  f"{b['lm_head_ms']:.2f} + rest {b['rest_ms']:.2f} ({b['step_ms'] / args.batch:.2f} per token)")
        for name, b in lb.items():
            print(f"  {name}: llm.eval of one token {b['eval_ms']:.2f} + logits read & argmax {b['argmax_ms']:.2f}")
        prof = {e.name: op_profile(e, prompts[0], args.new_tokens) for e in tq}
        entry["op_profile"] = prof
        print("\ntorch.profiler, generate.py 1x: top ops by self CPU time (ms per decode step, calls per step):")
        for name, ops in prof.items():
            print(f"  {name}: " + "; ".join(f"{k} {ms:.2f} ({c:g})" for k, ms, c in ops))
        if not args.no_repack_probe:
            probe = repack_probe(made["gguf"]["q8_0"], args.threads, prompts[0], 20, n_tokens, res["llama.cpp q8_0"]["tokens_one"][:20])
            entry["q8_0_default_repacking"] = probe
            print(f"\nllama.cpp q8_0 with its default weight repacking (child process): {probe}")
        if args.explore:
            ex = explore(label, tq, prompts[:1], args)
            entry["explore"] = ex
            print(f"\n--explore, generate.py 1x{args.new_tokens} new tok/s (medians of {args.reps}; llama.cpp f32 "
                  f"{one['llama.cpp f32']:.1f}, q8_0 {one['llama.cpp q8_0']:.1f}):")
            for k, v in ex.items():
                print(f"  {k:<42} {v:8.1f}")
        for r in res.values():
            r.pop("tokens_one", None)
        report["models"][label] = entry
        del tq, ll
    report["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
