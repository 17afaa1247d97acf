"""The ``gwtn`` command (also ``python -m gwtn_dist``).

    gwtn shards fashion-mnist OUT [--src DIR]      write webdataset shards
    gwtn shards imagefolder|wikipedia|text …       shards for ImageNet / BERT pretraining
    gwtn tokenizer train FILE… --out PATH          a WordPiece tokenizer
    gwtn run CONFIG [key=value ...]                wide → imitate → finetune (+ baselines)
    gwtn wide|imitate|finetune CONFIG [key=value]  one stage, in run_dir
    gwtn compare CONFIG [key=value ...]            the method vs baselines over seeds
    gwtn regime CONFIG [key=value ...]             one comparison per cell of a grid
    gwtn export WEIGHTS OUT [--tokenizer T]        a BERT → Hugging Face; a ResNet → torchvision
    gwtn config CONFIG [key=value ...]             print the resolved config, with help
    gwtn plan CONFIG --nodes N --gpus-per-node G   memory and time per stage and rank
    gwtn rehearse CONFIG [key=value ...]           every stage at true size, a few steps

Under a launcher (``torchrun``, ``deepspeed``, ``srun``) every rank runs the same command; the
rank layout comes from the launcher's environment (see ``gwtn_dist.distributed.env``).

Exit codes: 0 done; 2 a bad config, command line, data source or stage order; 3 training
diverged (a non-finite loss: no checkpoint is written after it); 4 an unreadable or damaged
file: a checkpoint, weights, a shard index, or an evaluation split read short of its index;
74 an I/O error (an unwritable or full run folder); 75 stopped on request (preemption, SIGTERM
or Ctrl-C: checkpointed at the next step, resume later); 130 / 143 a second Ctrl-C / SIGTERM
(stopped at once, without a checkpoint). Each prints one line naming the problem, never a
traceback (docs/bad_inputs.md lists the bad inputs tested and what each gives).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .benchmarks.kernels import add_arguments as add_kernel_bench_arguments
from .checkpoint import CheckpointError
from .config import Config, ConfigError, date_stamp, fill_run_dir, load_config
from .data.commands import add_shard_commands, add_tokenizer_command
from .data.datasets import ensure_shards
from .data.errors import DamagedDataError, DataSourceError
from .distributed import peers, preempt, runtime, setup
from .distributed.env import LaunchError
from .export_hf import ExportError
from .launch import add_launch_command
from .stages.common import StageOrderError

EXIT_DIVERGED, EXIT_CHECKPOINT, EXIT_IO = 3, 4, 74


def _load(args: argparse.Namespace,
          continuing: bool = False) -> tuple[runtime.Runtime, Config]:
    """The process's Runtime (made here, once: the job's ranks joined if launched on several)
    and the config, after making the data; its run_dir's ``{date}`` and ``{seed}`` filled
    (``continuing``: a command that continues a run, which a ``{date}`` cannot name)."""
    cfg = load_config(args.config, args.overrides)
    rt = setup.setup(cfg)
    cfg = fill_run_dir(cfg, _job_date_stamp(rt), continuing=continuing)
    if not rt.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    check_loss_backend(cfg, runtime.device_for(cfg, rt.env))
    preempt.install(Path(cfg.run_dir), rt)
    ensure_shards(cfg, is_main=rt.is_main)
    runtime.barrier()  # the other ranks wait while rank 0 writes missing shards
    return rt, cfg


def _job_date_stamp(rt: runtime.Runtime) -> str:
    """``{date}`` for this run: rank 0's clock, so every rank of a job names the same folder."""
    digits = int(date_stamp().replace("-", ""))  # 14 digits: exact in a float64 all-reduce
    digits = str(int(rt.rank0_value(digits)))
    return f"{digits[:8]}-{digits[8:]}"


def check_loss_backend(cfg: Config, device) -> None:
    """Refuse an imitation-loss backend that cannot run here before any stage starts."""
    if cfg.imitate.loss_backend != "triton":
        return
    from .kernels import select_imitation_mse

    try:
        select_imitation_mse("triton", device)
    except RuntimeError as exc:
        raise ConfigError(f"imitate.loss_backend: {exc}") from None


def _cmd_run(args: argparse.Namespace) -> None:
    from .pipeline import run_all

    run_all(*_load(args))


def _cmd_stage(args: argparse.Namespace) -> None:
    from .pipeline import run_stage
    from .spec import resolve

    rt, cfg = _load(args, continuing=args.command != "wide")
    spec = resolve(cfg)
    run_dir, record = run_stage(rt, spec, args.command)
    if not rt.is_main:
        return
    task = spec.task
    # The test split's score, or the validation one when the test split is not read.
    metric = task.metric if task.metric in record else task.select_metric
    label = task.metric_label if metric == task.metric else task.labels.get(
        metric, metric.replace("_", " "))
    print(f"{args.command}: {label} {record[metric]:.4f} after "
          f"{record['steps']} steps ({record['wall_s']:.0f} s); weights in "
          f"{run_dir / args.command / 'model.pt'}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare

    compare(*_load(args))


def _cmd_regime(args: argparse.Namespace) -> None:
    from .regime import regime

    rt, cfg = _load(args)
    if not cfg.regime.axes:
        raise ConfigError("regime.axes: give one or two axes of cells to compare")
    regime(rt, cfg)


def _cmd_export(args: argparse.Namespace) -> None:
    from .export_hf import export_weights

    files = export_weights(Path(args.weights), Path(args.out),
                           Path(args.tokenizer) if args.tokenizer else None)
    out = str(args.out)
    how = (f"torch.load({str(files[0])!r}) into a torchvision/timm ResNet of the shape in "
           f"config.json" if files[0].name == "model.pt" else
           f"transformers.BertForMaskedLM.from_pretrained({out!r})")
    print(f"wrote {', '.join(f.name for f in files)} in {out}; load with {how}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .benchmarks.step import bench_imitate, bench_step, table
    from .pipeline import apply_runtime

    if args.steps < 1 or args.rounds < 1:
        raise ConfigError("--steps and --rounds: positive numbers of steps and rounds")
    rt, cfg = _load(args)
    apply_runtime(cfg)
    run = bench_step if args.what == "step" else bench_imitate
    rows = run(rt, cfg, args.steps, args.rounds, Path(args.out))
    print(table(rows))
    print(f"csv: {Path(args.out) / f'bench_{args.what}.csv'}")


def _cmd_bench_kernels(args: argparse.Namespace) -> None:
    from .benchmarks.imitation_kernels import run_command

    run_command(args)


def _cmd_profile(args: argparse.Namespace) -> None:
    from .profile_report import profile

    table, plot = profile(Path(args.run_dir))
    print(table)
    print(f"plot: {plot}")


def _cmd_config(args: argparse.Namespace) -> None:
    from .config_doc import commented_yaml

    print(commented_yaml(load_config(args.config, args.overrides)), end="")


class _Parser(argparse.ArgumentParser):
    """argparse, with a command-line mistake in one line (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gwtn", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--version", action="version", version=f"gwtn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    kinds = sub.add_parser("shards", help="write webdataset shards of a dataset").add_subparsers(
        dest="dataset", required=True)
    add_shard_commands(kinds)
    add_tokenizer_command(sub)
    add_launch_command(sub)

    helps = {
        "run": ("all three stages, then the other arms of `arms`", _cmd_run),
        "wide": ("stage 1: train the wide twin", _cmd_stage),
        "imitate": ("stage 2: layerwise imitation of the wide twin", _cmd_stage),
        "finetune": ("stage 3: fine-tune the imitated thin net", _cmd_stage),
        "compare": ("the method against baselines over several seeds", _cmd_compare),
        "regime": ("one comparison per cell of a grid (regime.axes), and a heat map",
                   _cmd_regime),
    }
    for name, (text, func) in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML config, e.g. configs/fmnist_resnet.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. wide.steps=500")
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="a BERT → a Hugging Face BertForMaskedLM folder; a "
                       "ResNet → a torchvision/timm-named state dict")
    p.add_argument("weights", help="a stage's model.pt, e.g. runs/kjv/finetune/model.pt")
    p.add_argument("out", help="output folder (config.json and the weights)")
    p.add_argument("--tokenizer", help="BERT: a tokenizer.json to copy along (e.g. the shards' "
                   "one)")
    p.set_defaults(func=_cmd_export)
    benches = sub.add_parser("bench", help="what a training step costs, side by side") \
        .add_subparsers(dest="what", required=True)
    for what, text in (("step", "the framework's step against a bare PyTorch loop"),
                       ("imitate", ("an imitation step per loss backend against a plain "
                                    "step plus one teacher forward"))):
        p = benches.add_parser(what, help=text)
        p.add_argument("config", help="YAML config, e.g. configs/fmnist_resnet.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=64")
        p.add_argument("--steps", type=int, default=50, help="timed steps per round (default 50)")
        p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
        p.add_argument("--out", default="runs/bench", help="folder for the CSV (default "
                                                           "runs/bench)")
        p.set_defaults(func=_cmd_bench)
    p = benches.add_parser("kernels", help="the imitation loss kernel against eager PyTorch, "
                           "torch.compile and the matmul floor (CSV and plot; GPU timings)")
    add_kernel_bench_arguments(p)
    p.set_defaults(func=_cmd_bench_kernels)
    p = sub.add_parser("profile", help="where the training steps of a run spent their time "
                       "(table, and RUN_DIR/profile.png)")
    p.add_argument("run_dir", help="a run folder, e.g. runs/fmnist")
    p.set_defaults(func=_cmd_profile)
    p = sub.add_parser("config", help="print the resolved config (defaults included) as YAML")
    p.add_argument("config", help="YAML config, e.g. configs/fmnist_resnet.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. wide.steps=500")
    p.set_defaults(func=_cmd_config)
    from .plan.commands import add_plan_commands

    add_plan_commands(sub, load=_load)
    return parser


def _without_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the deepspeed launcher appends (LOCAL_RANK carries it too)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def _quiet_first(argv: list[str]) -> list[str]:
    """``-q`` may stand anywhere before a ``--`` (``gwtn run CONFIG -q``): move it to the front,
    where the parser reads it. After ``--`` it belongs to the command ``gwtn launch`` starts."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a not in ("-q", "--quiet")]
    return (["-q"] if len(head) < end else []) + head + argv[end:]


def _say(line: str) -> None:
    """Write one line to stderr in a single write. ``print`` writes the text and its newline
    apart, so two ranks sharing one stderr (torchrun, srun) could run their lines together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = _quiet_first(_without_local_rank(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[gwtn %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    preempt.install_outside_training()
    try:
        code = args.func(args)
        runtime.barrier()  # no rank tears the process group down while another still uses it
    except DamagedDataError as exc:  # before the data errors it is one of
        _say(f"gwtn: error: {exc}")
        return EXIT_CHECKPOINT
    except (ConfigError, DataSourceError, StageOrderError, LaunchError, ExportError) as exc:
        _say(f"gwtn: error: {exc}")
        return 2
    except preempt.Preempted as exc:
        _say(f"gwtn: {exc}")
        return preempt.EXIT_CODE
    except preempt.Interrupted as exc:
        _say(f"gwtn: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the handlers were set
        _say("gwtn: SIGINT: stopped")
        return 130
    except FloatingPointError as exc:
        _say(f"gwtn: error: training diverged: {exc}")
        return EXIT_DIVERGED
    except CheckpointError as exc:
        _say(f"gwtn: error: {exc}")
        return EXIT_CHECKPOINT
    except OSError as exc:  # after the data errors above (DataSourceError is an OSError too)
        _say(f"gwtn: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return EXIT_IO
    except peers.JoinFailed as exc:
        _say(f"gwtn: error: {exc}")
        return peers.EXIT_CODE
    except RuntimeError as exc:
        if not peers.is_peer_failure(exc):
            raise
        line = peers.explain(exc)  # a lost rank or host: one line from the lowest survivor
        if line:
            _say(f"gwtn: error: {line}")
        return peers.EXIT_CODE
    finally:
        from .pipeline import release_locks

        release_locks()
        runtime.leave()
        preempt.restore()
    return code or 0
