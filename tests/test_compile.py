"""The compiled path (``TrainConfig.compile``: torch.compile, inductor on the CPU) trains and evaluates as the
eager path does, within floating-point tolerance."""

from __future__ import annotations

import pytest
import torch

from layerlab.train import evaluate_epoch, setup, train_epoch


@pytest.mark.slow
@pytest.mark.timeout(3600)  # inductor compiles a few dozen C++ kernels: minutes on a busy CPU
def test_compiled_steps_and_evaluation_match_eager(tiny_cfg, digits_splits):
    results = {}
    for compiled in (False, True):
        s = setup(tiny_cfg(method="at", compile=compiled, grad_stats=False), digits_splits)
        assert (s.step_model is not None) is compiled and (s.eval_model is s.step_model)
        stats = train_epoch(s, 0, progress=False)  # two PGD-2 AT steps of batch 32
        results[compiled] = (stats, evaluate_epoch(s, 0), {k: v.clone() for k, v in s.model.state_dict().items()})
    (eager_stats, eager_eval, eager_w), (comp_stats, comp_eval, comp_w) = results[False], results[True]
    assert comp_stats == pytest.approx(eager_stats, rel=1e-4)
    assert comp_eval == pytest.approx(eager_eval, abs=100 / 32)  # accuracies in percent: at most one image apart
    for name, weight in eager_w.items():
        torch.testing.assert_close(comp_w[name], weight, rtol=1e-3, atol=1e-4, msg=name)
