"""evaluation.py and perplexity.py: perplexity (sliding window, blocks), bits per byte, generation metrics, reports, CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluation as ev
import generate as G
import perplexity as pp
from errors import GPT2ToolkitError
from model import ModelError

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 128


def _tiny_model(seed=0, vocab_size=50257):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=CONTEXT, vocab_size=vocab_size, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.config.pad_token_id = model.generation_config.pad_token_id = config.eos_token_id
    return model


@pytest.fixture(scope="session")
def corpus_text():
    import dataset

    return "\n\n".join(dataset.builtin_documents()[:40])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, corpus_text):
    """A 2-layer GPT-2 trained for 10 steps on some English, saved with its tokenizer."""
    model = _tiny_model()
    ids = torch.tensor(tokenizer.encode(corpus_text)[:20000])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(10):  # held-out loss 10.8 -> ~6.7; every step costs, the 50257-way output dominates
        starts = torch.randint(0, len(ids) - 33, (2,), generator=gen)
        batch = torch.stack([ids[s:s + 32] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_vocab():
    """Random ids and a random model over 1000 tokens: the window arithmetic, without a 50257-way softmax."""
    return _tiny_model(seed=3, vocab_size=1000).eval(), np.random.default_rng(0).integers(0, 1000, 600).tolist()


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    tokenizer, model, _ = G.load_model(str(tiny_model_dir), device="cpu")
    return model, tokenizer


@pytest.fixture
def text_file(tmp_path, corpus_text):
    path = tmp_path / "docs.jsonl"
    docs = [p[:400] for p in corpus_text.split("\n\n") if len(p) > 200][:6]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


# ----------------------------------------------------------------------------------------------
# Perplexity


def test_blocks_agree_with_trainer_evaluate(tiny, tmp_path, corpus_text):
    from transformers import Trainer, TrainingArguments, default_data_collator

    import dataset

    model, tokenizer = tiny
    (tmp_path / "a.txt").write_text(corpus_text[:30000])
    _, _, val = dataset.get_dataset_and_tokenizer(dataset_path=str(tmp_path / "a.txt"), block_size=64, val_split=0.2,
                                                  cache_dir=str(tmp_path / "cache"))
    val = val.select(range(10))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=4, report_to="none",
                             use_cpu=True, disable_tqdm=True)

    def trainer_loss():
        return Trainer(model=model, args=args, eval_dataset=val, data_collator=default_data_collator).evaluate()["eval_loss"]

    ours = pp.evaluate_perplexity(model, tokenizer, val, batch_size=3, progress=False)
    assert ours["tokens"] == len(val) * 63 and ours["windows"] == len(val)
    assert 1 < ours["perplexity"] < 20000  # trained: better than uniform over 50257 tokens
    assert not model.training
    # transformers 5.24's Trainer divides a GPT2LMHeadModel's summed loss by all 64 labels of a block,
    # not the 63 predicted ones: the model takes loss kwargs, so prediction_step passes num_items_in_batch,
    # which _get_num_items_in_batch counts over labels[..., 1:] only when LOSS_MAPPING[model.loss_type] is
    # ForCausalLMLoss -- and GPT2LMHeadModel's loss_type is None (its class name maps to no loss type).
    # Every block has 64 labels, so its eval_loss is exactly 63/64 of the true mean (ours), never equal to it.
    unfixed = trainer_loss()
    assert unfixed == pytest.approx(ours["loss"] * 63 / 64, rel=1e-4)
    saved, model.loss_type = model.loss_type, "ForCausalLM"
    try:
        fixed = trainer_loss()
    finally:
        model.loss_type = saved
    assert ours["perplexity"] == pytest.approx(math.exp(fixed), rel=0.01)
    assert ours["loss"] == pytest.approx(fixed, rel=1e-4)


def test_evaluation_reexports_the_scoring_api():
    """perplexity.py holds the scoring; `from evaluation import evaluate_perplexity, ...` keeps working."""
    for name in ("EvaluationError", "evaluate_perplexity", "evaluate_texts", "sliding_window_nll", "iter_windows",
                 "token_byte_lengths", "model_context"):
        assert getattr(ev, name) is getattr(pp, name), name


def _documented_sliding_window(model, ids, context, stride):
    """https://huggingface.co/docs/transformers/perplexity, with the scored tokens counted exactly."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor(ids[begin:end])[None]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits
        nll += F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100, reduction="sum").item()
        count += int((target[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll / count, count


def _chunks(ids, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(ids[i:i + s])
        i += s
    out.append(ids[i:])
    return out


@pytest.mark.parametrize("stride", [32, 100, CONTEXT])
def test_sliding_window_matches_the_documented_loop(small_vocab, stride):
    model, ids = small_vocab  # 600 tokens, not a multiple of the stride
    loss, count = _documented_sliding_window(model, ids, CONTEXT, stride)
    ours = pp.sliding_window_nll(model, _chunks(ids, [7, 50, 1, 300]), context=CONTEXT, stride=stride, batch_size=3,
                                 progress=False)
    assert ours["tokens"] == count
    assert ours["loss"] == pytest.approx(loss, rel=1e-5)


def test_stride_equal_to_context_is_the_non_overlapping_computation(small_vocab):
    model, ids = small_vocab
    blocks = [ids[i:i + CONTEXT] for i in range(0, len(ids), CONTEXT)]  # the last one shorter
    assert len(blocks[-1]) < CONTEXT
    windows = pp.sliding_window_nll(model, [ids], context=CONTEXT, stride=CONTEXT, progress=False)
    separate = pp.evaluate_perplexity(model, None, iter(blocks), progress=False)
    assert windows["tokens"] == separate["tokens"] == len(ids) - len(blocks)
    assert windows["loss"] == pytest.approx(separate["loss"], rel=1e-6)
    assert separate["bits_per_byte"] is None  # no tokenizer, no byte count


def test_windows_are_streamed_not_collected(small_vocab):
    """The scorer pulls chunks lazily and holds at most a batch of windows: memory is flat in the data size."""
    model, _ = small_vocab
    pulled, at_forward = [0], []
    rng = np.random.default_rng(0)

    def stream():
        for _ in range(40):
            pulled[0] += 1
            yield rng.integers(0, 1000, 50)

    hook = model.register_forward_pre_hook(lambda *_: at_forward.append(pulled[0]))
    try:
        result = pp.sliding_window_nll(model, stream(), context=CONTEXT, stride=64, batch_size=2, progress=False)
    finally:
        hook.remove()
    assert result["tokens"] == 40 * 50 - 1
    assert at_forward[0] <= 5 and len(at_forward) > 10  # the first batch ran long before the stream ended
    assert all(len(ids) <= CONTEXT for ids, _ in pp.iter_windows(stream(), CONTEXT, 64))


def test_iter_windows_scores_every_token_once():
    for n in (1, 2, 5, 127, 128, 129, 300):
        for stride in (1, 16, 100, 128):
            windows = list(pp.iter_windows([np.arange(n)], CONTEXT, stride))
            scored = [int(t) for ids, k in windows for t in ids[len(ids) - k:]]
            assert scored == sorted(set(scored))
            expected_unscored = {0} | ({i for i in range(0, n, CONTEXT)} if stride == CONTEXT else set())
            assert set(range(n)) - set(scored) == expected_unscored


def test_uniform_model_known_perplexity_and_bits_per_byte(tokenizer):
    """All-zero output embedding: every token has probability 1/V, so perplexity is V exactly."""
    model = _tiny_model()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied to lm_head: all logits are 0
    vocab = model.config.vocab_size
    docs = ["Grüße aus Köln — ✓ 日本語のテキスト.", "plain ascii text\nwith two lines"]
    n_bytes = sum(len(d.encode()) for d in docs)
    result = pp.evaluate_texts(model, tokenizer, docs, stride=64, progress=False)
    n_tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)  # each document and its <|endoftext|>
    assert result["tokens"] == n_tokens  # the start token makes the first text token scored too
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["bytes"] == n_bytes and result["documents"] == 2
    assert result["bits_per_byte"] == pytest.approx(n_tokens * math.log2(vocab) / n_bytes, rel=1e-5)
    # The same bytes counted from token ids (blocks path): exact for byte-level BPE.
    ids = [tokenizer.eos_token_id] + tokenizer.encode(docs[0])
    blocks = pp.evaluate_perplexity(model, tokenizer, [ids], progress=False)
    assert blocks["bytes"] == len(docs[0].encode())
    assert blocks["bits_per_byte"] == pytest.approx((len(ids) - 1) * math.log2(vocab) / len(docs[0].encode()), rel=1e-5)


def test_token_byte_lengths_are_exact_for_gpt2(tokenizer):
    lengths = pp.token_byte_lengths(tokenizer)
    for text in ["héllo wörld ✓ 日本 🙂", "  spaces\n\ttabs", "<|endoftext|> is special"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        special = text.count("<|endoftext|>") * len("<|endoftext|>")
        assert lengths[ids].sum() == len(text.encode()) - special
    assert lengths[tokenizer.eos_token_id] == 0


# ----------------------------------------------------------------------------------------------
# Generation metrics


def test_bleu_and_rouge_known_answers_and_library_equality():
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog", "hello world"]
    hyps = ["the cat sat on a mat", "the quick brown fox jumped over the dog", "goodbye moon"]
    assert ev.bleu(refs, refs) == pytest.approx(100.0)
    assert ev.rouge(refs, refs) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert ev.bleu(["xyz qqq"], ["abc def"]) == 0.0 and ev.rouge(["xyz"], ["abc"])["rouge1"] == 0.0
    assert ev.bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key, value in ev.rouge(hyps, refs).items():
        assert value == pytest.approx(np.mean([scorer.score(r, h)[key].fmeasure for h, r in zip(hyps, refs)]))
    assert 0 < ev.bleu(hyps, refs) < 100


def test_distinct_and_repetition_on_hand_made_inputs():
    assert ev.distinct_n([["a", "b", "a", "b"]], 1) == 0.5
    assert ev.distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    assert ev.distinct_n([["a", "b"], ["a", "c"]], 1) == 0.75  # pooled over samples
    assert ev.distinct_n([["a"]], 2) is None
    assert ev.repetition_rate([list("abcd") * 3], 4) == pytest.approx(5 / 9)
    assert ev.repetition_rate([list("abcdefgh")], 4) == 0.0
    assert ev.repetition_rate([list("abcd"), list("abcd")], 4) == 0.0  # across samples is not repetition
    assert ev.repetition_rate([["x"] * 3], 4) is None


def test_copy_rate_streams_training_data_across_chunk_boundaries():
    train = list(range(100, 130))
    chunks = [train[:15], train[15:22], train[22:]]  # 8-grams straddle both chunk borders
    samples = [list(range(110, 118)), list(range(1, 9)), list(range(110, 119)), [5, 6]]
    queries = np.concatenate([ev.ngram_hashes(s, 8) for s in samples])
    found = ev.find_ngrams(queries, iter(chunks), 8)
    assert ev.copy_rate(samples, found, 8) == pytest.approx(3 / 4)
    assert ev.copy_rate([[1, 2, 3]], found, 8) is None
    h = ev.ngram_hashes(list(range(20)), 8)
    assert len(h) == 13 and len(set(h.tolist())) == 13
    assert ev.ngram_hashes([1, 2, 3, 4, 5, 6, 7, 8], 8)[0] != ev.ngram_hashes([8, 7, 6, 5, 4, 3, 2, 1], 8)[0]


def test_generation_metrics_end_to_end(tiny, corpus_text):
    model, tokenizer = tiny
    docs = [p for p in corpus_text.split("\n\n") if len(p) > 300][:4]
    pairs, skipped = ev.make_prompts(["short"] + docs, tokenizer, 3, 16, 8)
    assert len(pairs) == 3 and skipped == 1 and all(len(p) == 16 and len(r) == 8 for p, r in pairs)
    settings = ev.SamplingSettings(prompt_tokens=16, reference_tokens=8, seed=1, batch_size=2, top_k=0, top_p=0.9)
    metrics, samples = ev.generation_metrics(model, tokenizer, pairs[:2], settings, progress=False)
    again, _ = ev.generation_metrics(model, tokenizer, pairs[:2], settings, progress=False)
    assert metrics == again  # seeded
    assert metrics["samples"] == 2 and 0 < metrics["mean_length_tokens"] <= 8
    assert 0 <= metrics["bleu"] <= 100 and 0 <= metrics["rouge1"] <= 1
    assert all(len(s["generated_ids"]) <= 8 for s in samples)
    greedy = ev.SamplingSettings(prompt_tokens=16, reference_tokens=8, greedy=True, batch_size=3)
    _, s1 = ev.generation_metrics(model, tokenizer, pairs, greedy, progress=False)
    greedy.batch_size = 1
    _, s2 = ev.generation_metrics(model, tokenizer, pairs, greedy, progress=False)
    assert [s["generated_ids"] for s in s1] == [s["generated_ids"] for s in s2]  # greedy: batching changes nothing
    # The references scored against themselves: the known answers.
    refs = [s["reference"] for s in s1]
    known = ev.text_metrics(refs, refs)
    assert known["bleu"] == pytest.approx(100.0) and known["rouge1"] == known["rougeL"] == 1.0


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(ev.EvaluationError, match="longer than the model's context of 128"):
        ev.SamplingSettings(prompt_tokens=100, reference_tokens=40).check(CONTEXT)
    with pytest.raises(ev.EvaluationError, match="temperature"):  # generate.check_sampling_args' rule and words
        ev.SamplingSettings(temperature=-1).check(CONTEXT)
    ev.SamplingSettings(temperature=0).check(CONTEXT)  # greedy, as in generate.py


# ----------------------------------------------------------------------------------------------
# Reports and the command line


def test_markdown_table_one_row_per_model():
    results = {"models": [
        {"model": "a", "parameters": 3_300_000, "perplexity": {"tokens": 1000, "loss": 3.0, "perplexity": 20.0855, "bits_per_byte": 1.2}},
        {"model": "b", "parameters": 124_000_000, "perplexity": {"tokens": 1000, "loss": 2.5, "perplexity": 12.18, "bits_per_byte": None}},
    ]}
    lines = ev.markdown_table(results).splitlines()
    assert lines[0] == "| model | params | tokens | loss | perplexity | bits/byte |"
    assert lines[2] == "| a | 3.3M | 1,000 | 3.0000 | 20.09 | 1.2000 |"
    assert lines[3] == "| b | 124.0M | 1,000 | 2.5000 | 12.18 | – |"
    assert len(lines) == 4


def _cli(*args, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "evaluation.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_cli_compares_models_side_by_side(tiny_model_dir, tmp_path, text_file):
    other = tmp_path / "untrained"
    _tiny_model(seed=1).save_pretrained(other)  # no tokenizer files: the official GPT-2 tokenizer is used
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    r = _cli("--model_path", tiny_model_dir, other, "--dataset_path", text_file, "--stride", 64, "--num_samples", 3,
             "--prompt_tokens", 16, "--reference_tokens", 8, "--train_data", text_file, "--output_json", out_json,
             "--output_md", out_md)
    assert r.returncode == 0, r.stderr
    results = json.loads(out_json.read_text())
    rows = results["models"]
    assert [row["model"] for row in rows] == [str(tiny_model_dir), str(other)]
    trained, untrained = (row["perplexity"]["perplexity"] for row in rows)
    assert trained < untrained / 5
    assert rows[0]["perplexity"]["documents"] == 6 and rows[0]["perplexity"]["stride"] == 64
    assert all(row["generation"]["samples"] == 3 and "copy_rate" in row["generation"] for row in rows)
    assert results["reference"]["copy_rate"] == 1.0  # the references come from the training data itself
    table = out_md.read_text()
    assert table.splitlines()[0].startswith("| model | params | vocab | tokens | loss | perplexity | bits/byte | BLEU | ROUGE-1")
    assert f"| {tiny_model_dir} |" in table and f"| {other} |" in table
    assert table.strip() in r.stdout


def test_cli_help_documents_every_flag():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ev.EvalArguments)
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
    assert not undocumented


def test_cli_missing_model_is_one_line_error(tmp_path, text_file):
    r = _cli("--model_path", tmp_path / "nope", "--dataset_path", text_file)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: model folder") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["empty data", "no data", "prompt too long", "stride", "not a model", "bad json",
                                  "not downloaded", "hub offline", "bad device"])
def test_cli_bad_input(case, tiny_model_dir, tmp_path, text_file, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    (tmp_path / "notmodel").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    argv = {
        "empty data": ["--dataset_path", empty],
        "no data": [],
        "prompt too long": ["--dataset_path", text_file, "--num_samples", 2, "--prompt_tokens", 100, "--reference_tokens", 100],
        "stride": ["--dataset_path", text_file, "--stride", 500],
        "not a model": ["--dataset_path", text_file],
        "bad json": ["--dataset_path", bad],
        "not downloaded": ["--dataset_name", "webtext", "--split", "valid", "--data_dir", tmp_path / "data"],
        "hub offline": ["--dataset_name", "nobody/no-such-dataset-xyz"],
        "bad device": ["--dataset_path", text_file, "--device", "tpu9"],
    }[case]
    model = tmp_path / "notmodel" if case == "not a model" else tiny_model_dir
    expected = {"empty data": "contains no text", "no data": "no data to evaluate on", "prompt too long": "longer than the model's context",
                "stride": "larger than the window", "not a model": "no config.json", "bad json": "line 2: invalid JSON",
                "not downloaded": "webtext.valid.jsonl not found: run `python download_dataset.py --datasets webtext --splits valid",
                "hub offline": "nor a loadable Hugging Face dataset", "bad device": "'tpu9' is not a device"}[case]  # generate.pick_device's words
    assert ev.main(["--model_path", str(model), *map(str, argv), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err


def test_worked_example_on_webtext_sample(shared_data, tiny_model_dir):
    """docs/evaluation.md's example on the shared WebText test sample (skipped when ../shared/data is absent)."""
    test = shared_data / "gpt2-output" / "webtext.test.head30.jsonl"
    args = ev.EvalArguments(model_path=[str(tiny_model_dir)], dataset_path=str(test), max_documents=2, num_samples=3,
                            prompt_tokens=32, reference_tokens=16, train_data=str(test), progress=False)
    results = ev.evaluate(args)
    row = results["models"][0]
    assert row["perplexity"]["documents"] == 2 and row["perplexity"]["bits_per_byte"] > 0
    assert row["generation"]["samples"] == 3
    assert results["reference"]["copy_rate"] == 1.0  # test documents scanned as "training data" contain the references
    assert 0 <= row["generation"]["copy_rate"] <= 1


def test_help_names_the_generation_metrics():
    """Issue 13, item 12: --help says what --num_samples computes, and the module docstring too."""
    r = _cli("--help", timeout=120)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for name in ("BLEU", "ROUGE", "distinct-1/2", "copy rate", "perplexity", "bits per byte"):
        assert name in text, name
    flag = text[text.rindex("--num_samples NUM_SAMPLES"):]  # the flag's own help, after the usage line
    flag = flag[:flag.index("--prompt_tokens")]
    for name in ("BLEU", "ROUGE", "distinct", "copy rate"):
        assert name in flag, (name, flag)
    doc = " ".join(ev.__doc__.split())
    assert "--num_samples" in doc and all(n in doc for n in ("BLEU", "ROUGE", "distinct-1/2", "copy rate"))


@pytest.mark.parametrize("kind", ["garbage weights", "truncated weights", "bad config json", "weights of a narrower model",
                                  "refused pickle"])
def test_broken_model_folders_are_one_line_errors(broken_model_folder, text_file, kind, capsys):
    """Issue 13, item 11: a broken model folder is an EvaluationError naming the broken file (model.load_folder)."""
    folder, named = broken_model_folder(kind)
    with pytest.raises(GPT2ToolkitError) as e:
        G.load_model(str(folder), device="cpu")
    assert str(e.value).startswith(str(named))  # the broken file first, then what is wrong with it
    assert ev.main(["--model_path", str(folder), "--dataset_path", str(text_file), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named}") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    if kind == "refused pickle":
        assert "could run code" in err


# ----------------------------------------------------------------------------------------------
# More bad inputs (issue 13: faults, not only values)


def test_unwritable_outputs_fail_before_evaluating(tiny_gpt2_dir, tmp_path, text_file, monkeypatch, capsys):
    """An --output_json that cannot be written used to be a traceback after the whole evaluation, its results lost."""
    (tmp_path / "afile").write_text("x")
    real_evaluate = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda args: pytest.fail("evaluated although the output cannot be written"))
    base = ["--model_path", str(tiny_gpt2_dir), "--dataset_path", str(text_file), "--no_progress"]
    for flag, path, expected in [("--output_json", tmp_path / "afile" / "r.json", f"{tmp_path / 'afile'} is a file"),
                                 ("--output_md", tmp_path, "is a folder, not a file: choose another path, e.g.")]:
        assert ev.main([*base, flag, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} ") and expected in err and len(err.splitlines()) == 1, err
    monkeypatch.setattr(ev, "evaluate", real_evaluate)
    out = tmp_path / "new" / "folder" / "r.json"  # a missing folder is created
    assert ev.main([*base, "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())["models"][0]["perplexity"]["documents"] == 6
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_non_finite_weights_and_nan_losses_are_errors(tiny_gpt2_dir, tmp_path, tokenizer):
    """Weights with inf gave a table of nan (and a multinomial traceback when sampling)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "diverged")
    with pytest.raises(ModelError, match=r"diverged: the weight transformer\.h\.0\.mlp\.c_fc\.weight holds NaN or inf"):
        G.load_model(str(tmp_path / "diverged"), device="cpu")
    with pytest.raises(ev.EvaluationError, match="loss is NaN"):  # a model handed to the library directly
        ev.evaluate_texts(model, tokenizer, ["some text to score"], progress=False)


def test_fewer_documents_than_num_samples_is_said(tiny_gpt2_dir, text_file):
    args = ev.EvalArguments(model_path=[str(tiny_gpt2_dir)], dataset_path=str(text_file), skip_perplexity=True,
                            num_samples=50, prompt_tokens=8, reference_tokens=8, greedy=True, progress=False)
    with pytest.warns(UserWarning, match=r"--num_samples 50: .*docs\.jsonl has only 6 document\(s\)"):
        results = ev.evaluate(args)
    assert results["models"][0]["generation"]["samples"] == 6


def test_text_metrics_of_no_samples_are_none():
    assert ev.text_metrics([], []) == {"bleu": None, "rouge1": None, "rouge2": None, "rougeL": None, "distinct_1": None,
                                       "distinct_2": None, "repetition_4": None, "mean_length_words": None}
    empty = ev.text_metrics([""], [""])  # an empty reference and an empty continuation: zeros, no crash
    assert empty["bleu"] == 0.0 and empty["rouge1"] == 0.0


def test_a_full_disk_at_the_end_keeps_the_previous_file_and_the_results(tmp_path, monkeypatch, capsys):
    import errno

    results = {"models": [{"model": "m", "parameters": 1000, "perplexity": {"tokens": 10, "loss": 2.0, "perplexity": 7.39}}]}
    monkeypatch.setattr(ev, "evaluate", lambda args: results)
    out = tmp_path / "r.json"
    out.write_text('{"previous": "results"}\n')
    real_write_text = Path.write_text

    def disk_fills_up(self, data, *args, **kwargs):
        real_write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    assert ev.main(["--model_path", "m", "--dataset_path", "d", "--output_json", str(out)]) == 2
    captured = capsys.readouterr()
    assert "| m | 0.0M | 10 | 2.0000 | 7.39 |" in captured.out  # the results are still shown
    assert captured.err.startswith(f"error: {out} could not be written (No space left on device)")
    assert out.read_text() == '{"previous": "results"}\n'  # not half of the new one
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness (--tasks): the real harness, offline, on the local tasks of conftest.harness_tasks


def _harness_direct(folder, harness_tasks, **kwargs):
    """lm_eval.simple_evaluate(model="hf", model_args="pretrained=<folder>") on the local tasks, as a user would run it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include, names = harness_tasks
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},device=cpu", tasks=names,
                                   task_manager=TaskManager(include_path=str(include)), log_samples=False,
                                   batch_size=8, verbosity="ERROR", **kwargs)


def _harness_cli(models, harness_tasks, tmp_path, capsys, *extra):
    include, names = harness_tasks
    out_json, out_md = tmp_path / "h.json", tmp_path / "h.md"
    code = ev.main(["--model_path", *map(str, models), "--tasks", ",".join(names), "--include_path", str(include),
                    "--device", "cpu", "--output_json", str(out_json), "--output_md", str(out_md), "--no_progress",
                    *map(str, extra)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(out_json.read_text()), out_md.read_text(), captured.out


def test_tasks_columns_equal_the_harness_hf_model(tiny_model_dir, harness_tasks, tmp_path, text_file, capsys):
    """--tasks adds the harness's scores to the same table and JSON as perplexity, and they are the scores
    `lm_eval --model hf --model_args pretrained=<folder>` gives (accuracies exactly)."""
    from lm_eval.utils import make_table

    results, table, stdout = _harness_cli([tiny_model_dir], harness_tasks, tmp_path, capsys, "--dataset_path", text_file)
    row = results["models"][0]
    assert row["perplexity"]["documents"] == 6
    scores = row["tasks"]
    assert set(scores) == {"local_mc", "local_lastword"}
    assert scores["local_mc"]["samples"] == 20 and scores["local_lastword"]["samples"] == 20
    header = table.splitlines()[0]
    for col in ("perplexity", "bits/byte", "local_mc acc", "local_mc acc_norm", "local_lastword acc",
                "local_lastword perplexity"):
        assert f"| {col} |" in header, header
    assert stdout.strip() == table.strip()  # the harness's own prints went to stderr
    assert results["harness"]["tasks"] == ["local_mc", "local_lastword"] and results["harness"]["lm_eval"]

    out = _harness_direct(tiny_model_dir, harness_tasks)
    print(make_table(out))  # the harness's own table (pytest -s shows it)
    direct = out["results"]
    for task, metric in (("local_mc", "acc"), ("local_mc", "acc_norm"), ("local_lastword", "acc")):
        assert scores[task][metric] == direct[task][f"{metric},none"], (task, metric)
    assert scores["local_lastword"]["perplexity"] == pytest.approx(direct["local_lastword"]["perplexity,none"], rel=1e-6)
    assert 0 <= scores["local_mc"]["acc"] <= 1 and scores["local_lastword"]["perplexity"] > 1
    assert row["harness_table"].startswith("|") and "local_mc" in row["harness_table"]


def test_tasks_on_an_int8_folder_run_through_our_loader_close_to_fp32(tiny_model_dir, harness_tasks, tmp_path, capsys):
    """quantize.py's int8 folder (which from_pretrained cannot read) goes through an HFLM around our loader's
    model; its scores are close to the fp32 folder's."""
    import quantize

    int8 = tmp_path / "int8"
    assert quantize.main(["--model_path", str(tiny_model_dir), "--mode", "int8", "--out", str(int8)]) == 0
    capsys.readouterr()
    results, table, _ = _harness_cli([tiny_model_dir, int8], harness_tasks, tmp_path, capsys)
    fp32, q8 = (row["tasks"] for row in results["models"])
    assert f"| {int8} |" in table
    for task, metric in (("local_mc", "acc"), ("local_mc", "acc_norm"), ("local_lastword", "acc")):
        assert abs(fp32[task][metric] - q8[task][metric]) <= 0.1, (task, metric, fp32[task], q8[task])  # 2 of 20 items
    assert q8["local_lastword"]["perplexity"] == pytest.approx(fp32["local_lastword"]["perplexity"], rel=0.05)


@pytest.mark.parametrize("kind", ["padded vocabulary", "own tokenizer", "no tokenizer files"])
def test_tasks_with_our_kinds_of_model_folders(kind, harness_tasks, tmp_path, small_bpe_folder, tokenizer, capsys):
    """The harness's hf model reads our folders offline: a vocabulary padded to 50304 (> the tokenizer's 50257),
    a tokenizer of our own (train_tokenizer.py's kind: byte-level BPE, <|endoftext|> id 0), a checkpoint-N
    folder without tokenizer files (the official GPT-2 tokenizer is passed)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    vocab = {"padded vocabulary": 50304, "own tokenizer": 300, "no tokenizer files": 50257}[kind]
    _tiny_model(seed=2, vocab_size=vocab).save_pretrained(folder)
    if kind == "padded vocabulary":
        tokenizer.save_pretrained(folder)
    elif kind == "own tokenizer":
        AutoTokenizer.from_pretrained(small_bpe_folder).save_pretrained(folder)
    results, table, _ = _harness_cli([folder], harness_tasks, tmp_path, capsys, "--limit", 5)
    scores = results["models"][0]["tasks"]
    assert scores["local_mc"]["samples"] == 5 and 0 <= scores["local_mc"]["acc"] <= 1
    assert math.isfinite(scores["local_lastword"]["perplexity"])
    assert "local_lastword perplexity" in table


def test_hub_task_without_network_is_a_one_line_error(tiny_gpt2_dir, capsys):
    """Offline, a Hub task cannot download: one line that says so and how to point the harness at a local copy."""
    assert ev.main(["--model_path", str(tiny_gpt2_dir), "--tasks", "hellaswag", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks hellaswag: its data could not be downloaded") and len(err.splitlines()) == 1, err
    assert "--include_path" in err and "dataset_path: json" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["unknown task", "include_path not a folder", "limit without tasks", "empty tasks"])
def test_bad_task_arguments_are_one_line_errors(case, tiny_gpt2_dir, tmp_path, text_file, capsys):
    argv = {"unknown task": ["--tasks", "no_such_task_xyz"],
            "include_path not a folder": ["--tasks", "local_mc", "--include_path", str(tmp_path / "nope")],
            "limit without tasks": ["--dataset_path", str(text_file), "--limit", "5"],
            "empty tasks": ["--tasks", ","]}[case]
    expected = {"unknown task": "no_such_task_xyz is not a task of lm-evaluation-harness",
                "include_path not a folder": "is not a folder", "limit without tasks": "add --tasks",
                "empty tasks": "--tasks is empty"}[case]
    assert ev.main(["--model_path", str(tiny_gpt2_dir), *argv, "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err


def test_markdown_table_has_task_columns():
    results = {"models": [
        {"model": "a", "parameters": 124_000_000, "tasks": {"hellaswag": {"acc": 0.289, "acc_stderr": 0.004, "acc_norm": 0.3115,
                                                                          "samples": 10042},
                                                            "lambada_openai": {"perplexity": 40.0621, "acc": 0.3256}}},
        {"model": "b", "parameters": 124_000_000, "tasks": {"hellaswag": {"acc": 0.28, "acc_norm": 0.30}}},
    ]}
    lines = ev.markdown_table(results).splitlines()
    assert lines[0] == "| model | params | hellaswag acc | hellaswag acc_norm | lambada_openai perplexity | lambada_openai acc |"
    assert lines[2] == "| a | 124.0M | 0.2890 | 0.3115 | 40.06 | 0.3256 |"
    assert lines[3] == "| b | 124.0M | 0.2800 | 0.3000 | – | – |"
