"""``gwtn launch``: start a gwtn command on every node of a SLURM job (or on this machine).

The batch script runs ``gwtn launch --style STYLE -- COMMAND CONFIG [key=value …]`` once, in the
batch step. It reads the allocation from SLURM's variables, builds the command each node runs,
starts them (one job step), and handles preemption: on the warning signal it asks the ranks to
checkpoint and stop (``gwtn_dist.distributed.preempt``), then requeues the job, whose next start
adds ``resume=true``. ``--dry-run`` prints the commands instead of running them.

Styles (N nodes × P ranks per node; the rendezvous is on the first node):

- ``srun``: ``srun`` starts N·P tasks, one per rank; each rank reads SLURM_PROCID & co.
- ``srun-torchrun``: ``srun`` starts one ``torchrun`` per node, which starts P ranks; c10d
  rendezvous on the first node (torchrun's agent through ``gwtn_dist.distributed.agent``: the
  ranks' own exit code, one-line errors, ``dist.rendezvous_timeout_s``).
- ``deepspeed-slurm``: the ``deepspeed`` launcher with ``--launcher slurm``, which calls ``srun``
  itself; needs neither ssh nor pdsh.
- ``deepspeed-nossh``: ``srun`` starts ``deepspeed --no_ssh --node_rank=K`` on node K, which starts
  P ranks there.
- ``deepspeed-hostfile``: the plain ``deepspeed`` launcher on a hostfile written from the SLURM
  node list; it reaches the other nodes through pdsh and passwordless ssh.
- ``local``: this machine only; ``torchrun --standalone`` with P ranks (one plain process for P=1).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .distributed import peers, preempt
from .distributed.env import LaunchError, check_port, expand_hostlist, rendezvous_port

log = logging.getLogger("gwtn")
STYLES = ("srun", "srun-torchrun", "deepspeed-slurm", "deepspeed-nossh", "deepspeed-hostfile",
          "local")
NEEDS_HOSTFILE = ("deepspeed-slurm", "deepspeed-nossh", "deepspeed-hostfile")


@dataclass(frozen=True)
class Allocation:
    """Where the ranks run: the job's nodes, ranks per node, and the job's identity."""

    nodes: list[str]
    ranks_per_node: int
    job_id: str = ""
    restarts: int = 0  # how often SLURM has requeued the job
    cpus_per_node: int = 0  # 0 = unknown (outside SLURM)

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.ranks_per_node


def allocation(environ: Mapping[str, str] = os.environ, nodes: str | None = None,
               ranks_per_node: int | None = None) -> Allocation:
    """The allocation from SLURM's variables; ``nodes`` (a SLURM host list) and ``ranks_per_node``
    override them (and stand in for them outside SLURM)."""
    if nodes is not None and not nodes.strip():
        raise LaunchError("--nodes is empty: give a SLURM host list such as gpu[01-04]")
    hostlist = nodes or environ.get("SLURM_JOB_NODELIST") or "localhost"
    if ranks_per_node is None:
        ranks_per_node = _per_node(environ, "SLURM_TASKS_PER_NODE", "--ntasks-per-node")
    if ranks_per_node < 1:
        raise LaunchError(f"--nproc-per-node {ranks_per_node}: at least 1 rank per node")
    restarts = environ.get("SLURM_RESTART_COUNT", "0") or "0"
    if not restarts.isdigit():
        raise LaunchError(f"SLURM_RESTART_COUNT={restarts!r} is not a count of restarts")
    return Allocation(nodes=expand_hostlist(hostlist), ranks_per_node=ranks_per_node,
                      job_id=environ.get("SLURM_JOB_ID", ""), restarts=int(restarts),
                      cpus_per_node=_per_node(environ, "SLURM_JOB_CPUS_PER_NODE", "--cpus-per-task",
                                              default=0))


def _per_node(environ: Mapping[str, str], key: str, option: str, default: int = 1) -> int:
    """A per-node count such as SLURM_TASKS_PER_NODE="4(x2)"; it must be the same everywhere."""
    if key not in environ:
        return default
    counts = {int(c) for c in re.findall(r"(\d+)(?:\(x\d+\))?", environ[key])}
    if not counts or 0 in counts:
        raise LaunchError(f"{key}={environ[key]!r} is not a count per node (like 4 or 4(x2))")
    if len(counts) != 1:
        raise LaunchError(f"{key}={environ[key]!r}: the launch styles need the same count on "
                          f"every node ({option})")
    return counts.pop()


@dataclass
class Plan:
    """What to run: ``command`` in the batch step, and what each node then runs (for dry-run)."""

    command: list[str]
    per_node: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)  # set for the launched processes
    hostfile: str | None = None  # the hostfile's text, for the deepspeed styles

    def describe(self, style: str, alloc: Allocation) -> str:
        shape = f"{len(alloc.nodes)} node(s) x {alloc.ranks_per_node} rank(s)"
        lines = [f"# style {style}: {shape} = {alloc.world_size} ranks"]
        lines += [f"# env: {k}={v}" for k, v in sorted(self.env.items())]
        if self.hostfile is not None:
            lines += ["# hostfile:"] + [f"#   {h}" for h in self.hostfile.splitlines()]
        lines += ["# the batch step runs:", shlex.join(self.command)]
        for node, text in self.per_node.items():
            lines += [f"# node {node} runs:", text]
        return "\n".join(lines)


def hostfile_text(alloc: Allocation) -> str:
    """DeepSpeed's hostfile: one ``host slots=P`` line per node of the allocation."""
    return "".join(f"{node} slots={alloc.ranks_per_node}\n" for node in alloc.nodes)


def build(style: str, gwtn_args: list[str], alloc: Allocation, *, port: int,
          hostfile: Path | None = None, python: str = sys.executable,
          rendezvous_timeout_s: int = 300) -> Plan:
    """The plan for ``style`` (see the module docstring) running ``gwtn GWTN_ARGS`` everywhere;
    ``rendezvous_timeout_s`` bounds srun-torchrun's wait for the rendezvous host and the nodes."""
    if style not in STYLES:
        raise LaunchError(f"unknown launch style {style!r}; choose one of {', '.join(STYLES)}")
    if style in NEEDS_HOSTFILE and hostfile is None:
        raise LaunchError(f"style {style} needs a hostfile path")
    n, p = len(alloc.nodes), alloc.ranks_per_node
    first = alloc.nodes[0]
    gwtn = [python, "-m", "gwtn_dist", *gwtn_args]
    # One task per node that holds all the node's CPUs (with cgroups, a task only gets what it
    # asks for, and its P ranks share them); one failing node ends the step.
    srun_nodes = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                  "--kill-on-bad-exit=1"]
    if alloc.cpus_per_node:
        srun_nodes.append(f"--cpus-per-task={alloc.cpus_per_node}")
    ds = [python, "-m", "deepspeed.launcher.runner"]
    ds_common = [f"--hostfile={hostfile}", f"--master_addr={first}", f"--master_port={port}"]
    rendezvous = {"MASTER_ADDR": first, "MASTER_PORT": str(port)}

    if style == "local":
        if n > 1:
            raise LaunchError(f"style local runs on this machine only, but the job has {n} "
                              f"nodes; choose a SLURM style")
        if p == 1:
            return Plan(gwtn, {first: shlex.join(gwtn)})
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
               "-m", "gwtn_dist", *gwtn_args]
        return Plan(cmd, {first: shlex.join(cmd)})
    if style == "srun":
        cmd = ["srun", f"--nodes={n}", f"--ntasks={n * p}", f"--ntasks-per-node={p}",
               "--kill-on-bad-exit=1", *gwtn]
        return Plan(cmd, {node: f"{p} tasks (SLURM_PROCID {k * p}..{k * p + p - 1}): "
                                f"{shlex.join(gwtn)}" for k, node in enumerate(alloc.nodes)},
                    env=rendezvous)
    if style == "srun-torchrun":
        # torchrun's agent, ending with its ranks' exit code and one-line errors (agent.py)
        t = rendezvous_timeout_s
        torchrun = [python, "-m", "gwtn_dist.distributed.agent", f"--nnodes={n}",
                    f"--nproc-per-node={p}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={first}:{port}", f"--rdzv-id={alloc.job_id or 'gwtn'}",
                    f"--rdzv-conf=join_timeout={t},read_timeout={t}", "--max-restarts=0",
                    "-m", "gwtn_dist", *gwtn_args]
        return Plan([*srun_nodes, *torchrun], {node: shlex.join(torchrun) for node in alloc.nodes})
    text = hostfile_text(alloc)
    if style == "deepspeed-slurm":
        # DeepSpeed's slurm runner runs `srun -n N·P python -u SCRIPT ARGS` and has no --module,
        # so the script is "-m" and the module is its first argument ("--" ends the options).
        # --force_multi: use srun even on one node; --no_ssh_check: srun needs no ssh.
        cmd = [*ds, *ds_common, "--launcher=slurm", "--force_multi", "--no_ssh_check", "--",
               "-m", "gwtn_dist", *gwtn_args]
        rank_cmd = [python, "-u", "-m", "gwtn_dist", *gwtn_args]
        return Plan(cmd, {node: f"{p} tasks (srun started by deepspeed): {shlex.join(rank_cmd)}"
                          for node in alloc.nodes}, env=rendezvous, hostfile=text)
    if style == "deepspeed-nossh":
        def on_node(rank: str) -> list[str]:
            return [*ds, *ds_common, "--no_ssh", f"--node_rank={rank}", "--module", "gwtn_dist",
                    *gwtn_args]

        # srun runs the same command everywhere; the shell fills in each node's own rank.
        quoted = shlex.join(on_node("NODE_RANK")).replace("--node_rank=NODE_RANK",
                                                           '--node_rank="$SLURM_NODEID"')
        cmd = [*srun_nodes, "bash", "-c", f"exec {quoted}"]
        return Plan(cmd, {node: shlex.join(on_node(str(k))) for k, node in enumerate(alloc.nodes)},
                    hostfile=text)
    cmd = [*ds, *ds_common, "--module", "gwtn_dist", *gwtn_args]  # deepspeed-hostfile
    return Plan(cmd, {node: f"(started by deepspeed over pdsh/ssh) deepspeed.launcher.launch "
                            f"--node_rank={k} … -m gwtn_dist {shlex.join(gwtn_args)}"
                      for k, node in enumerate(alloc.nodes)}, hostfile=text)


def _run_dir(gwtn_args: list[str], requeue: bool) -> Path:
    """The run directory of ``COMMAND CONFIG [overrides]`` (where the stop file goes). A
    ``{date}`` in it is filled here once and passed to every rank as ``run_dir=…``; it is
    refused where a requeued start would have to find the run again."""
    from .config import date_stamp, fill_run_dir, load_config

    if len(gwtn_args) < 2:
        raise LaunchError("after --, give the gwtn command: COMMAND CONFIG [key=value …]")
    cfg = load_config(gwtn_args[1], gwtn_args[2:])
    if "{date}" in cfg.run_dir:
        if requeue:
            raise LaunchError(f"run_dir {cfg.run_dir!r} has {{date}}, so a requeued job would "
                              f"start a new folder instead of resuming; give a fixed run_dir "
                              f"(e.g. with the job id) or pass --no-requeue")
        cfg = fill_run_dir(cfg, date_stamp(), continuing=gwtn_args[0] in ("imitate", "finetune"))
        gwtn_args.append(f"run_dir={cfg.run_dir}")
    return Path(cfg.run_dir.replace("{seed}", str(cfg.seed)))


def _requeue(job_id: str) -> None:
    log.info("requeueing job %s; it resumes from the checkpoint", job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True)


def launch(args: argparse.Namespace) -> int:
    """Run (or with ``--dry-run`` print) the plan; see the module docstring. Returns the exit
    code."""
    gwtn_args = list(args.gwtn)
    if gwtn_args[:1] == ["--"]:
        gwtn_args = gwtn_args[1:]
    preempt.signal_number(args.signal)  # a name that is no signal: refused before anything
    if args.port is not None:
        check_port(args.port, "--port")
    alloc = allocation(nodes=args.nodes, ranks_per_node=args.nproc_per_node)
    if alloc.restarts and "resume=true" not in gwtn_args:
        gwtn_args.append("resume=true")  # a requeued job continues the run it started
    run_dir = _run_dir(gwtn_args, requeue=bool(alloc.job_id) and not args.no_requeue)
    # In the working directory (the submit directory, shared by the nodes like the run
    # directory, which must hold nothing but the run before the run starts).
    hostfile = Path(args.hostfile or f"gwtn-hostfile-{alloc.job_id or 'local'}")
    from .config import load_config

    plan = build(args.style, gwtn_args, alloc, port=args.port or rendezvous_port(),
                 hostfile=hostfile if args.style in NEEDS_HOSTFILE else None,
                 rendezvous_timeout_s=load_config(gwtn_args[1], gwtn_args[2:])
                 .dist.rendezvous_timeout_s)
    if args.dry_run:
        print(plan.describe(args.style, alloc))
        return 0
    if plan.hostfile is not None:
        hostfile.write_text(plan.hostfile)
    # A stop request left by the previous start of this job must not stop this one.
    preempt.stop_file(run_dir).unlink(missing_ok=True)
    requested = []

    def on_signal(signum, frame):
        log.info("got %s: asking the ranks to checkpoint and stop", signal.Signals(signum).name)
        run_dir.mkdir(parents=True, exist_ok=True)
        preempt.stop_file(run_dir).touch()
        requested.append(signum)

    # Ctrl-C and SIGTERM ask the ranks to stop the same way (the launched command may get them
    # too: from the terminal, or torchrun passes them on), never requeued: someone wants the
    # job to end. The launcher itself waits for the ranks, so that none is killed mid-save.
    for sig in {preempt.signal_number(args.signal), *preempt.INTERRUPTS}:
        preempt.handle(sig, on_signal)
    log.info("launching (%s): %s", args.style, shlex.join(plan.command))
    env = {**os.environ, **plan.env, preempt.SIGNAL_VARIABLE: args.signal}
    try:
        code = subprocess.run(plan.command, env=env, check=False).returncode
    except FileNotFoundError as exc:
        raise LaunchError(f"{exc.filename} not found: style {args.style} runs inside a SLURM "
                          f"job; on one machine use --style local") from exc
    if code == 0:
        # A request that came after the last step found nobody to consume it.
        preempt.stop_file(run_dir).unlink(missing_ok=True)
        return 0
    # Ranks that got the signal themselves (--signal=USR1@N without B:, ranks started by srun)
    # exit with EXIT_CODE, which srun passes on; a stop requested here may come back as any
    # failure (torchrun reports its ranks' exit as 1).
    if code == peers.EXIT_CODE and alloc.job_id and not args.no_requeue:
        # A lost rank or host (peers.py): the job goes back in the queue and resumes from its
        # last checkpoint once SLURM has the nodes again.
        _requeue(alloc.job_id)
        return code
    if not (requested or code == preempt.EXIT_CODE):
        return code
    interrupted = any(s in preempt.INTERRUPTS for s in requested)
    if interrupted and code in (128 + s for s in preempt.INTERRUPTS):
        return code  # a second Ctrl-C or SIGTERM stopped the ranks at once
    if alloc.job_id and not args.no_requeue and not interrupted:
        _requeue(alloc.job_id)
    return preempt.EXIT_CODE


def add_launch_command(sub: argparse._SubParsersAction) -> None:
    """Register ``gwtn launch`` on the CLI's subcommands."""
    p = sub.add_parser("launch", help="start a gwtn command on every node of a SLURM job",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--style", choices=STYLES, default="srun-torchrun")
    p.add_argument("--nproc-per-node", type=int,
                   help="ranks per node (default: the job's tasks per node; 1 outside SLURM)")
    p.add_argument("--nodes", help="SLURM host list, e.g. 'gpu[01-04]' (default: the job's; "
                   "outside a job, for --dry-run)")
    p.add_argument("--port", type=int, help="rendezvous port (default: MASTER_PORT, else "
                   "20000 + job id %% 20000)")
    p.add_argument("--hostfile", help="where the deepspeed styles write their hostfile "
                   "(default: ./gwtn-hostfile-JOBID)")
    p.add_argument("--signal", default=os.environ.get(preempt.SIGNAL_VARIABLE, "USR1"),
                   help="the warning signal SLURM sends before the end (--signal=B:USR1@N)")
    p.add_argument("--no-requeue", action="store_true",
                   help="after a stop on the signal, exit with code 75 instead of requeueing")
    p.add_argument("--dry-run", action="store_true", help="print what each node would run")
    p.add_argument("gwtn", nargs=argparse.REMAINDER, metavar="-- COMMAND CONFIG [key=value …]")
    p.set_defaults(func=launch)
