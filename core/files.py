"""Files written whole or not at all, and JSON checked against a shape before it is trusted.

* ``write_text`` / ``write_json`` write to a temporary sibling and rename it over the target;
  ``atomic_path`` does the same for a file or folder another library writes (safetensors,
  ``save_pretrained``). An interrupted step never leaves a half-written file, and every file gets
  the mode a plain ``open()`` would give, so a run folder can be shared.
* ``field_problem`` says, in words, how a JSON object departs from a *shape*: a dict mapping a
  key to a type (or a tuple of types), to a nested shape, to ``(shape, type(None))`` for such an
  object or null, or to ``[item]`` for a list whose items all match ``item``; a key ending in "?"
  may be absent, and the key "*" stands for every key of a mapping. The shapes of a run's files
  are in ``core.runfolder``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import LayerscopeError


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
    except OSError as e:  # permission, a full disk...: named by the file asked for, not our temporary name
        raise type(e)(e.errno, e.strerror, str(path)) from None
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


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None: ``json.dumps`` would write them
    as the bare words NaN and Infinity, which JSON readers refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def refuse_unreadable(path: Path, error: type[LayerscopeError] = LayerscopeError) -> None:
    """``error`` when ``path`` is there but this user may not read it: a permission to change,
    not a damaged file to rebuild (which is what the reader's own error would suggest)."""
    if Path(path).exists() and not os.access(path, os.R_OK):
        raise error(f"cannot read {path}: permission denied; give your user read access to it (e.g. chmod u+r), or run as its owner")


NUMBER = (int, float)  # JSON numbers, NaN included (Python's json writes and reads it)


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
    make_folder(final.parent)  # a file in the way is one clear message, not a traceback
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
