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


def closed_port() -> int:
    """A localhost port nothing listens on: a W&B server there refuses at once, as a machine without network."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_KEY = "f4ke" * 10


def no_network_env() -> dict:
    return clean_env(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", WANDB_MODE="")


def assert_key_nowhere(*places: Path, text: str = "") -> None:
    assert FAKE_KEY not in text
    for place in places:
        for path in place.rglob("*"):
            if path.is_file():
                assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_wandb_without_network_falls_back_offline_within_the_configured_wait(tmp_path):
    """With a key set and no server, `auto` tries online, gives up after `init_timeout` and finishes offline
    under the same run id (the failed init used to hold it: "run ID ... is in use")."""
    script = (
        "import json, sys, time\n"
        "from vtc.tracking import wandb_run\n"
        "start = time.time()\n"
        f"settings = {{'mode': 'auto', 'group': 'g', 'dir': {str(tmp_path / 'wandb')!r}, 'init_timeout': 2}}\n"
        "with wandb_run(settings, job_type='evaluate', name='n', config={'a': 1}) as run:\n"
        "    run.log({'accuracy': 0.5})\n"
        "    print(json.dumps({'id': run.id, 'offline': run.settings._offline, 'seconds': time.time() - start}))\n"
    )
    env = {**no_network_env(), "PYTHONPATH": str(REPO / "src")}
    env.pop("WANDB_MODE")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["offline"] and report["seconds"] < 30, report
    assert "logging offline instead" in result.stderr
    assert list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{report['id']}/run-{report['id']}.wandb"))
    assert_key_nowhere(tmp_path, text=result.stdout + result.stderr)
