"""Golden files: rendered scripts and manifests compared byte for byte with the files in this folder.

Regenerate after an intended change with ``KSCALE_UPDATE_GOLDEN=1 pytest tests/unit/executors`` and review
the diff like code (never in CI: there the variable is refused, see :func:`updating`). Inputs are the ``*.job.yaml`` files here; renders use a fixed version (0.0.0), fixed
submission id and fixed paths so only the renderer can change the output.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from tests.testing_utils import in_ci

GOLDEN = Path(__file__).parent
SID = "kscale-golden-0000000000"
UPDATE = "KSCALE_UPDATE_GOLDEN"


def updating() -> bool:
    """True when ``KSCALE_UPDATE_GOLDEN=1`` asks to rewrite the golden files. Under CI (``in_ci()``) the
    variable set to anything is an error: every golden test would pass whatever it rendered."""
    value = os.environ.get(UPDATE, "")
    if value and in_ci():
        raise AssertionError(f"{UPDATE}={value!r} is set under CI: golden files would be rewritten from what "
                             f"the code renders, so no golden test could fail. Unset it in CI; regenerate "
                             f"locally with {UPDATE}=1 pytest tests/unit/executors and commit the reviewed diff")
    return value == "1"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    update = updating()
    if update or not path.exists():
        path.write_text(text)
        if not update:
            raise AssertionError(f"{path} did not exist; wrote it: review and commit it")
        return
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "rendered"))
        raise AssertionError(f"rendering differs from {path} (KSCALE_UPDATE_GOLDEN=1 to accept):\n{diff}")


EXAMPLE = GOLDEN.parents[1] / "cluster" / "example-job.yaml"


def hand_copies() -> dict[Path, str]:
    """What ``cluster/`` should hold: ``cluster/example-job.yaml`` rendered for each target, with
    placeholder paths a reader replaces (the tests keep these files current)."""
    import dataclasses

    from kscale.targets import k8s, slurm
    from kscale.spec import load_spec

    spec = load_spec(EXAMPLE, check_model=False)
    sid = "kscale-demo-0000000000"
    root = EXAMPLE.parent
    rec = Path("/path/to/project/runs/demo/keys.cluster")
    out = {root / "slurm" / "kscale.sbatch": slurm.render_script(
        spec, sid, rec, rec / f"{sid}.job.yaml", "/path/to/project", "/path/to/project/.venv/bin/python",
        source="cluster/example-job.yaml")}
    out[root / "k8s" / "rayjob.yaml"] = k8s.to_yaml(k8s.render_rayjob(spec, str(EXAMPLE), sid))
    out[root / "k8s" / "raycluster.yaml"] = k8s.to_yaml([k8s.render_raycluster(spec, "kscale-demo")])
    reuse = dataclasses.replace(spec, cluster=dataclasses.replace(  # cluster.env is set on the RayCluster there
        spec.cluster, env={}, k8s=dataclasses.replace(spec.cluster.k8s, reuse_cluster="kscale-demo")))
    out[root / "k8s" / "rayjob-reuse.yaml"] = k8s.to_yaml(k8s.render_rayjob(reuse, str(EXAMPLE), sid))
    return out


def assert_hand_copies_current() -> None:
    stale = []
    update = updating()
    for path, text in hand_copies().items():
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(str(path))
    assert not stale, f"out of date: {stale}; regenerate with KSCALE_UPDATE_GOLDEN=1 pytest tests/unit/executors"
