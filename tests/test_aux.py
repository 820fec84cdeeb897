"""Layer-wise gradient decoupling (method=aux): the properties the rule and its "similar to BP"
diagnostics rest on. Real MNIST rows, small MLPs, a few steps."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bpfree.data import TensorData, batches, load_dataset
from bpfree.models import build_model
from bpfree.rules import UnsupportedModel, build_rule
from bpfree.similarity import linear_cka
from run import run
from tests.conftest import CACHE, CONF, data_root

SMALL = ["data.subset=512", "data.test_subset=500", "trainer.batch_size=64", "optim.lr=1e-3",
         "method=aux", "method.compare_bp=true", "method.z_lr=0.05"]


def method_kwargs(**over):
    """conf/method/aux.yaml's values (the one place the defaults live), with `over` replaced."""
    kw = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / "method" / "aux.yaml")).items()
          if k != "name"}
    return kw | over


@pytest.fixture(scope="module")
def mnist():
    s = load_dataset("mnist", str(data_root()), str(CACHE), subset=256, test_subset=200)
    return s.train, s.test


def make_rule(mnist, seed=0, hidden=(24, 16, 12), **over):
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 28, 28), 10, hidden=list(hidden))
    rule = build_rule("aux", model, F.nll_loss, **method_kwargs(**over))
    rule.prepare(*mnist)
    return rule


def test_batches_with_index_yield_each_examples_row(mnist):
    train, _ = mnist
    seen = []
    for x, y, idx in batches(train, 50, shuffle=True, seed=1, epoch=2, with_index=True):
        assert torch.equal(x, train.x[idx]) and torch.equal(y, train.y[idx])
        seen.append(idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(train)))  # a permutation: each once
    plain = [x for x, _ in batches(train, 50, shuffle=True, seed=1, epoch=2)]
    assert all(torch.equal(a, train.x[i]) for a, i in zip(plain, seen))  # the same order as without


def test_no_gradient_of_a_layer_loss_reaches_another_layers_parameters(mnist):
    rule = make_rule(mnist, z_init="random")  # random Z: every term is non-zero
    train, _ = mnist
    idx = torch.arange(32)
    blocks = list(rule.model.blocks.values())
    for t in range(len(blocks)):
        zs = rule.inputs(train.x[idx], idx)
        term = rule.layer_losses(zs, train.y[idx])[t]
        grads = torch.autograd.grad(term, [p for b in blocks for p in b.parameters()] + zs[1:],
                                    allow_unused=True)
        per_param = iter(grads)
        for s, b in enumerate(blocks):
            for _ in b.parameters():
                g = next(per_param)
                if s == t:
                    assert g is not None and g.abs().sum() > 0, f"term {t + 1} does not train its own block"
                else:
                    assert g is None or g.abs().sum() == 0, f"term {t + 1} reaches block {s + 1}'s parameters"
        z_grads = list(per_param)  # z_1..z_{T-1}: term t touches only z_{t-1} (its input) and z_t (its target)
        for k, g in enumerate(z_grads, start=1):
            touched = g is not None and g.abs().sum() > 0
            assert touched == (k in (t, t + 1)), f"term {t + 1} and z_{k}"


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_with_z_fixed_each_layers_update_is_the_bp_update_of_its_one_layer_problem(mnist, optim):
    """With Z fixed (z_lr = 0) at the forward values of the initial network theta_A, start from other
    weights theta_B and take one aux step with a large lambda_h (10). Then for every block t, theta_t's
    new value equals one step of the same optimizer on a lone copy of block t trained by plain autograd
    on the one-layer problem  lambda_h * L_h(f_t(z_{t-1}; theta_t), z_t)  (the last block:
    L_y(f_T(z_{T-1}), y)), with those fixed inputs z_{t-1} and targets z_t."""
    rule = make_rule(mnist, z_lr=0.0, lambda_h=10.0)  # Z = forward values of theta_A
    torch.manual_seed(123)
    other = build_model("mlp", (1, 28, 28), 10, hidden=[24, 16, 12])
    rule.model.load_state_dict(other.state_dict())   # theta_B: the targets are now far from met
    train, _ = mnist
    idx = torch.arange(40, 104)
    zs = [z.detach() for z in rule.inputs(train.x[idx], idx)]
    lone = [copy.deepcopy(b) for b in rule.model.blocks.values()]
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05), "adam": lambda p: torch.optim.Adam(p, lr=1e-3)}[optim]
    rule.train_step(train.x[idx], train.y[idx], make(rule.parameters()), idx=idx)
    for t, (block, new) in enumerate(zip(lone, rule.model.blocks.values())):
        opt = make(block.parameters())
        out = block(zs[t].flatten(1))
        loss = (F.nll_loss(out, train.y[idx]) if t == len(lone) - 1 else 10.0 * F.mse_loss(out, zs[t + 1]))
        loss.backward()
        opt.step()
        moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(block.parameters(), other.blocks[f"l{t + 1}"].parameters()))
        assert moved > 0
        for a, b in zip(block.parameters(), new.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for t, name in enumerate(rule.names[:-1], start=1):  # and Z did not move
        torch.testing.assert_close(rule.Z(name)[idx], zs[t], rtol=0, atol=0)


def test_forward_init_meets_eq2_exactly_at_step_0(mnist):
    rule = make_rule(mnist, z_init="forward")
    train, _ = mnist
    idx = torch.arange(len(train))
    zs = rule.inputs(train.x[idx], idx)
    h = train.x.flatten(1)
    for t, (name, block) in enumerate(list(rule.model.blocks.items())[:-1], start=1):
        zhat = block(zs[t - 1].flatten(1))
        torch.testing.assert_close(zhat, zs[t], rtol=0, atol=1e-6)  # zhat_t == z_t
        h = block(h)
        torch.testing.assert_close(zs[t], h, rtol=0, atol=1e-6)     # and both are the chain's activation
    terms = rule.layer_losses(zs, train.y[idx])
    assert all(float(term.detach()) < 1e-10 for term in terms[:-1])
    assert all(v < 1e-6 for v in rule.aux_gaps().values())
    rand = make_rule(mnist, z_init="random")
    assert all(v > 0.5 for v in rand.aux_gaps().values())  # the measurement can see a gap


def test_z_learns_from_both_terms_it_appears_in(mnist):
    """z_optim=sgd: z_t^i moves by -z_lr * d l_i / d z_t (target of block t and input of block t+1)."""
    rule = make_rule(mnist, z_init="random", z_optim="sgd", z_lr=0.5)
    train, _ = mnist
    idx = torch.tensor([3, 7, 11, 200])
    zs = rule.inputs(train.x[idx], idx)
    before = [z.detach().clone() for z in zs[1:]]
    per_example = sum(sum(rule.layer_losses([z[i:i + 1] for z in zs], train.y[idx][i:i + 1])) for i in range(4))
    grads = torch.autograd.grad(per_example, zs[1:])
    rule.train_step(train.x[idx], train.y[idx], torch.optim.SGD(rule.parameters(), lr=0.0), idx=idx)
    for name, b, g in zip(rule.names, before, grads):
        torch.testing.assert_close(rule.Z(name)[idx], b - 0.5 * g, rtol=1e-5, atol=1e-6)
        assert g.abs().sum() > 0


def test_memory_refusal_names_the_number_and_the_fix(mnist):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)  # the seed MLP, 735 hidden units
    rule = build_rule("aux", model, F.nll_loss, **method_kwargs(max_aux_gb=0.001))
    assert rule.aux_gb(60000) == pytest.approx(60000 * (735 * 4 * 3 + 4) / 1e9)  # ~0.53 GB with Adam
    gb = rule.aux_gb(len(mnist[0]))
    with pytest.raises(ValueError) as e:
        rule.prepare(*mnist)
    msg = str(e.value)
    assert f"{gb:.2f} GB" in msg and "method.max_aux_gb=0.001" in msg and "method.z_optim=sgd" in msg
    # a conv net on CIFAR-10-sized data fails before anything is allocated (tens of GB)
    cnn = build_model("cnn", (3, 32, 32), 10)
    crule = build_rule("aux", cnn, F.nll_loss, **method_kwargs())
    assert crule.aux_gb(50000) > 4.0
    cifar_sized = TensorData(torch.zeros(1, 3, 32, 32).expand(50000, 3, 32, 32),  # no memory behind it
                             torch.zeros(1, dtype=torch.long).expand(50000))
    with pytest.raises(ValueError, match=r"aux needs \d+\.\d\d GB"):
        crule.prepare(cifar_sized, cifar_sized)


def test_a_model_that_is_not_a_chain_is_refused_and_a_resnet_fails_on_memory():
    class Skip(torch.nn.Module):  # block l2's output is added to l1's: not a chain of blocks
        input_shape = (4,)

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleDict({"l1": torch.nn.Linear(4, 4), "l2": torch.nn.Linear(4, 4),
                                               "l3": torch.nn.Linear(4, 2)})

        def forward(self, x):
            h = self.blocks["l1"](x)
            return self.blocks["l3"](h + self.blocks["l2"](h))

    with pytest.raises(UnsupportedModel, match="block 'l3'"):
        build_rule("aux", Skip(), F.nll_loss, **method_kwargs())
    # ResNet-20's residuals live inside its blocks, so it is a chain, but its feature maps are too big
    torch.manual_seed(0)
    rule = build_rule("aux", build_model("resnet20", (3, 32, 32), 10), F.nll_loss, **method_kwargs())
    assert rule.aux_gb(50000) > 50  # 102400 hidden units per example, x3 with Adam


def test_linear_cka_is_invariant_to_rotation_and_scale_not_to_content():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 20, generator=g)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert linear_cka(a, 3.0 * a @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(a, a[:, torch.randperm(20, generator=g)]) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(a, torch.randn(300, 20, generator=g)) < 0.2


def _per_epoch(rec):
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in rec["metrics"]["per_epoch"]]


def test_twin_is_the_bp_run_and_resume_restores_z_and_its_optimizer(compose_run, tmp_path):
    bp = run(compose_run([*SMALL[:4], "trainer.epochs=3", "run_name=bp", f"checkpoint_dir={tmp_path / 'bp'}"]))
    full = run(compose_run([*SMALL, "trainer.epochs=3", f"checkpoint_dir={tmp_path / 'a'}", "run_name=full"]))
    # the shadow BP copy is the method=bp run of the same seed: same init, batches and optimizer
    for twin, alone in zip(full["metrics"]["per_epoch"], bp["metrics"]["per_epoch"]):
        assert twin["bp_test_acc"] == pytest.approx(alone["test_acc"], abs=1e-6)  # the same predictions
        assert twin["train_bp_loss"] == pytest.approx(alone["train_loss"], rel=1e-6)
    # interrupted after epoch 1, resumed to 3
    run(compose_run([*SMALL, "trainer.epochs=1", f"checkpoint_dir={tmp_path / 'b'}", "run_name=part"]))
    resumed = run(compose_run([*SMALL, "trainer.epochs=3", "trainer.resume=true",
                               f"checkpoint_dir={tmp_path / 'b'}", "run_name=part"]))
    assert resumed["timing"]["resumed_from_epoch"] == 1
    assert _per_epoch(resumed) == _per_epoch(full)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["rule"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["rule"]
    for key in ("z_l1", "zm_l1", "zv_l3", "z_steps", "model.blocks.l2.0.weight"):
        assert torch.equal(a[key], b[key]), key
    assert int(a["z_steps"].min()) == 3  # every example's z was stepped once per epoch
    twin_a, twin_b = a["_extra_state"], b["_extra_state"]
    for k in twin_a["twin"]:
        assert torch.equal(twin_a["twin"][k], twin_b["twin"][k])
    assert twin_a["twin_optimizer"]["state"][0]["step"] == twin_b["twin_optimizer"]["state"][0]["step"]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(twin_a["twin_optimizer"]["state"][0][k], twin_b["twin_optimizer"]["state"][0][k])
    diag = full["metrics"]["per_epoch"][-1]
    assert {f"cka/l{t}" for t in range(1, 6)} <= set(diag) and "agreement" in diag
    assert {f"param_dist/l{t}" for t in range(1, 6)} <= set(diag) and {f"aux_gap/l{t}" for t in range(1, 5)} <= set(diag)


def test_without_indices_one_batch_is_the_training_set_and_bench_extras_time_each_layer(mnist):
    train, _ = mnist
    torch.manual_seed(0)
    rule = build_rule("aux", build_model("mlp", (1, 28, 28), 10, hidden=[24, 16]), F.nll_loss, **method_kwargs())
    x, y = train.x[:32], train.y[:32]
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    first = float(rule.train_step(x, y, opt)["loss"])  # scripts/bench.py's call: no idx, no prepare
    for _ in range(20):
        last = float(rule.train_step(x, y, opt)["loss"])
    assert len(rule.Z("l1")) == 32 and last < first
    extras = rule.bench_extras(x, y, repeats=2)
    per_layer = [v for k, v in extras.items() if k.startswith("layer_step_ms/")]
    assert len(per_layer) == 3 and extras["ideal_parallel_step_ms"] == max(per_layer) > 0
    with pytest.raises(ValueError, match="needs each batch's example indices"):
        rule.train_step(train.x[:16], train.y[:16], opt)  # another batch: its rows are not Z's
    fitted = make_rule(mnist)  # prepared on the split, as fit does
    with pytest.raises(ValueError, match="idx"):
        fitted.train_step(x, y, opt)
