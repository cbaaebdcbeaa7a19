"""The command line: verbs, JSON report, and one clear line (exit 2) for every user mistake."""

import contextlib
import errno
import io
import json
import os
import shlex
import shutil
import subprocess
import stat
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.errors import LayerscopeError
from core.runfolder import RunFolder
from tests.conftest import ROOT


_HOME = ""  # set by _cli_home for this module's tests


@pytest.fixture(scope="module", autouse=True)
def _cli_home(tmp_path_factory):
    """The CLI runs with a HOME of its own, so caches it or a library writes stay out of the repo."""
    global _HOME
    _HOME = str(tmp_path_factory.mktemp("home"))


# Variables that pick the numeric libraries' kernels and threads (e.g. OPENBLAS_CORETYPE, set on
# some machines): a subprocess without them can round float64 sums differently from this process,
# and tests compare files written here with files written by the CLI.
NUMERIC_ENV_PREFIXES = ("OPENBLAS_", "GOTO_", "OMP_", "MKL_", "KMP_", "ATEN_", "NPY_")


def cli_env(**extra) -> dict:
    numeric = {k: v for k, v in os.environ.items() if k.startswith(NUMERIC_ENV_PREFIXES)}
    return {**numeric, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": _HOME, **extra}


def cli(*args, check=False, env=None, process=False) -> subprocess.CompletedProcess:
    """``python -m core ARGS``: its exit code, stdout and stderr.

    Run in this process through ``core.__main__.main``, the same parsing and dispatch without a new
    interpreter's ~4 s of imports; a bug's exception propagates and fails the test (a subprocess
    would print its traceback). ``process=True`` (or an ``env``, read when a process starts) runs a
    real ``python -m core`` where the process itself is under test."""
    if process or env:
        out = subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env(**(env or {})))
    else:
        from core.__main__ import main

        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
        out = subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert out.returncode == 0, out.stderr
    return out


def assert_user_error(out, *fragments):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, out.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_a_command_run_too_early_names_itself_and_the_step_it_needs(tmp_path, tiny_csv, tiny_model):
    run = tmp_path / "r"
    cli("data", "--run", run, "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, check=True)
    assert_user_error(cli("analyze", "--run", run, "--text", "a film", process=True), "the analyze command needs step 'finetune', which has not run in", f"`python -m core build --run {run} --until finetune` first")  # exit 2 from a real interpreter
    # the command it suggests runs every missing step up to the one needed, not that one alone
    assert_user_error(cli("similarity", "--run", run), "step 'similarity' needs step 'activations'", f"`python -m core build --run {run} --until activations` first")


def test_a_build_whose_from_step_comes_after_its_until_step_is_refused(tmp_path, tiny_csv, tiny_model):
    """``build --from saes --until data`` would redo nothing: said so, and no run folder is made."""
    run = tmp_path / "r"
    out = cli("build", "--run", run, "--from", "saes", "--until", "data", "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model)
    assert_user_error(out, "--from saes comes after --until data", "pass --until saes or a later step")
    assert not run.exists()


def test_a_new_run_is_never_made_over_someone_elses_files(tmp_path, tiny_csv, tiny_model):
    """A folder with files but no manifest.json is not a run: the data step refused to write
    there, and the user's files are as they were."""
    folder = tmp_path / "mine"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.csv").write_text("precious\n")
    out = cli("data", "--run", folder, "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model)
    assert_user_error(out, "holds files but no manifest.json", "pass a new or empty folder")
    assert (folder / "data" / "train.csv").read_text() == "precious\n" and sorted(p.name for p in folder.rglob("*")) == ["data", "train.csv"]
    cli("data", "--run", folder, "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, "--force", check=True)  # asked for: built there
    assert (folder / "manifest.json").is_file() and (folder / "data" / "train.csv").read_text() != "precious\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    cli("data", "--run", empty, "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, check=True)  # an empty folder is a new run


def test_export_refuses_to_write_over_a_run_file_or_a_device(tmp_path, tiny_run):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(tiny_run.root, run)
    manifest = (run / "manifest.json").read_bytes()
    assert_user_error(cli("export", "--run", run, "--out", run / "manifest.json"), "is a file of the run", "nothing was written")
    assert (run / "manifest.json").read_bytes() == manifest
    cli("export", "--run", run, "--out", run / "report.html", check=True)  # a new file inside the run is fine
    cli("export", "--run", run, "--out", run / "report.html", check=True)  # and so is replacing that report
    other = tmp_path / "other"
    shutil.copytree(tiny_run.root, other)
    for victim in (other / "manifest.json", other / "data" / "train.csv"):  # another run's files are as safe as its own
        before = victim.read_bytes()
        assert_user_error(cli("export", "--run", run, "--out", victim), f"is a file of the run {other}", "nothing was written")
        assert victim.read_bytes() == before
    assert_user_error(cli("export", "--run", run, "--out", " "), "--out is empty")
    (tmp_path / "mine").mkdir()
    shutil.copy(other / "data" / "train.csv", tmp_path / "mine" / "reviews.csv")
    (tmp_path / "mine" / "index.html").write_text("<!DOCTYPE html><html><head><title>my page</title></head><body>mine</body></html>")
    for victim in (tmp_path / "mine" / "reviews.csv", tmp_path / "mine" / "index.html"):  # a file outside any run, .html or not
        before = victim.read_bytes()
        assert_user_error(cli("export", "--run", run, "--out", victim), f"--out {victim} is a file that is not a Layerscope report", "nothing was written")
        assert victim.read_bytes() == before
    (tmp_path / "mine" / "report").write_bytes((run / "report.html").read_bytes())  # an earlier report, whatever its name
    cli("export", "--run", run, "--out", tmp_path / "mine" / "report", check=True)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # like /dev/null: renaming a file over it would replace it
    assert_user_error(cli("export", "--run", run, "--out", fifo), "is not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert_user_error(cli("figures", "--run", run, "--out", "/proc/layerscope-figures"), "cannot create the folder /proc/layerscope-figures")
    assert_user_error(cli("export", "--run", run, "--out", "/proc/layerscope.html"), "cannot create a file in /proc")
    assert_user_error(cli("export", "--run", run, "--out", f"{tmp_path / 'new'}/"), f"--out {tmp_path / 'new'}/ names a folder", "report.html")
    assert not (tmp_path / "new").exists()  # not a file named like the folder


@pytest.mark.parametrize("option", ["data.seed", "finetune.seed", "activations.seed", "saes.training.seed"])
@pytest.mark.parametrize("value", ["-1", "99999999999999999999999", "4294967296"])
def test_seeds_out_of_range_are_refused_before_any_work(option, value):
    from core.config import load_config

    with pytest.raises(LayerscopeError, match=f"{option}=.* must be a whole number from 0 to 2147483647"):
        load_config(overrides={option: value})


def test_report_json_from_cli(tiny_run):
    rep = json.loads(cli("report", "--run", tiny_run.root, "--json", check=True, process=True).stdout)  # a real `python -m core`
    assert rep["num_layers"] == 2 and len(rep["similarity"]) == 3
    assert "Layer similarity" in cli("report", "--run", tiny_run.root, check=True).stdout


def test_config_verb_shows_resolved_settings(tiny_run):
    out = cli("config", "--run", tiny_run.root, check=True).stdout
    assert "finetune.epochs = 10.0" in out and "data.seed = 0" in out
    assert "saes.training.lr = " in out and "Config(" not in out  # nested sections spelt out, one option a line
    from core.config import RunConfig, load_config

    for line in out.splitlines():  # every line names an option: --set accepts the name (a misspelt one is refused)
        name = line.split(" = ", 1)[0]
        section, *path = name.split(".")
        obj = getattr(RunConfig(), section)
        for part in path:
            obj = getattr(obj, part)  # AttributeError: not an option
        assert not hasattr(obj, "__dataclass_fields__"), line
    assert load_config(overrides={"saes.training.lr": 1e-4}).saes.training.lr == 1e-4


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["data", "--dataset", "imbd"], ["unknown dataset 'imbd'", "imdb"]),
        (["finetune"], ["needs step 'data'"]),
        (["report"], ["does not exist", "python -m core build"]),
        (["data", "--set", "data.max_row=5"], ["did you mean 'data.max_rows'"]),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, args, fragments):
    assert_user_error(cli(*args, "--run", tmp_path / "run"), *fragments)


@pytest.mark.parametrize("verb", [["build"], ["report"], ["analyze", "--text", "a fine film"], ["config"]])
def test_a_file_given_as_run_folder_is_refused_and_left_alone(tmp_path, verb):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert_user_error(cli(verb[0], "--run", notes, *verb[1:]), "notes.txt is a file, not a run folder")
    assert notes.read_text() == "my notes"


@pytest.mark.parametrize("verb", [["build", "--force"], ["report"], ["config"]])
def test_an_empty_run_path_is_refused_not_read_as_the_working_directory(tmp_path, verb, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli(verb[0], "--run", "", *verb[1:]), "--run is empty")
    assert not list(tmp_path.iterdir())  # nothing built in the working directory


def test_a_second_process_writing_to_a_run_is_refused_and_changes_nothing(tmp_path, tiny_run):
    """While a build holds the run folder (flock on the folder, taken here through a descriptor of
    our own, as another process would), a step or build in it is one line and writes nothing;
    readers are not held up, and once the lock is gone the same command goes through."""
    import fcntl

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["similarity", "--force"], ["build"]):
            assert_user_error(cli(args[0], "--run", run, *args[1:]), f"another process is building in {run}", "wait for it to finish")
        report = cli("report", "--run", run, "--json")
        assert json.loads(report.stdout)["run"] and "note: a build is running in" in report.stderr  # readers go on, and are told
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        os.close(fd)
    assert "build is running" not in cli("report", "--run", run).stderr
    assert cli("similarity", "--run", run, "--force").returncode == 0
    assert list(run.rglob("*.lock")) == [] and not any(p.name.startswith(".") for p in run.iterdir())  # no lock file left


def test_a_refused_first_step_leaves_no_folders_behind(tmp_path):
    """The writer's lock makes the run folder (and its missing parents) before the first step is
    checked; a refusal removes them again."""
    assert_user_error(cli("finetune", "--run", tmp_path / "a" / "b" / "run"), "needs step 'data'")
    assert list(tmp_path.iterdir()) == []


NO_USER = "~layerscope_no_such_user_xyz"


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--run", f"{NO_USER}/run"],
        ["build", "--run", "{tmp}/r", "--preset", "tiny", "--dataset", f"{NO_USER}/reviews.csv"],
        ["build", "--run", "{tmp}/r", "--preset", "tiny", "--model", f"{NO_USER}/bert"],
    ],
)
def test_a_path_under_the_home_of_a_user_that_does_not_exist_is_one_line(tmp_path, args):
    """``~user/...`` of no such user: Path.expanduser's RuntimeError was a traceback."""
    assert_user_error(cli(*(a.format(tmp=tmp_path) for a in args)), f"cannot expand '{NO_USER}'", "pass the path without it")
    assert not (tmp_path / "r").exists()


def test_out_and_config_paths_expand_the_home_folder_like_run(tmp_path, tiny_run, monkeypatch):
    """``--out ~/r.html`` and ``--config ~/x.toml`` mean the home folder, as ``--run ~/...`` does
    (they made a folder named "~" in the working directory), and ``~user`` of no such user is one line."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (home / "x.toml").write_text("[finetune]\nepochs = 2.0\n")
    assert "finetune.epochs = 2.0" in cli("config", "--run", tiny_run.root, "--config", "~/x.toml", check=True).stdout
    assert cli("export", "--run", tiny_run.root, "--out", "~/r.html", check=True).stdout.strip() == f"wrote {home / 'r.html'}"
    assert (home / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert_user_error(cli("export", "--run", tiny_run.root, "--out", f"{NO_USER}/r.html"), f"cannot expand '{NO_USER}'")
    assert_user_error(cli("config", "--run", tiny_run.root, "--config", f"{NO_USER}/x.toml"), f"cannot expand '{NO_USER}'")
    assert list(work.iterdir()) == []


def test_a_config_file_that_is_a_device_and_a_section_set_as_a_value_are_one_line(tiny_run):
    assert_user_error(cli("config", "--run", tiny_run.root, "--config", "/dev/null"), "/dev/null is not a regular file")
    for order in (["finetune=x", "finetune.epochs=3"], ["finetune.epochs=3", "finetune=x"]):
        assert_user_error(cli("config", "--run", tiny_run.root, "--set", order[0], "--set", order[1]), "option 'finetune' is a section", "finetune.FIELD=VALUE")


def test_export_to_a_folder_or_below_a_file_is_refused(tmp_path, tiny_run):
    assert_user_error(cli("export", "--run", tiny_run.root, "--out", tmp_path), "is a folder; pass a file name", "report.html")
    assert_user_error(cli("export", "--run", tiny_run.root, "--out", tiny_run.root), "is a folder; pass a file name", "report.html")  # not "a file of the run"
    (tmp_path / "f").write_text("x")
    assert_user_error(cli("export", "--run", tiny_run.root, "--out", tmp_path / "f" / "r.html"), "a file is in the way")
    assert (tmp_path / "f").read_text() == "x"


def test_a_path_name_too_long_for_the_file_system_is_one_line(tmp_path, tiny_run):
    long = "x" * 300  # most file systems allow 255 bytes per name
    assert_user_error(cli("export", "--run", tiny_run.root, "--out", tmp_path / f"{long}.html"), "too long for its file system (305 characters", "shorter --run (or --out)")
    assert_user_error(cli("build", "--run", tmp_path / long), "too long for its file system (300 characters")
    assert_user_error(cli("report", "--run", tmp_path / long), "too long for its file system (300 characters", "shorter --run (or --out)")
    assert list(tmp_path.iterdir()) == []


def test_impossible_setting_stops_build_before_anything_is_written(tmp_path):
    out = cli("build", "--run", tmp_path / "run", "--epochs", "-1")
    assert_user_error(out, "finetune.epochs=-1.0 must be a number > 0", "--set finetune.epochs=")
    assert not (tmp_path / "run").exists()  # refused before the data step created the run folder


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--layers", "3,9"], ["saes.layers has [9]", "hidden states 0..6"]),
        (["--set", "activations.train_layers=1,2", "--layers", "2,3"], ["saes.layers asks for hidden states [3]", "activations.train_layers=[1, 2]"]),
        (["--set", "model.max_length=1000"], ["model.max_length=1000", "(512 positions)"]),
        (["--sae-k", "5000"], ["saes.k=5000 is larger than the dictionary (1536 latents", "expansion_factor 4 x hidden size 384"]),
        (["--set", "activations.train_layers=3,6", "--layers", "3,6", "--set", "similarity.split=train"], ["similarity.split=train compares every hidden state", "use similarity.split=test"]),
    ],
)
def test_build_checks_layers_and_length_against_the_model_before_any_step(tmp_path, args, fragments):
    """Found from the embedded model's config.json before the data step, not minutes later."""
    assert_user_error(cli("build", "--run", tmp_path / "run", *args), *fragments)
    assert not (tmp_path / "run").exists()


def test_build_on_a_fine_tuned_run_checks_layers_before_redoing_activations(tmp_path, tiny_run):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    manifest = (run / "manifest.json").read_text()
    out = cli("build", "--run", run, "--from", "activations", "--set", "activations.train_layers=1", "--layers", "2")
    assert_user_error(out, "saes.layers asks for hidden states [2]", "activations.train_layers=[1]")
    assert "[activations] running" not in out.stdout and (run / "manifest.json").read_text() == manifest


def test_max_length_beyond_the_model_positions_is_refused_by_the_finetune_step(tmp_path, tiny_model, tiny_csv):
    cli("data", "--run", tmp_path / "r", "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, check=True)
    out = cli("finetune", "--run", tmp_path / "r", "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, "--set", "model.max_length=100")
    assert_user_error(out, "model.max_length=100", "(64 positions)", "model.max_length=64 or less")
    assert not (tmp_path / "r" / "finetune").exists()


def test_analyze_ranks_by_the_sentence_from_the_cli(tiny_run, capsys):
    """In-process (``main``): the rankings, not the process, are under test here."""
    from core.__main__ import main

    def analyze(*args) -> str:
        assert main(["analyze", "--run", str(tiny_run.root), "--text", "a fine film", *args]) == 0
        return capsys.readouterr().out

    result = json.loads(analyze("--rank-by", "sentence", "--top", "2", "--json"))
    assert result["ranking"] == "variance over this sentence" and all(len(e["features"]) == 2 for e in result["saes"])
    assert "(top features by variance over this sentence)" in analyze("--rank-by", "sentence")
    change = json.loads(analyze("--rank-by", "sentence-change", "--json"))
    assert change["ranking"] == "|fine-tuned − pre-trained| over this sentence" and len(change["saes"]) == len(result["saes"])
    assert all(len(f["difference"]) == len(change["tokens"]) for e in change["saes"] for f in e["features"])
    assert "values: fine-tuned − pre-trained activation)" in analyze("--rank-by", "sentence-change")
    bad = cli("analyze", "--run", tiny_run.root, "--text", "a fine film", "--rank-by", "loudest")  # argparse's own message
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--rank-by: invalid choice: 'loudest'" in bad.stderr and "'sentence'" in bad.stderr


def test_analyze_compares_sentences_given_as_several_texts(tiny_run, capsys):
    """``--text A --text B``: a JSON list, one analysis per sentence, each as core's compare mode
    (``analyze_text(..., compared=...)``, tested against a hand encode) makes it."""
    from core.__main__ import main
    from core.analysis import analyze_text, load_bundle, sentence_state

    texts = ["the plot was brilliant but the acting was dull", "a dull boring film"]
    assert main(["analyze", "--run", str(tiny_run.root), "--text", texts[0], "--text", texts[1], "--rank-by", "sentence", "--top", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    bundle = load_bundle(tiny_run)
    states = [sentence_state(bundle, t) for t in texts]
    want = [json.loads(json.dumps(analyze_text(bundle, t, top=3, rank_by="sentence", state=s, compared=states))) for t, s in zip(texts, states)]
    assert isinstance(got, list) and len(got) == 2
    assert [r["text"] for r in got] == texts
    assert got == want
    assert got[0]["ranking"] == "variance over the compared sentences"
    assert main(["analyze", "--run", str(tiny_run.root), "--text", texts[0], "--text", texts[1]]) == 0
    shown = capsys.readouterr().out
    assert shown.index("=== sentence 1 of 2 ===") < shown.index(f"text: {texts[0]}") < shown.index("=== sentence 2 of 2 ===") < shown.index(f"text: {texts[1]}")
    assert main(["analyze", "--run", str(tiny_run.root), "--text", texts[0], "--text", "  "]) == 2
    assert "error: text 2 of 2: the sentence is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("  ", "the sentence is empty"),
        ("\u200b\u200b \u2060", "the sentence has no visible characters (only invisible ones, such as zero-width spaces)"),  # read as [CLS] [SEP] alone
        ("film " * 10001, "the text has 50,005 characters; analyse at most 50,000 at a time"),
        (os.fsdecode(b"a \xff film"), "--text holds bytes that are not valid UTF-8 (a \\udcff film); pass UTF-8 text"),  # argv bytes that are not UTF-8
    ],
)
def test_analyze_refuses_text_it_cannot_read_in_one_line(tiny_run, capsys, text, message):
    from core.__main__ import main

    assert main(["analyze", "--run", str(tiny_run.root), "--text", text]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], lines


def test_a_path_or_text_that_is_not_utf8_is_refused_up_front(tiny_run, tmp_path, capsys):
    """A folder whose name holds non-UTF-8 bytes ran the report, then failed writing HTML; and
    such text reaching the analysis directly (not through the CLI) is refused there too."""
    from core.__main__ import main
    from core.analysis import load_bundle, sentence_state

    odd = tmp_path / os.fsdecode(b"run\xff")
    shutil.copytree(tiny_run.root, odd)
    assert main(["export", "--run", str(odd), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "--run holds bytes that are not valid UTF-8" in err and "rename the file or folder" in err and not (tmp_path / "r.html").exists()
    with pytest.raises(LayerscopeError, match=r"the text is not valid UTF-8 \(character 3 of 8 is a lone surrogate"):
        sentence_state(load_bundle(tiny_run), os.fsdecode(b"a \xff film"))


def test_analyze_top_below_one_and_a_closed_pipe(tiny_run):
    assert_user_error(cli("analyze", "--run", tiny_run.root, "--text", "a fine film", "--top", "0"), "top=0", "at least 1 feature")
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `python -m core report | head` once head has left
    try:
        out = subprocess.run([sys.executable, "-m", "core", "report", "--run", str(tiny_run.root), "--json"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, env=cli_env())
    finally:
        os.close(write_end)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.skipif(not shutil.which("chromium"), reason="PNG export needs Chromium (installed by scripts/setup.sh --dev)")
def test_figures_writes_pngs_and_says_when_there_is_nothing_to_draw(tmp_path, tiny_run, tiny_csv, tiny_model):
    out = cli("figures", "--run", tiny_run.root, "--out", tmp_path / "figs", check=True)
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["cka_matrix.png", "classification.png", "matching.png", "sae_training.png", "similarity.png"], out.stdout
    for name in names:
        head = (tmp_path / "figs" / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 2 * 900  # scale 2
        assert f"wrote {tmp_path / 'figs' / name}" in out.stdout
    cli("data", "--run", tmp_path / "r", "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, check=True)
    assert_user_error(cli("figures", "--run", tmp_path / "r", "--out", tmp_path / "none"), "no figures to draw yet", f"python -m core build --run {tmp_path / 'r'}")


@pytest.mark.skipif(not shutil.which("chromium"), reason="PNG export needs Chromium (installed by scripts/setup.sh --dev)")
def test_figures_blames_a_failed_write_on_the_folder_not_the_renderer(tmp_path, tiny_run, monkeypatch, capsys):
    """A PNG is rendered first and then written atomically; a write that fails (here: permission
    denied, which root cannot provoke with chmod) gets the file-system message, not 'install Chromium'."""
    import core.export
    from core.__main__ import main

    def denied(path, data):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"  # rendered before anything is written
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(core.export, "write_text", denied)
    assert main(["figures", "--run", str(tiny_run.root), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: permission denied on ") and "Chromium" not in err and "\n" not in err, err
    assert list((tmp_path / "figs").iterdir()) == []


def test_the_renderer_s_undecodable_message_log_stays_off_the_terminal(caplog):
    """kaleido's browser driver logs a Chromium message it cannot decode, with a traceback, now
    and then during a run of figures that succeeds; with no logging set up, Python prints it."""
    import logging

    from core.export import quiet_renderer_logs

    pipe = logging.getLogger("choreographer.channels.pipe")
    level = logging.getLogger("choreographer").level
    try:
        quiet_renderer_logs()
        with caplog.at_level(logging.DEBUG):
            try:
                raise ValueError("Expecting property name enclosed in double quotes")
            except ValueError:
                pipe.exception("JSONError decoding message. Ignoring")
            logging.getLogger("kaleido").error("a kaleido error still shows")
        assert [r.getMessage() for r in caplog.records] == ["a kaleido error still shows"]
    finally:
        logging.getLogger("choreographer").setLevel(level)


def test_figures_compare_with_an_empty_entry_is_not_the_working_directory(tmp_path, tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run.root)  # inside a run, "" compared the run with itself
    for empty in ("", " "):
        assert_user_error(cli("figures", "--run", tiny_run.root, "--out", tmp_path / "figs", "--compare", empty), "--compare has an empty entry", "nothing was written")
    assert not (tmp_path / "figs").exists()


@pytest.mark.skipif(not shutil.which("chromium"), reason="PNG export needs Chromium (installed by scripts/setup.sh --dev)")
def test_figures_compare_writes_its_png(tmp_path, tiny_run):
    other = tmp_path / "other"
    shutil.copytree(tiny_run.root, other)
    out = cli("figures", "--run", tiny_run.root, "--out", tmp_path / "figs", "--compare", other, check=True)
    assert (tmp_path / "figs" / "similarity_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out.stdout


def test_figures_compare_draws_each_run_beside_the_others(tmp_path, tiny_run, tiny_csv, tiny_model):
    from core.export import compare_figure
    from core.report import build_report
    from core.runfolder import RunFolder

    other = tmp_path / "other"
    shutil.copytree(tiny_run.root, other)
    sim = json.loads((other / "similarity" / "similarity.json").read_text())
    sim["layers"] = [{**r, "cka": r["cka"] / 2} for r in sim["layers"]]
    (other / "similarity" / "similarity.json").write_text(json.dumps(sim))
    fig = compare_figure(tiny_run, [RunFolder(other)])
    mine, dataset = build_report(tiny_run)["similarity"], build_report(tiny_run)["dataset"]
    lines = {(t.name, t.meta): t for t in fig.data}
    assert set(lines) == {(f"{n} ({dataset})", m) for n in (tiny_run.name, "other") for m in ("cosine_of_means", "cka")}
    assert list(lines[f"{tiny_run.name} ({dataset})", "cka"].y) == [r["cka"] for r in mine]
    assert list(lines[f"other ({dataset})", "cka"].y) == pytest.approx([r["cka"] / 2 for r in mine])
    assert list(lines[f"other ({dataset})", "cka"].x) == [r["layer"] for r in mine]  # same depth: layer numbers
    sim["layers"] = sim["layers"][:-1]  # a shallower model: both on relative depth
    sim["cka_matrix"] = [row[:-1] for row in sim["cka_matrix"][:-1]]
    (other / "similarity" / "similarity.json").write_text(json.dumps(sim))
    fig = compare_figure(tiny_run, [RunFolder(other)])
    assert fig.data[0].x[-1] == pytest.approx(1.0) and fig.data[-1].x[-1] == pytest.approx(1.0) and "depth-normalised" in fig.layout.title.text
    cli("data", "--run", tmp_path / "young", "--preset", "tiny", "--dataset", tiny_csv, "--model", tiny_model, check=True)
    assert_user_error(cli("figures", "--run", tiny_run.root, "--out", tmp_path / "f2", "--compare", tmp_path / "young"), "no similarity figures yet", f"python -m core build --run {tmp_path / 'young'} --until similarity")
    assert not (tmp_path / "f2").exists()  # refused before any file was written


def test_unreachable_model_says_how_to_pass_a_local_path(tmp_path, tiny_csv):
    cli("data", "--run", tmp_path / "r", "--dataset", tiny_csv, "--preset", "tiny", "--model", "bert-base-uncased", check=True)
    out = cli("finetune", "--run", tmp_path / "r")
    assert_user_error(out, "bert-base-uncased", "unreachable", "local folder")



def test_a_second_ctrl_c_while_the_first_unwinds_prints_no_traceback(monkeypatch, capsys):
    """A double press: the second SIGINT arrives while the command ends after the first (here in
    its last clean-up, which leaves a process group). It is ignored there, the command ends with
    its one line, and main() puts the handler back after."""
    import signal
    import sys

    import core.__main__ as cli_main
    import core.pipeline

    def interrupted(args):
        raise KeyboardInterrupt

    def second_press():
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once: Python runs handlers between bytecodes

    monkeypatch.setattr(cli_main, "_dispatch", interrupted)
    monkeypatch.setattr(core.pipeline, "end_distributed", second_press)
    assert "torch" in sys.modules  # so main() ends with end_distributed, where the second press lands
    before = signal.getsignal(signal.SIGINT)
    assert cli_main.main(["report", "--run", "somewhere"]) == 130
    assert "interrupted: the run was not changed" in capsys.readouterr().err  # a verb that only reads: no steps to speak of
    assert signal.getsignal(signal.SIGINT) is before
    assert cli_main.main(["similarity", "--run", "somewhere"]) == 130
    assert "interrupted: finished steps are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before

    # `python -m core` keeps ignoring presses after main() returns, up to its exit with status 130
    try:
        assert cli_main.main(["report", "--run", "somewhere"], restore_sigint=False) == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        second_press()  # a third press, between main() and the exit: no KeyboardInterrupt here
    finally:
        signal.signal(signal.SIGINT, before)

def test_a_hub_whose_name_does_not_resolve_is_refused_without_retrying(tmp_path, tiny_csv):
    """Not offline mode, but a hub host that cannot resolve (the ``.invalid`` domain never does):
    the same message at once, not after huggingface_hub's five retries with back-off."""
    out = cli("build", "--run", tmp_path / "r", "--dataset", tiny_csv, "--preset", "tiny", "--model", "someorg/not-cached", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"})
    assert_user_error(out, "could not load model 'someorg/not-cached'", "unreachable", "local folder")
    assert "Retrying" not in out.stderr and "Retry" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_bad_csv_on_existing_run_damages_nothing(tmp_path, tiny_run):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"review": ["x"] * 30, "label": [0, 1] * 15}).to_csv(bad, index=False)
    assert_user_error(cli("data", "--run", run, "--dataset", bad), "--force")  # settings changed
    assert_user_error(cli("data", "--run", run, "--dataset", bad, "--force"), "no column 'text'")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before




def test_one_step_with_options_that_change_a_finished_earlier_step_is_refused(tmp_path, tiny_run):
    """``features --set model.max_length=...`` would record a max_length the models and activations
    were not built with (and ``build`` would then refuse the run): refused, nothing written."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_user_error(
        cli("features", "--run", run, "--force", "--set", "model.max_length=16"),
        f"model.max_length {json.loads((run / 'manifest.json').read_text())['config']['model']['max_length']} -> 16 would change the settings this run's 'finetune' step was built with",
        f"`python -m core build --run {run} --from finetune`",
    )
    assert_user_error(cli("saes", "--run", run, "--force", "--preset", "paper"), "data.dataset", "'data' step")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    cli("features", "--run", run, "--force", "--set", "features.top_k=3", check=True)  # its own section: fine
    out = cli("build", "--run", run, check=True)
    assert out.stdout.count("already done") == 6, out.stdout
    # a run whose saved settings an older version changed that way: no option of the user's to blame
    m = json.loads((run / "manifest.json").read_text())
    m["config"]["model"]["max_length"] = 16
    (run / "manifest.json").write_text(json.dumps(m))
    assert_user_error(cli("features", "--run", run, "--force"), "this run's saved settings are not those its 'finetune' step was built with", "--from finetune")


def test_labels_that_disagree_with_the_model_are_refused_not_a_class_dropped(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    labels = json.loads((run / "data" / "labels.json").read_text())
    (run / "data" / "labels.json").write_text(json.dumps({**labels, "names": labels["names"][:1]}))
    assert_user_error(cli("analyze", "--run", run, "--text", "a film"), "labels.json names 1 classes but the fine-tuned model has 2", "build --run")
    # the features step says the same before it works (it suggested itself, `features --force`, again and again)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_user_error(cli("features", "--run", run, "--force"), "labels.json names 1 classes but the fine-tuned model has 2", "build --run")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda run: _edit_json(run / "activations/test/index.json", num_shards=0), "num_shards 0"),
        (lambda run: _edit_json(run / "activations/test/index.json", d_model=100), "not [tokens, 100] as its index.json says"),
        (lambda run: shutil.copy(run / "activations/train/pretrained_00000.safetensors", run / "activations/test/pretrained_00000.safetensors"), "it was replaced since the step wrote it"),
    ],
    ids=["no shards", "another width", "a train shard over a test one"],
)
def test_activation_files_edited_or_swapped_by_hand_are_one_line(tiny_run, tmp_path, damage, said):
    """index.json edited, or a shard of another split copied over one: the similarity step (and
    every reader of the shards) names the file and the fix instead of a torch shape error, and
    leaves the run as it was."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_user_error(cli("similarity", "--run", run, "--force"), said, f"python -m core activations --run {run} --force")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _edit_json(path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_model_config_edited_since_the_build_is_one_line_not_an_index_error(tiny_run, tmp_path):
    """The weights are unchanged (the SAEs' fingerprint check passes), but config.json now gives a
    model fewer layers than its SAEs read, or the two models different depths."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    depth = json.loads((run / "models" / "finetuned" / "config.json").read_text())["num_hidden_layers"]
    top = max(layer for _, layer, _ in tiny_run.sae_dirs())
    assert top == depth  # the tiny run has an SAE on the last layer
    for model in ("pretrained", "finetuned"):
        path = run / "models" / model / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": depth - 1}))
        if model == "pretrained":
            assert_user_error(cli("analyze", "--run", run, "--text", "a film"), f"gives the pretrained model {depth - 1} layer", f"gives the finetuned model {depth} layers", "was edited since the build")
    assert_user_error(cli("analyze", "--run", run, "--text", "a film"), f"gives the pretrained model {depth - 1} layer, but its SAE at layer {top}", "was edited since the build")

def test_an_sae_folder_gone_since_the_step_is_named_not_left_out(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    shutil.rmtree(run / "saes" / "finetuned" / "layer_1")
    fix = f"python -m core saes --run {run} --layers 1 --force"
    assert_user_error(cli("report", "--run", run), f"the saes step trained {len(tiny_run.sae_dirs())} SAEs but finetuned layer 1 is missing", fix)
    out = cli("analyze", "--run", run, "--text", "a film", "--json", check=True)  # the others are analysed, and the gap is said
    assert {(s["model"], s["layer"]) for s in json.loads(out.stdout)["saes"]} == {(m, l) for m, l, _ in tiny_run.sae_dirs()} - {("finetuned", 1)}
    assert "note: the saes step trained" in out.stderr and "finetuned layer 1 is missing" in out.stderr
    # the command offered trains that layer's SAEs again and leaves the other layers' files as they were
    others = {p: p.read_bytes() for p in (run / "saes").rglob("*") if p.is_file() and "layer_1" not in p.parts}
    assert others and cli(*fix.split()[3:], check=True)
    assert {p: p.read_bytes() for p in others} == others
    assert {(m, l) for m, l, _ in RunFolder(run).sae_dirs()} == {(m, l) for m, l, _ in tiny_run.sae_dirs()}
    assert cli("report", "--run", run).returncode == 0


# root reads every file whatever its mode: without the capabilities that let it (setpriv)
_WITHOUT_ROOTS_READ = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="running as root without setpriv: every file is readable")
@pytest.mark.parametrize(
    "unreadable, verb, fix",
    [
        ("saes/finetuned/layer_2/sae_weights.safetensors", ["analyze", "--text", "a film"], "chmod u+r"),
        ("saes/finetuned/layer_2/cfg.json", ["analyze", "--text", "a film"], "chmod u+r"),
        ("features/pretrained/layer_2/stats.safetensors", ["analyze", "--text", "a film"], "chmod u+r"),  # not a silent fallback to the sentence's ranking
        ("activations/test/finetuned_00000.safetensors", ["similarity", "--force"], "chmod u+r"),
        ("finetune/metrics.json", ["report"], "chmod u+r"),
        ("models/finetuned/model.safetensors", ["analyze", "--text", "a film"], "chmod -R u+rX"),  # transformers called it missing: "redo finetune"
        ("saes/finetuned", ["report"], "chmod -R u+rX"),  # a folder that cannot be listed looked empty: "SAEs missing, train them again"
    ],
)
def test_a_file_the_user_may_not_read_is_a_permission_to_change_not_damage(tiny_run, tmp_path, unreadable, verb, fix):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    path = run / unreadable
    assert path.exists(), sorted(p.name for p in path.parent.iterdir())
    path.chmod(0)
    prefix = _WITHOUT_ROOTS_READ if os.geteuid() == 0 else []
    out = subprocess.run([*prefix, sys.executable, "-m", "core", verb[0], "--run", str(run), *verb[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    path.chmod(0o755 if path.is_dir() else 0o644)
    assert_user_error(out, f"cannot read {'the SAE folder ' if path.is_dir() else ''}{path}: permission denied", fix)


@pytest.mark.parametrize(
    "version, said",
    [({"format_version": 99}, "written in run format 99,"), ({"format_version": "1"}, 'written with format_version "1", not a format number,'), ({}, "written with no format_version,")],
)
def test_incompatible_run_folder_from_cli(tmp_path, version, said):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**version, "config": {}, "steps": {}}))
    assert_user_error(cli("report", "--run", tmp_path / "old"), said, "rebuild")


def test_changed_settings_point_to_build_from_and_force_from_redoes_only_later_steps(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    k = json.loads((run / "manifest.json").read_text())["config"]["saes"]["k"]
    assert k != 4
    assert_user_error(
        cli("build", "--run", run, "--set", "saes.k=4"), f"step 'saes' was built with other settings than the ones asked now (saes.k {k} -> 4)", f"`python -m core build --run {run} --from saes` and the same options"
    )
    out = cli("build", "--run", run, "--force", "--from", "features", check=True)
    assert "[finetune] already done" in out.stdout and "[saes] already done" in out.stdout
    assert "[features] running" in out.stdout and "[finetune] running" not in out.stdout


def test_the_runs_own_dataset_spelt_otherwise_is_named_as_such(tiny_run, tmp_path):
    """``./x.csv`` for ``x.csv`` is a change of the data step's settings (they hold the path as
    typed): the message says it is the same file and how to pass it."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    built = json.loads((run / "manifest.json").read_text())["config"]["data"]["dataset"]
    respelt = os.path.join(os.path.dirname(built), ".", os.path.basename(built))
    assert respelt != built and Path(respelt).resolve() == Path(built).resolve()
    out = cli("build", "--run", run, "--dataset", respelt)
    assert_user_error(out, f'step \'data\' was built with other settings than the ones asked now (data.dataset "{built}" -> "{respelt}" (the same file, spelt otherwise: pass it as {built}))')
    other = tmp_path / "other.csv"
    shutil.copy(built, other)  # the same rows in another file: a change, and not called the same file
    out = cli("build", "--run", run, "--dataset", other)
    assert_user_error(out, f'(data.dataset "{built}" -> "{other}");')


def test_tqdm_disable_silences_every_progress_bar(tiny_run, tmp_path):
    """tqdm ignores TQDM_DISABLE for bars whose caller passes ``disable``, as core's do; core reads it itself."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    shown = cli("build", "--run", run, "--force", "--from", "activations", check=True).stderr
    assert "activations train: 100%" in shown and "similarity: 100%" in shown and "SAEs: 100%" in shown
    quiet = cli("build", "--run", run, "--force", "--from", "activations", env={"TQDM_DISABLE": "1"}, check=True)
    assert "%|" not in quiet.stderr, quiet.stderr
    assert "[features] running" in quiet.stdout


@pytest.mark.parametrize(
    ("err", "fragments"),
    [
        (errno.EACCES, ["permission denied on", "report.html", "change its permissions, or choose a --run (or --out) path you can read and write"]),
        (errno.ENOSPC, ["no space left on the device while writing", "free some space"]),
        (errno.EROFS, ["is on a read-only file system"]),
    ],
)
def test_file_system_errors_are_one_line_and_keep_the_old_file(tmp_path, tiny_run, monkeypatch, capsys, err, fragments):
    """A folder the user cannot write to, a full disk, a read-only mount: exit 2 with one line, old file intact."""
    from core import files
    from core.__main__ import main

    out = tmp_path / "report.html"
    out.write_text("<html><head><title>Layerscope report: an earlier one</title></head></html>")  # export may replace only a report

    def refuse(*args, dir, prefix, suffix, **kwargs):  # as mkstemp does: the error names the temporary file
        raise (PermissionError if err == errno.EACCES else OSError)(err, os.strerror(err), os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    assert main(["export", "--run", str(tiny_run.root), "--out", str(out)]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and ".tmp" not in lines[0], lines  # the file asked for, not our temporary name
    for f in fragments:
        assert f in lines[0], lines[0]
    assert out.read_text() == "<html><head><title>Layerscope report: an earlier one</title></head></html>" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_other_os_errors_still_show_their_traceback(tmp_path, tiny_run, monkeypatch):
    """Only the file-system problems a user can fix become one line; anything else is a bug to report."""
    from core import files
    from core.__main__ import main

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "x")

    monkeypatch.setattr(files.tempfile, "mkstemp", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["export", "--run", str(tiny_run.root), "--out", str(tmp_path / "r.html")])


@pytest.mark.parametrize("damaged", ["features/finetuned/layer_1/stats.safetensors", "models/finetuned/model.safetensors"])
def test_damaged_safetensors_files_are_one_line(tiny_run, tmp_path, damaged):
    """A truncated weights or statistics file: exit 2 and one line naming the damage, no traceback."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    path = run / damaged
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:5])
    out = cli("analyze", "--run", run, "--text", "a fine film")
    assert_user_error(out, "damaged")


def test_safetensors_disk_errors_get_the_file_system_hint(tiny_run, tmp_path, monkeypatch, capsys):
    """safetensors wraps a full disk in its own error type ("... (os error 28)"): same one line as OSError."""
    from safetensors import SafetensorError

    from core import activations
    from core.__main__ import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)

    def full_disk(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(activations, "save_file", full_disk)
    assert main(["activations", "--run", str(run), "--force"]) == 2
    err = capsys.readouterr().err
    lines = [l[l.index("error:") :] for l in err.splitlines() if "error:" in l]  # after the stopped bar
    assert len(lines) == 1 and "no space left on the device" in lines[0], err
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("content", ["{\"format_version\": 1, \"config\"", "[]", "{\"format_version\": 1}"])
def test_damaged_manifest_is_one_line_with_a_fix_that_works(tiny_run, tmp_path, tiny_model, tiny_csv, content, capsys):
    from core.__main__ import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    (run / "manifest.json").write_text(content)
    for verb in (["report"], ["build", "--force"]):
        assert main([*verb, "--run", str(run)]) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "manifest.json is damaged" in lines[0] and "delete that manifest.json" in lines[0], lines
    (run / "manifest.json").unlink()  # the fix the message gives
    assert main(["build", "--run", str(run), "--until", "data", "--preset", "tiny", "--dataset", str(tiny_csv), "--model", str(tiny_model), "--force"]) == 0
    assert json.loads((run / "manifest.json").read_text())["steps"].keys() == {"data"}


@pytest.mark.parametrize(
    "damaged, content, step",
    [("similarity/similarity.json", "[1, 2]", "similarity"), ("finetune/metrics.json", "", "finetune"), ("saes/pretrained/layer_1/metrics.json", '{"fvu": 0.', "saes")],
)
def test_a_damaged_json_file_names_the_step_to_redo(tiny_run, tmp_path, damaged, content, step, capsys):
    from core.__main__ import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    (run / damaged).write_text(content)
    assert main(["report", "--run", str(run)]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and str(run / damaged) in lines[0] and f"`python -m core {step} --run {run} --force`" in lines[0], lines
    if step == "similarity":  # the fix the message gives works (the quick one here)
        assert main([step, "--run", str(run), "--force"]) == 0
        capsys.readouterr()
        assert main(["report", "--run", str(run), "--json"]) == 0
        from core.report import build_report

        assert json.loads(capsys.readouterr().out)["similarity"] == build_report(tiny_run)["similarity"]


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _drop_support(d):
    d["pretrained"]["per_class"]["negative"].pop("support")
    return d


def _step_record_is_a_number(m):
    m["steps"]["data"] = 5
    return m


def _edit_result(step, edit):
    def f(m):
        m["steps"][step]["result"] = edit(m["steps"][step]["result"])
        return m

    return f


def _split_hash_is_a_number(m):
    m["steps"]["data"]["result"]["hashes"]["test"] = 5
    return m


@pytest.mark.parametrize(
    "damaged, edit, verb, problem, fix",
    [
        ("similarity/similarity.json", lambda d: {}, ["report"], "(no 'layers')", "`python -m core similarity --run {run} --force`"),
        ("similarity/similarity.json", lambda d: {**d, "layers": []}, ["report"], "('layers' holds 0 hidden states;", "`python -m core similarity --run {run} --force`"),
        ("similarity/similarity.json", lambda d: {**d, "layers": d["layers"][::-1]}, ["export", "--out", "{run}/../r.html"], "('layers' lists hidden states [2, 1, 0], not 0 to 2 in order)", "`python -m core similarity --run {run} --force`"),
        ("similarity/similarity.json", lambda d: {**d, "cka_matrix": d["cka_matrix"][:1]}, ["report", "--json"], "('cka_matrix' is not 3 x 3,", "`python -m core similarity --run {run} --force`"),
        ("data/labels.json", lambda d: {"names": "negative"}, ["analyze", "--text", "a film"], "('names' is a string, not a list)", "`python -m core data --run {run} --force`"),
        ("activations/test/index.json", _drop("num_shards"), ["similarity", "--force"], "(no 'num_shards')", "`python -m core activations --run {run} --force`"),
        ("finetune/metrics.json", _drop_support, ["export", "--out", "{run}/../r.html"], "(no 'pretrained.per_class.negative.support')", "`python -m core finetune --run {run} --force`"),
        ("saes/finetuned/layer_2/metrics.json", lambda d: {**d, "fvu": None}, ["report", "--json"], "('fvu' is null, not a number)", "`python -m core saes --run {run} --force`"),
        ("saes/finetuned/layer_2/metrics.json", lambda d: {**d, "loss_curve": {**d["loss_curve"], "step": "1, 2"}}, ["export", "--out", "{run}/../r.html"], "('loss_curve.step' is a string, not a list)", "`python -m core saes --run {run} --force`"),
        ("saes/pretrained/layer_1/metrics.json", lambda d: {**d, "rare_tokens": {**d["rare_tokens"], "token_share": "29%"}}, ["report"], "('rare_tokens.token_share' is a string, not a number)", "`python -m core saes --run {run} --force`"),
        ("saes/pretrained/layer_1/metrics.json", lambda d: {**d, "accuracy_spliced": [0.9]}, ["report"], "('accuracy_spliced' is a list, not a number)", "`python -m core saes --run {run} --force`"),
        ("saes/pretrained/layer_2/metrics.json", lambda d: {**d, "accuracy_original": "x"}, ["report"], "('accuracy_original' is a string, not a number)", "`python -m core saes --run {run} --force`"),
        ("saes/pretrained/layer_2/metrics.json", lambda d: {**d, "training": {**d["training"], "lr": "4e-3"}}, ["export", "--out", "{run}/../r.html"], "('training.lr' is a string, not a number)", "`python -m core saes --run {run} --force`"),
        ("manifest.json", _step_record_is_a_number, ["build"], "('steps.data' is a whole number, not an object)", "delete that manifest.json"),
        ("manifest.json", _split_hash_is_a_number, ["features", "--force"], "('steps.data.result.hashes.test' is a whole number, not a string)", "delete that manifest.json"),
        ("manifest.json", lambda m: {**m, "steps": {**m["steps"], "data": {**m["steps"]["data"], "seconds": "fast"}}}, ["report"], "('steps.data.seconds' is a string, not a number)", "delete that manifest.json"),
        ("manifest.json", _edit_result("features", lambda r: {**r, "matching": [{}]}), ["export", "--out", "{run}/../r.html"], "(no 'steps.features.result.matching[0].layer')", "delete that manifest.json"),
        ("manifest.json", _edit_result("activations", lambda r: {**r, "train": {"tokens": "x"}}), ["report"], "('steps.activations.result.train.tokens' is a string, not a whole number)", "delete that manifest.json"),
    ],
)
def test_a_run_file_missing_a_field_its_reader_needs_is_one_line(tiny_run, tmp_path, damaged, edit, verb, problem, fix, capsys):
    """Valid JSON that lacks a field (or holds the wrong kind of value): one line naming the file,
    the field and the step to redo, where a KeyError or TypeError came before; nothing is written."""
    from core.__main__ import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    path = run / damaged
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([verb[0], "--run", str(run), *(a.format(run=run) for a in verb[1:])]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert len(lines) == 1 and f"{path} is damaged {problem}" in lines[0] and fix.format(run=run) in lines[0], lines
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before and not (tmp_path / "r.html").exists()


def test_a_run_saved_by_another_version_names_its_manifest_and_a_fix_that_works(tiny_run, tmp_path, tiny_model, tiny_csv, capsys):
    """A manifest whose config holds an option this version lacks: the user typed none of it, so the
    message names the manifest (not a --set flag) and a rebuild with an explicit preset goes through."""
    from core.__main__ import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    m = json.loads((run / "manifest.json").read_text())
    m["config"]["saes"]["mix_shards"] = 4  # written by a version that had this option
    (run / "manifest.json").write_text(json.dumps(m))
    for verb in (["saes"], ["build"]):
        assert main([*verb, "--run", str(run)]) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, lines
        for fragment in (f"{run / 'manifest.json'} holds a setting", "unknown option 'saes.mix_shards'", "another version", f"--run {run} --preset default --force"):
            assert fragment in lines[0], lines[0]
    assert main(["build", "--run", str(run), "--until", "data", "--force", "--preset", "tiny", "--dataset", str(tiny_csv), "--model", str(tiny_model)]) == 0
    assert "mix_shards" not in json.loads((run / "manifest.json").read_text())["config"]["saes"]
    m["config"]["saes"].pop("mix_shards")
    m["config"]["model"]["max_length"] = 2  # a value it refuses, edited into the manifest: not an option typed now
    (run / "manifest.json").write_text(json.dumps(m))
    assert main(["report", "--run", str(run)]) == 0  # reading the run does not resolve its settings
    capsys.readouterr()
    assert main(["saes", "--run", str(run)]) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert "model.max_length=2 must be a number >= 4." in line and "does not accept" in line and "--set" not in line, line


def _set_max_length(value):
    def f(config):
        config["model"]["max_length"] = value

    return f


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda c: c.pop("model"), "the section model is missing"),
        (lambda c: c.update(data="x"), "option 'data' is a section"),
        (_set_max_length("x"), "option model.max_length expects an integer, got 'x'"),
        (_set_max_length(10**6), "saves model.max_length=1000000, more than the 64 positions the models read"),
    ],
)
def test_a_saved_config_edited_by_hand_is_one_line_for_the_readers_that_need_it(tiny_run, tmp_path, edit, problem, capsys):
    """``analyze`` tokenises with the saved model and data settings: a value edited into the
    manifest is named (it was a KeyError, a TypeError, or a forward pass over more positions than
    the model has). ``report`` describes the run whatever its settings, naming what it cannot."""
    from core.__main__ import main
    from core.report import build_report

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    m = json.loads((run / "manifest.json").read_text())
    edit(m["config"])
    (run / "manifest.json").write_text(json.dumps(m))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["analyze", "--run", str(run), "--text", " ".join(["a fine film"] * 40)]) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert problem in line and str(run / "manifest.json") in line and "put back the value it was built with" in line, line
    assert main(["report", "--run", str(run), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["base_model"] == ("unknown (not in the saved config)" if "model" not in m["config"] else m["config"]["model"]["base"])
    assert rep["saes"] == build_report(tiny_run)["saes"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_fine_tuning_that_diverges_is_refused_before_it_saves_a_model(tiny_run, tmp_path):
    """A learning rate that drives the weights to NaN: the step stops with one line naming the
    option, and the models already in the run are left as they were (they were accepted, and every
    later step read NaN, with report --json printing bare NaN words)."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    models = {p: p.read_bytes() for p in (run / "models").rglob("*") if p.is_file()}
    out = cli("finetune", "--run", run, "--force", "--set", "finetune.learning_rate=1e10")
    assert_user_error(out, "fine-tuning diverged", "lower finetune.learning_rate (now 1e+10, default 5e-05)")
    assert {p: p.read_bytes() for p in (run / "models").rglob("*") if p.is_file()} == models


def test_a_model_folder_without_its_tokenizer_files_is_refused_before_the_first_step(tiny_model, tiny_csv, tmp_path):
    """Without tokenizer.json / vocab.txt, transformers loads a tokenizer of the special tokens
    alone: the build went through with every word read as [UNK] and a chance-level classifier."""
    bare = tmp_path / "bare_model"
    bare.mkdir()
    for f in tiny_model.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    run = tmp_path / "run"
    out = cli("build", "--run", run, "--preset", "tiny", "--model", bare, "--dataset", tiny_csv)
    assert_user_error(out, f"'{bare}' has a tokenizer of", "tokenizer files (tokenizer.json or vocab.txt) are missing")
    assert not run.exists()  # refused before any step: no run folder left


def test_a_model_folder_without_weights_is_refused_before_a_forced_build_touches_the_run(tiny_run, tiny_model, tmp_path):
    """Its config.json and tokenizer load, so the finetune step alone found the weights missing:
    `build --force` had redone the data step and marked every later step to redo by then."""
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model, weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_user_error(cli("build", "--run", run, "--force", "--model", weightless), f"{weightless} has no weights (none of model.safetensors", "copy them into that folder")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_s_own_split_as_its_dataset_is_refused_and_the_run_kept(tiny_run, tmp_path):
    """Each rebuild would split the last train split again (240 rows, then 156, ...)."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for verb in (["data", "--force"], ["build", "--force"]):
        out = cli(*verb, "--run", run, "--dataset", run / "data" / "train.csv")
        assert_user_error(out, f"the dataset {run / 'data' / 'train.csv'} (--dataset) is a file in this run's folder", f"copy it outside {run}")
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_folder_with_another_program_s_manifest_is_not_a_run_and_its_file_is_left_alone(tmp_path):
    theirs = tmp_path / "extension"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"name": "my extension", "manifest_version": 3}')
    for verb in (["report"], ["analyze", "--text", "a film"], ["export", "--out", str(tmp_path / "r.html")], ["build", "--preset", "tiny"], ["build", "--preset", "tiny", "--force"]):
        out = cli(verb[0], "--run", theirs, *verb[1:])
        assert_user_error(out, f"{theirs} is not a Layerscope run (its manifest.json holds none of format_version, config and steps", "or a new folder")
        assert "delete" not in out.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["manifest.json"] and json.loads((theirs / "manifest.json").read_text())["manifest_version"] == 3


def test_json_output_never_holds_bare_nan():
    from core.files import json_safe

    obj = {"a": [1.0, float("nan"), {"b": float("inf"), "c": "NaN"}], "d": (2, -float("inf"))}
    assert json.loads(json.dumps(json_safe(obj), allow_nan=False)) == {"a": [1.0, None, {"b": None, "c": "NaN"}], "d": [2, None]}


def test_more_mistakes_get_one_line_and_change_nothing(tiny_run, tmp_path, monkeypatch):
    """Mistakes found by trying the CLI on a damaged copy of a run: each is one line, exit 2, and
    leaves every file as it was."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    # an empty --out for figures would have meant the working directory
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli("figures", "--run", run, "--out", ""), "--out is empty", "--out figs/")
    assert not list(tmp_path.glob("*.png"))
    # a run file replaced by a folder, a run folder replaced by a file
    sim = run / "similarity" / "similarity.json"
    sim.rename(tmp_path / "sim.json")
    sim.mkdir()
    assert_user_error(cli("report", "--run", run), f"{sim} is a folder, not the file a build writes", f"similarity --run {run} --force")
    sim.rmdir()
    (tmp_path / "sim.json").rename(sim)
    metrics = run / "finetune"
    metrics.rename(tmp_path / "finetune")
    metrics.write_text("x")
    assert_user_error(cli("report", "--run", run), "a file stands where one of its folders should be", f"finetune --run {run} --force")
    metrics.unlink()
    (tmp_path / "finetune").rename(metrics)
    # a class named twice: a prediction would merge two classes
    labels = run / "data" / "labels.json"
    kept = labels.read_text()
    names = json.loads(kept)["names"]
    labels.write_text(json.dumps({**json.loads(kept), "names": [names[0]] * len(names)}))
    assert_user_error(cli("analyze", "--run", run, "--text", "a film"), "appears more than once", f"data --run {run} --force")
    labels.write_text(kept)
    # a folder that is not a run (here a run's own subfolder): not "build a run in it"
    assert_user_error(cli("analyze", "--run", run / "saes", "--text", "a film"), "is not a Layerscope run (no manifest.json)")
    assert not (run / "saes" / "manifest.json").exists()
    # a thread count torch cannot start
    assert_user_error(cli("finetune", "--run", run, "--force", "--set", "finetune.threads=100000"), "finetune.threads=100000 must be a whole number from 0", "CPU cores")
    assert cli("report", "--run", run, check=True).returncode == 0  # nothing was marked not done
    # a per-class table with no rows still prints
    m = json.loads((metrics / "metrics.json").read_text())
    m["finetuned"]["per_class"] = {}
    (metrics / "metrics.json").write_text(json.dumps(m))
    assert "base model" in cli("report", "--run", run, check=True).stdout
    # --force in someone's folder whose file is in the way of the step's folder: their folder as it was
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data").write_text("my notes")
    assert_user_error(cli("data", "--run", theirs, "--force", "--preset", "tiny"), f"cannot create the folder {theirs / 'data'}: a file is in the way")
    assert sorted(p.name for p in theirs.iterdir()) == ["data"] and (theirs / "data").read_text() == "my notes"


def test_a_full_disk_behind_standard_output_is_named_as_the_output(tiny_run):
    out = subprocess.run(f"{shlex.quote(sys.executable)} -m core report --run {shlex.quote(str(tiny_run.root))} > /dev/full", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert_user_error(out, "could not write the output (No space left on device)", "standard output")
    assert "activations take" not in out.stderr  # not the hint for a run file


def test_a_full_disk_behind_standard_output_after_an_export_says_the_report_was_written(tiny_run, tmp_path):
    report = tmp_path / "r.html"
    out = subprocess.run(f"{shlex.quote(sys.executable)} -m core export --run {shlex.quote(str(tiny_run.root))} --out {shlex.quote(str(report))} > /dev/full", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())
    assert_user_error(out, "could not write the output (No space left on device)", f"the report was written to {report}")
    assert "activations take" not in out.stderr and "no run file was changed" not in out.stderr
    assert "<title>Layerscope report: " in report.read_text()


def test_a_test_sample_smaller_than_the_classes_is_refused(tiny_run, tmp_path):
    """One test text for two classes made every selectivity AUROC undefined, and ``--rank-by
    selectivity`` then listed features 0, 1, 2 without a word."""
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = cli("build", "--run", run, "--from", "activations", "--set", "activations.eval_examples=1")
    assert_user_error(out, "activations.eval_examples=1 is fewer than the 2 classes", "use at least 2 (default 400), or 0 for the whole test split")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"} == {p: b for p, b in before.items() if p.name != "manifest.json"}


def test_a_model_that_is_not_a_bert_family_encoder_is_refused_before_the_first_step(tmp_path, tiny_csv):
    """DistilBERT, GPT-2: refused by name before the data step, where the finetune step failed with
    "unexpected keyword argument 'attention_probs_dropout_prob'" after the data step had run."""
    from transformers import DistilBertConfig, DistilBertModel, GPT2Config, GPT2Model

    for name, model in (("distilbert", DistilBertModel(DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=37))), ("gpt2", GPT2Model(GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4)))):
        folder = tmp_path / name
        model.save_pretrained(folder)
        run = tmp_path / f"run_{name}"
        out = cli("build", "--run", run, "--preset", "tiny", "--model", folder, "--dataset", tiny_csv)
        assert_user_error(out, f"'{folder}' is a {name} model; Layerscope reads BERT-family encoders")
        assert not run.exists()
