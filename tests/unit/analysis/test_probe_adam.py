"""The probes' Adam (``kscale.analysis.jsd.Adam``) is torch's Adam bit for bit, and training probes does not
import ``torch._dynamo`` (what ``torch.optim.Optimizer`` costs on its first step: about 1.5 s of CPU).

Reference: ``torch.optim.Adam`` itself, on twin models trained on the same batches, with some parameters
left without a gradient for some steps (torch skips those; so must we).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kscale.analysis import jsd


def _twins(seed: int):
    return jsd.make_probe("mlp", 6, 5, seed), jsd.make_probe("mlp", 6, 5, seed)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_adam_equals_torch_adam_bit_for_bit(foreach):
    ours_m, ref_m = _twins(3)
    frozen_ours, frozen_ref = _twins(4)  # a second probe that gets no gradient on odd steps
    ours = jsd.Adam(list(ours_m.parameters()) + list(frozen_ours.parameters()), lr=3e-3, foreach=foreach)
    ref = torch.optim.Adam(list(ref_m.parameters()) + list(frozen_ref.parameters()), lr=3e-3, foreach=foreach)
    rng = np.random.default_rng(0)
    for step in range(25):
        x = torch.from_numpy(rng.normal(size=(16, 6)).astype(np.float32))
        y = torch.from_numpy((rng.random(16) < 0.5).astype(np.float32))
        for model, frozen, opt in ((ours_m, frozen_ours, ours), (ref_m, frozen_ref, ref)):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
            if step % 2 == 0:
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(frozen(x)[:, 0], 1 - y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(list(ours_m.parameters()) + list(frozen_ours.parameters()),
                    list(ref_m.parameters()) + list(frozen_ref.parameters())):
        assert torch.equal(a, b)
    steps_ref = [float(ref.state[p]["step"]) for p in frozen_ref.parameters()]
    assert [float(s) for s in ours.steps[-len(steps_ref):]] == steps_ref == [13.0] * len(steps_ref)


def test_probe_bank_equals_torch_adam_and_does_not_import_dynamo():
    code = r"""
import sys
import numpy as np
import torch
from kscale.analysis import jsd
rng = np.random.default_rng(1)
data = {("a", "mlp"): (rng.normal(size=(40, 6)), rng.normal(1.0, 1.0, size=(30, 6))),
        ("a", "logistic"): (rng.normal(size=(40, 6)), rng.normal(1.0, 1.0, size=(30, 6)))}
def fit(opt_class):
    jsd.Adam, keep = opt_class, jsd.Adam
    try:
        bank = jsd.ProbeBank({k: k[1] for k in data}, 6, hidden=5, lr=3e-3, batch_size=8, seed=2)
        bank.fit_chunk(data, 12)
    finally:
        jsd.Adam = keep
    return [p.detach().clone() for m in bank.models.values() for p in m.parameters()]
ours = fit(jsd.Adam)
print("dynamo imported:", "torch._dynamo" in sys.modules)
ref = fit(lambda params, lr, foreach=None: torch.optim.Adam(params, lr=lr, foreach=foreach))
print("equal:", all(torch.equal(a, b) for a, b in zip(ours, ref)), len(ours))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "dynamo imported: False" in out.stdout, out.stdout
    assert "equal: True 8" in out.stdout, out.stdout
