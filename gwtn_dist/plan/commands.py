"""The ``gwtn plan`` and ``gwtn rehearse`` subcommands (registered by ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError


def _cmd_rehearse(args: argparse.Namespace, load: Callable) -> int | None:
    from .memwatch import MemoryWatch
    from .rehearse import RehearsalFailed, fits_here, rehearse, run_recorded_stage, table

    if args.stage:  # one stage on this rank, under the rehearsal's launcher
        watch = MemoryWatch()
        rt, cfg = load(args, continuing=True)
        run_recorded_stage(rt, cfg, args.stage, watch, Path(args.record))
        return None
    out = Path(args.out)
    try:
        record = rehearse(args.config, args.overrides, out, ranks=args.ranks, steps=args.steps,
                          micro_batch=args.micro_batch, seq_len=args.seq_len,
                          real_data=args.real_data,
                          check_fit=None if args.no_plan else fits_here)
    except RehearsalFailed as exc:
        sys.stderr.write(f"gwtn: error: {exc}\n")
        return exc.code
    print(table(record))
    print(f"record: {out / 'rehearsal.json'}")
    return None


def _seq_len(cfg, given: int | None) -> int | None:
    """Tokens per sequence of a text config: ``--seq-len``, else its shards' (index.json),
    else 128 (what ``gwtn shards wikipedia`` writes by default)."""
    if given:
        return given
    index = Path(cfg.data.shards) / "index.json"
    if index.is_file():
        try:
            return int(json.loads(index.read_text()).get("seq_len") or 0) or 128
        except (ValueError, TypeError):
            pass
    return 128


def _cmd_plan(args: argparse.Namespace) -> int | None:
    from ..config import load_config
    from .planner import Layout, headroom_line, make_plan, parse_bytes, read_throughput, table

    if args.check:
        from .check import check

        text, rows = check(Path(args.check))
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return None
    if args.config is None:
        raise ConfigError("gwtn plan: give a CONFIG (or --check REHEARSAL)")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node: positive numbers")
    cfg = load_config(args.config, args.overrides)
    cpu = args.device == "cpu"
    if cpu:
        from .check import meminfo_bytes
        from .probe import measure

        memory = parse_bytes(args.memory, "--memory") if args.memory else \
            meminfo_bytes("MemAvailable")
        early, floor = measure(args.config, args.overrides, args.nodes * args.gpus_per_node)
        runtime, runtime_early = int(floor * 2**20), int(early * 2**20)
    else:
        memory, runtime = parse_bytes(args.gpu_memory, "--gpu-memory"), 0
        runtime_early = None
    reserve = parse_bytes(args.reserve, "--reserve") if args.reserve else (0 if cpu else None)
    layout = Layout(nodes=args.nodes, per_node=args.gpus_per_node, device=args.device,
                    memory=memory, runtime=runtime, runtime_early=runtime_early,
                    **({} if reserve is None else {"reserve": reserve}))
    world = layout.world
    throughput = (read_throughput(args.throughput, args.throughput_batch or
                                  cfg.data.batch_size) if args.throughput else None)
    text_seq = _seq_len(cfg, args.seq_len) if cfg.data.dataset == "text" else None
    plan = make_plan(cfg, layout, config_name=args.config, throughput=throughput,
                     bandwidth=args.bandwidth * 1e9, seq_len=text_seq)
    print(table(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.as_dict(), indent=1))
    refusal = headroom_line(plan)
    if refusal:
        raise ConfigError(f"{refusal} ({world} rank(s))")
    return None


def add_plan_commands(sub: argparse._SubParsersAction, load: Callable) -> None:
    """Register ``gwtn plan`` and ``gwtn rehearse``; ``load(args, continuing)`` is the CLI's
    start-up of a run command (config, runtime, shards)."""
    p = sub.add_parser("plan", help="memory, communication and time per stage and rank of a "
                       "layout, before it runs (refuses one that cannot fit)")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/imagenet_resnet50.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=512")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="ranks per node: GPUs, or CPU processes with --device cpu (default 8)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="plan for GPUs (default) or CPU ranks sharing a node's memory")
    p.add_argument("--memory", help="--device cpu: a node's memory (default: this machine's "
                                    "available memory)")
    p.add_argument("--reserve", help="memory kept free per rank (default 2GB per GPU, 0 on CPU)")
    p.add_argument("--throughput", help="the thin net's training throughput: a `gwtn bench "
                   "step` CSV, or samples per second per rank")
    p.add_argument("--throughput-batch", type=int,
                   help="the batch the CSV was measured at (default data.batch_size)")
    p.add_argument("--bandwidth", type=float, default=25.0,
                   help="GB/s a rank sends at, for the communication time (default 25)")
    p.add_argument("--seq-len", type=int, help="text: tokens per sequence (default: the "
                                               "shards', else 128)")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.add_argument("--check", metavar="REHEARSAL", help="compare the plan with a `gwtn "
                   "rehearse` folder's measured peaks instead")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("rehearse", help="every stage at true size for a few steps on a few "
                       "local ranks, with each rank's peak memory (before booking a cluster)")
    p.add_argument("config", help="YAML config, e.g. configs/imagenet_resnet50.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dist.wide_zero_stage=3")
    p.add_argument("--ranks", type=int, default=4, help="local processes (default 4)")
    p.add_argument("--steps", type=int, default=3,
                   help="steps per phase (default 3: a sharded teacher reaches its steady "
                        "memory at its third forward)")
    p.add_argument("--micro-batch", type=int, default=2,
                   help="samples per rank and step (default 2)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per synthetic sequence (text configs; default 128)")
    p.add_argument("--real-data", action="store_true",
                   help="read the config's shards instead of writing synthetic ones")
    p.add_argument("--out", default="runs/rehearsal", help="folder (default runs/rehearsal)")
    p.add_argument("--no-plan", action="store_true",
                   help="run even where the plan says this machine's memory is too small")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # one stage, under the launcher
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.set_defaults(func=lambda args: _cmd_rehearse(args, load))
