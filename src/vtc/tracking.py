"""Weights & Biases runs for pipeline jobs: offline unless a key is set, never fatal.

Mode `auto` (the default) logs online when `WANDB_API_KEY` is set and offline otherwise; `online`,
`offline` and `disabled` force a mode. An online run that cannot reach the server falls back to
offline after at most `wandb.init_timeout` seconds (and an offline run that cannot start is skipped), so a
missing network never fails a job; `wandb sync results/wandb/wandb/offline-run-*`
uploads offline runs later. Run ids are derived from the experiment and the job, so a rerun of a job
resumes its run instead of adding a duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
MODES = ("auto", "online", "offline", "disabled")


def run_id(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:16]


def environment() -> dict:
    """Versions and machine facts that can change a number, recorded in every run's config."""
    versions = {}
    for package in ("vtc", "torch", "transformers", "datasets", "polars", "snakemake", "wandb"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[f"version/{package}"] = importlib.metadata.version(package)
    with contextlib.suppress(Exception):
        versions["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    versions["python"] = platform.python_version()
    versions["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs"
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            versions["gpu"] = torch.cuda.get_device_name()
    return versions


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"wandb.mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


@contextlib.contextmanager
def wandb_run(settings: dict, *, job_type: str, name: str, config: dict):
    """A W&B run for one job, as a context manager; yields the run (a no-op object when disabled)."""
    import wandb

    directory = Path(settings.get("dir", "results/wandb")).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # Media staged for tables lives in the data dir: keep everything under results/ so sync works.
    os.environ.setdefault("WANDB_DIR", str(directory))
    os.environ.setdefault("WANDB_DATA_DIR", str(directory / "data"))
    os.environ.setdefault("WANDB_CACHE_DIR", str(directory / "cache"))
    group = settings["group"]
    kwargs = dict(
        project=settings.get("project", "vtc"),
        entity=settings.get("entity"),
        group=group,
        job_type=job_type,
        name=name,
        id=run_id(group, job_type, name),
        resume="allow",
        dir=str(directory),
        config={**config, **environment()},
        settings=wandb.Settings(
            console="off", x_disable_stats=True, init_timeout=settings.get("init_timeout", 60), silent=True
        ),
    )
    mode = resolve_mode(settings.get("mode", "auto"))
    fallbacks = {"online": "offline", "offline": "disabled"}
    while True:
        try:
            run = wandb.init(mode=mode, **kwargs)
            break
        except Exception as error:  # noqa: BLE001 - W&B must never fail a job
            if mode not in fallbacks:
                raise
            log.warning("W&B %s init failed (%s); logging %s instead", mode, redact(str(error)), fallbacks[mode])
            # The failed init still holds the run id in W&B's service process ("run ID ... is in use"): stop
            # the service so that the retry starts a fresh one and can reuse the id.
            wandb.teardown()
            mode = fallbacks[mode]
    with run:
        yield run


def redact(text: str) -> str:
    """`text` without the W&B API key, should an error message ever quote it."""
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text
