"""A damaged or missing activation shard: one plain error naming the file and the step to redo, nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.__main__ import main
from core.runfolder import RunFolder


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), so any write, new file or removal shows."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shards(run: RunFolder) -> dict[str, Path]:
    return {"tokens": run.token_shard("test", 0), "finetuned": run.hidden_shard("test", "finetuned", 0)}


@pytest.mark.parametrize("shard", ["tokens", "finetuned"])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_similarity_on_a_bad_test_shard_says_which_file_and_to_redo_activations(tiny_run, tmp_path, capsys, damage, shard):
    run = RunFolder(tmp_path / "copy")
    shutil.copytree(tiny_run.root, run.root)
    path = _shards(run)[shard]
    assert path.is_file() and run.is_done("similarity")
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # the header parses or not, the tensors' bytes are cut short
    else:
        path.unlink()
    before = _snapshot(run.root)
    capsys.readouterr()  # drop what the copy printed

    code = main(["similarity", "--run", str(run.root), "--force"])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1, err
    line = errors[0]
    assert str(path) in line
    assert ("is missing" if damage == "deleted" else "is damaged") in line
    assert f"python -m core activations --run {run.root} --force" in line  # the step to redo, on this run
    assert _snapshot(run.root) == before  # nothing written, removed or added
