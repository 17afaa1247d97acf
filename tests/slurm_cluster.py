"""A SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's packages, started as
root with every file under a temporary folder, and stopped again.

``start_cluster(folder)`` starts one node, this machine. ``start_cluster(folder, network)`` starts
one node per test host of ``network`` (``net_hosts.py``): a slurmd in each host's namespace,
under its host name (``NodeName``) and address (``NodeAddr``), slurmctld on the first host, whose
commands (sbatch, scontrol, …) then run there too (:attr:`Cluster.prefix`); munged runs once, its
socket shared through the file system as the hosts share the run folders. Either returns a
running :class:`Cluster` or raises :class:`Unavailable` with the reason (the tests skip with it).
Debian's ``slurm-wlm`` and ``munge`` are installed first when they are missing and
``GWTN_SLURM_INSTALL=1`` (``./setup.sh``, the README's set-up, installs them). Under CI
(``CI=true``) a skip is a failure (``tests/conftest.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class Unavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def _install() -> None:
    missing = [n for n in (*DAEMONS, *CLIENTS) if not _which(n)]
    if not missing:
        return
    if os.environ.get("GWTN_SLURM_INSTALL") != "1":
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing): "
                          f"apt-get install slurm-wlm munge, or set GWTN_SLURM_INSTALL=1 to let "
                          f"the tests install them")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise Unavailable(f"apt-get install slurm-wlm munge failed: {proc.stderr[-500:]}")


CONF = """\
ClusterName=gwtntest
SlurmctldHost={ctld}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (default 120 s)
AuthInfo=socket={dir}/munge.sock,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node may declare more CPUs than the machine has (2-core CI machines, 2 tasks + launcher)
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# a node whose slurmd is silent this long is DOWN, and its jobs are requeued (default 300 s)
SlurmdTimeout=20
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%h.log
{nodes}
PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running one-node cluster; ``env`` points SLURM's commands at it."""

    folder: Path
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # where SLURM's commands run (a host)
    nodes: list[str] = field(default_factory=list)

    def run(self, *cmd: str) -> str:
        proc = subprocess.run([*self.prefix, *cmd], env=self.env, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run([*self.prefix, "sbatch", "--parsable", *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, …)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while (info := self.job(job_id))["JobState"] not in FINISHED:
            if time.time() > deadline:
                subprocess.run([*self.prefix, "scancel", job_id], env=self.env, check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")
            time.sleep(0.5)
        return info

    def start_slurmd(self, host) -> None:
        """(Re)start the slurmd of test host ``host`` (a node that came back)."""
        pid_file = self.folder / f"slurmd-{host.name}.pid"
        pid_file.unlink(missing_ok=True)
        _start(self, host.cmd([_which("slurmd"), "-f", str(self.folder / "slurm.conf")]),
               pid_file)

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for pid in self.pids:
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)


def _alive(pid: int) -> bool:
    # The daemons fork away from us; one that exited may linger as a zombie ("Z") until reaped.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(cluster: Cluster, argv: list[str], pid_file: Path) -> None:
    proc = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(argv[:12])} failed: {proc.stderr[-500:]}")
    deadline = time.time() + 15
    pid = ""
    # The daemon writes its pid file after it forks: wait for a whole line.
    while proc.returncode == 0 and not pid.endswith("\n") and time.time() < deadline:
        pid = pid_file.read_text() if pid_file.is_file() else ""
        time.sleep(0.1)
    if not pid.strip():
        raise Unavailable(f"{Path(argv[0]).name} did not start: {proc.stderr[-500:]}")
    cluster.pids.append(int(pid))


def start_cluster(folder: Path, network=None) -> Cluster:
    """Start munged, slurmctld and one slurmd per node with their files in ``folder`` (the nodes:
    this machine, or each host of ``network``); wait until every node is idle."""
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld and slurmd needs root")
    _install()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state").mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    if network is None:
        hosts = [socket.gethostname().split(".")[0]]
        ctld, nodes = hosts[0], f"NodeName={hosts[0]} CPUs=4 State=UNKNOWN"
        on = [lambda argv: argv]
    else:
        hosts = [h.name for h in network.hosts]
        ctld = f"{hosts[0]}({network[0].addr})"
        nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=4 State=UNKNOWN"
                          for h in network.hosts)
        on = [h.cmd for h in network.hosts]
    for host in hosts:
        (folder / f"spool-{host}").mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(CONF.format(ctld=ctld, dir=folder, ctld_port=_free_port(),
                                d_port=_free_port(), nodes=nodes, names=",".join(hosts)))
    cluster = Cluster(folder, {**os.environ, "SLURM_CONF": str(conf)},
                      prefix=on[0]([]), nodes=hosts)
    try:
        _start(cluster, [_which("munged"), "--force", f"--socket={folder}/munge.sock",
                         f"--key-file={key}", f"--pid-file={folder}/munged.pid",
                         f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge.seed"],
               folder / "munged.pid")
        _start(cluster, on[0]([_which("slurmctld"), "-f", str(conf)]), folder / "slurmctld.pid")
        for host, wrap in zip(hosts, on, strict=True):
            _start(cluster, wrap([_which("slurmd"), "-f", str(conf)]),
                   folder / f"slurmd-{host}.pid")
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            state = subprocess.run([*cluster.prefix, "sinfo", "-h", "-N", "-o", "%t"],
                                   env=cluster.env, capture_output=True, text=True,
                                   check=False).stdout.split()
            if state == ["idle"] * len(hosts):
                return cluster
            time.sleep(0.5)
        logs = "".join(f.read_text()[-800:] for f in [folder / "slurmctld.log",
                                                      *folder.glob("slurmd-*.log")])
        raise Unavailable(f"the SLURM nodes did not become idle (states {state}): {logs}")
    except BaseException:
        cluster.stop()
        raise
