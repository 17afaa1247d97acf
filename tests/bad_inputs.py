"""The bad inputs gwtn is tested against, and what each gives: the one list that
``docs/bad_inputs.md`` is generated from and ``tests/test_bad_inputs.py`` walks.

    python -m tests.bad_inputs --write      # regenerate docs/bad_inputs.md from CASES

Every case is a ``gwtn`` command line (with its environment and the files a setup step makes)
that must end with its exit code and a first line that starts as given, in one line, with no
traceback. Placeholders: ``{config}`` configs/tiny_cpu.yaml, ``{shards}`` the tests' synthetic
Fashion-MNIST shards (1200 train, 300 test; a damaged copy where a setup makes one), ``{tmp}`` a
fresh folder, ``{run}`` ``{tmp}/run``, ``{host}`` this machine's name. Inputs that need a
process killed, a disk filled or several processes are tested apart (``ELSEWHERE``).

Add a case here (and regenerate the doc) for every bad input found; ``FLOOR`` keeps the count
from going down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"
FLOOR = 142  # CASES may only grow

# A few steps of the tiny net on the synthetic shards: the bad input is met before or right
# after them.
WIDE = ("wide", "{config}", "run_dir={run}", "data.shards={shards}", "progress=false",
        "threads=1", "eval_every=0", "data.train_samples=0", "wide.steps=2")


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` after ``gwtn -q``, ``env`` added to the environment, ``setup``
    (a name in SETUPS) run first; it must exit with ``code`` and print one line starting with
    ``line``."""

    category: str
    what: str
    argv: tuple[str, ...]
    code: int
    line: str
    env: dict[str, str] = field(default_factory=dict)
    setup: str = ""


def wide(*overrides: str) -> tuple[str, ...]:
    return (*WIDE, *overrides)


def dry(*options: str) -> tuple[str, ...]:
    return ("launch", "--dry-run", *options, "--", "wide", "{config}", "run_dir={run}")


E = "gwtn: error: "
CONFIG = "config values"
FILES = "config files and the command line"
RUNS = "run folders"
CKPT = "checkpoints and weights"
DATA = "data"
EXPORT = "gwtn export"
LAUNCH = "gwtn launch and the launch environment"

CASES: list[Case] = [
    # Config values: a line naming the key, before anything runs.
    Case(CONFIG, "`seed` past 64 bits", wide("seed=100000000000000000000000"), 2,
         E + "seed: 100000000000000000000000 does not fit in 64 bits"),
    Case(CONFIG, "`seed=1e23`", wide("seed=1e23"), 2,
         E + "seed: expected an integer, got '1e23'"),
    Case(CONFIG, "negative `seed`", wide("seed=-1"), 2,
         E + "seed: a seed in [0, 4294967295] (2**32 - 1), got -1"),
    Case(CONFIG, "`seed` past 2**32", wide("seed=4294967296"), 2,
         E + "seed: a seed in [0, 4294967295]"),
    Case(CONFIG, "`seed` not a number", wide("seed=abc"), 2,
         E + "seed: expected an integer, got 'abc'"),
    Case(CONFIG, "`data.val_seed` past 64 bits", wide("data.val_seed=100000000000000000000000"),
         2, E + "data.val_seed: 100000000000000000000000 does not fit in 64 bits"),
    Case(CONFIG, "a huge seed in `compare.seeds`", wide("compare.seeds=[5000000000]"), 2,
         E + "compare.seeds: a seed in [0, 4294967295]"),
    Case(CONFIG, "`compare.seeds` empty", wide("compare.seeds=[]"), 2,
         E + "compare.seeds: give at least one seed"),
    Case(CONFIG, "`compare.seeds` repeated", wide("compare.seeds=[1,1]"), 2,
         E + "compare.seeds: seeds must differ"),
    Case(CONFIG, "`threads=100000`", wide("threads=100000"), 2,
         E + "threads: at most 1,024, got 100,000"),
    Case(CONFIG, "negative `threads`", wide("threads=-1"), 2, E + "threads: must be >= 0"),
    Case(CONFIG, "`wide.steps=1e23`", wide("wide.steps=1e23"), 2,
         E + "wide.steps: expected an integer, got '1e23'"),
    Case(CONFIG, "`wide.steps` past 64 bits", wide("wide.steps=100000000000000000000000"), 2,
         E + "wide.steps: 100000000000000000000000 does not fit in 64 bits"),
    Case(CONFIG, "`wide.steps` over 10**9", wide("wide.steps=2000000000"), 2,
         E + "wide.steps: at most 1,000,000,000, got 2,000,000,000"),
    Case(CONFIG, "`wide.steps=0` without `wide.init`", wide("wide.steps=0"), 2,
         E + "wide.steps: must be > 0"),
    Case(CONFIG, "negative `imitate.steps_per_point`", wide("imitate.steps_per_point=-3"), 2,
         E + "imitate.steps_per_point: must be > 0"),
    Case(CONFIG, "`finetune` with no steps", wide("finetune.kd_steps=0",
                                                 "finetune.label_steps=0"), 2,
         E + "finetune: kd_steps + label_steps must be > 0"),
    Case(CONFIG, "`checkpoint.every=0`", wide("checkpoint.every=0"), 2,
         E + "checkpoint.every: must be > 0"),
    Case(CONFIG, "`eval_every` past 64 bits", wide("eval_every=100000000000000000000000"), 2,
         E + "eval_every: 100000000000000000000000 does not fit in 64 bits"),
    Case(CONFIG, "an infinite learning rate", wide("wide.optim.lr=1e400"), 2,
         E + "wide.optim.lr: expected a finite number, got inf"),
    Case(CONFIG, "a NaN learning rate", wide("wide.optim.lr=.nan"), 2,
         E + "wide.optim.lr: expected a finite number, got nan"),
    Case(CONFIG, "a zero learning rate", wide("wide.optim.lr=0"), 2,
         E + "wide.optim.lr: must be > 0, got 0.0"),
    Case(CONFIG, "`momentum=1`", wide("wide.optim.momentum=1"), 2,
         E + "wide.optim.momentum: must be in [0, 1), got 1.0"),
    Case(CONFIG, "`betas` of three numbers", wide("wide.optim.betas=[0.9,0.9,0.9]"), 2,
         E + "wide.optim.betas: must be two numbers in [0, 1)"),
    Case(CONFIG, "`accumulate` that does not split the batch",
         wide("wide.optim.accumulate=3"), 2,
         E + "wide.optim.accumulate: data.batch_size 64 does not split into 3 equal"),
    Case(CONFIG, "an optimizer that does not exist", wide("wide.optim.name=adam"), 2,
         E + "wide.optim.name: 'adam' is not allowed"),
    Case(CONFIG, "`data.batch_size=0`", wide("data.batch_size=0"), 2,
         E + "data.batch_size: must be > 0, got 0"),
    Case(CONFIG, "`data.batch_size` past 64 bits",
         wide("data.batch_size=100000000000000000000000"), 2,
         E + "data.batch_size: 100000000000000000000000 does not fit in 64 bits"),
    Case(CONFIG, "`data.train_samples` beyond the dataset", wide("data.train_samples=10000000"),
         2, E + "data.train_samples: 10000000 is more than the 1000 training samples in "
                "{shards} (after the 200 held out for validation)"),
    Case(CONFIG, "negative `data.train_samples`", wide("data.train_samples=-1"), 2,
         E + "data.train_samples: must be >= 0"),
    Case(CONFIG, "`data.val_samples` over a quarter of the data", wide("data.val_samples=900"),
         2, E + "data.val_samples: 900 is more than a quarter of the 1200 training samples"),
    Case(CONFIG, "`data.dataset` unknown", wide("data.dataset=mnist"), 2,
         E + "data.dataset: 'mnist' is not allowed"),
    Case(CONFIG, "`data.eval_missing_ok=1`", wide("data.eval_missing_ok=1"), 2,
         E + "data.eval_missing_ok: a fraction in [0, 1), got 1.0"),
    Case(CONFIG, "a key of another dataset", wide("data.mlm_probability=0"), 2,
         E + "data.mlm_probability is not a key of a fashion-mnist dataset (it is a text key"),
    Case(CONFIG, "`data.mlm_probability=0`", ("wide", "{tmp}/bert.yaml", "run_dir={run}",
                                              "data.mlm_probability=0"), 2,
         E + "data.mlm_probability: must be in (0, 1)", setup="bert_config"),
    Case(CONFIG, "`device=tpu`", wide("device=tpu"), 2, E + "device: 'tpu' is not allowed"),
    Case(CONFIG, "`dist.precision=fp8`", wide("dist.precision=fp8"), 2,
         E + "dist.precision: 'fp8' is not allowed"),
    Case(CONFIG, "`dist.deepspeed` naming an optimizer",
         wide("dist.deepspeed={optimizer: {type: Adam}}"), 2,
         E + "dist.deepspeed.optimizer: the optimizer and its schedule come from"),
    Case(CONFIG, "an unknown key", wide("nope=1"), 2, E + "unknown key nope; allowed here:"),
    Case(CONFIG, "an unknown key in a section", wide("wide.nope=1"), 2,
         E + "unknown key wide.nope; allowed here:"),
    Case(CONFIG, "a value where a section goes", wide("wide=3"), 2,
         E + "wide: expected a mapping of WideStageConfig fields, got 3"),
    Case(CONFIG, "a key of another model family", wide("model.layers=2"), 2,
         E + "model.layers is not a key of a resnet model"),
    Case(CONFIG, "`model.blocks` and `model.inner_widths` of other lengths",
         wide("model.blocks=[1,1]"), 2,
         E + "model.inner_widths: needs one width per stage (2 stages in model.blocks)"),
    Case(CONFIG, "an arm twice", wide("arms=[win,win]"), 2,
         E + "arms: each arm once, got ['win', 'win']"),
    Case(CONFIG, "an arm that does not exist", wide("arms=[win,bogus]"), 2,
         E + "arms: 'bogus' is not an arm"),
    Case(CONFIG, "a placeholder `run_dir` does not know", ("wide", "{config}",
                                                          "run_dir={tmp}/x-{bogus}"), 2,
         E + "run_dir: '{tmp}/x-{bogus}' may hold only the placeholders {date} and {seed}"),
    Case(CONFIG, "`{date}` in `run_dir` with `resume=true`",
         ("wide", "{config}", "run_dir={tmp}/x-{date}", "resume=true"), 2,
         E + "run_dir: '{tmp}/x-{date}' has {date}, which names a new folder at every start"),

    # Config files and the command line.
    Case(FILES, "a config file that does not exist", ("wide", "{tmp}/absent.yaml"), 2,
         E + "config file {tmp}/absent.yaml does not exist"),
    Case(FILES, "a config file that is not UTF-8", ("wide", "{tmp}/latin1.yaml"), 2,
         E + "{tmp}/latin1.yaml: not UTF-8 text (byte 6); save it as UTF-8",
         setup="latin1_config"),
    Case(FILES, "a YAML key given twice", ("wide", "{tmp}/twice.yaml"), 2,
         E + "{tmp}/twice.yaml: not valid YAML (the key 'seed' is given twice", setup="dup_config"),
    Case(FILES, "malformed YAML", ("wide", "{tmp}/broken.yaml"), 2,
         E + "{tmp}/broken.yaml: not valid YAML (", setup="broken_config"),
    Case(FILES, "a config whose top level is a list", ("wide", "{tmp}/list.yaml"), 2,
         E + "{tmp}/list.yaml: the top level must be a mapping of keys", setup="list_config"),
    Case(FILES, "a folder as the config", ("wide", "{tmp}"), 2,
         E + "config file {tmp} does not exist"),
    Case(FILES, "an override without `=`", wide("seed"), 2,
         E + "override 'seed' must look like key.sub=value"),
    Case(FILES, "an override that is not YAML", wide("seed=[1"), 2,
         E + "override 'seed=[1': not valid YAML ("),
    Case(FILES, "an override below a value", wide("seed.x=1"), 2,
         E + "seed.x: seed is a value, not a section"),
    Case(FILES, "no command", (), 2, E + "the following arguments are required: command"),
    Case(FILES, "an unknown command", ("train",), 2, E + "argument command: invalid choice"),
    Case(FILES, "a stage command without a config", ("wide",), 2,
         "gwtn wide: error: the following arguments are required: config"),
    Case(FILES, "`gwtn bench step --steps 0`", ("bench", "step", "{config}", "--steps", "0"), 2,
         E + "--steps and --rounds: positive numbers of steps and rounds"),
    Case(FILES, "`gwtn profile` of a folder that is not there", ("profile", "{tmp}/absent"), 2,
         E + "{tmp}/absent: no such run folder"),
    Case(FILES, "`gwtn shards fashion-mnist` from a folder without the files",
         ("shards", "fashion-mnist", "{tmp}/out", "--src", "{tmp}/absent"), 2, E),
    Case(FILES, "`GWTN_PREEMPT_SIGNAL` that is no signal", wide(), 2,
         E + "stop signal 'BOGUS' (--signal or GWTN_PREEMPT_SIGNAL) is not a signal",
         env={"GWTN_PREEMPT_SIGNAL": "BOGUS"}),
    Case(FILES, "`GWTN_PREEMPT_SIGNAL=KILL` (cannot be caught)", wide(), 2,
         E + "stop signal 'KILL': SIGKILL cannot be caught", env={"GWTN_PREEMPT_SIGNAL": "KILL"}),

    # Run folders.
    Case(RUNS, "`run_dir` below a file", wide("run_dir={tmp}/a-file/run"), 74,
         E + "Not a directory: {tmp}/a-file/run", setup="a_file"),
    Case(RUNS, "`gwtn run` in a folder that holds other files", ("run", *WIDE[1:]), 2,
         E + "{run} exists and is not a gwtn run directory; choose another",
         setup="foreign_folder"),
    Case(RUNS, "`gwtn run` again in a run's folder without `resume=true`", ("run", *WIDE[1:]),
         2, E + "{run} already holds a run; pass resume=true to continue it",
         setup="saved_run"),
    Case(RUNS, "`resume=true` under a changed config", ("run", *WIDE[1:], "resume=true"), 2,
         E + "resume=true but the config differs from the one {run} was started with: ",
         setup="saved_run"),
    Case(RUNS, "a stage command under a changed config", wide(), 2,
         E + "the config differs from the one {run} was started with: ", setup="saved_run"),
    Case(RUNS, "a run folder another live process holds", wide(), 2,
         E + "{run} is in use by process", setup="held_lock"),
    Case(RUNS, "`gwtn imitate` before the wide stage", ("imitate", *WIDE[1:]), 2,
         E + "{run}/wide has not finished; run `gwtn wide` first"),
    Case(RUNS, "`gwtn finetune` before imitation", ("finetune", *WIDE[1:]), 2,
         E + "{run}/imitate has not finished; run `gwtn imitate` first"),

    # Checkpoints and weights: never run, one line naming the file, exit 4.
    Case(CKPT, "a torn `checkpoint.pt`", wide(), 4,
         E + "{run}/wide/checkpoint.pt cannot be read safely (", setup="torn_checkpoint"),
    Case(CKPT, "an empty `checkpoint.pt`", wide(), 4,
         E + "{run}/wide/checkpoint.pt cannot be read safely (", setup="empty_checkpoint"),
    Case(CKPT, "a `checkpoint.pt` whose pickle would run code", wide(), 4,
         E + "{run}/wide/checkpoint.pt cannot be read safely (it holds a Python object "
             "(posix.system), not plain tensors, and gwtn runs no code from a file)",
         setup="pickle_checkpoint"),
    Case(CKPT, "a `checkpoint.pt` holding a tensor", wide(), 4,
         E + "{run}/wide/checkpoint.pt is not a checkpoint of this stage (it holds a Tensor, "
             "not a mapping)", setup="tensor_checkpoint"),
    Case(CKPT, "a `checkpoint.pt` of other keys", wide(), 4,
         E + "{run}/wide/checkpoint.pt is not a checkpoint of this stage (no stream)",
         setup="dict_checkpoint"),
    Case(CKPT, "a `checkpoint.pt` stopped past the stage's steps", wide(), 4,
         E + "{run}/wide/checkpoint.pt is not a checkpoint of this stage (it stopped at step "
             "900 of phase 0", setup="late_checkpoint"),
    Case(CKPT, "a `checkpoint.pt` with another net's weights", wide(), 4,
         E + "{run}/wide/checkpoint.pt lacks ", setup="foreign_checkpoint"),
    Case(CKPT, "`wide.init` that does not exist", wide("wide.init={tmp}/absent.pt"), 2,
         E + "wide.init: {tmp}/absent.pt not found"),
    Case(CKPT, "`wide.init` that is not a torch file", wide("wide.init={tmp}/junk.pt"), 4,
         E + "wide.init: {tmp}/junk.pt cannot be read as weights (", setup="junk_weights"),
    Case(CKPT, "`wide.init` whose pickle would run code", wide("wide.init={tmp}/pickle.pt"), 4,
         E + "wide.init: {tmp}/pickle.pt cannot be read as weights (it holds a Python object",
         setup="pickle_weights"),
    Case(CKPT, "`wide.init` of lists, not tensors", wide("wide.init={tmp}/lists.pt"), 4,
         E + "wide.init: {tmp}/lists.pt: conv1.weight is a list, not a tensor",
         setup="list_weights"),
    Case(CKPT, "`wide.init` of another net", wide("wide.init={tmp}/other.pt"), 2,
         E + "wide.init: ", setup="other_weights"),

    # Data: the shard folder's index and tars.
    Case(DATA, "`data.shards` a pattern that matches nothing",
         wide("data.shards={tmp}/nothing-*.tar"), 2,
         E + "no shard files match the pattern '{tmp}/nothing-*.tar'"),
    Case(DATA, "`index.json` holding `null`", wide(), 4,
         E + "{shards}/index.json is not a shard index: expected an object with \"splits\"",
         setup="index_null"),
    Case(DATA, "`index.json` that is not JSON", wide(), 4,
         E + "{shards}/index.json is not valid JSON (", setup="index_broken"),
    Case(DATA, "`index.json` that is not UTF-8", wide(), 4,
         E + "{shards}/index.json is not valid JSON (", setup="index_latin1"),
    Case(DATA, "`index.json` holding a list", wide(), 4,
         E + "{shards}/index.json is not a shard index: expected an object", setup="index_list"),
    Case(DATA, "`index.json` naming `../train-00000.tar`", wide(), 4,
         E + "{shards}/index.json is not a shard index: split 'train' names the shard "
             "'../train-00000.tar', not a file in the folder", setup="index_traversal"),
    Case(DATA, "`index.json` naming an absolute path", wide(), 4,
         E + "{shards}/index.json is not a shard index: split 'train' names the shard "
             "'/etc/passwd', not a file in the folder", setup="index_absolute"),
    Case(DATA, "`index.json` with a negative sample count", wide(), 4,
         E + "{shards}/index.json is not a shard index: split 'train' has no sample count",
         setup="index_negative"),
    Case(DATA, "`index.json` with labels that are not numbers", wide(), 4,
         E + "{shards}/index.json is not a shard index: split 'train' has labels that are not "
             "class numbers", setup="index_labels"),
    Case(DATA, "a tar `index.json` lists is missing", wide(), 2,
         E + "{shards}: shards listed in index.json are missing:", setup="tar_missing"),
    Case(DATA, "64 KB of garbage in the middle of the test tar", wide(), 4,
         E + "{shards}/test-00000.tar is damaged (1 short tar, 150 missing samples): the test "
             "split reads 150 of the 300 samples its index lists", setup="test_garbage"),
    Case(DATA, "the test tar cut short", wide(), 4,
         E + "{shards}/test-00000.tar is damaged (1 truncated tar, ", setup="test_truncated"),
    Case(DATA, "64 KB of garbage in the middle of the training tar (the validation split)",
         wide(), 4, E + "{shards}/train-00000.tar is damaged (1 short tar, 600 missing samples):"
                        " the validation split (out of 'train') reads ", setup="train_garbage"),
    Case(DATA, "the training tar swapped for the test tar", wide(), 4,
         E + "{shards}/train-00000.tar holds 'test-0000000', a sample of another split than "
             "'train'", setup="swapped"),
    Case(DATA, "the test tar replaced by the training tar", wide(), 4,
         E + "{shards}/test-00000.tar holds 'train-0000000', a sample of another split than "
             "'test'", setup="test_is_train"),
    Case(DATA, "a tar that is not a tar at all (training)", wide(), 2,
         E + "the training shards {shards}/train-00000.tar… yield no full batch of 64",
         setup="train_not_a_tar"),

    # gwtn export.
    Case(EXPORT, "weights that do not exist", ("export", "{tmp}/absent.pt", "{tmp}/out"), 2,
         E + "{tmp}/absent.pt not found"),
    Case(EXPORT, "weights that are not a torch file", ("export", "{tmp}/junk.pt", "{tmp}/out"),
         4, E + "{tmp}/junk.pt cannot be read safely (", setup="junk_weights"),
    Case(EXPORT, "weights whose pickle would run code",
         ("export", "{tmp}/pickle.pt", "{tmp}/out"), 4,
         E + "{tmp}/pickle.pt cannot be read safely (it holds a Python object",
         setup="pickle_weights"),
    Case(EXPORT, "a model.pt whose meta has no shape", ("export", "{tmp}/lists.pt", "{tmp}/out"),
         4, E + "{tmp}/lists.pt is not a stage's model.pt (no family and shape in it)",
         setup="list_weights"),
    Case(EXPORT, "a model.pt whose shape is a string", ("export", "{tmp}/x.pt", "{tmp}/out"), 4,
         E + "{tmp}/x.pt: the shape it records cannot be built (", setup="shape_string"),
    Case(EXPORT, "a model.pt with a negative width", ("export", "{tmp}/x.pt", "{tmp}/out"), 4,
         E + "{tmp}/x.pt: the shape it records cannot be built (Trying to create tensor with "
             "negative dimension", setup="shape_negative"),
    Case(EXPORT, "a model.pt recording 10**9 blocks", ("export", "{tmp}/x.pt", "{tmp}/out"), 4,
         E + "{tmp}/x.pt: the shape it records cannot be built (a net with more parameters "
             "than the", setup="shape_huge"),
    Case(EXPORT, "a model.pt whose weights are of another shape",
         ("export", "{tmp}/x.pt", "{tmp}/out"), 4,
         E + "{tmp}/x.pt lacks layer1.1.", setup="shape_deeper"),
    Case(EXPORT, "a model.pt of a family gwtn does not know",
         ("export", "{tmp}/x.pt", "{tmp}/out"), 4,
         E + "{tmp}/x.pt is not a stage's model.pt (its family 'vit' is not one gwtn knows)",
         setup="shape_family"),

    # gwtn launch --dry-run, and the environment a launcher leaves.
    Case(LAUNCH, "`--nproc-per-node 0`", dry("--nproc-per-node", "0"), 2,
         E + "--nproc-per-node 0: at least 1 rank per node"),
    Case(LAUNCH, "`--nproc-per-node -4`", dry("--nproc-per-node", "-4"), 2,
         E + "--nproc-per-node -4: at least 1 rank per node"),
    Case(LAUNCH, "`--nproc-per-node x`", dry("--nproc-per-node", "x"), 2,
         "gwtn launch: error: argument --nproc-per-node: invalid int value: 'x'"),
    Case(LAUNCH, "`--port -1`", dry("--port", "-1"), 2, E + "--port -1 is not a TCP port"),
    Case(LAUNCH, "`--port 99999`", dry("--port", "99999"), 2,
         E + "--port 99999 is not a TCP port (1-65535)"),
    Case(LAUNCH, "`--port 0`", dry("--port", "0"), 2, E + "--port 0 is not a TCP port"),
    Case(LAUNCH, "a newline in a node name (a hostfile line injected)",
         dry("--style", "deepspeed-hostfile", "--nodes", "gpu1\nevil slots=64"), 2,
         E + "'gpu1\\nevil slots=64' is not a host name"),
    Case(LAUNCH, "a space in a node name", dry("--nodes", "gpu1 gpu2"), 2,
         E + "'gpu1 gpu2' is not a host name"),
    Case(LAUNCH, "a `;` in a node name", dry("--nodes", "gpu1;reboot"), 2,
         E + "'gpu1;reboot' is not a host name"),
    Case(LAUNCH, "a node name of 64 characters in a label", dry("--nodes", "n" * 64), 2,
         E + f"'{'n' * 64}' is not a host name"),
    Case(LAUNCH, "a 3-million-node range", dry("--nodes", "n[0-3000000]"), 2,
         E + "host list 'n[0-3000000]': more than 65,536 nodes"),
    Case(LAUNCH, "`gpu[05-01]`", dry("--nodes", "gpu[05-01]"), 2,
         E + "host list 'gpu[05-01]': the range 05-01 runs backwards"),
    Case(LAUNCH, "`gpu[]`", dry("--nodes", "gpu[]"), 2,
         E + "host list 'gpu[]': empty brackets"),
    Case(LAUNCH, "`gpu[01-03` (unclosed)", dry("--nodes", "gpu[01-03"), 2,
         E + "host list 'gpu[01-03': a '[' is never closed"),
    Case(LAUNCH, "`gpu]1[`", dry("--nodes", "gpu]1["), 2,
         E + "host list 'gpu]1[': brackets nested or closed before opened"),
    Case(LAUNCH, "`gpu[a-c]`", dry("--nodes", "gpu[a-c]"), 2,
         E + "host list 'gpu[a-c]': [a-c] holds 'a-c', not a number"),
    Case(LAUNCH, "`a,,b`", dry("--nodes", "a,,b"), 2,
         E + "host list 'a,,b': an empty name between commas"),
    Case(LAUNCH, "`--nodes ''`", dry("--nodes", ""), 2, E + "--nodes is empty"),
    Case(LAUNCH, "`--signal BOGUS`", dry("--signal", "BOGUS"), 2,
         E + "stop signal 'BOGUS' (--signal or GWTN_PREEMPT_SIGNAL) is not a signal"),
    Case(LAUNCH, "`--signal 999`", dry("--signal", "999"), 2,
         E + "stop signal '999' (--signal or GWTN_PREEMPT_SIGNAL) is not a signal"),
    Case(LAUNCH, "`--signal STOP`", dry("--signal", "STOP"), 2,
         E + "stop signal 'STOP': SIGSTOP cannot be caught"),
    Case(LAUNCH, "`--style local` on two nodes", dry("--style", "local", "--nodes", "a,b"), 2,
         E + "style local runs on this machine only, but the job has 2 nodes"),
    Case(LAUNCH, "`--style` unknown", dry("--style", "mpi"), 2,
         "gwtn launch: error: argument --style: invalid choice: 'mpi'"),
    Case(LAUNCH, "no command after `--`", ("launch", "--dry-run", "--"), 2,
         E + "after --, give the gwtn command: COMMAND CONFIG"),
    Case(LAUNCH, "`SLURM_RESTART_COUNT=x`", dry(), 2,
         E + "SLURM_RESTART_COUNT='x' is not a count of restarts",
         env={"SLURM_RESTART_COUNT": "x"}),
    Case(LAUNCH, "`SLURM_TASKS_PER_NODE=x`", dry(), 2,
         E + "SLURM_TASKS_PER_NODE='x' is not a count per node",
         env={"SLURM_TASKS_PER_NODE": "x"}),
    Case(LAUNCH, "`SLURM_TASKS_PER_NODE=4,2` (uneven)", dry(), 2,
         E + "SLURM_TASKS_PER_NODE='4,2': the launch styles need the same count on every node",
         env={"SLURM_TASKS_PER_NODE": "4,2"}),
    Case(LAUNCH, "`SLURM_JOB_NODELIST` with a bad range", dry(), 2,
         E + "host list 'gpu[3-1]': the range 3-1 runs backwards",
         env={"SLURM_JOB_NODELIST": "gpu[3-1]"}),
    Case(LAUNCH, "`SLURM_JOB_ID=x` (the port derived from it)", dry(), 2,
         E + "SLURM_JOB_ID='x' is not an integer", env={"SLURM_JOB_ID": "x"}),
    Case(LAUNCH, "`MASTER_PORT=99999`", dry(), 2, E + "MASTER_PORT 99999 is not a TCP port",
         env={"MASTER_PORT": "99999"}),
    Case(LAUNCH, "`{date}` in `run_dir` of a job that would be requeued",
         ("launch", "--dry-run", "--", "run", "{config}", "run_dir={tmp}/r-{date}"), 2,
         E + "run_dir '{tmp}/r-{date}' has {date}, so a requeued job would start a new folder",
         env={"SLURM_JOB_ID": "7"}),
    Case(LAUNCH, "`RANK` past `WORLD_SIZE`", wide(), 2,
         E + "inconsistent launch environment: rank 3, local rank 0, world size 2",
         env={"RANK": "3", "WORLD_SIZE": "2"}),
    Case(LAUNCH, "`WORLD_SIZE=x`", wide(), 2, E + "WORLD_SIZE='x' is not an integer",
         env={"RANK": "0", "WORLD_SIZE": "x"}),
]


class Apart(NamedTuple):
    """A bad input tested apart: what it is, its exit code, its first line, the test."""

    what: str
    code: str
    line: str
    test: str


# Bad inputs that need a process killed, a signal, a full disk, several processes or a longer
# run: tested by these tests (file::function), each of which asserts the outcome shown.
ELSEWHERE: list[Apart] = [
    Apart("a DeepSpeed checkpoint whose pickle would run code (`RUN/wide/deepspeed/TAG/…`)",
     "4", "gwtn: error: DeepSpeed checkpoint … cannot be read safely (it holds a Python object "
          "(posix.system) …", "test_distributed.py::test_a_crafted_pickle_in_a_deepspeed_"
                              "checkpoint_runs_no_code"),
    Apart("Ctrl-C or SIGTERM while training (or SIGTERM to `gwtn launch`)", "75",
     "gwtn: stopped on request after step N of wide and checkpointed …; run again with "
     "resume=true", "test_reliability.py::test_ctrl_c_and_sigterm_stop_at_a_checkpoint_that_"
                    "resumes_bit_exact"),
    Apart("a second Ctrl-C / SIGTERM while the stop is pending; SIGTERM before training",
          "130 / 143",
     "gwtn: SIGINT again: stopped at once, without a checkpoint …",
     "test_reliability.py::test_a_second_ctrl_c_stops_at_once_and_outside_training_too"),
    Apart("a full disk (the lock, config.yaml, metrics.jsonl, a checkpoint, model.pt)", "74",
     "gwtn: error: No space left on device: RUN/wide/checkpoint.pt",
     "test_reliability.py::test_a_full_disk_ends_in_one_line_and_exit_74_wherever_it_strikes"),
    Apart("12 processes taking one run folder's lock at once (fresh or stale)", "—",
     "exactly one holds it, 200 of 200 trials",
     "test_reliability.py::test_racing_processes_never_both_hold_the_lock"),
    Apart("a checkpoint.pt of another shape of net", "4",
     "gwtn: error: RUN/wide/checkpoint.pt: … has shape …, but the net's has …",
     "test_reliability.py::test_a_checkpoint_of_another_shape_or_kind_is_refused"),
    Apart("a stage's model.pt of another shape (for `gwtn imitate` / `gwtn finetune`)", "4",
     "gwtn: error: RUN/wide/model.pt: … it holds a net of another shape",
     "test_reliability.py::test_a_stage_model_of_another_shape_is_refused_by_the_next_stage"),
    Apart("a damaged training tar (garbage mid-tar, cut short)", "0",
     "(it trains; skipped_samples counts the short tar and its missing samples)",
     "test_data_damage.py::test_damaged_training_data_is_counted_in_skipped_samples"),
    Apart("a damaged val tar of image-folder or token shards (0 or 2 DataLoader workers)", "4",
     "…/val-w00-00000.tar holds N of the M samples its index lists …",
     "test_data_damage.py::test_a_damaged_val_tar_stops_its_evaluation_in_one_line"),
    Apart("a learning rate that makes training diverge", "3",
     "gwtn: error: training diverged: wide: loss became nan at step N …",
     "test_reliability.py::test_a_diverging_run_stops_with_one_line_and_no_new_checkpoint"),
    Apart("`device=cuda` on a machine without CUDA", "2", "gwtn: error: device: … no CUDA device",
     "test_reliability.py::test_a_device_or_backend_that_is_not_here_is_a_config_error"),
]


# --------------------------------------------------------------------------------------------
# Setups: the files a case needs, made in ``tmp`` (``shards``: the tests' shards to copy).

GARBAGE = bytes((i * 7 + 3) % 251 for i in range(65536))


class _RunsCode:
    """A pickle that, loaded unsafely, creates ``{tmp}/code-ran``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_shards(tmp: Path, shards: Path) -> Path:
    out = tmp / "shards"
    shutil.copytree(shards, out)
    return out


def _edit_index(tmp: Path, shards: Path, edit: Callable[[dict], object]) -> None:
    out = _copy_shards(tmp, shards)
    index = json.loads((out / "index.json").read_text())
    edited = edit(index)
    (out / "index.json").write_text(json.dumps(index if edited is None else edited))


def _checkpoint(tmp: Path, content: object) -> None:
    import torch

    (tmp / "run" / "wide").mkdir(parents=True)
    torch.save(content, tmp / "run" / "wide" / "checkpoint.pt")


def _garbage_mid_tar(tar: Path) -> None:
    with tarfile.open(tar) as tf:
        members = list(tf)
    at = members[len(members) // 2].offset
    data = bytearray(tar.read_bytes())
    data[at:at + len(GARBAGE)] = GARBAGE[:len(data) - at]
    tar.write_bytes(bytes(data))


def _cut(tar: Path) -> None:
    """The tar cut 20 kB before its end (a copy that stopped)."""
    tar.write_bytes(tar.read_bytes()[:-20_000])


def _swap(out: Path, both: bool) -> None:
    """The test tar in place of the training one (``both``: and the other way round), or
    only the training tar in place of the test one."""
    train, test = (out / "train-00000.tar").read_bytes(), (out / "test-00000.tar").read_bytes()
    (out / "test-00000.tar").write_bytes(train)
    if both:
        (out / "train-00000.tar").write_bytes(test)


def _model_file(tmp: Path, edit: Callable[[dict], None] | None = None,
                blocks: list[int] | None = None) -> None:
    """``{tmp}/x.pt``: a stage's model.pt of the tiny config's thin net, its meta edited."""
    from gwtn_dist import checkpoint
    from gwtn_dist.config import load_config
    from gwtn_dist.models.family import build_thin, shape_meta

    m = load_config(REPO / "configs" / "tiny_cpu.yaml").model
    model = build_thin(m, blocks=blocks)
    meta = {"stage": "finetune", **shape_meta(m, wide=False)}
    if edit:
        edit(meta)
    checkpoint.save_weights(model, tmp / "x.pt", meta)


def _saved_run(tmp: Path, shards: Path) -> None:
    from gwtn_dist.config import dump_config, load_config

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml",
                      [f"run_dir={tmp / 'run'}", f"data.shards={shards}", "wide.steps=3"])
    (tmp / "run").mkdir()
    dump_config(cfg, tmp / "run" / "config.yaml")


def _torch_save(path: Path, content: object) -> None:
    import torch

    torch.save(content, path)


SETUPS: dict[str, Callable[[Path, Path], None]] = {
    "latin1_config": lambda tmp, s: (tmp / "latin1.yaml").write_bytes(b"seed: \xe9t\xe9\n"),
    # Were it accepted, it would run in {tmp}, not in the current folder's runs/.
    "dup_config": lambda tmp, s: (tmp / "twice.yaml").write_text(
        f"run_dir: {tmp / 'run'}\ndata: {{shards: {s}}}\nseed: 1\nseed: 2\n"),
    "broken_config": lambda tmp, s: (tmp / "broken.yaml").write_text("wide: {steps: 3\n"),
    "list_config": lambda tmp, s: (tmp / "list.yaml").write_text("- seed: 1\n"),
    "a_file": lambda tmp, s: (tmp / "a-file").write_text(""),
    "bert_config": lambda tmp, s: shutil.copy(REPO / "configs" / "bert_tiny_cpu.yaml",
                                              tmp / "bert.yaml"),
    "foreign_folder": lambda tmp, s: ((tmp / "run").mkdir(), (tmp / "run" / "notes.txt")
                                      .write_text("mine")),
    "saved_run": _saved_run,
    "held_lock": lambda tmp, s: ((tmp / "run").mkdir(), (tmp / "run" / ".lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))),
    "torn_checkpoint": lambda tmp, s: ((tmp / "run" / "wide").mkdir(parents=True),
                                       (tmp / "run" / "wide" / "checkpoint.pt")
                                       .write_bytes(b"PK\3\4 torn")),
    "empty_checkpoint": lambda tmp, s: ((tmp / "run" / "wide").mkdir(parents=True),
                                        (tmp / "run" / "wide" / "checkpoint.pt")
                                        .write_bytes(b"")),
    "pickle_checkpoint": lambda tmp, s: _checkpoint(tmp, {"x": _RunsCode(tmp / "code-ran")}),
    "tensor_checkpoint": lambda tmp, s: _checkpoint(tmp, __import__("torch").zeros(3)),
    "dict_checkpoint": lambda tmp, s: _checkpoint(tmp, {"a": 1}),
    "late_checkpoint": lambda tmp, s: _checkpoint(tmp, {
        "stream": {"epoch": 0, "batch": 0}, "phase_index": 0, "step": 900, "results": [],
        "recent_losses": [], "modules": {"wide": {}}}),
    "foreign_checkpoint": lambda tmp, s: _checkpoint(tmp, {
        "stream": {"epoch": 0, "batch": 0}, "phase_index": 0, "step": 1, "results": [],
        "recent_losses": [], "modules": {"wide": {"x": __import__("torch").zeros(1)}}}),
    "junk_weights": lambda tmp, s: (tmp / "junk.pt").write_bytes(b"not a torch file"),
    "pickle_weights": lambda tmp, s: _torch_save(tmp / "pickle.pt",
                                                 {"x": _RunsCode(tmp / "code-ran")}),
    "list_weights": lambda tmp, s: _torch_save(tmp / "lists.pt", {"conv1.weight": [1, 2]}),
    "other_weights": lambda tmp, s: _torch_save(tmp / "other.pt", {
        "conv1.weight": __import__("torch").zeros(1, 1, 1, 1)}),
    "index_null": lambda tmp, s: (_copy_shards(tmp, s) / "index.json").write_text("null"),
    "index_broken": lambda tmp, s: (_copy_shards(tmp, s) / "index.json").write_text("{"),
    "index_latin1": lambda tmp, s: (_copy_shards(tmp, s) / "index.json").write_bytes(
        b'{"splits": "\xe9"}'),
    "index_list": lambda tmp, s: (_copy_shards(tmp, s) / "index.json").write_text("[1, 2]"),
    "index_traversal": lambda tmp, s: _edit_index(tmp, s, lambda index: index["splits"]["train"]
                                                  .update(shards=["../train-00000.tar"])),
    "index_absolute": lambda tmp, s: _edit_index(tmp, s, lambda index: index["splits"]["train"]
                                                 .update(shards=["/etc/passwd"])),
    "index_negative": lambda tmp, s: _edit_index(tmp, s, lambda index: index["splits"]["train"]
                                                 .update(shard_samples=[-1])),
    "index_labels": lambda tmp, s: _edit_index(tmp, s, lambda index: index["splits"]["train"]
                                               .update(labels=["shirt"])),
    "tar_missing": lambda tmp, s: (_copy_shards(tmp, s) / "test-00000.tar").unlink(),
    "test_garbage": lambda tmp, s: _garbage_mid_tar(_copy_shards(tmp, s) / "test-00000.tar"),
    "test_truncated": lambda tmp, s: _cut(_copy_shards(tmp, s) / "test-00000.tar"),
    "train_garbage": lambda tmp, s: _garbage_mid_tar(_copy_shards(tmp, s) / "train-00000.tar"),
    "swapped": lambda tmp, s: _swap(_copy_shards(tmp, s), both=True),
    "test_is_train": lambda tmp, s: _swap(_copy_shards(tmp, s), both=False),
    "train_not_a_tar": lambda tmp, s: (_copy_shards(tmp, s) / "train-00000.tar").write_bytes(
        b"not a tar" * 1000),
    "shape_string": lambda tmp, s: _model_file(tmp, lambda meta: meta.update(shape="x")),
    "shape_negative": lambda tmp, s: _model_file(tmp, lambda meta: meta["shape"].update(
        inner_widths=[-4, 8, 8])),
    "shape_huge": lambda tmp, s: _model_file(tmp, lambda meta: meta["shape"].update(
        blocks=[10**9, 1, 1])),
    "shape_deeper": lambda tmp, s: _model_file(tmp, lambda meta: meta["shape"].update(
        blocks=[2, 2, 2])),
    "shape_family": lambda tmp, s: _model_file(tmp, lambda meta: meta.update(family="vit")),
}


def fill(text: str, tmp: Path, shards: Path) -> str:
    """A case's text with its placeholders filled (``{date}``, ``{seed}`` and ``{bogus}``
    stay: they are run_dir's own)."""
    return (text.replace("{config}", str(REPO / "configs" / "tiny_cpu.yaml"))
            .replace("{run}", str(tmp / "run")).replace("{shards}", str(shards))
            .replace("{tmp}", str(tmp)).replace("{host}", socket.gethostname()))


def prepare(case: Case, tmp: Path, shards: Path) -> tuple[list[str], dict[str, str], str]:
    """Make the case's files in ``tmp``; its argv, env and expected first line, filled. The
    tests' ``shards`` are copied (and damaged) into ``tmp/shards`` where the setup says."""
    if case.setup:
        SETUPS[case.setup](tmp, shards)
    if (tmp / "shards").is_dir():
        shards = tmp / "shards"
    return ([fill(a, tmp, shards) for a in case.argv],
            {k: fill(v, tmp, shards) for k, v in case.env.items()}, fill(case.line, tmp, shards))


# --------------------------------------------------------------------------------------------
# The document.


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def render() -> str:
    """docs/bad_inputs.md, from CASES and ELSEWHERE."""
    lines = [
        "# Bad inputs and what each gives",
        "",
        "Every bad input ends in one line naming the problem and a documented exit code, never a",
        "traceback: 0 done; 2 a bad config, command line, data source or stage order; 3 training",
        "diverged; 4 an unreadable or damaged file (checkpoint, weights, shard index, an",
        "evaluation split short of its index); 69 a rank or host of the job lost (its peers",
        "stop within dist.timeout_s; docs/distributed.md); 74 an I/O error or full disk; 75",
        "stopped on request (preemption, SIGTERM, Ctrl-C: checkpointed, resume later); 130 / 143",
        "a second Ctrl-C / SIGTERM (stopped at once, without a checkpoint).",
        "",
        "This page is generated from `tests/bad_inputs.py` (`python -m tests.bad_inputs",
        (f"--write`); `tests/test_bad_inputs.py` runs each of the {len(CASES)} inputs below, "
         "checks its"),
        "exit code and that the one line it prints starts as shown, and that this page is the",
        "table. Placeholders: `{config}` configs/tiny_cpu.yaml, `{shards}` the tests' synthetic",
        "shards (1200 train, 300 test; a damaged copy where the input is about them), `{tmp}` a",
        "fresh folder, `{run}` `{tmp}/run`. Commands are `gwtn -q …`; `gwtn wide …` stands for",
        f"`gwtn wide {' '.join(WIDE[1:])}` and `… -- …` for `-- wide {{config}} run_dir={{run}}`.",
        "",
    ]
    category = None
    for case in CASES:
        if case.category != category:
            category = case.category
            lines += ["", f"## {category[0].upper()}{category[1:]}", "",
                      "| input | command | exit | first line |", "|---|---|---|---|"]
        env = "".join(f"{k}={v} " for k, v in case.env.items())
        argv = list(case.argv)
        if tuple(argv[1:len(WIDE)]) == WIDE[1:]:
            argv[1:len(WIDE)] = ["…"]
        if argv[:2] == ["launch", "--dry-run"] and argv[-4:] == list(dry()[-4:]):
            argv[-3:] = ["…"]
        command = _cell(env + "gwtn " + " ".join(a if a else "''" for a in argv))
        lines.append(f"| {_cell(case.what)} | `{command}` | {case.code} | "
                     f"`{_cell(case.line)}…` |")
    lines += ["", "## Tested apart", "",
              ("These need a process killed, a signal, a full disk, several processes or a "
               "longer run; each test asserts what the row says."), "",
              "| input | exit | first line | test |", "|---|---|---|---|"]
    for what, code, line, test in ELSEWHERE:
        lines.append(f"| {_cell(what)} | {code} | `{_cell(line)}` | `tests/{test}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(render())
        print(f"wrote {DOC} ({len(CASES)} inputs)")
    else:
        print(render(), end="")
