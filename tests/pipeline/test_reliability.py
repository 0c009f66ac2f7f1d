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
    env = clean_env(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    del env["WANDB_MODE"]
    return env


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
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["offline"] and report["seconds"] < 30, report
    assert "logging offline instead" in result.stderr
    assert list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{report['id']}/run-{report['id']}.wandb"))
    assert_key_nowhere(tmp_path, text=result.stdout + result.stderr)


def small_study(workdir: Path, model_dir: Path, **overrides) -> Path:
    """A study of a few minutes' CPU: 8 questions, the tiny model, two methods at one budget."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"] = {"tiny": {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
    config["shapes"] = {"test": 8}
    config["methods"] = {"full": {}, "pool": {}}
    config["budgets"] = [16]
    config["efficiency"] = {"measure": False}
    config["wandb"] = {"mode": "auto", "init_timeout": 2}
    config.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]


def run_snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_cmd(workdir, *args), capture_output=True, text=True, env=env or clean_env(), timeout=900
    )


def results_without_timings(workdir: Path):
    import polars as pl

    table = pl.read_parquet(workdir / "results/tables/shapes-demo/results.parquet")
    timing = [c for c in table.columns if "seconds" in c or c.endswith("_ms") or c.startswith("measured")]
    table = table.drop(timing).filter(~pl.col("metric").str.contains("seconds|_ms|per_second|measured"))
    return table.sort(table.columns)


def recovery_commands() -> list[list[str]]:
    """The commands the README's "Reruns" paragraph tells a user to type after a crash, in order."""
    import shlex

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Reruns.**") :]
    block = section[section.index("```sh\n") + 6 : section.index("```\n", section.index("```sh\n") + 6)]
    commands = [shlex.split(line.split("#")[0])[1:] for line in block.splitlines() if line.startswith("snakemake ")]
    assert commands, block
    return commands


def start_and_kill(workdir: Path, args: list[str], after: float, env: dict) -> bool:
    """Starts Snakemake in its own process group and SIGKILLs the whole group (Snakemake and its jobs, as a
    lost node) after `after` seconds; returns whether it was still running then."""
    import signal
    import time

    process = subprocess.Popen(
        snakemake_cmd(workdir, *args), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        process.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.time() + 30
        while time.time() < deadline:  # wait for every job of the group to be gone
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        raise AssertionError("processes of the killed group survived")


@pytest.mark.slow
def test_killed_study_recovers_with_the_readme_commands_to_the_same_results(tmp_path, tiny_model_dir):
    """kill -9 at two random moments (the second during the recovery), then the README's commands: the results
    equal an uninterrupted run's. The uninterrupted run also has a fake W&B key and no network: its jobs finish,
    offline."""
    import random
    import time

    reference = small_study(tmp_path / "reference", tiny_model_dir)
    start = time.time()
    result = run_snakemake(reference, "--cores", "2", env=no_network_env())
    duration = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((reference / "results/evaluate").rglob("metrics.json"))) == 2
    offline = list((reference / "results/wandb/wandb").glob("offline-run-*"))
    assert len(offline) == 3  # two evaluate runs and the aggregate run
    assert_key_nowhere(reference, text=result.stdout + result.stderr)

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    crashed = small_study(tmp_path / "crashed", tiny_model_dir)
    commands = recovery_commands()
    kills = [rng.uniform(0.1, 0.9) * duration, rng.uniform(0.05, 0.5) * duration]
    killed = [start_and_kill(crashed, ["--cores", "2"], kills[0], clean_env())]
    for command in commands[:-1]:
        assert run_snakemake(crashed, *command).returncode == 0
    killed.append(start_and_kill(crashed, commands[-1], kills[1], clean_env()))
    for command in commands:
        result = run_snakemake(crashed, *command)
        assert result.returncode == 0, f"seed {seed}, kills after {kills} s ({killed}): {result.stderr[-3000:]}"
    assert results_without_timings(crashed).equals(results_without_timings(reference)), f"seed {seed}, {kills}"
    assert "Nothing to be done" in run_snakemake(crashed, "-n").stdout
