"""The SLURM profile (workflow/profiles/slurm): what its dry runs ask SLURM for, and (slow, marked `slurm`) a small
study on a real single-node cluster, run as README "Running on a SLURM cluster" says.

The partition of a job is chosen by the SLURM plugin's own partition matcher (the code that picks it at
submission) from the profile's partitions.yaml and the job's resources as the dry run prints them.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
from test_wandb import logged

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_API_KEY": ""}
# and reduce for an encoder-level method; the saliency study's prefill passes run the model too
MODEL_BOUND = {"encode", "generate", "measure_cost", "saliency_record", "saliency_oracle"}


class Resources(dict):
    """A job's resources as the plugin reads them (`.get`, and attribute access)."""

    __getattr__ = dict.__getitem__


class PlannedJob:
    def __init__(self, rule: str, wildcards: dict, threads: int, resources: dict):
        self.name, self.rule, self.wildcards, self.threads = rule, rule, wildcards, threads
        self.resources = Resources(resources)


class QuietLogger:
    def debug(self, *args): ...

    info = warning = debug


def parse_value(text: str):
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def planned_jobs(output: str) -> list[PlannedJob]:
    """Every job a dry run prints, with its wildcards, threads and resources."""
    jobs = []
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:)", output):
        head = re.match(r"\s*(?:local)?rule (\w+):", block)
        if not head:
            continue
        fields = dict(re.findall(r"^\s*(wildcards|resources|threads): (.*)$", block, re.M))
        items = lambda key: [kv.split("=", 1) for kv in fields.get(key, "").split(", ") if "=" in kv]  # noqa: E731
        resources = {k: parse_value(v) for k, v in items("resources") if v != "<TBD>"}
        jobs.append(PlannedJob(head[1], dict(items("wildcards")), int(fields.get("threads", 1)), resources))
    return jobs


def dry_run(*args: str, profile: Path = PROFILE, runner: list[str] | None = None) -> subprocess.CompletedProcess:
    command = runner or [str(SNAKEMAKE)]
    result = subprocess.run(
        [*command, "-n", "--workflow-profile", str(profile), "-s", str(REPO / "Snakefile"), *args],
        cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def is_model_bound(job: PlannedJob, config: dict) -> bool:
    if job.rule == "reduce":
        return job.wildcards["method"] == "tome"  # the paper preset's encoder-level method
    return job.rule in MODEL_BOUND


def test_paper_preset_asks_for_gpus_only_for_model_bound_jobs_on_the_gpu_partition():
    paper = REPO / "configs" / "paper.yaml"
    config = yaml.safe_load(paper.read_text())
    result = dry_run("--configfile", str(paper), runner=[sys.executable, str(Path(__file__).parent / "groupres.py")])
    partitions = read_partition_file(PROFILE / "partitions.yaml")
    jobs = [job for job in planned_jobs(result.stdout) if job.rule not in ("all", "aggregate")]
    assert len(jobs) > 2000
    gpu_jobs = [job for job in jobs if job.resources.get("gpu", 0) > 0]
    assert {job.rule for job in gpu_jobs} == MODEL_BOUND | {"reduce"}
    for job in jobs:
        partition = get_best_partition(partitions, job, QuietLogger())
        if is_model_bound(job, config):
            assert job.resources.get("gpu") == config["models"]["llava-1.5-7b"]["gpus"], job.rule
            assert partition == "gpu", (job.rule, job.wildcards)
        else:
            assert job.resources.get("gpu", 0) == 0, (job.rule, job.wildcards)
            assert partition == "cpu", (job.rule, job.wildcards)
        assert "slurm_partition" not in job.resources  # else it would override the choice

    # What is submitted: group jobs of several generate jobs still ask for one GPU (they run one after another),
    # CPU groups for none, and a group's runtime stays within a day.
    groups = [json.loads(line[len("GROUP ") :]) for line in result.stderr.splitlines() if line.startswith("GROUP ")]
    by_rule = {
        name: [g for g in groups if g["group"].startswith(name + "-")] for name in ("reduce", "generate", "evaluate")
    }
    assert all(by_rule.values()) and sum(map(len, by_rule.values())) == len(groups)
    assert {g["gpu"] for g in by_rule["generate"]} == {1}
    assert max(g["jobs"] for g in by_rule["generate"]) == 6
    assert all(g.get("gpu", 0) == 0 for g in by_rule["reduce"] + by_rule["evaluate"])
    assert max(g["runtime"] for g in groups) <= 24 * 60


def test_default_study_asks_for_no_gpu_and_fits_a_cpu_only_cluster(tmp_path):
    result = dry_run()
    cpu_only = tmp_path / "partitions.yaml"
    cpu_only.write_text(yaml.safe_dump({"partitions": {"cpu": {}}}))
    partitions = read_partition_file(cpu_only)
    jobs = [job for job in planned_jobs(result.stdout) if job.rule not in ("all", "aggregate")]
    assert {job.rule for job in jobs} >= {"encode", "reduce", "generate", "evaluate", "measure_cost"}
    for job in jobs:
        assert job.resources.get("gpu", 0) == 0, job.rule
        assert get_best_partition(partitions, job, QuietLogger()) == "cpu", job.rule


def test_a_retry_asks_for_more_memory_and_time():
    first, retry = planned_jobs(dry_run().stdout), planned_jobs(dry_run("--attempt", "2").stdout)
    by_job = lambda jobs: {(j.rule, tuple(sorted(j.wildcards.items()))): j.resources for j in jobs}  # noqa: E731
    first, retry = by_job(first), by_job(retry)
    assert first.keys() == retry.keys()
    for key, resources in first.items():
        if key[0] in ("all", "aggregate"):
            continue
        assert retry[key]["mem_mb"] == 2 * resources["mem_mb"], key
        assert retry[key]["runtime"] == 2 * resources["runtime"], key


# ---- a real single-node cluster ------------------------------------------------------------------------------

CONTROLLER_TIMEOUT = 900  # s, per Snakemake run; a run past it is killed with its process group


def readme_edits(profile: Path, partition: str, account: str) -> None:
    """The edits README "Running on a SLURM cluster" asks for: partition names and the account."""
    (profile / "partitions.yaml").write_text(yaml.safe_dump({"partitions": {partition: {}}}))
    text = (profile / "profile.yaml").read_text()
    assert 'slurm_account: "CHANGE_ME"' in text
    (profile / "profile.yaml").write_text(text.replace('slurm_account: "CHANGE_ME"', f'slurm_account: "{account}"'))


def small_study(workdir: Path) -> Path:
    """The default study cut down: 8 questions, the committed demo model, two methods, one shard."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"]["vtc-shapes-tiny"]["path"] = str(REPO / "models" / "vtc-shapes-tiny")
    config["shapes"] = {"test": 8}
    config["methods"] = {"full": {}, "pool": {}}
    config["budgets"] = [16]
    config["efficiency"]["measure"] = False
    config["saliency"]["datasets"] = []  # its rules are covered by the dry runs above and tests/test_saliency.py
    config["wandb"] = {"mode": "offline"}
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir / "config.yaml"


STARTED: list[subprocess.Popen] = []  # Snakemake runs of the current test, ended by the cluster fixture


def start_snakemake(workdir: Path, env: dict, *args: str) -> subprocess.Popen:
    log = open(workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.log", "w")
    process = subprocess.Popen(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(workdir / "config.yaml"), *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    STARTED.append(process)
    return process


def end(process: subprocess.Popen) -> None:
    """Ends a Snakemake run and everything it started locally (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=20)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def finish(process: subprocess.Popen, timeout: float = CONTROLLER_TIMEOUT) -> int:
    """Waits for a Snakemake run; past the timeout, ends it and fails the test."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end(process)
        pytest.fail(f"snakemake did not finish within {timeout} s:\n{log_of(process)}")


def log_of(process: subprocess.Popen) -> str:
    return Path(process.stdout.name).read_text()[-4000:]


def queue(env: dict) -> list[tuple[str, str, str]]:
    """(job id, state, comment) of every job SLURM still lists; the plugin's comment names the rule or group."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], env=env, capture_output=True, text=True, timeout=30)
    return [tuple(line.split("|", 2)) for line in out.stdout.splitlines() if line.count("|") == 2]


@pytest.fixture
def slurm_cluster():
    from slurm_cluster import SlurmCluster, missing_requirements

    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        try:
            yield cluster
        finally:
            while STARTED:
                end(STARTED.pop())
            subprocess.run(["scancel", "--full", "--user", "root"], env=cluster.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 60
            while queue(cluster.env) and time.monotonic() < deadline:
                time.sleep(1)


@pytest.mark.slow
@pytest.mark.slurm
def test_small_study_on_a_real_slurm_cluster_matches_a_local_run_and_recovers_a_cancelled_job(tmp_path, slurm_cluster):
    profile = tmp_path / "profile"
    shutil.copytree(PROFILE, profile)
    readme_edits(profile, partition="debug", account="vtctest")
    env = {**ENV, "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    small_study(local), small_study(on_slurm)

    # The local reference runs while the SLURM run mostly waits for its status checks.
    reference = start_snakemake(local, env, "--cores", "1")

    # First run: every generate job is cancelled while it runs, its retry as well, so the run stops short.
    run = start_snakemake(on_slurm, env, "--workflow-profile", str(profile))
    cancelled = []
    deadline = time.monotonic() + CONTROLLER_TIMEOUT
    while run.poll() is None and time.monotonic() < deadline:
        for job_id, state, comment in queue(env):
            # the plugin's comment of a generate group job: rule_generate-<model>-<dataset>-<shard>_generate
            if comment.startswith("rule_generate-") and state == "RUNNING" and job_id not in cancelled:
                subprocess.run(["scancel", job_id], env=env, check=True, timeout=30)
                cancelled.append(job_id)
        time.sleep(1)
    assert finish(run) != 0, log_of(run)
    assert len(cancelled) == 2, (cancelled, log_of(run))  # the job and its one retry
    assert finish(reference) == 0, log_of(reference)
    tables = Path("results/tables/shapes-demo")
    assert not (on_slurm / tables / "results.parquet").exists()

    # The same command again finishes the study.
    run = start_snakemake(on_slurm, env, "--workflow-profile", str(profile))
    assert finish(run) == 0, log_of(run)
    assert len(list((on_slurm / "logs" / "slurm" / "rule_encode").rglob("*.log"))) == 1  # not submitted again
    for name in ("results.parquet", "results.csv", "results.md"):
        assert (on_slurm / tables / name).read_bytes() == (local / tables / name).read_bytes(), name
    assert pl.read_parquet(on_slurm / tables / "results.parquet").height > 0

    # Every SLURM job's log is kept, and the evaluate jobs wrote offline W&B runs on the compute node.
    slurm_logs = {
        p.relative_to(on_slurm / "logs" / "slurm").parts[0] for p in (on_slurm / "logs" / "slurm").rglob("*.log")
    }
    assert {
        "rule_encode",
        "group_reduce-vtc-shapes-tiny-shapes_reduce",
        "group_evaluate-vtc-shapes-tiny-shapes_evaluate",
    } <= slurm_logs
    runs = [logged(run_dir) for run_dir in (on_slurm / "results" / "wandb" / "wandb").glob("offline-run-*")]
    evaluate_runs = [(config, summary) for config, summary in runs if "method" in config]  # not the aggregate run
    assert len(evaluate_runs) == 2
    for config, summary in evaluate_runs:
        assert {"model", "dataset", "method", "budget", "visual_tokens", "visual_tokens_kept"} <= config.keys()
        assert summary["score"] == summary[config["headline_metric"]]
