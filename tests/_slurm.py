"""A real single-node Slurm for the tests: munged, slurmctld and slurmd on this host.

Everything lives in one temporary folder (munge key and socket, slurm.conf, state, spool, logs, pid
files); the daemons listen on free ports; clients find it through ``SLURM_CONF``. ``stop()`` cancels
the jobs, then ends exactly the three daemons it started (by the pids in their pid files).

``why_unavailable()`` installs Debian's ``slurm-wlm`` when it is missing and the test runs as root with
apt-get (about 15 s), and otherwise says in one line why there is no Slurm.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def _sbin(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )


def why_unavailable() -> str | None:
    """None when Slurm can run here (installing it if needed), else the reason in one line."""
    if os.environ.get("KDPIPE_TEST_SLURM") == "0":
        return "KDPIPE_TEST_SLURM=0"
    if all(_sbin(d) for d in (*DAEMONS, "sbatch")):
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "Slurm is not installed and installing slurm-wlm needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install slurm-wlm"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0 or not all(_sbin(d) for d in (*DAEMONS, "sbatch")):
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        return f"apt-get install slurm-wlm failed: {last}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalSlurm:
    """One controller and one compute node (this host) in ``root``."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = root
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    def pidfile(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge", "logs"):
            (r / d).mkdir(parents=True, exist_ok=True)
            os.chmod(r / d, 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        self._daemon(
            "munged",
            [
                _sbin("munged") or "munged",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={self.pidfile('munged')}",
                f"--log-file={r / 'logs' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ],
        )
        host = socket.gethostname().split(".")[0]
        mem = max(256, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2**20 // 2)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=kdpipe-test",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "SwitchType=switch/none",
                    "JobCompType=jobcomp/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SchedulerType=sched/backfill",
                    "MinJobAge=3600",
                    "KillWait=5",
                    "InactiveLimit=0",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={self.pidfile('slurmctld')}",
                    f"SlurmdPidFile={self.pidfile('slurmd')}",
                    f"SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'logs' / 'slurmd.log'}",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN",
                    f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self._daemon("slurmctld", [_sbin("slurmctld") or "slurmctld", "-f", str(self.conf), "-c"])
        self._daemon("slurmd", [_sbin("slurmd") or "slurmd", "-f", str(self.conf)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.split()
            if out and all(s in ("idle", "mix", "alloc") for s in out):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm node not idle after 60 s; logs in {r / 'logs'}")

    def _daemon(self, name: str, argv: list[str]) -> None:
        """Start a daemon (it forks into the background) and record its pid from its pid file."""
        subprocess.run(argv, check=True, env=self.env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.pids[name] = int(self.pidfile(name).read_text().split()[0])
                return
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no pid file ({self.pidfile(name)})")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        r = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
        return r

    def active(self, ids: list[str] | None = None) -> list[str]:
        """Ids (with array task) of queued or running jobs (of ``ids``, or all)."""
        args = ["squeue", "--noheader", "--format=%i %T"]
        args += [f"--jobs={','.join(ids)}"] if ids else []
        r = self.run(*args, check=False)
        return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]

    def wait(self, ids: list[str], timeout: float = 240) -> None:
        """Until none of the jobs ``ids`` is queued or running."""
        deadline = time.monotonic() + timeout
        while self.active(ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {ids} still active after {timeout} s")
            time.sleep(0.5)

    def states(self, job_id: str) -> list[str]:
        """JobState of a job (one per array task)."""
        r = self.run("scontrol", "--oneliner", "show", "job", job_id, check=False)
        words = [w for ln in r.stdout.splitlines() for w in ln.split()]
        return [w.split("=", 1)[1] for w in words if w.startswith("JobState=")]

    def stop(self) -> None:
        """Cancel every job of this cluster, then end the daemons this object started."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 20
            while self.active() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
