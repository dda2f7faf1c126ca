"""decode.py: the fast KV-cache forward is proved against the Hugging Face forward, step by step, on random
GPT-2 configs; what it does not implement is sampled with model.generate instead (tested in test_generate)."""

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

import decode

VOCAB = 211


def tiny(seed=0, **config):
    torch.manual_seed(seed)
    cfg = dict(n_layer=3, n_embd=32, n_head=4, n_positions=24, vocab_size=VOCAB, attn_implementation="eager")
    cfg.update(config)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def _activations():
    names = []
    for name in sorted(ACT2FN):
        try:
            ACT2FN[name]
        except Exception:  # an activation that needs arguments GPT2Config cannot give
            continue
        names.append(name)
    return names


def stepwise_logits(fast, ids, prompt_len):
    """Logits at every position of `ids` (1, T): the prompt in one step, then one token per step (KV cache)."""
    T = ids.shape[1]
    cache = fast.new_cache(1, T)
    pos = torch.arange(T)[None]
    h = fast.hidden(ids[:, :prompt_len], pos[:, :prompt_len], cache, 0)[0]
    rows = [fast.logits(h)]
    for t in range(prompt_len, T):
        rows.append(fast.logits(fast.hidden(ids[:, t : t + 1], pos[:, t : t + 1], cache, t)[0]))
    return torch.cat(rows)


CONFIGS = {
    "default": {},
    "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
    "scale_attn_weights=False": dict(scale_attn_weights=False),
    "all three": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, scale_attn_weights=False),
    "one head, sdpa": dict(n_head=1, attn_implementation="sdpa"),
    **{f"activation {name}": dict(activation_function=name) for name in _activations()},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stepwise_logits_equal_the_hf_forward(name):
    model = tiny(**CONFIGS[name])
    assert decode.unsupported(model) is None
    fast = decode.FastGPT2(model, lm_head_dtype=torch.float32, screen=False)
    ids = torch.randint(0, VOCAB, (1, model.config.n_positions))  # fills the whole context
    with torch.inference_mode():
        want = model(ids).logits[0]
        got = stepwise_logits(fast, ids, prompt_len=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_rows_equal_each_row_alone():
    model = tiny(seed=1)
    fast = decode.FastGPT2(model, lm_head_dtype=torch.float32, screen=False)
    short, long = torch.randint(0, VOCAB, (1, 4)), torch.randint(0, VOCAB, (1, 9))
    P = long.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, P - 4, dtype=torch.long), short], 1), long])
    valid = torch.ones(2, P, dtype=torch.bool)
    valid[0, : P - 4] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = ((torch.ones(P, P, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(P, dtype=torch.bool))[:, None]
    with torch.inference_mode():
        h = fast.hidden(ids, pos, fast.new_cache(2, P), 0, mask)[:, -1]
        got = fast.logits(h)
        want = torch.cat([model(short).logits[:, -1], model(long).logits[:, -1]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_what_it_does_not_implement_is_named_not_computed():
    half = tiny(reorder_and_upcast_attn=True).to(torch.bfloat16)
    assert "reorder_and_upcast_attn" in decode.unsupported(half)
    with pytest.raises(ValueError, match="cannot run this model"):
        decode.FastGPT2(half)
    assert "cross-attention" in decode.unsupported(tiny(add_cross_attention=True))
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32, is_decoder=True))
    assert "not a GPT-2" in decode.unsupported(bert)


def test_cached_forward_is_rebuilt_when_weights_change():
    model = tiny()
    first = decode.fast_forward(model)
    assert decode.fast_forward(model) is first
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # trained further (tied: the embedding too)
    assert decode.fast_forward(model) is not first


def test_lm_head_keeps_only_the_tokenizers_rows():
    # A vocabulary padded beyond the tokenizer (train.py: to a multiple of 64): the padding rows are never computed,
    # so no logit, top-k or greedy pick can name an id the tokenizer does not have.
    model = tiny(vocab_size=256)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 50.0  # padding rows with huge logits
    ids = torch.randint(0, VOCAB, (1, 7))
    for screen in (False, True):
        fast = decode.FastGPT2(model, lm_head_dtype=torch.float32, screen=screen, n_tokens=VOCAB)
        assert fast.vocab == VOCAB
        with torch.inference_mode():
            h = fast.hidden(ids, torch.arange(7)[None], fast.new_cache(1, 7), 0)[0]
            logits = fast.logits(h)
            torch.testing.assert_close(logits, model(ids).logits[0, :, :VOCAB], rtol=1e-5, atol=1e-5)
            for k in (1, 5, 50):
                vals, idx = fast.top_logits(h, k)
                assert (idx < VOCAB).all()
                torch.testing.assert_close(vals, torch.topk(logits, k).values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_tokens=300 must be from 1 to the model's 256 vocabulary rows"):
        decode.FastGPT2(model, n_tokens=300)
    first = decode.fast_forward(model, VOCAB)
    assert decode.fast_forward(model, VOCAB) is first and first.vocab == VOCAB
    assert decode.fast_forward(model).vocab == 256  # another tokenizer length: rebuilt


def _padded_batch(prompts, new):
    from sampling import left_padded

    class Eos:
        eos_token_id = 0

    return left_padded(prompts, Eos.eos_token_id, new, "cpu")


class _Replayed(decode._Graph):
    """A CUDA graph without the capture: each replay runs the step it would have captured (on CPU)."""

    made = []

    def _capture(self, device):
        _Replayed.made.append(self.valid.shape)

    def _replay(self):
        return self.step()


def _decode(fast, prompts, tokens, mode):
    """Logits (steps, B, vocab) of feeding the prompts, then `tokens` (steps, B) one step at a time."""
    ids, valid, pos, mask = _padded_batch(prompts, len(tokens))
    steps = fast.steps(valid, padded=mask is not None, mode=mode)
    try:
        out = [fast.logits(steps.prefill(ids, pos, mask))]
        next_pos = pos[:, -1] + 1
        for i, t in enumerate(tokens[:-1]):
            out.append(fast.logits(steps.step(t, next_pos + i, ids.shape[1] + i)))
    finally:
        steps.close()
    return torch.stack(out), steps.mode


@pytest.mark.parametrize("mode", ["static", "graph"])
def test_the_static_step_a_cuda_graph_replays_equals_the_eager_step(mode, monkeypatch):
    # The graph path's logic on CPU: fixed shapes, the cache written at a position held in a tensor,
    # attention over the whole (stale or zero) cache under the mask; "graph" also reuses one static
    # cache, with 128-column buckets, from one batch to the next. Only the capture itself is CUDA-only.
    model = tiny(seed=2, n_positions=300)
    fast = decode.FastGPT2(model, lm_head_dtype=torch.float32, screen=False)
    monkeypatch.setattr(decode, "_Graph", _Replayed)
    _Replayed.made.clear()
    torch.manual_seed(0)
    for prompts in ([[5, 6, 7], list(range(10, 17))], [list(range(40, 49)), [3]]):  # the second batch finds the first's cache
        tokens = torch.randint(1, VOCAB, (12, 2))
        with torch.inference_mode():
            want, eager = _decode(fast, prompts, tokens, "eager")
            got, used = _decode(fast, prompts, tokens, mode)
            alone = [model(torch.tensor([p + tokens[:-1, b].tolist()])).logits[0, len(p) - 1 :] for b, p in enumerate(prompts)]
        assert eager == "eager" and used == mode
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.transpose(0, 1), torch.stack(alone), rtol=1e-4, atol=1e-4)
    assert _Replayed.made == ([(2, 128)] if mode == "graph" else [])  # one graph served both batches


def test_graph_mode_falls_back_to_eager_steps_and_says_so_once():
    # Where capture is not possible (here: no CUDA), decoding goes on step by step, with one warning.
    fast = decode.FastGPT2(tiny(), lm_head_dtype=torch.float32, screen=False)
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        assert fast.steps(torch.ones(1, 5, dtype=torch.bool), padded=False, mode="graph").mode == "eager"
    assert fast.graph_problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast.steps(torch.ones(1, 5, dtype=torch.bool), padded=False, mode="graph").mode == "eager"
    assert fast.steps(torch.ones(1, 5, dtype=torch.bool), padded=False).mode == "eager"  # the default off CUDA


def test_a_graph_in_use_is_not_shared(monkeypatch):
    # Two batches at once (two threads) never replay the same graph: its buffers are one batch's state.
    fast = decode.FastGPT2(tiny(), lm_head_dtype=torch.float32, screen=False)
    monkeypatch.setattr(decode, "_Graph", _Replayed)
    valid = torch.ones(1, 5, dtype=torch.bool)
    first = fast.steps(valid, padded=False, mode="graph")
    second = fast.steps(valid, padded=False, mode="graph")
    assert (first.mode, second.mode) == ("graph", "eager")
    first.close()
    assert fast.steps(valid, padded=False, mode="graph").mode == "graph"


def test_rows_that_join_and_columns_that_leave_keep_each_rows_logits():
    # engine.py's running batch: a row joins mid-way (its prompt in the columns just before the next
    # step's), both step together, then the first leaves and the columns only it used are dropped.
    model = tiny(seed=3, n_positions=64)
    fast = decode.FastGPT2(model, lm_head_dtype=torch.float32, screen=False)
    a, b = [5, 6, 7, 8], [9, 10]
    torch.manual_seed(1)
    ta, tb = torch.randint(1, VOCAB, (6,)), torch.randint(1, VOCAB, (5,))
    with torch.inference_mode():
        ids, valid, pos, mask = _padded_batch([a], 8)
        steps = fast.steps(valid, padded=False, mode="eager")
        got_a, at = [fast.logits(steps.prefill(ids, pos, mask))], len(a)
        for i in range(3):
            got_a.append(fast.logits(steps.step(ta[i : i + 1], torch.tensor([len(a) + i]), at)))
            at += 1
        ids, valid, pos, mask = _padded_batch([b], 0)
        got_b = [fast.logits(steps.join(ids, pos, mask, valid, at, at + 5))]
        for i in range(2):
            h = steps.step(torch.stack([ta[3 + i], tb[i]]), torch.tensor([len(a) + 3 + i, len(b) + i]), at)
            at += 1
            got_a.append(fast.logits(h[:1]))
            got_b.append(fast.logits(h[1:]))
        dropped = steps.keep(torch.tensor([1]))
        assert dropped == len(a) + 3 - len(b)  # b's prompt starts there
        at -= dropped
        for i in range(2, 4):
            got_b.append(fast.logits(steps.step(tb[i : i + 1], torch.tensor([len(b) + i]), at)))
            at += 1
        want_a = model(torch.tensor([a + ta[:5].tolist()])).logits[0, len(a) - 1 :]
        want_b = model(torch.tensor([b + tb[:4].tolist()])).logits[0, len(b) - 1 :]
    torch.testing.assert_close(torch.cat(got_a), want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(got_b), want_b, rtol=1e-5, atol=1e-5)
