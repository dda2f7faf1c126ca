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
