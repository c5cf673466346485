"""Golden files: rendered scripts and manifests compared byte for byte with the files in this folder.

Regenerate after an intended change with ``KSCALE_UPDATE_GOLDEN=1 pytest tests/unit/executors`` and review
the diff like code. Inputs are the ``*.job.yaml`` files here; renders use a fixed version (0.0.0), fixed
submission id and fixed paths so only the renderer can change the output.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN = Path(__file__).parent
SID = "kscale-golden-0000000000"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("KSCALE_UPDATE_GOLDEN") == "1" or not path.exists():
        path.write_text(text)
        if os.environ.get("KSCALE_UPDATE_GOLDEN") != "1":
            raise AssertionError(f"{path} did not exist; wrote it: review and commit it")
        return
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "rendered"))
        raise AssertionError(f"rendering differs from {path} (KSCALE_UPDATE_GOLDEN=1 to accept):\n{diff}")
