"""AWP and RWP components: the step they take against independent computations, RWP's selection,
frozen blocks, bookkeeping, and end-to-end runs through the trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab.config import make_config
from layerlab.layerwise import apply_update_spec
from layerlab.methods import AttackSettings, Method, StepContext, build_method
from layerlab.methods.objectives import PGDAT
from layerlab.methods.perturbation import AWP, RWP, perturbable, rescale, weight_norms
from layerlab.models import build_model
from layerlab.runs import read_json
from layerlab.train import train

LR = 0.1
REF_EPS = 1e-20


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10, width=0.0625)


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _ctx(seed: int = 7, epoch: int = 0) -> StepContext:
    return StepContext(epoch, 2, 0, 1, AttackSettings(8 / 255, 2 / 255, 2), torch.Generator().manual_seed(seed))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv/linear weights (the tensors the reference codes perturb)."""
    return {n: p for n, p in model.named_parameters() if p.dim() > 1 and n.endswith("weight")}


def _spy(method: Method) -> dict[str, torch.Tensor]:
    """Capture the v a weight-perturbation component holds just before it restores the weights."""
    comp = method.components[0]
    captured: dict[str, torch.Tensor] = {}
    restore = comp.after_step

    def after_step(model: nn.Module, ctx: StepContext) -> None:
        captured.clear()
        captured.update({n: t.clone() for n, t in (comp.active or {}).items()})
        restore(model, ctx)

    comp.after_step = after_step
    return captured


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- shared machinery ---------------------------------------------------------------------------


def test_rescale_per_layer_and_whole_model() -> None:
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, 2, 3, 3, generator=g)}
    d = {"a": torch.randn(4, 3, generator=g), "b": 1e-3 * torch.randn(5, 2, 3, 3, generator=g)}
    layer = rescale(d, weight_norms(w), 0.01, "layer")
    for n, wn in w.items():
        torch.testing.assert_close(layer[n].norm(), 0.01 * wn.norm())
        torch.testing.assert_close(layer[n] / layer[n].norm(), d[n] / d[n].norm())  # direction kept
    whole = rescale(d, weight_norms(w), 0.01, "model")
    def total(t: dict) -> float:
        return math.sqrt(sum(float(x.norm()) ** 2 for x in t.values()))

    assert total(whole) == pytest.approx(0.01 * total(w), rel=1e-6)
    torch.testing.assert_close(whole["a"] / whole["b"].norm(), d["a"] / d["b"].norm())  # one common factor
    with pytest.raises(ValueError, match="layer"):
        rescale(d, weight_norms(w), 0.01, "block")


def test_perturbable_skips_frozen_biases_and_batchnorm() -> None:
    model = _model()
    names = set(perturbable(model))
    assert names == set(_weights(model))
    assert all("bn" not in n and not n.endswith("bias") for n in names)
    apply_update_spec(model, "2", reinit=False)
    assert set(perturbable(model)) == {n for n in names if n.startswith("block2.")}


# --- RWP's selection (Loss Stationary Condition) ----------------------------------------------------


@pytest.mark.parametrize("method,args,baseline", [
    ("rwp", {"c_min": 0.0}, "at"),                          # no example has CE < 0: no perturbation
    ("trades-rwp", {"c_min": 0.0}, "trades"),
    ("awp", {"warmup_epochs": 1}, "at"),                    # epoch 0 is inside the warm-up
])
def test_no_perturbation_is_the_baseline_step_for_step(method: str, args: dict, baseline: str) -> None:
    model_a, model_b = _model(), _model()
    meth, base = build_method(method, args), build_method(baseline)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        x, y = _batch(seed=10 + step)
        out = meth.train_step(model_a, x, y, opt_a, _ctx(seed=step))
        base.train_step(model_b, x, y, opt_b, _ctx(seed=step))
        assert _same_state(model_a, model_b), f"differs after step {step + 1}"
        name = meth.components[0].name
        assert float(out.terms[f"{name}_steps"]) == 0
    stats = meth.components[0].stats()
    assert stats["batches"] == 3 and stats["steps"] == 0 and stats["perturbed_batches"] == 0


def test_rwp_with_infinite_c_min_uses_every_example_for_every_step() -> None:
    model, (x, y) = _model(), _batch()
    meth = build_method("rwp", {"c_min": math.inf, "steps": 3})
    out = meth.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=LR), _ctx())
    assert float(out.terms["rwp_qualified"]) == len(y) and float(out.terms["rwp_steps"]) == 3
    stats = meth.components[0].stats()
    assert stats["qualified_first"] == 16 and stats["qualified_total"] == 48 and stats["perturbed_batches"] == 1


# --- the step at w + v and the restore, against independent computations --------------------------


def _reference_awp_v(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, gamma: float) -> dict:
    """AWP's calc_awp: one proxy SGD step (lr 0.01) on -CE, per-layer ||w|| / (||diff|| + EPS) * diff."""
    proxy = copy.deepcopy(model).train()
    before = {n: p.detach().clone() for n, p in _weights(proxy).items()}
    opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
    opt.zero_grad()
    (-F.cross_entropy(proxy(x_adv), y)).backward()
    opt.step()
    diff = {n: p.detach() - before[n] for n, p in _weights(proxy).items()}
    return {n: gamma * before[n].norm() / (diff[n].norm() + REF_EPS) * diff[n] for n in diff}


def _reference_rwp_v(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, gamma: float, c_min: float,
                     steps: int) -> dict:
    """RWP's calc_awp: K2 proxy steps on the loss of examples with loss < c_min, accumulated raw steps,
    rescaled so the norm over all perturbed weights together is gamma * ||w||."""
    w = {n: p.detach().clone() for n, p in _weights(model).items()}
    w_norm = torch.cat([t.view(-1) for t in w.values()]).norm()
    diff: dict = {}
    scaled: dict = {}
    for _ in range(steps):
        proxy = copy.deepcopy(model).train()
        with torch.no_grad():
            for n, p in _weights(proxy).items():
                p.add_(gamma * scaled[n] if scaled else 0.0)
        start = {n: p.detach().clone() for n, p in _weights(proxy).items()}
        opt = torch.optim.SGD(proxy.parameters(), lr=0.01)
        loss = F.cross_entropy(proxy(x_adv), y, reduction="none")
        loss = -(loss * (loss < c_min).float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step = {n: p.detach() - start[n] for n, p in _weights(proxy).items()}
        diff = step if not diff else {n: diff[n] + step[n] for n in diff}
        scale = w_norm / (torch.cat([t.view(-1) for t in diff.values()]).norm() + REF_EPS)
        scaled = {n: scale * diff[n] for n in diff}
    return {n: gamma * t for n, t in scaled.items()}


@pytest.mark.parametrize("kind", ["awp", "rwp"])
def test_v_matches_reference_transcription(kind: str) -> None:
    """In float64, where the reference's ``(w + lr g) - w`` loses no digits that matter."""
    model, (x, y) = _model().double(), _batch()
    x = x.double()
    x_adv = PGDAT().craft(copy.deepcopy(model), x, y, _ctx())
    with torch.no_grad():  # a c_min between two per-example losses at w: some qualify, some do not
        losses = F.cross_entropy(copy.deepcopy(model).train()(x_adv), y, reduction="none").sort().values
    c_min = float(losses[7] + losses[8]) / 2
    comp = AWP(gamma=0.01) if kind == "awp" else RWP(gamma=0.01, c_min=c_min, steps=3)
    v, taken, qualified = comp.compute(model, PGDAT(), x, x_adv, y)
    if kind == "awp":
        ref = _reference_awp_v(model, x_adv, y, 0.01)
        assert (taken, qualified) == (1, [16])
    else:
        ref = _reference_rwp_v(model, x_adv, y, 0.01, c_min, 3)
        assert taken >= 2 and qualified[0] == 8  # the selection shrinks as v raises the losses
    assert set(v) == set(ref)
    for n in v:
        torch.testing.assert_close(v[n], ref[n], rtol=1e-6, atol=1e-9 * float(ref[n].abs().max()))


def _mlp() -> nn.Module:
    """A model without BatchNorm, so that forwarding a subset of the batch equals masking the whole batch's loss."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def test_awp_on_a_loss_range_ascends_on_the_examples_in_that_range_only() -> None:
    """v against an independent computation that never sees the examples outside [lo, hi)."""
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    x_adv, y = torch.randn(16, 12, generator=g, dtype=torch.float64) * 3, torch.randint(0, 4, (16,), generator=g)
    with torch.no_grad():
        ordered = F.cross_entropy(model(x_adv), y, reduction="none").sort().values
    lo, hi = float(ordered[3] + ordered[4]) / 2, float(ordered[11] + ordered[12]) / 2  # 8 inside, 4 below, 4 above
    comp = AWP(gamma=0.01, loss_lo=lo, loss_hi=hi)
    v, taken, qualified = comp.compute(model, PGDAT(), x_adv, x_adv, y)
    assert (taken, qualified) == (1, [8])

    with torch.no_grad():
        inside = [i for i, l in enumerate(F.cross_entropy(model(x_adv), y, reduction="none")) if lo <= l < hi]
    weights = _weights(model)
    loss = F.cross_entropy(model(x_adv[inside]), y[inside], reduction="sum") / len(y)
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
    assert set(v) == set(grads)
    for n, grad in grads.items():
        expected = 0.01 * weights[n].detach().norm() / grad.norm() * grad
        torch.testing.assert_close(v[n], expected, rtol=1e-9, atol=0.0)

    everything = AWP(gamma=0.01).compute(model, PGDAT(), x_adv, x_adv, y)[0]  # the range changes v
    assert any(not torch.allclose(v[n], everything[n]) for n in v)


def test_awp_on_an_empty_loss_range_does_not_perturb() -> None:
    model, (x, y) = _model(), _batch()
    meth = build_method("awp", {"loss_lo": 1e6})
    spy = _spy(meth)
    meth.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), _ctx())
    stats = meth.components[0].stats()
    assert spy == {} and stats["perturbed_batches"] == 0 and stats["qualified_first"] == 0


def test_awp_loss_range_defaults_to_plain_awp_and_rejects_bad_ranges() -> None:
    plain = AWP(gamma=0.01)
    assert (plain.c_low, plain.c_min, plain.selective) == (None, None, False)
    assert AWP(loss_lo=0.5, loss_hi=1.0).hparams()["c_low"] == 0.5
    for lo, hi in ((1.0, 1.0), (2.0, 1.0), (-0.5, 1.0), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="loss range"):
            build_method("awp", {"loss_lo": lo, "loss_hi": hi})


CASES = {
    "awp": (lambda c_min: build_method("awp", {"gamma": 0.01}), "layer"),
    "rwp": (lambda c_min: build_method("rwp", {"gamma": 0.01, "c_min": c_min, "steps": 3}), "model"),
    "rwp-layer": (lambda c_min: build_method("rwp", {"gamma": 0.01, "c_min": c_min, "steps": 3,
                                                     "scope": "layer"}), "layer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_is_sgd_at_perturbed_weights_then_exact_restore(case: str) -> None:
    build, scope = CASES[case]
    model, (x, y) = _model(), _batch()
    pristine = copy.deepcopy(model)
    x_adv0 = PGDAT().craft(copy.deepcopy(model), x, y, _ctx())
    with torch.no_grad():
        losses = F.cross_entropy(copy.deepcopy(model).train()(x_adv0), y, reduction="none").sort().values
    c_min = float(losses[7] + losses[8]) / 2
    method = build(c_min)
    captured = _spy(method)
    out = method.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=LR), _ctx())
    assert torch.equal(out.x_adv, x_adv0)
    name = method.components[0].name
    assert float(out.terms[f"{name}_qualified"]) == (16 if case == "awp" else 8)
    assert float(out.terms[f"{name}_steps"]) >= 1
    v = dict(captured)
    w = _weights(pristine)
    assert set(v) == set(w) and all(t.dtype == torch.float32 for t in v.values())

    # ||v|| = gamma ||w||: per layer, or over all perturbed weights together
    if scope == "layer":
        for n, vn in v.items():
            assert float(vn.norm()) == pytest.approx(0.01 * float(w[n].detach().norm()), rel=1e-5), n
    else:
        v_norm = math.sqrt(sum(float(t.norm()) ** 2 for t in v.values()))
        w_norm = math.sqrt(sum(float(t.detach().norm()) ** 2 for t in w.values()))
        assert v_norm == pytest.approx(0.01 * w_norm, rel=1e-5)

    # the step: w <- ((w + v) - lr * grad L(w + v)) - v, with grad L(w + v) from an independent perturbed copy
    twin = copy.deepcopy(pristine)
    twin_weights = _weights(twin)
    with torch.no_grad():
        for n, t in v.items():
            twin_weights[n].add_(t)
    opt = torch.optim.SGD(twin.parameters(), lr=LR)
    opt.zero_grad()
    F.cross_entropy(twin.train()(out.x_adv), y).backward()
    grads = {n: p.grad.clone() for n, p in twin.named_parameters()}
    opt.step()
    with torch.no_grad():
        for n, t in v.items():
            twin_weights[n].sub_(t)
    assert _same_state(model, twin)  # weights bit for bit, and BatchNorm statistics untouched by the proxy
    trained = dict(model.named_parameters())
    for n, p in pristine.named_parameters():
        torch.testing.assert_close(trained[n].detach(), (p - LR * grads[n]).detach(), rtol=0, atol=1e-6)


def test_awp_matches_rwp_special_case() -> None:
    """AWP = one unselective RWP step with per-layer rescaling."""
    model_a, model_b = _model(), _model()
    (x, y) = _batch()
    awp = Method("a", PGDAT(), [AWP(gamma=0.01)])
    rwp = Method("b", PGDAT(), [RWP(gamma=0.01, c_min=math.inf, steps=1, scope="layer")])
    for meth, model in ((awp, model_a), (rwp, model_b)):
        meth.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), _ctx())
    assert _same_state(model_a, model_b)


# --- frozen blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,args", [("awp", {}), ("rwp", {"c_min": math.inf, "steps": 2}), ("mart", {})])
def test_frozen_blocks_stay_frozen(method: str, args: dict) -> None:
    model = _model()
    apply_update_spec(model, "2", reinit=False)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    meth = build_method(method, args)
    captured = _spy(meth) if meth.components else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9,
                          weight_decay=5e-4)
    for step in range(2):
        x, y = _batch(seed=20 + step)
        meth.train_step(model, x, y, opt, _ctx(seed=step))
    after = model.state_dict()
    for k, t in before.items():
        if k.startswith("block2."):
            continue
        assert torch.equal(after[k], t), f"frozen {k} changed"
    assert any(not torch.equal(after[k], t) for k, t in before.items() if k.startswith("block2."))
    if captured is not None:
        assert captured and all(n.startswith("block2.") for n in captured)


# --- bookkeeping ----------------------------------------------------------------------------------


def test_stats_reset_per_epoch_and_survive_state_dict() -> None:
    comp = AWP(warmup_epochs=5)  # inside the warm-up: counts batches without computing anything
    model, (x, y) = _model(), _batch(n=4)
    for epoch in (0, 0, 1):
        comp.before_loss(model, PGDAT(), x, x, y, _ctx(epoch=epoch))
        comp.after_step(model, _ctx(epoch=epoch))
    stats = comp.stats()
    assert stats["epoch"] == 1 and stats["batches"] == 1 and stats["total_batches"] == 3
    assert stats["examples"] == 4 and stats["total_examples"] == 12 and stats["total_steps"] == 0
    other = AWP()
    other.load_state_dict(comp.state_dict())
    assert other.stats() == stats


def test_invalid_hyperparameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="scope"):
        build_method("rwp", {"scope": "block"})
    with pytest.raises(ValueError, match="steps"):
        build_method("rwp", {"steps": 0})
    with pytest.raises(ValueError, match="c_min"):
        build_method("trades-rwp", {"c_min": math.nan})
    with pytest.raises(ValueError, match="bad hyper-parameters"):
        build_method("awp", {"c_min": 1.0})


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """The smoke profile's built-in data, loaded once for the end-to-end runs."""
    from layerlab.data import load_splits

    return load_splits("digits", train_size=128, val_size=32, test_size=32, seed=0)


@pytest.mark.parametrize("method,args,key", [
    ("mart", {}, "beta"),
    ("awp", {}, "awp.gamma"),
    ("rwp", {"c_min": 100.0, "steps": 2}, "rwp.c_min"),
    ("trades-rwp", {"c_min": 100.0, "steps": 2}, "rwp.c_min"),
])
def test_end_to_end_training_writes_summary(tmp_path, digits, method: str, args: dict, key: str) -> None:
    cfg = make_config("smoke", method=method, method_args=args, epochs=1, train_size=128, width=0.0625,
                      val_size=32, test_size=32, eval_size=32, attack_steps=2, epoch_eval_steps=1,
                      eval_steps=2, device="cpu")
    summary = train(cfg, tmp_path / method, progress=False, splits=digits)
    saved = read_json(tmp_path / method / "summary.json")
    assert saved["method"] == method and key in saved["method_hparams"]
    assert saved["method_hparams"] == build_method(method, args).hparams() == summary["method_hparams"]
    assert 0 <= saved["robust_acc"] <= 100
