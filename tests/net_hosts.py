"""Test hosts on this machine: each a network namespace with its own address and host name.

``start_hosts(n)`` makes ``n`` hosts (``gwtn-h1`` … ``gwtn-hN``) and returns a running
:class:`Network`, or raises :class:`Unavailable` with the reason (the tests skip with it; under
CI a skip is a failure, ``tests/conftest.py``). Each host is

- a network namespace with loopback and an ``eth0`` (one end of a veth pair) holding
  ``198.18.0.K/24`` (RFC 2544's range for test networks: no private or public network uses it);
- the other end of each pair is a port of one bridge in the root namespace, which holds no
  address: the hosts reach each other and nothing else (no default route, so an address outside
  the test network is unreachable from them, not sent anywhere);
- its own host name: every command runs in a UTS namespace named ``gwtn-hK`` and a mount
  namespace where ``/etc/netns/<namespace>/hosts`` is mounted over ``/etc/hosts`` (every host's
  name and address, nothing else; ``nsswitch.conf`` likewise: files only, no DNS), so name
  lookups (torchrun's agents, gloo's choice of interface, slurmd's node name) behave as on
  separate machines.

The file system is the machine's, as a cluster's shared file system would be: run folders,
shards and munge's socket are seen by every host. :meth:`Host.lose` takes a host off the network
(its link down, then every process in it SIGKILLed, so no peer ever hears a FIN) as a machine
that loses power would go; :meth:`Network.stop` removes everything. Needs root and ``ip``
(Debian's iproute2, which ``./setup.sh`` installs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET = "198.18.0"
NETNS_ETC = Path("/etc/netns")
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files\n"


class Unavailable(RuntimeError):
    """Test hosts cannot be made here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    """One test host: ``name`` (its host name), ``netns``, ``addr`` and the root-side ``port``."""

    name: str
    netns: str
    addr: str
    port: str  # the veth end on the bridge

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host: in its network namespace, under its host name, with its
        name files over /etc's. (nsenter rather than ``ip netns exec``, which also mounts a
        sysfs of the namespace over /sys and so hides the cgroup mounts slurmd needs.)"""
        etc = NETNS_ETC / self.netns
        script = ('hostname "$0" && mount --bind "$1" /etc/hosts && '
                  'mount --bind "$2" /etc/nsswitch.conf && shift 2 && exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount",
                "--", "sh", "-c", script, self.name, str(etc / "hosts"),
                str(etc / "nsswitch.conf"), *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kwargs)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(argv), check=kwargs.pop("check", False), **kwargs)

    def pids(self) -> list[int]:
        """Every process on this host (in its network namespace)."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def link(self, up: bool) -> None:
        _ip("link", "set", "dev", self.port, "up" if up else "down")

    def lose(self) -> float:
        """Take the host off the network, then SIGKILL every process on it (until none is
        left: a dying launcher may still fork). Returns the time it went off the network."""
        self.link(False)
        lost = time.time()
        deadline = time.time() + 30
        while (pids := self.pids()) and time.time() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return lost


@dataclass
class Network:
    """Running test hosts on one bridge; :meth:`stop` removes them."""

    hosts: list[Host]
    bridge: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def stop(self) -> None:
        for host in self.hosts:
            for pid in host.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for host in self.hosts:
            _ip("link", "del", host.port, check=False)
            _ip("netns", "del", host.netns, check=False)
            shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when no other network's files are left in it


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


_made = 0  # networks made by this process (each its own names)


def _remove_stale() -> None:
    """Hosts left by a test process that died without stopping them (its pid in the names)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(r"(gw(\d+)[a-z])h\d+\b", line)
        if match and not _alive(int(match[2])):
            name = line.split()[0]
            Network([Host("", name, "", f"{name}p")], f"{match[1]}br").stop()


def start_hosts(n: int = 2) -> Network:
    """Make ``n`` test hosts on one bridge (see the module docstring)."""
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root")
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            raise Unavailable(f"{tool} is not installed (./setup.sh installs iproute2)")
    global _made
    _remove_stale()
    tag = f"gw{os.getpid()}{chr(ord('a') + _made % 26)}"
    _made += 1
    bridge = f"{tag}br"
    hosts = [Host(f"gwtn-h{k}", f"{tag}h{k}", f"{SUBNET}.{k}", f"{tag}h{k}p")
             for k in range(1, n + 1)]
    network = Network(hosts, bridge)
    if len(bridge) > 15 or any(len(h.port) > 15 for h in hosts):
        raise Unavailable(f"interface names too long for pid {os.getpid()}")
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        names = "".join(f"{h.addr} {h.name}\n" for h in hosts)
        for host in hosts:
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns",
                host.netns)
            _ip("link", "set", host.port, "master", bridge, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            (NETNS_ETC / host.netns).mkdir(parents=True, exist_ok=True)
            # Names resolve from these files alone: no DNS query leaves a host.
            (NETNS_ETC / host.netns / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            (NETNS_ETC / host.netns / "nsswitch.conf").write_text(NSSWITCH)
        return network
    except BaseException:
        network.stop()
        raise


@pytest.fixture(scope="module", name="hosts")
def hosts_fixture():
    """Two test hosts for a test module (skipped with the reason where they cannot start; under
    CI a skip fails the run), removed after it."""
    try:
        network = start_hosts(2)
    except Unavailable as exc:
        pytest.skip(f"test hosts cannot start here: {exc}")
    yield network
    network.stop()
