"""scripts/setup.sh: refuses up front when the disk cannot hold the packages, and is a no-op when
everything is installed. Run on a copy of the scripts with a stand-in `df` on PATH, so nothing is
installed and the real disk does not matter."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

REQUIREMENTS = ["requirements.txt", "requirements-data.txt"]


def _copy_project(dst, free_mb: int):
    """The files setup.sh reads, plus a `df` that reports `free_mb` MB free (POSIX -P -m format)."""
    (dst / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", dst / "scripts" / "setup.sh")
    for name in REQUIREMENTS:
        shutil.copy(ROOT / name, dst / name)
    bin_dir = dst / "fakebin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text(
        "#!/bin/sh\n"
        "echo 'Filesystem 1048576-blocks Used Available Capacity Mounted on'\n"
        f"echo '/dev/x 100000 {100000 - free_mb} {free_mb} 99% /'\n"
    )
    df.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(dst)}


def _run(cwd, env):
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="setup.sh insists on Python 3.11")
def test_setup_refuses_a_full_disk_before_creating_anything(tmp_path):
    env = _copy_project(tmp_path, free_mb=1100)
    done = _run(tmp_path, env)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert message.count("\n") == 0, message  # one line
    assert "needs about 3000 MB free" in message and "only 1100 MB are free" in message
    assert "Traceback" not in message and "No space left" not in message
    assert not (tmp_path / ".venv").exists()  # refused before the venv was made


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="setup.sh insists on Python 3.11")
def test_setup_does_nothing_when_up_to_date_even_on_a_full_disk(tmp_path):
    env = _copy_project(tmp_path, free_mb=10)
    # The stamp setup.sh writes after a successful install, computed here independently.
    digest = hashlib.sha256(b"".join((tmp_path / f).read_bytes() for f in REQUIREMENTS + ["scripts/setup.sh"]))
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    (tmp_path / ".venv" / ".layerscope-setup").write_text(f"{digest.hexdigest()[:16]} {' '.join(REQUIREMENTS)}\n")
    done = _run(tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="setup.sh insists on Python 3.11")
@pytest.mark.parametrize("stamp, need", [("0123456789abcdef requirements.txt\n", 500), (None, 3000)])
def test_setup_asks_less_space_only_to_update_a_venv_that_was_set_up(tmp_path, stamp, need):
    """A .venv with an outdated stamp (requirements changed since) needs little; one without a
    stamp (an install that died half-way) still needs the whole install."""
    env = _copy_project(tmp_path, free_mb=200)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    if stamp:
        (tmp_path / ".venv" / ".layerscope-setup").write_text(stamp)
    done = _run(tmp_path, env)
    assert done.returncode == 2
    assert f"needs about {need} MB free" in done.stderr and "only 200 MB are free" in done.stderr
