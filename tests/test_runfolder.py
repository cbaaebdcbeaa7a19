"""The run folder: the shapes of its JSON files (what readers check before they trust a file) and
its one-writer lock."""

import json
import os
import re
import shlex
import shutil

import pytest

from core import runfolder
from core.errors import LayerscopeError
from core.files import NUMBER, field_problem
from core.runfolder import (
    ACTIVATION_INDEX_FIELDS,
    FINETUNE_METRICS_FIELDS,
    LABELS_FIELDS,
    MANIFEST_FIELDS,
    MATCHING_FIELDS,
    SAE_METRICS_FIELDS,
    SIMILARITY_FIELDS,
    RunFolder,
)

SHAPE = {"name": str, "size?": int, "scores": [NUMBER], "per_class": {"*": {"f1": NUMBER}}}


@pytest.mark.parametrize(
    "obj, problem",
    [
        ({"name": "a", "scores": [1, 0.5, float("nan")], "per_class": {"x": {"f1": 1}}}, None),  # "size" may be absent
        ({"scores": [], "per_class": {}}, "no 'name'"),
        ({"name": 3, "scores": [], "per_class": {}}, "'name' is a whole number, not a string"),
        ({"name": "a", "size": True, "scores": [], "per_class": {}}, "'size' is true or false, not a whole number"),
        ({"name": "a", "size": 2.5, "scores": [], "per_class": {}}, "'size' is a number, not a whole number"),
        ({"name": "a", "scores": [1, "2"], "per_class": {}}, "'scores[1]' is a string, not a number"),
        ({"name": "a", "scores": {"0": 1}, "per_class": {}}, "'scores' is an object, not a list"),
        ({"name": "a", "scores": [], "per_class": {"x": {"f1": 1}, "y": {}}}, "no 'per_class.y.f1'"),
        ({"name": "a", "scores": [], "per_class": {"x": None}}, "'per_class.x' is null, not an object"),
    ],
)
def test_field_problem_names_the_first_field_that_departs_from_the_shape(obj, problem):
    assert field_problem(obj, SHAPE) == problem


def test_every_json_file_a_build_writes_fits_its_shape(tiny_run):
    """The shapes must never refuse what the writers write (else every run would read as damaged)."""
    root = tiny_run.root
    files = {
        "manifest.json": MANIFEST_FIELDS,
        "data/labels.json": LABELS_FIELDS,
        "finetune/metrics.json": FINETUNE_METRICS_FIELDS,
        "activations/train/index.json": ACTIVATION_INDEX_FIELDS,
        "activations/test/index.json": ACTIVATION_INDEX_FIELDS,
        "similarity/similarity.json": SIMILARITY_FIELDS,
        **{str(p.relative_to(root)): SAE_METRICS_FIELDS for p in root.glob("saes/*/layer_*/metrics.json")},
        **{str(p.relative_to(root)): MATCHING_FIELDS for p in root.glob("features/matching/layer_*.json")},
    }
    assert sum("saes/" in f for f in files) == 4 and sum("matching/" in f for f in files) == 2
    for name, shape in files.items():
        assert field_problem(json.loads((root / name).read_text()), shape) is None, name


def test_a_field_the_shape_requires_is_one_every_writer_sets(tiny_run):
    """Each required field is really there: dropping it from a written file is caught."""
    path = tiny_run.root / "similarity" / "similarity.json"
    sim = json.loads(path.read_text())
    for key in ("layers", "cka_matrix", "num_tokens"):
        assert field_problem({k: v for k, v in sim.items() if k != key}, SIMILARITY_FIELDS) == f"no '{key}'"
    sim["layers"][1] = {**sim["layers"][1], "cka": "high"}
    assert field_problem(sim, SIMILARITY_FIELDS) == "'layers[1].cka' is a string, not a number"


def test_a_writer_refused_by_the_lock_leaves_the_holders_new_folder_alone(tmp_path, monkeypatch):
    """Two commands on a new run folder: B finds no folder, then A makes it and takes the lock
    before B can. B is refused and must not remove A's still-empty folder."""
    import fcntl

    import core.runfolder as rf

    root = tmp_path / "new" / "run"
    held = []

    def a_wins(path):  # A makes the folder and locks it just before B's make_folder
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fd)

    monkeypatch.setattr(rf, "make_folder", a_wins)
    try:
        with pytest.raises(LayerscopeError, match="another process is building in"):
            with RunFolder(root).writing():
                pass
        assert root.is_dir() and (tmp_path / "new").is_dir()
    finally:
        os.close(held[0])


def test_a_writer_leaves_a_folder_made_again_by_another_process(tmp_path):
    """A refused first step removes the empty run folder; another process may make and lock a
    new one at the same path before the first lets go: that one is not the first's to remove."""
    root = tmp_path / "run"
    with RunFolder(root).writing():
        shutil.rmtree(root)
        root.mkdir()  # another process's new folder (another inode)
    assert root.is_dir()
    with RunFolder(tmp_path / "other").writing():
        pass
    assert not (tmp_path / "other").exists()  # its own empty folder it does remove


@pytest.mark.parametrize("name", ["my runs/r 1", "it's <b>&", "plain"])
def test_suggested_commands_quote_the_run_path_so_they_paste_into_a_shell(tmp_path, name):
    root = tmp_path / name
    assert shlex.split(runfolder.core_command("build", root, "--until", "saes")) == ["python", "-m", "core", "build", "--run", str(root), "--until", "saes"]
    with pytest.raises(LayerscopeError) as e:  # a message that suggests a command: it splits back to the same path
        RunFolder(root).manifest()
    (command,) = re.findall(r"`(python -m core [^`]*)`", str(e.value))
    assert shlex.split(command)[4:] == ["--run", str(root)]


def test_the_stamp_changes_with_any_file_a_reader_uses_and_not_with_the_shards(tiny_run, tmp_path):
    run = RunFolder(tmp_path / "copy")
    shutil.copytree(tiny_run.root, run.root)
    first = run.stamp()
    assert first and run.stamp() == first  # nothing changed: the same number
    shard = run.hidden_shard("train", "pretrained", 0)
    shard.write_bytes(shard.read_bytes() + b"x")  # only the steps read the shards
    assert run.stamp() == first
    stats = run.feature_stats_path("pretrained", 1)
    data = stats.read_bytes()
    stats.write_bytes(data[:100])  # damaged in place: no rename, the folder's mtime stays
    damaged = run.stamp()
    assert damaged != first
    stats.write_bytes(data)
    os.utime(stats, ns=(1, 1))  # the same size back, but not the same file as far as a cache can tell
    assert run.stamp() not in (first, damaged)
    (run.root / "notes.txt").write_text("a file a user left in the run")
    noted = run.stamp()
    assert noted != first
    os.chmod(stats, 0o600)  # the fix a permission message asks for changes no size or mtime
    assert run.stamp() != noted
    noted = run.stamp()
    (run.root / "saes" / ".cfg.json.swp").write_text("an editor's swap file")  # hidden: not the run's
    (run.root / ".manifest.json.123.tmp").write_text("a write in progress")
    assert run.stamp() == noted
    assert RunFolder(tmp_path / "nowhere").stamp() == 0
