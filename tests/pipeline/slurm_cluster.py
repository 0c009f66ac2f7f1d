"""A real single-node SLURM cluster (Debian's slurm-wlm and munge, as root) for the SLURM tests.

Everything it writes (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one temporary
directory, and clients find it through SLURM_CONF; the one exception is a link /etc/slurm/slurm.conf to it, made
only where none exists and removed again, because Snakemake's job step drops SLURM_CONF before it calls `srun`
inside a job. `stop()` ends exactly the daemons it started, by the pids in their pid files. Usage:

    with SlurmCluster() as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PARTITION = "debug"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: slurmctld, slurmd and munged are started as root (as .ci/run does)"
    missing = [name for name, path in DAEMONS.items() if not os.access(path, os.X_OK)]
    missing += [tool for tool in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(tool) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge, as .ci/run does"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user: apt-get install munge"
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        return f"{SYSTEM_CONF} exists: this machine has its own SLURM configuration, which the test would shadow"
    return None


SLURM_CONF = """\
ClusterName=vtctest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
# Memory is not a consumable here (a CI runner may have less than a job asks for); the node's configured size
# is taken as is, so jobs asking for up to RealMemory are accepted on a smaller machine.
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory=64000 State=UNKNOWN
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, start_timeout: float = 30.0):
        self.start_timeout = start_timeout
        self.root = Path(tempfile.mkdtemp(prefix="vtc-slurm-"))
        self.root.chmod(0o755)  # munged runs as `munge` and must reach its folder
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self.pid_files = {
            "slurmd": self.root / "slurmd.pid",
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.root / "munge" / "munged.pid",
        }

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        munge = pwd.getpwnam("munge")
        munge_dir = self.root / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # clients reach the socket in it
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        host = socket.gethostname().split(".")[0]
        (self.root / "slurm.conf").write_text(
            SLURM_CONF.format(
                host=host, root=self.root, cpus=max(2, os.cpu_count() or 2), partition=PARTITION,
                ctld_port=free_port(), slurmd_port=free_port(),
            )
        )  # fmt: skip
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.root / "slurm.conf")
        run = dict(env=self.env, check=True, timeout=30, capture_output=True)
        subprocess.run(
            ["runuser", "-u", "munge", "--", DAEMONS["munged"], f"--socket={munge_dir}/munge.socket",
             f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed"],
            **run,
        )  # fmt: skip
        subprocess.run([DAEMONS["slurmctld"]], **run)
        subprocess.run([DAEMONS["slurmd"]], **run)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=10
            )
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is not idle after {self.start_timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted((self.root / "log").glob("*.log"))
        )

    def stop(self):
        """Ends the daemons this cluster started (by their pid files) and deletes its folder; the link and the folder
        go even if ending the daemons is interrupted."""
        try:
            pids = []
            for pid_file in self.pid_files.values():
                try:
                    pid = int(pid_file.read_text().split()[0])
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                except (OSError, ValueError, IndexError):  # never started, or already gone
                    continue
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if alive(pid)]
                time.sleep(0.1)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        finally:
            if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == (self.root / "slurm.conf").resolve():
                SYSTEM_CONF.unlink()
            shutil.rmtree(self.root, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
