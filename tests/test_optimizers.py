"""optimizers.py: which parameters Muon trains, the Conv1D orientation, checkpoints of both optimizers, fp16 scaling."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import optimizers
from optimizers import MuonWithAdamW, OptimizerError, muon_lr_scale, muon_matrices, muon_with_adamw


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def train_steps(model, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 96, (2, 16), generator=generator)
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_muon_trains_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_gpt2()
    names = {name for name, _, _ in muon_matrices(model)}
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    optimizer = muon_with_adamw(model, lr=1e-3, weight_decay=0.1, no_decay={"transformer.wpe.weight"})
    in_muon = [p for g in optimizer.muon.param_groups for p in g["params"]]
    in_adamw = [p for g in optimizer.adamw.param_groups for p in g["params"]]
    params = dict(model.named_parameters())
    assert {id(p) for p in in_muon} == {id(params[n]) for n in names}
    # The tied embedding / LM head, the position embedding, LayerNorms and biases: AdamW, each once.
    assert sorted(id(p) for p in in_muon + in_adamw) == sorted(id(p) for p in model.parameters())
    assert any(p is model.lm_head.weight for p in in_adamw) and model.lm_head.weight is model.transformer.wte.weight
    assert [g["weight_decay"] for g in optimizer.adamw.param_groups] == [0.1, 0.0]
    assert optimizer.adamw.param_groups[1]["params"] == [params["transformer.wpe.weight"]]
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the Trainer logs the first group's: --learning_rate


@pytest.fixture
def bf16_newton_schulz(monkeypatch):
    """torch.optim.Muon's own precision, on any CPU (ours runs fp32 where bf16 is emulated)."""
    monkeypatch.setattr(optimizers, "newton_schulz_dtype", lambda device: torch.bfloat16)


def test_our_muon_step_is_torchs_in_bf16_and_close_in_fp32(monkeypatch):
    torch.manual_seed(0)
    shapes = [(32, 96), (32, 96), (128, 32), (32, 32)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    for dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(optimizers, "newton_schulz_dtype", lambda device: dtype)
        for p, q, s in zip(ours, theirs, start):
            p.data.copy_(s), q.data.copy_(s)
        mine = optimizers.Muon(ours, lr=0.02, weight_decay=0.1)
        reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
        for step in grads:  # three steps: momentum and Nesterov included
            for p, q, g in zip(ours, theirs, step):
                p.grad, q.grad = g.clone(), g.clone()
            mine.step(), reference.step()
        for p, q in zip(ours, theirs):
            if dtype == torch.bfloat16:
                assert torch.equal(p, q)
            else:  # fp32 orthogonalisation: the same update to bf16's rounding
                torch.testing.assert_close(p, q, rtol=0, atol=0.02 * 3 * 2 * 0.01)


def test_newton_schulz_runs_in_fp32_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(optimizers, "native_bf16_cpu", lambda: False)
    assert optimizers.newton_schulz_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(optimizers, "native_bf16_cpu", lambda: True)
    assert optimizers.newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16
    assert optimizers.newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16


def test_a_conv1d_weight_moves_as_the_same_linear_weight_would(bf16_newton_schulz):
    # GPT-2's Conv1D stores (in, out); Muon's update scale is for (out, in). An MLP's c_fc (32 -> 128) must get the
    # same update as an nn.Linear(32, 128) with the same gradient, transposed.
    model = tiny_gpt2()
    optimizer = muon_with_adamw(model, lr=1e-3, muon_lr=0.02, weight_decay=0.0)
    conv = model.transformer.h[0].mlp.c_fc.weight  # (32, 128)
    linear = torch.nn.Parameter(conv.detach().T.clone())  # (128, 32), nn.Linear's layout
    reference = torch.optim.Muon([linear], lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True)
    before = conv.detach().clone()
    x = torch.randint(0, 96, (2, 16))
    model(x, labels=x).loss.backward()
    linear.grad = conv.grad.T.clone()
    optimizer.step()
    reference.step()
    torch.testing.assert_close(conv.detach() - before, (linear.detach() - before.T).T)
    assert muon_lr_scale(torch.Size((32, 128)), transposed=True) == 2.0  # torch would give this matrix 1x
    assert muon_lr_scale(torch.Size((128, 32)), transposed=True) == 0.5  # and the 128 -> 32 projection 2x
    assert muon_lr_scale(torch.Size((128, 32)), transposed=False) == 1.0


def test_state_dict_holds_both_optimizers_and_resumes_exactly():
    model = tiny_gpt2()
    optimizer = muon_with_adamw(model, lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    train_steps(model, optimizer, 3)
    scheduler.step()
    saved = copy.deepcopy(optimizer.state_dict())
    kinds = {frozenset(s) for s in saved["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    assert len(saved["state"]) == len(list(model.parameters()))

    resumed_model = copy.deepcopy(model)
    resumed = muon_with_adamw(resumed_model, lr=1e-3, weight_decay=0.01)
    resumed.load_state_dict(saved)
    assert resumed.muon.param_groups[0] is resumed.param_groups[len(resumed.adamw.param_groups)]  # still one set of groups
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]
    train_steps(model, optimizer, 2, seed=2)
    train_steps(resumed_model, resumed, 2, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_scheduler_scales_every_group_from_its_own_learning_rate():
    model = tiny_gpt2()
    optimizer = muon_with_adamw(model, lr=1e-3, muon_lr=0.02)
    peaks = [g["lr"] for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    train_steps(model, optimizer, 1)
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [p / 2 for p in peaks]
    assert [g["lr"] for g in optimizer.muon.param_groups] == [p / 2 for p in peaks[len(optimizer.adamw.param_groups):]]


def test_fp16_loss_scaling_skips_an_overflowing_step():
    model = tiny_gpt2()
    optimizer = muon_with_adamw(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 96, (2, 16))
    scaler.scale(model(x, labels=x).loss * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # neither optimizer stepped
    assert scaler.get_scale() == 2.0**7
    optimizer.zero_grad()
    scaler.scale(model(x, labels=x).loss).backward()
    scaler.step(optimizer)
    assert not torch.equal(before[0], model.transformer.wte.weight)  # AdamW stepped
    assert not torch.equal(before[4], model.transformer.h[0].attn.c_attn.weight)  # Muon stepped


def test_a_model_without_hidden_matrices_is_refused():
    class Embeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.wte

        def get_output_embeddings(self):
            return None

    with pytest.raises(OptimizerError, match="adamw_torch"):
        muon_with_adamw(Embeddings(), lr=1e-3)


def test_it_is_a_torch_optimizer():
    # LR schedulers, accelerate and the GradScaler accept only torch.optim.Optimizer instances.
    assert isinstance(muon_with_adamw(tiny_gpt2(), lr=1e-3), (MuonWithAdamW, torch.optim.Optimizer))


@pytest.mark.parametrize("make", [lambda m: muon_with_adamw(m, lr=1e-3, weight_decay=0.1),
                                  lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)], ids=["muon", "fused_adamw"])
def test_a_flag_on_the_device_skips_the_step_and_a_clear_one_steps(make):
    # train.py's NaN guard: the optimizer reads the flag on the device, so no host read decides whether to step.
    model, reference = tiny_gpt2(), tiny_gpt2()
    optimizer, plain = make(model), make(reference)
    flag = torch.zeros(())
    assert optimizers.attach_found_inf(optimizer, flag)
    train_steps(model, optimizer, 2)
    train_steps(reference, plain, 2)
    for p, q in zip(model.parameters(), reference.parameters()):  # a clear flag: the ordinary step
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    flag.fill_(1.0)
    x = torch.randint(0, 96, (2, 16))
    (model(x, labels=x).loss * float("nan")).backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = optimizer.state_dict()["state"]
    for key, value in state["state"].items():  # moments, momentum buffers and step counts as they were
        for name, tensor in value.items():
            assert torch.equal(after[key][name], tensor), (key, name)


def test_other_optimizers_take_no_flag():
    model = tiny_gpt2()
    assert not optimizers.attach_found_inf(torch.optim.AdamW(model.parameters(), foreach=True), torch.zeros(()))
    assert not optimizers.attach_found_inf(torch.optim.SGD(model.parameters(), lr=0.1), torch.zeros(()))
