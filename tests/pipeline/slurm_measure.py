"""Wall time and SLURM job count of a small study on a throwaway single-node cluster (see slurm_cluster.py), with the
shipped profile (grouped) or one SLURM job per Snakemake job (ungrouped); the figures in docs/slurm.md. As root,
from the repository root:

    python tests/pipeline/slurm_measure.py grouped ungrouped

The study: the default study cut to 8 questions, methods full, random and pool at budgets 64 and 16 (five runs), one
shard, no measure_cost, W&B offline. Prints one JSON line per variant; outputs are under /tmp/vtc-slurm-measure/.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {"grouped": [], "ungrouped": ["--group-components", "reduce=1", "generate=1", "evaluate=1"]}


def main(names: list[str]) -> None:
    base = Path("/tmp/vtc-slurm-measure")
    shutil.rmtree(base, ignore_errors=True)
    profile = base / "profile"
    shutil.copytree(REPO / "workflow/profiles/slurm", profile)
    (profile / "partitions.yaml").write_text("partitions:\n  debug: {}\n")
    text = (profile / "profile.yaml").read_text()
    (profile / "profile.yaml").write_text(text.replace('slurm_account: "CHANGE_ME"', 'slurm_account: "vtctest"'))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"]["vtc-shapes-tiny"]["path"] = str(REPO / "models/vtc-shapes-tiny")
    config.update(shapes={"test": 8}, methods={"full": {}, "random": {}, "pool": {}}, budgets=[64, 16])
    config.update(wandb={"mode": "offline"})
    config["efficiency"]["measure"] = False
    with SlurmCluster() as cluster:
        env = {**os.environ, "SLURM_CONF": cluster.env["SLURM_CONF"], "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("WANDB_API_KEY", None)
        for name in names:
            workdir = base / name
            workdir.mkdir()
            (workdir / "config.yaml").write_text(yaml.safe_dump(config))
            load, start = os.getloadavg(), time.time()
            run = subprocess.run(
                [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                 "--configfile", str(workdir / "config.yaml"), "--workflow-profile", str(profile), *VARIANTS[name]],
                env=env, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            (base / f"{name}.log").write_text(run.stdout + run.stderr)
            figures = {
                "variant": name, "rc": run.returncode, "wall_s": round(time.time() - start),
                "slurm_jobs": len(list((workdir / "logs/slurm").rglob("*.log"))),
                "load_average_before": [round(x, 1) for x in load],
                "load_average_after": [round(x, 1) for x in os.getloadavg()],
            }  # fmt: skip
            print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))
