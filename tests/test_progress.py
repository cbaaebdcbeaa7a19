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


def test_an_error_under_a_bar_prints_on_its_own_line(monkeypatch, capsys):
    """The traceback keeps the failing step's frame, and its open bar, alive: the error line was
    printed after the bar's text, on the same line."""
    import core.__main__ as cli
    from core.errors import LayerscopeError

    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def failing_step(args):
        bar = progress_bar(total=10, desc="SAEs", mininterval=0)
        bar.update(4)
        raise LayerscopeError("the disk is full")

    monkeypatch.setattr(cli, "_dispatch", failing_step)
    assert cli.main(["report", "--run", "x"]) == 2
    err = capsys.readouterr().err
    assert "SAEs:  40%" in err and "\nerror: the disk is full\n" in err
