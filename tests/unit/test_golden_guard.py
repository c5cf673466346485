"""Golden tests cannot be switched off by a stray ``KSCALE_UPDATE_GOLDEN`` in CI.

With the variable set, ``assert_golden`` rewrites the expected file from what the code rendered and passes,
so a CI environment that leaked it would pass every golden test whatever the renderers did. Under
``in_ci()`` the variable is refused with a message that says so; locally ``=1`` still regenerates.
"""

from __future__ import annotations

import pytest

from tests.golden import golden


@pytest.fixture
def scratch_golden(tmp_path, monkeypatch):
    """The golden folder and the hand copies pointed at a scratch folder (nothing real is rewritten)."""
    monkeypatch.setattr(golden, "GOLDEN", tmp_path)
    monkeypatch.setattr(golden, "hand_copies", lambda: {tmp_path / "hand.yaml": "rendered\n"})
    (tmp_path / "x.sbatch").write_text("expected\n")
    (tmp_path / "hand.yaml").write_text("expected\n")
    return tmp_path


@pytest.mark.parametrize("value", ["1", "true", "0"])
def test_the_update_switch_is_refused_under_ci(scratch_golden, monkeypatch, value) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("KSCALE_UPDATE_GOLDEN", value)
    with pytest.raises(AssertionError, match=r"KSCALE_UPDATE_GOLDEN=.* is set under CI: .*no golden test could fail"):
        golden.assert_golden("x.sbatch", "rendered\n")
    with pytest.raises(AssertionError, match="is set under CI"):
        golden.assert_hand_copies_current()
    assert (scratch_golden / "x.sbatch").read_text() == (scratch_golden / "hand.yaml").read_text() == "expected\n"


def test_under_ci_without_the_switch_a_difference_fails(scratch_golden, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("KSCALE_UPDATE_GOLDEN", raising=False)
    with pytest.raises(AssertionError, match="rendering differs"):
        golden.assert_golden("x.sbatch", "rendered\n")
    golden.assert_golden("x.sbatch", "expected\n")  # equal: passes


def test_locally_the_switch_regenerates(scratch_golden, monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("KSCALE_UPDATE_GOLDEN", "1")
    golden.assert_golden("x.sbatch", "rendered\n")
    golden.assert_hand_copies_current()
    assert (scratch_golden / "x.sbatch").read_text() == (scratch_golden / "hand.yaml").read_text() == "rendered\n"
