import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# Tests never touch the network or a WandB account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, the real corpora; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from gpt2_tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    """A random 2-layer, 64-wide GPT-2 saved with the tokenizer: the model for sampling/serving tests."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128))
    path = tmp_path_factory.mktemp("tiny") / "final_model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def broken_model_folder(tiny_gpt2_dir, tmp_path, capsys):
    """break_(kind) -> (folder, the path the error must start with): a copy of the tiny GPT-2 broken one way a
    real folder gets broken (an interrupted copy, a foreign file, an unsafe pickle). Kinds: garbage weights,
    truncated weights, bad config json, wrong config type, weights of a shallower model, weights of a narrower
    model, refused pickle, corrupt tokenizer, tokenizer larger than the vocabulary."""
    import pickle
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    def break_(kind):
        folder = tmp_path / "model"
        shutil.copytree(tiny_gpt2_dir, folder)
        weights = folder / "model.safetensors"
        named = weights
        if kind == "garbage weights":
            weights.write_bytes(os.urandom(4096))
        elif kind == "truncated weights":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif kind == "bad config json":
            (folder / "config.json").write_text("{not json")
            named = folder / "config.json"
        elif kind == "wrong config type":
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, "n_layer": "two"}))
            named = folder / "config.json"
        elif kind in ("weights of a shallower model", "weights of a narrower model"):
            narrow = "narrower" in kind
            other = GPT2LMHeadModel(GPT2Config(n_layer=2 if narrow else 1, n_embd=32 if narrow else 64, n_head=2, n_positions=128))
            other.save_pretrained(tmp_path / "other")
            weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
        elif kind == "refused pickle":
            class Evil:
                def __reduce__(self):
                    return (os.system, ("echo pwned",))

            weights.unlink()
            named = folder / "pytorch_model.bin"
            named.write_bytes(pickle.dumps(Evil()))
        elif kind == "corrupt tokenizer":
            (folder / "tokenizer.json").write_text("{garbage")
            named = folder
        elif kind == "tokenizer larger than the vocabulary":  # token ids past the embedding: an IndexError before
            GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=1000)).save_pretrained(folder)
            named = folder
        else:
            raise ValueError(kind)
        capsys.readouterr()  # save_pretrained's progress bar
        return folder, named

    return break_


SMALL_BPE_SIZE = 300


@pytest.fixture(scope="session")
def small_bpe_folder(tmp_path_factory):
    """A byte-level BPE tokenizer of SMALL_BPE_SIZE (300) tokens, not GPT-2's, trained on Python's documentation
    text, saved as a Hugging Face tokenizer folder: its only special token is <|endoftext|>, id 0 (EOS, BOS, UNK)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL_BPE_SIZE, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([topics[k] for k in sorted(topics)][:200], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("small_bpe")
    tokenizer.save_pretrained(path)
    return path


HARNESS_TASKS = ("local_mc", "local_lastword")


def _harness_sentences(limit: int = 400) -> list[str]:
    """Plain sentences of 10-40 words: the WebText test sample of ../shared/data when present, else the
    built-in documents (dataset.builtin_documents(): Python's documentation)."""
    import re

    path = SHARED_DATA / "gpt2-output" / "webtext.test.head30.jsonl"
    if path.is_file():
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    else:
        import dataset

        texts = dataset.builtin_documents()
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = s.split()
            if 10 <= len(words) <= 40 and s[0].isalpha() and re.fullmatch(r"[A-Za-z]+[.!?]", words[-1]):
                out.append(s)
    return out[:limit]


def write_harness_tasks(folder, n: int = 20) -> tuple[Path, list[str]]:
    """Write two small lm-evaluation-harness tasks into `folder`: task YAMLs over local JSONL (no Hub):
      - local_mc: multiple choice, HellaSwag-like: a sentence's first half, 4 endings (its own and three other
        sentences' endings), acc and acc_norm;
      - local_lastword: LAMBADA-like last-word prediction (output_type loglikelihood), acc and perplexity.
    n items each. Returns (the folder for --include_path / TaskManager(include_path=...), the task names)."""
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sentences = _harness_sentences()
    assert len(sentences) >= 2 * n, f"only {len(sentences)} usable sentences"
    rng = random.Random(0)
    mc_sents, last_sents = sentences[:n], sentences[n:2 * n]
    splits = [s.split() for s in mc_sents]
    halves = [(" ".join(w[:len(w) // 2]), " " + " ".join(w[len(w) // 2:])) for w in splits]
    mc = []
    for i, (context, ending) in enumerate(halves):
        others = rng.sample([e for j, (_, e) in enumerate(halves) if j != i], 3)
        label = i % 4
        choices = others[:label] + [ending] + others[label:]
        mc.append({"context": context, "choices": choices, "label": label})
    last = [{"text": s.rstrip(".!?")} for s in last_sents]  # the last word without its full stop, as LAMBADA's
    for name, rows in (("local_mc", mc), ("local_lastword", last)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "local_mc.yaml").write_text(
        f"task: local_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'local_mc.jsonl'))}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "target_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "local_lastword.yaml").write_text(
        f"task: local_lastword\n{common}dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'local_lastword.jsonl'))}\n"
        "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder, list(HARNESS_TASKS)


@pytest.fixture(scope="session")
def harness_tasks(tmp_path_factory):
    """(include_path folder, ["local_mc", "local_lastword"]): two small local lm-evaluation-harness tasks (see
    write_harness_tasks), for the harness's offline tests (evaluation.py --tasks, the API's local-completions)."""
    return write_harness_tasks(tmp_path_factory.mktemp("harness_tasks"))
