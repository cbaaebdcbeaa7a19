"""The build the start page runs in the background (``python -m core build`` in a subprocess)
when no run exists yet, and its progress read back from the build's log.

Environment: ``LAYERSCOPE_BUILD_ARGS`` adds options to that build (e.g. ``--preset tiny``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import streamlit as st

from core.runfolder import STEPS, RunFolder
from pages import _shared as shared


STEP_LINE = re.compile(r"^\[(\w+)\]\s+(running|finished|already done)")
PERCENT = re.compile(r"(\d{1,3})%\|")


def parse_build_log(text: str) -> dict:
    """Progress of ``python -m core build`` from its output: steps done, step running, tqdm percent.

    ``fraction`` counts finished steps plus the running step's last tqdm percentage.
    """
    done: list[str] = []
    current, percent, error = None, None, None
    for line in re.split(r"[\r\n]+", text):
        line = line.strip()
        m = STEP_LINE.match(line)
        if m:
            step, what = m.groups()
            if what == "running":
                current, percent = step, None
            else:
                if step not in done:
                    done.append(step)
                if current == step:
                    current, percent = None, None
            continue
        if line.startswith("error:"):
            error = line[len("error:") :].strip()
        p = PERCENT.findall(line)
        if p and current:
            percent = min(100, int(p[-1]))
    partial = (percent or 0) / 100 if current else 0.0
    fraction = min(1.0, (len(done) + partial) / len(STEPS))
    return {"done": done, "current": current, "percent": percent, "fraction": fraction, "error": error}


def build_command(target: Path) -> list[str]:
    extra = shlex.split(os.environ.get("LAYERSCOPE_BUILD_ARGS", ""))
    return [sys.executable, "-m", "core", "build", "--run", str(target), *extra]


def build_log_path(target: Path) -> Path:
    """The build's log sits next to the run folder (in its parent), not inside it."""
    return target.parent / f"build-{target.name}.log"


@st.cache_resource(show_spinner=False)
def _builds() -> dict:
    """Background builds of this server, by run path: {"process", "log"}."""
    return {}


def start_build(target: Path) -> None:
    """Start ``python -m core build --run target`` in the background (one at a time per target)."""
    builds = _builds()
    running = builds.get(str(target))
    if running and running["process"].poll() is None or RunFolder(target).held_elsewhere():
        return  # building already, here or in another process (whose log this must not truncate)
    log = build_log_path(target)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("TQDM_DISABLE", None)  # the page's progress bar reads the build's tqdm bars from the log
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(build_command(target), cwd=shared.ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    builds[str(target)] = {"process": process, "log": log}


def build_state(target: Path) -> dict | None:
    """None when no build of ``target`` was started by this server, else its parsed progress plus
    ``running`` (bool), ``returncode`` and ``log_tail``."""
    entry = _builds().get(str(target))
    if entry is None:
        return None
    try:
        text = entry["log"].read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    state = parse_build_log(text)
    code = entry["process"].poll()
    tail = "\n".join(l for l in re.split(r"[\r\n]+", text)[-15:])
    return {**state, "running": code is None, "returncode": code, "log_tail": tail, "log": str(entry["log"])}


def building(target: Path) -> bool:
    """True while this server runs a build of ``target``."""
    entry = _builds().get(str(target))
    return entry is not None and entry["process"].poll() is None


def forget_build(target: Path) -> None:
    _builds().pop(str(target), None)
