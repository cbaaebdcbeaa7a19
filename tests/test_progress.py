"""Progress bars obey the caller and TQDM_DISABLE, which tqdm itself ignores when a caller passes ``disable``."""

from __future__ import annotations

import io

import pytest

from core.progress import bars_off, progress_bar


@pytest.mark.parametrize(
    ("env", "show", "shown"),
    [(None, True, True), (None, False, False), ("1", True, False), ("true", True, False), ("0", True, True), ("false", True, True), ("", True, True)],
)
def test_progress_bar_obeys_show_and_tqdm_disable(monkeypatch, env, show, shown):
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    out = io.StringIO()
    with progress_bar(range(3), show=show, file=out, desc="x") as bar:
        assert bar.disable is (not shown)  # (tqdm sets it on close)
        assert list(bar) == [0, 1, 2]  # the iterable passes through either way
    assert ("x: 100%" in out.getvalue()) is shown
    assert bars_off() is (env not in (None, "", "0", "false"))
