"""Which run the session shows: the runs found under checkpoints/, the sidebar picker, ``?run=``
and ``LAYERSCOPE_RUN``, and the line of steps the selected run has finished."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import streamlit as st

from core.errors import LayerscopeError
from core.report import stale_note
from core.runfolder import STEPS, RunFolder
from pages import _background as background
from pages import _keys as keys
from pages import _shared as shared


def discover_runs(base: Path | None = None) -> list[str]:
    """Every folder under ``base`` (two levels deep) holding a manifest.json, sorted by path."""
    base = base or shared.checkpoints_dir()
    found: list[str] = []
    if not base.is_dir():
        return found
    seen: set[Path] = set()  # a run reached twice (a symlink beside its target) is listed once

    def add(folder: Path) -> bool:
        try:
            if not RunFolder(folder).exists():
                return False
            real = folder.resolve()
        except OSError:  # a folder this user may not enter: not listed (typing its path says why)
            return False
        if real not in seen:
            seen.add(real)
            found.append(str(folder))
        return True

    try:
        children = sorted(base.iterdir())
    except OSError:
        return found
    for child in children:
        if child.name.startswith(".") or add(child):
            continue
        with contextlib.suppress(OSError):
            if child.is_dir():
                for g in sorted(child.iterdir()):
                    if not g.name.startswith("."):
                        add(g)
    return found


def resolve_run_arg(text: str) -> str:
    """A run given as a path (absolute, relative to the working folder or the repo) or a name under checkpoints/."""
    text = text.strip()
    try:
        p = Path(text).expanduser()
    except RuntimeError:  # ~user of no such user: kept as typed, and opening it says what is wrong
        p = Path(text)
    for candidate in (p, shared.ROOT / p, shared.checkpoints_dir() / p):
        with contextlib.suppress(OSError, ValueError):  # a name too long, a folder we may not enter: not this one
            if candidate.is_dir():
                return str(candidate.resolve())
    return str(p)


def run_label(path: str) -> str:
    """Short name of a run: its path relative to checkpoints/ when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(shared.checkpoints_dir().resolve()))
    except ValueError:
        return p.name or str(p)


def set_run(path: str | None) -> None:
    """Select a run for this session and mirror it in the URL."""
    st.session_state[keys.KEY_RUN] = path
    st.session_state[keys.KEY_RUN_MESSAGE] = None
    if path:
        st.query_params["run"] = path
        st.session_state[keys.KEY_QUERY_RUN] = path


def init_run_selection() -> None:
    """Choose the run at session start / when ``?run=`` changes: query param, LAYERSCOPE_RUN, first run found."""
    query = st.query_params.get("run")
    if query and query != st.session_state.get(keys.KEY_QUERY_RUN):
        st.session_state[keys.KEY_QUERY_RUN] = query
        st.session_state[keys.KEY_RUN] = resolve_run_arg(query)
        return
    if keys.KEY_RUN not in st.session_state or st.session_state[keys.KEY_RUN] is None:
        if background.building(shared.default_build_target()):
            st.session_state[keys.KEY_RUN] = None
            return
        env = os.environ.get("LAYERSCOPE_RUN")
        runs = discover_runs()
        st.session_state[keys.KEY_RUN] = resolve_run_arg(env) if env else (runs[0] if runs else None)


def selected_run_path() -> str | None:
    return st.session_state.get(keys.KEY_RUN)


def current_run() -> RunFolder:
    """The selected run; raises LayerscopeError when none is selected or it cannot be read."""
    path = selected_run_path()
    if not path:
        raise LayerscopeError("no run selected; pick one in the sidebar or build one with `python -m core build --run checkpoints/default`")
    run = RunFolder(path)
    run.manifest()
    return run


def _select_from_box() -> None:
    set_run(st.session_state[keys.KEY_RUN_SELECT])


def _select_from_text() -> None:
    text = (st.session_state.get(keys.KEY_RUN_TEXT) or "").strip()
    if not text:  # the box emptied (or only spaces): the message about what it held goes with it
        st.session_state[keys.KEY_RUN_MESSAGE] = None
        st.session_state[keys.KEY_RUN_TEXT] = ""
        return
    path = resolve_run_arg(text)
    try:
        found = RunFolder(path).exists()
    except (OSError, ValueError) as e:  # a name too long, a folder we may not enter, a NUL character
        st.session_state[keys.KEY_RUN_MESSAGE] = f"{text} cannot be opened ({getattr(e, 'strerror', None) or e}); type the path of a run folder you can read"
        return
    except LayerscopeError as e:  # ~user of no such user
        st.session_state[keys.KEY_RUN_MESSAGE] = str(e)
        return
    if found:
        set_run(path)
        st.session_state[keys.KEY_RUN_TEXT] = ""
    else:
        st.session_state[keys.KEY_RUN_MESSAGE] = f"{text} is not a Layerscope run (no manifest.json there)"


def same_folder(a: str, b: str) -> bool:
    """True when the two paths reach one folder (a symlink and its target, a relative and an absolute path)."""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return a == b


def run_picker() -> None:
    """Sidebar: a select box of runs under checkpoints/ plus a text box for any other run folder."""
    runs = discover_runs()
    current = selected_run_path()
    current = next((r for r in runs if same_folder(r, current)), current) if current else current  # a symlink to a listed run
    options = runs + ([current] if current and current not in runs else [])
    with st.sidebar:
        st.subheader("Run")
        if options:
            st.session_state[keys.KEY_RUN_SELECT] = current if current in options else options[0]
            st.selectbox("Run folder", options, key=keys.KEY_RUN_SELECT, format_func=run_label, on_change=_select_from_box)
        st.text_input("Other run folder", key=keys.KEY_RUN_TEXT, placeholder="/path/to/run", on_change=_select_from_text, help="any folder built by `python -m core build`; press Enter")
        message = st.session_state.get(keys.KEY_RUN_MESSAGE)
        if message:
            st.warning(shared.safe_message(message))
        if current:
            line, stale = run_status(current)
            st.caption(line)
            if stale:
                note = stale_note(current, stale)
                st.warning(shared.safe_message(shared.as_sentence(note) + "."), icon=":material/update:")


def steps_line(path: str) -> str:
    """Which pipeline steps the run has finished, for the sidebar (see ``run_status``)."""
    return run_status(path)[0]


def run_status(path: str) -> tuple[str, list[str]]:
    """Which pipeline steps the run has finished and whether a build is at work in it now (a flock
    held by another process: a few microseconds to ask), as one line for the sidebar; and the
    steps built by an earlier version of their method. One manifest read: this runs on every rerun."""
    try:
        run = RunFolder(path)
        m = run.manifest()
        held = run.held_elsewhere()
    except (LayerscopeError, OSError):  # OSError: a folder or manifest this user may not read
        return "not a readable run", []
    done = m.get("steps", {})
    missing = [s for s in STEPS if s not in done]
    line = "Steps done: " + (", ".join(s for s in STEPS if s in done) or "none") + (f". Missing: {', '.join(missing)}" if missing else "")
    return line + (". A build is running in this run now: reload the page to see the steps it finishes" if held else ""), run.stale_steps(m)
