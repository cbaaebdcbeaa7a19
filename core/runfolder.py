"""The run folder: the only module that knows file names inside a run.

    <run>/
      manifest.json                 format version, resolved config, per-step records
      data/{train,val,test}.csv     columns id,text,label (cleaned text; id traces back to the source row)
      data/labels.json              {"names": [...]}
      models/pretrained/            save_pretrained folder: base model + freshly initialised (seeded) head
      models/finetuned/             save_pretrained folder: the fine-tuned classifier
      finetune/trainer/             the transformers Trainer's output_dir (empty: no checkpoints are saved)
      finetune/metrics.json         accuracy, macro-F1, per-class report for both models
      activations/<split>/index.json
      activations/<split>/tokens_00000.safetensors       example_ids, token_ids, positions, special
      activations/<split>/<model>_00000.safetensors      layer_0 .. layer_L  [tokens, d_model]
      similarity/similarity.json + similarity.csv + cka_matrix.csv
      saes/<model>/layer_<i>/{cfg.json, sae_weights.safetensors, metrics.json}
      features/<model>/layer_<i>/stats.safetensors      per-feature statistics, top examples, histograms
      features/matching/layer_<i>.json

Every write goes to a temporary name in the same folder and is renamed into
place, so an interrupted step never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from core.errors import LayerscopeError, user_path

FORMAT_VERSION = 1
MODELS = ("pretrained", "finetuned")
MODEL_NAMES = {"pretrained": "pre-trained", "finetuned": "fine-tuned"}  # in messages and figures
OTHER_MODEL = {"pretrained": "finetuned", "finetuned": "pretrained"}
SPLITS = ("train", "val", "test")
STEPS = ("data", "finetune", "activations", "similarity", "saes", "features")


# ---------------------------------------------------------------- atomic writes
def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any worker thread
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_read_umask()


def file_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (0666 minus the umask); mkstemp's
    temporary files are 0600, which would make a shared run folder unreadable to others."""
    return _FILE_MODE


def make_folder(path: Path) -> None:
    """``mkdir -p`` with one clear message when the path cannot be a folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LayerscopeError(f"cannot create the folder {path}: a file is in the way; pass another path") from None
    except PermissionError:
        raise LayerscopeError(f"cannot create the folder {path}: permission denied; pass a path in a folder you can write to") from None
    except FileNotFoundError as e:  # a pseudo file system such as /proc refuses new folders
        raise LayerscopeError(f"cannot create the folder {path} ({e.strerror}); pass a path on a file system you can write to") from None


def write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to a temporary sibling, then rename it over ``path``."""
    if path.is_dir():
        raise LayerscopeError(f"{path} is a folder; pass a file name to write, e.g. {path / 'report.html'}")
    if path.exists() and not path.is_file():  # renaming over a device (/dev/null) or a pipe would replace it
        raise LayerscopeError(f"{path} is not a regular file (a device, pipe or socket); pass the path of a file to write")
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError as e:  # a pseudo file system such as /proc refuses new files
        raise LayerscopeError(f"cannot create a file in {path.parent} ({e.strerror}); pass a path on a file system you can write to") from None
    try:
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


# The step that writes each top-level folder of a run (the layout below, in RunFolder).
_FOLDER_STEP = {"data": "data", "models": "finetune", "finetune": "finetune", "activations": "activations", "similarity": "similarity", "saes": "saes", "features": "features"}


def core_command(verb: str, run, *options: str) -> str:
    """``python -m core VERB --run RUN OPTIONS`` with the run path shell-quoted, so that a command
    an error message suggests can be pasted as it is (a path with spaces, quotes or ``<>``)."""
    return " ".join(["python -m core", verb, "--run", shlex.quote(str(run)), *options])


def redo_hint(path: Path, otherwise: str = "redo the step that writes it with --force (see `python -m core --help`)") -> str:
    """How to rewrite ``path``: the command that redoes the step writing it, when ``path`` lies in
    a run; ``otherwise`` when it does not."""
    path = Path(path).absolute()
    for root in path.parents:
        if (root / "manifest.json").is_file():
            step = _FOLDER_STEP.get(path.relative_to(root).parts[0])
            if step:
                return f"redo the step that writes it: `{core_command(step, root, '--force')}`"
            break
    return otherwise


def refuse_unreadable(path: Path, error: type[LayerscopeError] = LayerscopeError) -> None:
    """``error`` when ``path`` is there but this user may not read it: a permission to change,
    not a damaged file to rebuild (which is what the reader's own error would suggest)."""
    if Path(path).exists() and not os.access(path, os.R_OK):
        raise error(f"cannot read {path}: permission denied; give your user read access to it (e.g. chmod u+r), or run as its owner")


def read_json(path: Path, fields: dict | None = None) -> dict:
    """A JSON object a step wrote; LayerscopeError naming the step to redo when it is missing,
    damaged, or lacks one of ``fields`` (a shape such as ``LABELS_FIELDS``, see ``field_problem``)."""
    refuse_unreadable(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerscopeError(f"{path} is missing; {redo_hint(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LayerscopeError(f"{path} is not valid JSON (damaged?); {redo_hint(path)}") from None
    if not isinstance(obj, dict):
        raise LayerscopeError(f"{path} is damaged (a JSON {type(obj).__name__}, not the object a build writes); {redo_hint(path)}")
    problem = field_problem(obj, fields or {})
    if problem:
        raise LayerscopeError(f"{path} is damaged ({problem}); {redo_hint(path)}")
    return obj



def read_similarity(path: Path) -> dict:
    """similarity.json (``SIMILARITY_FIELDS``), also checked for what the shapes cannot say: every
    hidden state 0..L in order, at least the embedding output and one layer, and an
    (L+1) x (L+1) CKA matrix; LayerscopeError naming the step to redo otherwise."""
    sim = read_json(path, SIMILARITY_FIELDS)
    layers = [r["layer"] for r in sim["layers"]]
    n = len(layers)
    problem = None
    if n < 2:
        problem = f"'layers' holds {n} hidden state{'s' * (n != 1)}; a model has at least two (the embedding output and one layer)"
    elif layers != list(range(n)):
        problem = f"'layers' lists hidden states {layers}, not 0 to {n - 1} in order"
    elif len(sim["cka_matrix"]) != n or any(len(row) != n for row in sim["cka_matrix"]):
        problem = f"'cka_matrix' is not {n} x {n}, one row and column per hidden state"
    if problem:
        raise LayerscopeError(f"{path} is damaged ({problem}); {redo_hint(path)}")
    return sim

# ---------------------------------------------------------------- what the run's JSON files hold
# The fields a reader relies on, so that a file edited by hand or written by another program gets
# one message naming it instead of a KeyError deep inside a reader. A shape maps a key to a type
# (or a tuple of types), to a nested shape, to ``(shape, type(None))`` for such an object or null,
# or to ``[item]`` for a list whose items all match ``item``; a key ending in "?" may be absent,
# and the key "*" stands for every key of a mapping.
# Writers may add fields; readers ``.get`` the rest.
NUMBER = (int, float)  # JSON numbers, NaN included (Python's json writes and reads it)
LABELS_FIELDS = {"names": [str]}
CLASS_SCORES = {"precision": NUMBER, "recall": NUMBER, "f1-score": NUMBER, "support": NUMBER}
CLASSIFIER_METRICS = {"accuracy": NUMBER, "macro_f1": NUMBER, "per_class": {"*": CLASS_SCORES}}
FINETUNE_METRICS_FIELDS = {"pretrained": CLASSIFIER_METRICS, "finetuned": CLASSIFIER_METRICS, "test_examples": int, "train_examples": int, "train_seconds": NUMBER}
ACTIVATION_INDEX_FIELDS = {"num_shards": int, "num_tokens": int, "num_examples": int, "num_hidden_states": int, "d_model": int, "layers?": [int]}
SIMILARITY_FIELDS = {
    "layers": [{"layer": int, "cosine_of_means": NUMBER, "mean_cosine": NUMBER, "token_cosine": NUMBER, "cka": NUMBER}],
    "cka_matrix": [[NUMBER]],
    "num_tokens": int,
}
SAE_METRICS_FIELDS = {
    "model": str, "layer": int, "architecture": str, "d_sae": int,
    "l0": NUMBER, "fvu": NUMBER, "mse": NUMBER, "dead_fraction": NUMBER, "dense_fraction": NUMBER,
    "accuracy_spliced?": NUMBER, "kl_spliced?": NUMBER, "fvu_on_finetuned?": NUMBER,
    "rare_tokens?": ({"token_share": NUMBER, "error_share": NUMBER, "fvu": NUMBER, "fvu_rest": NUMBER}, type(None)),
    "training?": {}, "loss_curve?": {"step": [NUMBER], "mse": [NUMBER], "l0": [NUMBER]},
}
NO_SIMILARITY = -2.0  # matching files: a feature whose partner similarity is NaN (JSON has no NaN; cosines are >= -1)


def match_similarity(value: float) -> float | None:
    """A similarity as a matching file stores it; None for ``NO_SIMILARITY``."""
    return None if value < -1 else value


MATCHING_FIELDS = {
    "layer": int, "kept": NUMBER, "shifted": NUMBER, "new": NUMBER, "lost": NUMBER, "counts": {},
    **{f"{what}_of_{model}": [kind] for what, kind in (("partner", int), ("similarity", NUMBER), ("status", str)) for model in MODELS},
}
# manifest.json: the resolved config and one record per finished step (its "result" is what the
# step's entry function returned; the report reads those of data, activations and features).
_STEP_RECORD = {"finished": str, "seconds?": NUMBER, "peak_rss_mb?": NUMBER, "result": {}}
_MATCHING_SUMMARY = {  # one layer of the features step's matching (report "matching", the overview's bars)
    "layer": int, "kept": NUMBER, "shifted": NUMBER, "new": NUMBER, "lost": NUMBER, "counts": {"*": int},
    "kept_threshold": NUMBER, "shifted_threshold": NUMBER, **{f"baseline_{k}?": NUMBER for k in ("kept", "shifted", "new", "lost")},
}
MANIFEST_FIELDS = {
    "config": {},
    "steps?": {
        "data?": {**_STEP_RECORD, "result": {"labels": [str], "rows": {"*": int}, "hashes?": {"*": str}}},
        "activations?": {**_STEP_RECORD, "result": {"*": {"tokens": int, "examples": int}}},
        "features?": {**_STEP_RECORD, "result": {"matching?": [_MATCHING_SUMMARY]}},
        **{f"{step}?": _STEP_RECORD for step in ("finetune", "similarity", "saes")},
    },
}


def field_problem(obj, fields: dict, where: str = "") -> str | None:
    """The first way ``obj`` (a dict) departs from the shape ``fields``, e.g. "no 'names'" or
    "'layers[3].cka' is a string, not a number"; None when it fits."""
    for key, spec in fields.items():
        if key == "*":  # every value of a mapping with free keys, e.g. one entry per class name
            for k, v in obj.items():
                problem = _value_problem(v, spec, f"{where}.{k}" if where else k)
                if problem:
                    return problem
            continue
        optional = key.endswith("?")
        key = key.rstrip("?")
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if optional:
                continue
            return f"no '{name}'"
        problem = _value_problem(obj[key], spec, name)
        if problem:
            return problem
    return None


def _value_problem(value, spec, name: str) -> str | None:
    if isinstance(spec, tuple) and isinstance(spec[0], dict):  # (shape, type(None)): that object, or null
        if value is None:
            return None
        spec = spec[0]
    if isinstance(spec, dict):
        return f"'{name}' is {_kind(value)}, not an object" if not isinstance(value, dict) else field_problem(value, spec, name)
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"'{name}' is {_kind(value)}, not a list"
        if isinstance(spec[0], (type, tuple)) and all(type(v) in _types(spec[0]) for v in value):
            return None  # a list of plain values that fits (a matching file holds six of d_sae each)
        for i, item in enumerate(value):
            problem = _value_problem(item, spec[0], f"{name}[{i}]")
            if problem:
                return problem
        return None
    if type(value) not in _types(spec):  # exact types: True is an int to isinstance
        wanted = "a number" if spec == NUMBER else " or ".join(_WORDS[t] for t in _types(spec))
        return f"'{name}' is {_kind(value)}, not {wanted}"
    return None


def _types(spec) -> tuple:
    return spec if isinstance(spec, tuple) else (spec,)


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "an object", list: "a list", type(None): "null"}


def _kind(value) -> str:
    """What a JSON value is, in words: "a string", "null"."""
    return _WORDS.get(type(value), type(value).__name__)


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary sibling path (file or folder); on success it replaces ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    _remove(tmp)
    try:
        yield tmp
        _plain_modes(tmp)
        old = final.parent / f".{final.name}.{os.getpid()}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _plain_modes(p: Path) -> None:
    """Give every file under ``p`` the mode a plain ``open()`` would: safetensors (our shards and
    statistics, and transformers' ``save_pretrained``) writes its files 0600, which would make a
    shared run folder unreadable to the rest of a team."""
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()] if p.is_dir() else []
    for f in files:
        if f.stat().st_mode & 0o777 != file_mode():
            os.chmod(f, file_mode())


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


# ---------------------------------------------------------------- the run folder
# Names of files that steps write inside a folder they fill atomically (a temporary folder renamed
# into place), so they need the bare name rather than a RunFolder path.
MANIFEST_FILE = "manifest.json"
SIMILARITY_JSON, SIMILARITY_CSV, CKA_CSV = "similarity.json", "similarity.csv", "cka_matrix.csv"
SAE_CFG_FILE, SAE_WEIGHTS_FILE, SAE_METRICS_FILE = "cfg.json", "sae_weights.safetensors", "metrics.json"  # the SAELens layout, + metrics
FEATURE_STATS_FILE = "stats.safetensors"


class RunFolder:
    """Paths and manifest of one run. Creating the object touches nothing on disk."""

    def __init__(self, root: str | Path):
        self.root = user_path(root)

    def refuse_file(self) -> None:
        """LayerscopeError when the path is a file: every verb needs a folder there (or nothing yet)."""
        if self.root.exists() and not self.root.is_dir():
            raise LayerscopeError(f"{self.root} is a file, not a run folder; pass a folder (a new one, or one built by `python -m core build`)")

    def __eq__(self, other) -> bool:
        return isinstance(other, RunFolder) and self.root.resolve() == other.root.resolve()

    def __hash__(self) -> int:
        return hash(str(self.root.resolve()))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- paths ----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def split_csv(self, split: str) -> Path:
        return self.root / "data" / f"{split}.csv"

    @property
    def labels_path(self) -> Path:
        return self.root / "data" / "labels.json"

    def model_dir(self, model: str) -> Path:
        assert model in MODELS, model
        return self.root / "models" / model

    def model_config_path(self, model: str) -> Path:
        return self.model_dir(model) / "config.json"  # written by save_pretrained

    @property
    def finetune_metrics_path(self) -> Path:
        return self.root / "finetune" / "metrics.json"

    @property
    def trainer_dir(self) -> Path:
        return self.root / "finetune" / "trainer"

    def activations_root(self) -> Path:
        return self.root / "activations"

    def activations_dir(self, split: str) -> Path:
        return self.activations_root() / split

    def activation_index(self, split: str) -> Path:
        return self.activations_dir(split) / "index.json"

    def token_shard(self, split: str, i: int) -> Path:
        return self.activations_dir(split) / f"tokens_{i:05d}.safetensors"

    def hidden_shard(self, split: str, model: str, i: int) -> Path:
        return self.activations_dir(split) / f"{model}_{i:05d}.safetensors"

    @property
    def similarity_dir(self) -> Path:
        return self.root / "similarity"

    @property
    def similarity_json(self) -> Path:
        return self.similarity_dir / SIMILARITY_JSON

    def sae_dir(self, model: str, layer: int) -> Path:
        return self.root / "saes" / model / f"layer_{layer}"

    def sae_metrics_path(self, model: str, layer: int) -> Path:
        return self.sae_dir(model, layer) / SAE_METRICS_FILE

    def sae_dirs(self) -> list[tuple[str, int, Path]]:
        """Every trained SAE as (model, layer, folder), in a stable order."""
        out = []
        for model in MODELS:
            base = self.root / "saes" / model
            if base.is_dir():
                for d in base.glob("layer_*"):
                    if (d / SAE_CFG_FILE).is_file() and d.name[6:].isdigit():
                        out.append((model, int(d.name[6:]), d))
        return sorted(out, key=lambda t: (MODELS.index(t[0]), t[1]))

    def features_dir(self, model: str, layer: int) -> Path:
        return self.root / "features" / model / f"layer_{layer}"

    def feature_stats_path(self, model: str, layer: int) -> Path:
        return self.features_dir(model, layer) / FEATURE_STATS_FILE

    def matching_path(self, layer: int) -> Path:
        return self.root / "features" / "matching" / f"layer_{layer}.json"

    def stamp(self) -> int:
        """A number that changes whenever a file a reader of the run uses changes (appears, goes,
        or gets a new size, modification time or status change time, as a chmod gives): every file
        except the activation shards and the Trainer's output folder, which only the steps read,
        and hidden files (the temporary names of writes in progress, an editor's swap file).
        Caches keyed by it see a step's rewrite and a file edited, damaged or made readable by hand
        alike. 0 when the folder cannot be read."""
        skip = {self.activations_root(), self.trainer_dir}
        seen = []
        for folder, subfolders, files in os.walk(self.root):  # ~70 files in a run: about 0.5 ms
            subfolders[:] = sorted(d for d in subfolders if Path(folder, d) not in skip and not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                with contextlib.suppress(OSError):  # gone meanwhile
                    st = os.stat(os.path.join(folder, name))
                    seen.append(f"{folder}/{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        digest = hashlib.blake2b("\n".join(seen).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") if seen else 0

    # -- one writer at a time -----------------------------------------------------
    @contextlib.contextmanager
    def writing(self):
        """Hold the run folder for this process while it builds or runs a step: a second process
        that tries (another terminal, a second dashboard) gets a LayerscopeError instead of
        interleaving its steps and losing the first one's manifest records. The lock is flock(2) on
        the folder itself, so no lock file is left behind and it ends with the process, however it
        ends; where the file system cannot lock (some network mounts), the work goes on unlocked.
        A folder made here and still empty at the end (a refused first step) is removed again, by
        the process that held it only, and only while it is the very folder it held."""
        self.refuse_file()
        made = [p for p in (self.root, *self.root.parents) if not p.exists()]  # deepest first
        make_folder(self.root)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                made = []  # the holder's folder, not ours to tidy
                raise LayerscopeError(
                    f"another process is building in {self.root} (a build or a step started elsewhere); "
                    "wait for it to finish, or pass another --run folder (nothing was changed)"
                ) from None
            except OSError:
                pass  # this file system has no locks
            yield self
        finally:
            held = os.fstat(fd)
            os.close(fd)
            with contextlib.suppress(OSError):
                now = os.stat(self.root)
                if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                    made = []  # removed and made again meanwhile (a refused first step's clean-up): another process's
            for p in made:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only succeeds when empty

    def held_elsewhere(self) -> bool:
        """True while another process holds this folder through ``writing`` (a build running)."""
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return False  # no folder (yet), or one we cannot open: nobody builds in it from here
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False  # free (closing the descriptor lets go again)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    # -- manifest ---------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        try:
            self.refuse_file()
            is_dir = self.root.is_dir()
        except OSError as e:  # a name too long, a parent folder we may not enter
            raise LayerscopeError(f"cannot open the run folder {self.root} ({e.strerror}); pass a run folder you can read") from None
        if not is_dir:
            raise LayerscopeError(f"run folder {self.root} does not exist; build it with `{core_command('build', self.root)}`")
        if not self.manifest_path.is_file():
            raise LayerscopeError(
                f"{self.root} is not a Layerscope run (no manifest.json); pass a run folder built by "
                f"`python -m core build`, or build one there"
            )
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            m = None
        problem = "not the JSON object a build writes" if not isinstance(m, dict) else field_problem(m, MANIFEST_FIELDS)
        if problem:
            raise LayerscopeError(
                f"{self.manifest_path} is damaged ({problem}); build the run again into a new "
                f"folder (`python -m core build --run NEW_DIR`), or delete that manifest.json and run `{core_command('build', self.root, '--force')}` to redo every step in place"
            )
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            if "format_version" not in m:
                written = "with no format_version"
            elif isinstance(version, int) and not isinstance(version, bool):
                written = f"in run format {version}"
            else:  # "1", 1.0, null: no format number, whatever it looks like
                written = f"with format_version {json.dumps(version)}, not a format number"
            raise LayerscopeError(
                f"run {self.root} was written {written}, this Layerscope reads format {FORMAT_VERSION}; "
                f"rebuild it into a new folder with `python -m core build --run NEW_DIR` (the old folder is left untouched)"
            )
        return m

    def write_manifest(self, m: dict) -> None:
        write_json(self.manifest_path, m)

    def init_manifest(self, config: dict, versions: dict, over_files: bool = False) -> dict:
        """Start a new run (``over_files``: even in a folder that holds files, e.g. a run whose
        damaged manifest.json was deleted; files of the same names are replaced)."""
        m = {
            "format_version": FORMAT_VERSION,
            "created": now(),
            "config": config,
            "packages": versions,
            "steps": {},
        }
        self.refuse_file()
        if not over_files and self.root.is_dir() and any(self.root.iterdir()):  # a new run must not write over someone's files
            raise LayerscopeError(
                f"{self.root} holds files but no manifest.json, so it is not a Layerscope run; pass a new or empty "
                "folder for a new run, or add --force to build one there, replacing files of the same names (nothing was changed)"
            )
        make_folder(self.root)
        self.write_manifest(m)
        return m

    def step_record(self, step: str) -> dict | None:
        if not self.exists():
            return None
        return self.manifest().get("steps", {}).get(step)

    def is_done(self, step: str) -> bool:
        return self.step_record(step) is not None

    def require(self, step: str, for_step: str) -> None:
        """Raise a clear error when ``step`` has not run yet; ``for_step`` is the step (or the
        command or reader, e.g. "the feature browser") that needs it."""
        self.refuse_file()
        if not self.exists() or not self.is_done(step):
            who = f"step '{for_step}'" if for_step in STEPS else for_step
            raise LayerscopeError(
                f"{who} needs step '{step}', which has not run in {self.root}; "
                f"run `{core_command('build', self.root, '--until', step)}` first"
            )

    def forget_steps(self, step: str) -> None:
        """Mark ``step`` and every later step not done (before a forced redo: if it stops half-way,
        the manifest must not vouch for a mix of old and new files)."""
        m = self.manifest()
        steps = m.get("steps", {})
        gone = [s for s in STEPS[STEPS.index(step) :] if s in steps]
        if gone:
            for s in gone:
                del steps[s]
            self.write_manifest(m)

    def record_step(self, step: str, record: dict) -> None:
        """Mark a step done, and forget every later step (their inputs just changed)."""
        m = self.manifest()
        steps = m.setdefault("steps", {})
        later = STEPS[STEPS.index(step) + 1 :] if step in STEPS else ()
        for s in later:
            steps.pop(s, None)
        steps[step] = {"finished": now(), **record}
        self.write_manifest(m)

    def labels(self) -> list[str]:
        return read_json(self.labels_path, LABELS_FIELDS)["names"]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
