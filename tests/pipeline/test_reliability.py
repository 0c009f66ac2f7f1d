"""Nothing lost, nothing wrongly trusted: jobs run this checkout's code, W&B without network, crash recovery,
validation before any job, bad data rows and damaged cache shards (issue 20)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_API_KEY")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def test_a_job_imports_the_checkouts_own_src(tmp_path):
    """A second clone's job runs the second clone's `src/`, not whichever `vtc` the environment has installed."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, clone / name)
    for name in ("workflow", "src", "envs"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["shapes"] = {"test": 4}
    (clone / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(SNAKEMAKE), "-s", "Snakefile", "--cores", "1", "resources/shapes/test.parquet"],
        cwd=clone, capture_output=True, text=True, env=clean_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (clone / "logs" / "generate_shapes" / "test.log").read_text()
    assert f"vtc: {clone / 'src' / 'vtc' / '__init__.py'}" in log, log
