import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import PRESETS, count_parameters, get_model

TINY = dict(n_layer=2, n_embd=32, n_head=2)


def test_signature_is_kept():
    params = inspect.signature(get_model).parameters
    assert [(n, params[n].default) for n in ("n_embd", "n_layer", "n_head", "vocab_size")] == [
        ("n_embd", 768), ("n_layer", 12), ("n_head", 12), ("vocab_size", 50257)]
    # Everything added after them is keyword-only, so old positional calls keep working.
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in list(params.values())[4:])


def test_tiny_model_config_and_sdpa(capsys):
    model = get_model(**TINY, n_positions=64, dropout=0.2)
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == (2, 32, 2, 64, 50257)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.2
    assert c._attn_implementation == "sdpa"
    assert model.generation_config.pad_token_id == 50256
    assert "parameters" in capsys.readouterr().out
    ids = torch.randint(0, 50257, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 50257) and torch.isfinite(out.loss)


@pytest.mark.parametrize("preset,millions", [("gpt2", 124), ("gpt2-medium", 355), ("gpt2-large", 774), ("gpt2-xl", 1558)])
def test_gpt2_presets_have_the_official_sizes(preset, millions):
    with torch.device("meta"):  # no memory, no init: just the shapes
        model = get_model(preset=preset, verbose=False)
    assert round(count_parameters(model) / 1e6) == millions


def test_small_preset_is_cpu_sized():
    assert PRESETS["small"] == dict(n_layer=4, n_head=4, n_embd=256)
    with torch.device("meta"):
        model = get_model(preset="small", verbose=False)
    assert count_parameters(model) < 20e6


def test_init_from_local_folder(tmp_path):
    torch.manual_seed(0)
    base = get_model(**TINY, verbose=False)
    base.save_pretrained(tmp_path)
    tuned = get_model(init_from=tmp_path, dropout=0.0, verbose=False)
    assert tuned.config.resid_pdrop == 0.0 and tuned.config.n_embd == 32
    assert tuned.config._attn_implementation == "sdpa"
    for (name, a), (_, b) in zip(base.state_dict().items(), tuned.state_dict().items()):
        assert torch.equal(a, b), name


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of n_head"):
        get_model(n_layer=1, n_embd=30, n_head=4, verbose=False)
    with pytest.raises(ValueError, match="Unknown model preset"):
        get_model(preset="gpt5", verbose=False)
    with pytest.raises(ValueError, match="Could not load a model from init_from"):
        get_model(init_from=tmp_path / "missing", verbose=False)


def test_import_has_no_side_effects():
    # (transformers itself prints a line at import when WANDB_MODE is set, so leave it out here)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    out = subprocess.run([sys.executable, "-c", "import model, train"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
