"""Multi-process extraction: two processes under torchrun write the same shards as one process.

``core.activations`` plans every shard before extracting and gives process r the shards
r, r + world_size, ...; this checks the files against a single-process run of the same step
on the same tiny run (fp32 compute and storage in the tiny settings, one thread per process
in both runs so the matmuls reduce in the same order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.config import load_config
from core.pipeline import build
from core.runfolder import RunFolder
from tests.conftest import ROOT, tiny_overrides


def _env(tmp: Path) -> dict:
    # TMPDIR: torchrun leaves a torchelastic_* log folder in the temporary directory
    return {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def _run(cmd: list[str], tmp: Path) -> None:
    out = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_torchrun_extraction_equals_single_process(tmp_path, tiny_model, tiny_csv):
    cfg = load_config(preset="tiny", overrides=tiny_overrides(tiny_model, tiny_csv))
    single = RunFolder(tmp_path / "single")
    build(single, cfg, until="finetune", log=lambda *_: None)
    multi = RunFolder(tmp_path / "multi")
    shutil.copytree(single.root, multi.root)

    _run([sys.executable, "-m", "core", "activations", "--run", str(single.root)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "core", "--", "activations", "--run", str(multi.root)], tmp_path)

    assert multi.is_done("activations")
    for split in ("train", "test"):
        a, b = single.activations_dir(split), multi.activations_dir(split)
        index_a, index_b = (json.loads((d / "index.json").read_text()) for d in (a, b))
        index_a.pop("seconds"), index_b.pop("seconds")
        assert index_a == index_b
        assert index_a["num_shards"] >= 3, "the tiny settings should give several shards to share out"
        files = sorted(p.name for p in a.glob("*.safetensors"))
        assert files == sorted(p.name for p in b.glob("*.safetensors"))
        assert len(files) == 3 * index_a["num_shards"]  # tokens + one file per model
        for name in files:
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, (name, key)
                assert torch.equal(ta[key], tb[key]), f"{split}/{name}:{key} differs"
