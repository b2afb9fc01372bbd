"""Tests for CURE / CURE^Eff (layerlab.methods.cure), each against an independent computation."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab.attacks import pgd_perturb
from layerlab.config import make_config
from layerlab.layerwise import apply_update_spec
from layerlab.methods import (
    PRESETS,
    AttackSettings,
    StepContext,
    build_method,
    resolve_method,
)
from layerlab.methods.cure import (
    Revision,
    Warmup,
    kth_smallest,
    lowest_k_mask,
    mask_count,
    masked_parameters,
    revision_decay,
    revision_rate,
)
from layerlab.models import block_of_param, build_model

WIDTH = 0.0625
ATTACK = AttackSettings(eps=8 / 255, alpha=2 / 255, steps=3)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10, width=WIDTH)


def _batch(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _ctx(seed: int, epoch: int = 0, epochs: int = 1, step: int = 0, steps: int = 1) -> StepContext:
    return StepContext(epoch, epochs, step, steps, ATTACK, torch.Generator().manual_seed(seed))


def _sgd(model: nn.Module, wd: float = 5e-3) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=wd)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def _component(method, name: str):
    return next(c for c in method.components if c.name == name)


# --- helpers --------------------------------------------------------------------------------------


def test_lowest_k_mask_counts_and_breaks_ties_by_index() -> None:
    score = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 3.0]])
    assert lowest_k_mask(score, 2).flatten().tolist() == [False, True, True, False, False, False]
    assert lowest_k_mask(score, 4).flatten().tolist() == [True, True, True, False, True, False]
    assert not lowest_k_mask(score, 0).any() and lowest_k_mask(score, 6).all()
    big = torch.rand(1000, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # many ties
    for k in (1, 137, 300, 999):
        mask = lowest_k_mask(big, k)
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[torch.sort(big, stable=True).indices[:k]] = True
        assert torch.equal(mask, expected)
    assert mask_count(30, 432) == 130 and mask_count(30, 10) == 3 and mask_count(0, 5) == 0


@pytest.mark.parametrize("kind", ["uniform", "tiny-and-huge", "ties", "zeros", "float64", "negative"])
def test_kth_smallest_matches_kthvalue(kind) -> None:
    """The radix select on float32 bit patterns agrees with torch.kthvalue, whatever the value range."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5000, generator=g)
    if kind == "tiny-and-huge":  # values across the exponent range, incl. subnormals and 0
        x = x * torch.logspace(-40, 30, 5000)[torch.randperm(5000, generator=g)]
        x[:7] = 0.0
    elif kind == "ties":
        x = (x * 5).floor()
    elif kind == "zeros":
        x = torch.zeros(5000)
    elif kind == "float64":
        x = x.double()
    elif kind == "negative":  # not an RGP score, but a valid input: falls back to kthvalue
        x = x - 0.5
    for k in (1, 2, 1499, 2500, 4999, 5000):
        assert kth_smallest(x, k).item() == torch.kthvalue(x, k).values.item()


def test_mask_scopes_select_the_documented_tensors() -> None:
    model = _model()
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n for n, _ in masked_parameters(model, "conv")} == convs
    assert {n for n, _ in masked_parameters(model, "conv+linear")} == convs | {"head.weight"}
    assert {n for n, _ in masked_parameters(model, "all")} == {n for n, _ in model.named_parameters()}
    apply_update_spec(model, "2", reinit=False)
    assert all(block_of_param(n) == "block2" for n, _ in masked_parameters(model, "all"))
    with pytest.raises(ValueError, match="mask_scope"):
        build_method("cure", {"mask_scope": "bn"})
    with pytest.raises(ValueError, match="r_decay"):
        build_method("cure", {"r_decay": "exp"})


def test_warmup_length_and_revision_rate_schedules() -> None:
    auto = Warmup(None)
    assert [auto.length(e) for e in (1, 2, 10, 30, 200)] == [0, 1, 1, 3, 20]
    assert Warmup(5).length(4) == 3 and Warmup(0).length(200) == 0
    assert revision_rate(0.2, "none", 0.7) == 0.2
    assert revision_rate(0.2, "linear", 0.25) == pytest.approx(0.15)
    assert revision_rate(0.2, "cosine", 0.5) == pytest.approx(0.1)
    assert revision_rate(0.2, "step", 0.49) == 0.2 and revision_rate(0.2, "step", 0.5) == 0.0


# --- the step ---------------------------------------------------------------------------------------


def test_p0_gamma0_step_equals_direct_trades_style_step() -> None:
    x, y = _batch()
    model = _model()
    ref = copy.deepcopy(model)
    method = build_method("cure", {"p": 0, "gamma": 0, "rgp_alpha": 0.1})
    method.setup(model)
    out = method.train_step(model, x, y, _sgd(model), _ctx(7))

    # Independent: PGD on CE + 0.1 KL(p(x)||p(x+d)) from the same uniform start, then CE_nat + KL, SGD.
    opt = _sgd(ref)
    ref.eval()
    with torch.no_grad():
        p_clean = F.softmax(ref(x), dim=1)

    def inner(logits: torch.Tensor) -> torch.Tensor:
        kl = (p_clean * (p_clean.log() - F.log_softmax(logits, dim=1))).sum()
        return F.cross_entropy(logits, y, reduction="sum") + 0.1 * kl

    x_adv = pgd_perturb(ref, x, inner, eps=ATTACK.eps, alpha=ATTACK.alpha, steps=ATTACK.steps,
                        init="uniform", generator=torch.Generator().manual_seed(7))
    ref.train()
    ln, la = ref(x), ref(x_adv)
    pn = F.softmax(ln, dim=1)
    loss = F.cross_entropy(ln, y) + (pn * (F.log_softmax(ln, 1) - F.log_softmax(la, 1))).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

    torch.testing.assert_close(out.x_adv, x_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_rgp_mask_gives_exactly_the_lowest_rgp_entries_a_zero_update() -> None:
    x, y = _batch(16)
    model = _model()
    method = build_method("cure", {"p": 30, "rgp_alpha": 0.1, "gamma": 1.0})
    method.setup(model)
    opt = _sgd(model, wd=5e-3)  # momentum and weight decay would move zero-gradient entries
    method.train_step(model, x, y, opt, _ctx(1))  # fills the momentum buffers
    before = copy.deepcopy(model)
    grads: dict[str, torch.Tensor] = {}
    ctx = _ctx(2)
    ctx.after_backward.append(lambda m: grads.update({n: p.grad.clone() for n, p in m.named_parameters()}))
    out = method.train_step(model, x, y, opt, ctx)

    # Independent RGP: fresh forwards of the pre-step model on the same x, x_adv.
    conv = [n for n, _ in masked_parameters(before, "conv")]
    params = dict(before.named_parameters())
    before.train()
    g_nat = torch.autograd.grad(F.cross_entropy(before(x), y), [params[n] for n in conv])
    g_adv = torch.autograd.grad(F.cross_entropy(before(out.x_adv), y), [params[n] for n in conv])
    after = dict(model.named_parameters())
    for name, gn, ga in zip(conv, g_nat, g_adv):
        rgp = (0.1 * gn.abs() + 0.9 * ga.abs()).flatten()
        k = round(0.3 * rgp.numel())
        expected = torch.zeros_like(rgp, dtype=torch.bool)
        expected[torch.sort(rgp, stable=True).indices[:k]] = True
        unchanged = (after[name] == params[name]).flatten()
        assert abs(int(unchanged.sum()) - k) <= 1, name
        assert torch.equal(unchanged, expected), name
        assert torch.all(grads[name].flatten()[expected] == 0), name
    for name, p in after.items():  # not masked under scope "conv": everything moves
        if name not in conv:
            assert (p != params[name]).float().mean() > 0.99, name


def _reference_cure_step(model: nn.Module, rev: nn.Module, opt: torch.optim.SGD, x: torch.Tensor, y: torch.Tensor,
                         gen: torch.Generator, rate: float, p: float = 30.0, alpha: float = 0.1, gamma: float = 1.0,
                         d: float = 0.5) -> None:
    """One CURE step as first implemented, in plain autograd: PGD, two training forwards, theta_rev's two
    forwards, both RGP gradients (retain_graph) before loss.backward, mask, SGD, restore, revise."""
    eps, step = ATTACK.eps, ATTACK.alpha
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    delta = (x + delta.clamp(-eps, eps)).clamp(0, 1) - x
    for _ in range(ATTACK.steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        inner = (F.cross_entropy(logits, y, reduction="sum")
                 + alpha * F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="sum"))
        (grad,) = torch.autograd.grad(inner, delta)
        delta = (x + (delta.detach() + step * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    x_adv = (x + delta).detach()
    model.train()
    ln, la = model(x), model(x_adv)
    loss = F.cross_entropy(ln, y) + F.kl_div(F.log_softmax(la, dim=1), F.softmax(ln, dim=1), reduction="batchmean")
    cr = 0.0
    for inputs, logits in ((x, ln), (x_adv, la)):
        with torch.no_grad():
            target = F.softmax(rev(inputs).float(), dim=1)
        cr = cr + F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")
    loss = loss + gamma * cr
    opt.zero_grad(set_to_none=True)
    convs = [w for _, w in masked_parameters(model, "conv")]
    g_nat = torch.autograd.grad(F.cross_entropy(ln, y), convs, retain_graph=True)
    g_adv = torch.autograd.grad(F.cross_entropy(la, y), convs, retain_graph=True)
    loss.backward()
    kept = []
    for w, gn, ga in zip(convs, g_nat, g_adv):
        score = (gn.abs() * alpha).add_(ga.abs(), alpha=1.0 - alpha).flatten()
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[torch.sort(score, stable=True).indices[:mask_count(p, score.numel())]] = True
        mask = mask.view(w.shape)
        w.grad.masked_fill_(mask, 0.0)
        kept.append((w, mask, w.detach().clone()))
    opt.step()
    with torch.no_grad():
        for w, mask, before in kept:
            w.copy_(torch.where(mask, before, w))
        if float(torch.rand((), generator=gen)) < rate:
            for rp, tp in zip(rev.parameters(), model.parameters()):
                rp.mul_(d).add_(tp, alpha=1.0 - d)
            for rm, tm in zip(rev.modules(), model.modules()):
                if isinstance(tm, nn.BatchNorm2d):
                    rm.running_mean.mul_(d).add_(tm.running_mean, alpha=1.0 - d)
                    rm.running_var.mul_(d).add_(tm.running_var, alpha=1.0 - d)
                    rm.num_batches_tracked.copy_(tm.num_batches_tracked)


def test_cure_steps_equal_the_original_algorithm_bit_for_bit() -> None:
    """Revision targets taken before the training forwards and the RGP gradients after loss.backward (which
    save memory traffic) change no value: weights, statistics and theta_rev equal the original order's."""
    x, y = _batch(16)
    model = _model()
    ref, rev_ref = copy.deepcopy(model), copy.deepcopy(model).eval().requires_grad_(False)
    method = build_method("cure", {"p": 30, "rgp_alpha": 0.1, "gamma": 1.0, "r": 0.9, "d": 0.5, "r_decay": "linear"})
    method.setup(model)
    opt, opt_ref = _sgd(model), _sgd(ref)
    gen, gen_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    steps = 4
    for s in range(steps):
        ctx = StepContext(0, 1, s, steps, ATTACK, gen)
        method.train_step(model, x, y, opt, ctx)
        _reference_cure_step(ref, rev_ref, opt_ref, x, y, gen_ref, rate=0.9 * (1 - s / steps))
    revision = _component(method, "revision")
    assert 0 < revision.revisions < steps  # theta_rev moved, so the consistency term mattered
    _assert_states_equal(_state(model), _state(ref))
    _assert_states_equal(_state(revision.model), _state(rev_ref))
    for a, b in zip(opt.param_groups[0]["params"], opt_ref.param_groups[0]["params"]):
        assert torch.equal(opt.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"])


def test_revision_update_follows_eq7_and_never_changes_theta() -> None:
    x, y = _batch()
    model = _model()
    method = build_method("cure", {"p": 30, "gamma": 1.0, "r": 1.0, "d": 0.9, "r_decay": "none"})
    method.setup(model)
    rev = _component(method, "revision")
    with torch.no_grad():  # let theta_rev differ from theta so Eq. 7 is visible
        for p in rev.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rev_old = _state(rev.model)
    method.train_step(model, x, y, _sgd(model), _ctx(3))
    theta = _state(model)
    assert rev.revisions == 1
    for name, new in rev.model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(new, theta[name])
        else:
            torch.testing.assert_close(new, 0.9 * rev_old[name] + 0.1 * theta[name], rtol=1e-6, atol=1e-7)
    assert all(not p.requires_grad for p in rev.model.parameters()) and not rev.model.training
    rev.after_step(model, _ctx(4))  # a revision on its own only reads theta
    _assert_states_equal(_state(model), theta)

    # With gamma = 0, theta never depends on theta_rev: r = 1 and r = 0 train bit-identical models.
    models = []
    for r in (1.0, 0.0):
        m = _model()
        meth = build_method("cure", {"p": 30, "gamma": 0.0, "r": r, "r_decay": "none"})
        meth.setup(m)
        opt = _sgd(m)
        for s in range(2):
            meth.train_step(m, x, y, opt, _ctx(10 + s))
        models.append(_state(m))
        assert _component(meth, "revision").revisions == (2 if r else 0)
    _assert_states_equal(*models)


def test_revision_fires_with_frequency_r() -> None:
    model = _model()
    n = 3000
    for decay, expected in (("none", 0.2 * n), ("linear", 0.1 * n)):
        rev = Revision(gamma=1.0, r=0.2, d=0.999, r_decay=decay)
        rev.setup(model)
        gen = torch.Generator().manual_seed(0)
        for step in range(n):
            rev.after_step(model, StepContext(0, 1, step, n, ATTACK, gen))
        sd = math.sqrt(n * 0.2 * 0.8)
        assert rev.draws == n and abs(rev.revisions - expected) < 4 * sd, (decay, rev.revisions)


def test_consistency_loss_equals_direct_computation_and_gamma0_skips_forwards() -> None:
    x, y = _batch()
    model = _model()
    method = build_method("cure", {"gamma": 0.5})
    method.setup(model)
    rev = _component(method, "revision")
    with torch.no_grad():
        for p in rev.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    rev.before_loss(model, method.objective, x, x_adv, y, _ctx(0))  # theta_rev's targets, before theta's forwards
    out = method.objective.loss(model, x, x_adv, y, _ctx(0))
    got = rev.extra_loss(model, out, x, y, _ctx(0))
    with pytest.raises(RuntimeError, match="before_loss"):  # the targets are used once
        rev.extra_loss(model, out, x, y, _ctx(0))

    rev.model.eval()
    with torch.no_grad():
        qn, qa = F.softmax(rev.model(x), 1), F.softmax(rev.model(x_adv), 1)
    direct = sum((q * (q.log() - F.log_softmax(logits, 1))).sum(1).mean()
                 for q, logits in ((qn, out.logits_nat), (qa, out.logits_adv)))
    torch.testing.assert_close(got, 0.5 * direct, rtol=1e-5, atol=1e-7)
    got.backward()
    assert all(p.grad is None for p in rev.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    calls = []
    quiet = build_method("cure", {"gamma": 0.0})
    quiet.setup(model)
    _component(quiet, "revision").model.register_forward_hook(lambda *a: calls.append(1))
    quiet.train_step(model, x, y, _sgd(model), _ctx(1))
    assert calls == []


def test_frozen_blocks_stay_bit_for_bit_frozen() -> None:
    x, y = _batch()
    model = _model()
    apply_update_spec(model, "23", reinit=True, seed=0)
    start = _state(model)
    method = build_method("cure", {"p": 30, "gamma": 1.0, "r": 1.0, "r_decay": "none", "mask_scope": "all"})
    method.setup(model)
    opt = _sgd(model)
    for s in range(2):
        method.train_step(model, x, y, opt, _ctx(20 + s))
    rev = _component(method, "revision").model.state_dict()
    for name, value in model.state_dict().items():
        if block_of_param(name) in ("stem", "block1", "block4", "head"):
            assert torch.equal(value, start[name]), name
            assert torch.equal(rev[name], start[name]), name
    assert not torch.equal(model.state_dict()["block2.0.conv1.weight"], start["block2.0.conv1.weight"])


def test_state_dict_round_trip_makes_resume_exact() -> None:
    x, y = _batch()
    model = _model()
    method = build_method("cure", {"r": 1.0, "d": 0.9, "r_decay": "none"})
    method.setup(model)
    opt = _sgd(model)
    for s in range(2):
        method.train_step(model, x, y, opt, _ctx(30 + s))
    buf = io.BytesIO()
    torch.save({"method": method.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    other = _model(seed=5)
    other.load_state_dict(saved["model"])
    resumed = build_method("cure", {"r": 1.0, "d": 0.9, "r_decay": "none"})
    resumed.setup(other)
    resumed.load_state_dict(saved["method"])
    _assert_states_equal(_state(_component(resumed, "revision").model), _state(_component(method, "revision").model))
    assert _component(resumed, "revision").revisions == 2
    opt2 = _sgd(other)
    opt2.load_state_dict(saved["opt"])
    method.train_step(model, x, y, opt, _ctx(40))
    resumed.train_step(other, x, y, opt2, _ctx(40))
    _assert_states_equal(_state(other), _state(model))
    _assert_states_equal(_state(_component(resumed, "revision").model), _state(_component(method, "revision").model))


def test_cure_eff_warms_up_naturally_then_syncs_the_revision_model() -> None:
    x, y = _batch()
    model = _model()
    ref = copy.deepcopy(model)
    method = build_method("cure-eff", {"r": 1.0, "d": 0.5, "r_decay": "none"})  # auto warm-up: 1 of 10 epochs
    method.setup(model)
    rev = _component(method, "revision")
    init = _state(rev.model)
    ctx = _ctx(1, epoch=0, epochs=10)
    out = method.train_step(model, x, y, _sgd(model), ctx)
    assert out.logits_adv is None and out.x_adv is None
    assert torch.equal(ctx.generator.get_state(), torch.Generator().manual_seed(1).get_state())  # no PGD, no draw
    opt = _sgd(ref)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    opt.step()
    _assert_states_equal(_state(model), _state(ref))  # warm-up = plain natural step
    _assert_states_equal(_state(rev.model), init)  # no revision during warm-up

    pre = _state(model)
    out = method.train_step(model, x, y, _sgd(model), _ctx(2, epoch=1, epochs=10))
    assert out.logits_adv is not None and rev.revisions == 1
    post = _state(model)
    for name, value in rev.model.state_dict().items():  # synced to theta at the end of warm-up, then Eq. 7
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, 0.5 * pre[name] + 0.5 * post[name], rtol=1e-6, atol=1e-7)


def test_presets_resolve_and_keep_epochs_out_of_overrides() -> None:
    for name, (method, args, overrides, doc) in PRESETS.items():
        if not method.startswith("cure"):
            continue
        assert set(overrides) <= {"model", "weight_decay"}, name
        resolved = resolve_method(method, name)
        assert resolved[1] == args
    assert PRESETS["cure-resnet18-cifar10"][2]["weight_decay"] == 5e-3
    assert PRESETS["cure-resnet18-cifar10-code"][2]["weight_decay"] == 7e-4
    assert PRESETS["cure-wrn34-10-cifar10"][1] == {"p": 50, "rgp_alpha": 0.3, "gamma": 0.5, "r": 0.2, "d": 0.999}


# --- end to end ---------------------------------------------------------------------------------------


def _tiny_cfg(method: str, epochs: int):
    return make_config("smoke", method=method, epochs=epochs, width=WIDTH, train_size=96, val_size=32,
                       test_size=48, eval_size=32, batch_size=48, attack_steps=2, epoch_eval_steps=1,
                       eval_steps=2, device="cpu")


def _check_summary(run_dir) -> None:
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert set(on_disk["revision"]) >= {"natural_acc", "robust_acc", "nrr"}
    hp = on_disk["method_hparams"]
    assert hp["objective"] == "cure" and hp["rgp.p"] == 30 and hp["revision.gamma"] == 1.0
    assert {"rgp_alpha", "rgp.mask_scope", "revision.r", "revision.d", "revision.r_decay"} <= set(hp)


def test_train_cure_writes_revision_summary(tmp_path) -> None:
    from layerlab.train import train

    summary = train(_tiny_cfg("cure", 1), tmp_path / "cure", progress=False)
    _check_summary(tmp_path / "cure")
    assert summary["method_hparams"]["warmup_epochs"] == 0


def test_train_cure_eff_writes_summary_and_resumes_exactly(tmp_path) -> None:
    from layerlab.runs import load_checkpoint
    from layerlab.train import train

    cfg = _tiny_cfg("cure-eff", 3)  # auto warm-up: epoch 1 natural, epochs 2-3 CURE
    summary = train(cfg, tmp_path / "full", progress=False)
    _check_summary(tmp_path / "full")
    assert summary["method_hparams"]["warmup_epochs"] == "auto"
    train(cfg, tmp_path / "split", progress=False, stop_after=2)
    train(cfg, tmp_path / "split", progress=False, resume=True)
    full, split = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "split"))
    _assert_states_equal(full["model"], split["model"])
    _assert_states_equal(full["method"]["revision"]["model"], split["method"]["revision"]["model"])
    assert full["method"]["revision"]["draws"] == split["method"]["revision"]["draws"] > 0


# --- the released code's variants (preset cure-resnet18-cifar10-code) ------------------------------


def test_revision_decay_ramp_follows_the_released_code() -> None:
    assert [revision_decay(0.999, t, ramp=True) for t in (0, 1, 9)] == [0.0, 0.5, 0.9]
    assert revision_decay(0.999, 10**6, ramp=True) == 0.999 and revision_decay(0.98, 39, ramp=True) == 0.975 and revision_decay(0.98, 99, ramp=True) == 0.98
    assert revision_decay(0.999, 1, ramp=False) == 0.999


def test_ramped_revision_averages_with_the_step_decay() -> None:
    x, y = _batch()
    model = _model()
    method = build_method("cure", {"p": 0, "r": 1.0, "d": 0.999, "r_decay": "none", "d_ramp": True})
    method.setup(model)
    rev = _component(method, "revision")
    for step, d in ((0, 0.5), (1, 2 / 3)):
        rev_old = _state(rev.model)
        method.train_step(model, x, y, _sgd(model), _ctx(3 + step))
        theta = _state(model)
        for name, p in rev.model.named_parameters():
            torch.testing.assert_close(p, d * rev_old[name] + (1 - d) * theta[name], rtol=1e-6, atol=1e-7)


def test_beta_scales_the_kl_term_exactly() -> None:
    x, y = _batch()
    model = _model()
    x_adv = (x + 0.03 * torch.rand_like(x)).clamp(0, 1)
    one = build_method("cure", {"beta": 1.0}).objective.loss(model, x, x_adv, y, _ctx(0))
    five = build_method("cure", {"beta": 5.0}).objective.loss(model, x, x_adv, y, _ctx(0))
    assert torch.equal(one.terms["kl"], five.terms["kl"]) and one.terms["kl"] > 0
    assert torch.equal(five.loss, one.terms["ce_nat"] + 5.0 * one.terms["kl"])
    per_example = build_method("cure", {"beta": 5.0}).objective.adv_loss(model, x, x_adv, y)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="none").sum(1)
    torch.testing.assert_close(per_example, F.cross_entropy(model(x), y, reduction="none") + 5.0 * kl)


def test_kl_attack_is_the_trades_attack() -> None:
    x, y = _batch()
    model = _model()
    ours = build_method("cure", {"attack": "kl"}).objective.craft(model, x, y, _ctx(7))
    trades = build_method("trades").objective.craft(model, x, y, _ctx(7))
    alg1 = build_method("cure").objective.craft(model, x, y, _ctx(7))
    assert torch.equal(ours, trades) and not torch.equal(ours, alg1)


def test_revision_bn_train_uses_batch_statistics_and_leaves_buffers_to_its_forwards() -> None:
    x, y = _batch()
    model = _model()
    method = build_method("cure", {"p": 0, "r": 1.0, "d": 0.9, "r_decay": "none", "revision_bn": "train"})
    method.setup(model)
    rev = _component(method, "revision")
    independent = copy.deepcopy(rev.model).train()
    with torch.no_grad():
        expected = F.softmax(independent(x), dim=1)
    targets = rev.targets(x, None)
    torch.testing.assert_close(targets[0], expected)
    assert not rev.model.training  # back in eval mode for evaluation
    buffers = {k: v.clone() for k, v in rev.model.state_dict().items() if "running" in k}
    assert all(torch.equal(buffers[k], independent.state_dict()[k]) for k in buffers)  # its forward moved them
    before = {k: v.clone() for k, v in rev.model.state_dict().items() if "running" in k}
    rev.revise()  # Eq. 7 on parameters only: the statistics are the revision model's own
    assert all(torch.equal(before[k], rev.model.state_dict()[k]) for k in before)


def test_code_mask_zeroes_the_lowest_signed_scores_of_block_conv1_only() -> None:
    x, y = _batch()
    model = _model()
    method = build_method("cure", {"p": 30, "rgp_alpha": 0.1, "gamma": 0.0, "mask_rule": "code"})
    method.setup(model)
    rgp = _component(method, "rgp")
    ctx = _ctx(5)
    x_adv = method.objective.craft(model, x, y, ctx)
    ref = copy.deepcopy(model)
    # Independent computation: the three gradients, numpy's percentile, gradient zeroing.
    out = method.objective.loss(ref, x, x_adv, y, ctx)
    names = [n for n, _ in ref.named_parameters() if n.startswith("block") and n.endswith(".conv1.weight")]
    params = [dict(ref.named_parameters())[n] for n in names]
    g_total = torch.autograd.grad(out.loss, params, retain_graph=True)
    g_nat = torch.autograd.grad(F.cross_entropy(out.logits_nat, y), params, retain_graph=True)
    g_kl = torch.autograd.grad(out.terms["kl"], params)
    out = method.objective.loss(model, x, x_adv, y, ctx)
    model.zero_grad()
    assert rgp.backward(model, out, out.loss, x, y, ctx)
    assert sorted(rgp.masks) == sorted(names) and len(names) == 8  # 2 per stage, stem excluded
    for name, gt, gn, gk in zip(names, g_total, g_nat, g_kl):
        score = (0.1 * gn + 0.9 * gk).numpy()
        expected = torch.from_numpy(score < np.percentile(score, 30))
        assert torch.equal(rgp.masks[name], expected) and 0.25 < expected.float().mean() < 0.35
        grad = dict(model.named_parameters())[name].grad
        assert torch.equal(grad[expected], torch.zeros_like(grad[expected]))
        torch.testing.assert_close(grad[~expected], gt[~expected])
    assert rgp._saved == []  # the code zeroes gradients only; no weights are held through the step


def test_code_preset_sets_every_released_code_choice() -> None:
    name, args, overrides = resolve_method("cure", "cure-resnet18-cifar10-code")
    hp = build_method(name, args).hparams()
    assert overrides["weight_decay"] == 7e-4
    assert (hp["beta"], hp["attack"], hp["rgp.rule"]) == (5.0, "kl", "code")
    assert (hp["revision.r_decay"], hp["revision.d_ramp"], hp["revision.bn"]) == ("none", True, "train")
    paper = build_method("cure").hparams()
    assert (paper["beta"], paper["attack"], paper["rgp.rule"], paper["revision.d_ramp"]) == (1.0, "alg1", "paper", False)
    for bad in ({"attack": "ce"}, {"mask_rule": "signed"}, {"revision_bn": "frozen"}, {"d_ramp": "yes"}, {"beta": -1}):
        with pytest.raises(ValueError):
            build_method("cure", bad)
