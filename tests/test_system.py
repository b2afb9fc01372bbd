"""layerlab.system: the allocator setting the CLI applies changes how memory is obtained, never a value."""

from __future__ import annotations

import subprocess
import sys

import pytest

STEP = """
import os, sys, torch
from layerlab.system import tune_cpu_allocator
print(tune_cpu_allocator())
torch.manual_seed(0)
torch.set_num_threads(1)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64 * 62 * 62, 10))
x, y = torch.rand(48, 3, 64, 64), torch.randint(0, 10, (48,))  # 47 MiB activations: above glibc's mmap threshold
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
torch.save(m.state_dict(), sys.argv[1])
"""


def _run(tmp_path, env_value: str | None) -> tuple[str, dict]:
    import os

    import torch

    env = {k: v for k, v in os.environ.items() if k != "LAYERLAB_MALLOC"}
    if env_value is not None:
        env["LAYERLAB_MALLOC"] = env_value
    out = tmp_path / f"w-{env_value}.pt"
    done = subprocess.run([sys.executable, "-c", STEP, str(out)], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip(), torch.load(out, weights_only=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_trains_the_same_weights(tmp_path):
    import torch

    applied, tuned = _run(tmp_path, None)
    skipped, plain = _run(tmp_path, "default")
    assert (applied, skipped) == ("True", "False")
    assert all(torch.equal(tuned[k], plain[k]) for k in plain)
