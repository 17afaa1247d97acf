"""The one source of configuration: typed dataclasses, loaded from YAML plus dotted overrides.

``load_config("configs/fmnist_resnet.yaml", ["run_dir=runs/x", "imitate.steps_per_point=200"])``
reads the file, applies the overrides, checks every key and value, and returns a ``Config``.
Unknown keys and bad values raise ``ConfigError`` naming the dotted key and what is allowed.
Every setting the paper leaves open is a field here with its default stated in the docstring.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the dotted key."""


@dataclass
class WideningConfig:
    """How the wide twin is made from the thin net (``model.widen``); each family's model
    section extends it with its own multipliers (``models/<family>/config.py``).

    boundary_mult: multiplier of the block-boundary widths (the widths the imitation points
    carry); 1 keeps them equal so no linear pairs are needed. Above 1, linear pairs are
    trained during imitation and merged afterwards, or lifts only where the family says so
    (see ``models/bridge.py``).
    """

    boundary_mult: int = 1


DEFAULT_FAMILY = "resnet"  # the family of a config that does not name one


@dataclass
class ModelConfig:
    """The thin net; the wide twin follows from ``widen``.

    family: the kind of net, ``resnet`` (images) or ``bert`` (masked-LM on ``data.dataset:
    text``); it selects this section's class and with it the other keys a ``model`` section
    may hold (``ResNetModelConfig`` in ``models/resnet/config.py``, ``BertModelConfig`` in
    ``models/bert/config.py``; a key of another family is an error naming it).

    compile: run every block of the thin and wide nets under ``torch.compile`` (default false;
    compiled in place, so checkpoints do not change; see ``models/compiled.py``).
    """

    family: str = DEFAULT_FAMILY
    compile: bool = False
    TAG: ClassVar[str] = "family"  # the key whose value selects the section's class

    # the ``data.dataset`` values this family trains on
    DATASETS: ClassVar[tuple[str, ...]] = ()
    _variants: ClassVar[dict[str, type[ModelConfig]]] = {}

    @classmethod
    def register(cls, name: str, config_class: type[ModelConfig]) -> None:
        """Make ``config_class`` the ``model`` section of ``model.family: name`` (each family's
        ``config`` module registers its class; ``register_family`` does it for added ones)."""
        ModelConfig._variants[name] = config_class

    @classmethod
    def variants(cls) -> dict[str, type[ModelConfig]]:
        """The ``model`` section's class of every registered family, by ``model.family``."""
        from .models import BUILTIN_FAMILIES  # the family config modules import this module

        for package in BUILTIN_FAMILIES.values():
            importlib.import_module(f"{package}.config")
        return dict(ModelConfig._variants)

    def check(self, cfg: Config) -> None:
        """Raise ConfigError naming the key for any ``model.*`` value (and any family-specific
        key elsewhere: ``compare.deeper_*``, ``imitate.attention_weight``) that cannot work."""


def default_model() -> ModelConfig:
    """The ``model`` section of a config that gives none: the default family's defaults."""
    return ModelConfig.variants()[DEFAULT_FAMILY]()


@dataclass
class DataConfig:
    """Where the shards are and how batches are made.

    dataset: ``fashion-mnist`` (``gwtn shards fashion-mnist``; written on first use),
    ``imagefolder`` (``gwtn shards imagefolder``: JPEGs, train/val) or ``text`` (``gwtn shards
    text|wikipedia``: token sequences, train/val, masked-LM batches); see ``data.batches``.
    shards: a folder written by ``gwtn shards`` (``train-*.tar``, ``test-*.tar``, index.json).
    batch_size: the global batch, split evenly over the ranks.
    train_samples: use only the first N training samples (by index, the validation split left
    out; 0 = all); handy for quick runs and for the data-size axis of a regime study.
    val_samples: Fashion-MNIST's validation split, carved out of the training data (seeded by
    ``val_seed``, stratified by class) and never trained on: evaluation curves
    (``eval_every``) and every choice ``gwtn compare`` makes (its tuning grid) read it, and the
    test split is read only for the report. Default 5000 (of 60,000); 0 = none (curves then
    read the test split). Token shards carry their own validation and test splits of whole
    documents (``gwtn shards text|wikipedia --val-every/--test-every``); token shards written
    without a test split, and image-folder shards, have one held-out split, ``val``, read for
    both. augment: random crop with ``crop_padding`` pixels of zero padding + flip.
    prefetch: training batches made ahead in a background thread (read, decoded, augmented,
    and pinned for the copy to a GPU) while the step runs; 0 makes each one on the training
    thread when it is due (see ``data.prefetch``).

    For image-folder and token shards (``gwtn_dist.data.streams``): num_workers: DataLoader
    worker processes per rank (default 0: read in the training process); image_size: side of
    the random-resized crop and of the eval centre crop (default 224); eval_resize: eval images'
    shorter side before the centre crop (default 256); mlm_probability: share of tokens chosen
    for masked-LM (default 0.15, BERT's).

    eval_missing_ok: the fraction of an evaluation split (validation or test) that damaged
    shards or undecodable samples may take away before an evaluation refuses to score (exit 4,
    naming the shard); default 0: every sample ``index.json`` lists must be read. Damaged
    training data is skipped and counted (``skipped_samples``) instead.
    """

    dataset: Literal["fashion-mnist", "imagefolder", "text"] = "fashion-mnist"
    shards: str = "runs/data/fashion-mnist"
    batch_size: int = 128
    eval_batch_size: int = 500
    shuffle_buffer: int = 5000
    train_samples: int = 0
    val_samples: int = 5000
    val_seed: int = 0
    crop_padding: int = 2
    hflip: bool = True
    mean: float = 0.2860
    std: float = 0.3530
    num_workers: int = 0
    prefetch: int = 2
    image_size: int = 224
    eval_resize: int = 256
    mlm_probability: float = 0.15
    eval_missing_ok: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of one training phase.

    schedule: ``cosine`` (to ``min_lr_ratio`` × lr) or ``multistep`` (× gamma at each milestone,
    given as fractions of the phase's steps), after ``warmup_steps`` of linear warm-up.
    name: ``sgd``, ``adamw`` (torch's, fused on CUDA) or ``lamb`` (layer-wise adaptive Adam for
    large batches: apex's FusedLAMB on CUDA when apex is installed, else our plain-torch
    ``distributed/lamb.py``; Adam moments with ``betas``, decoupled ``weight_decay``, and a
    per-parameter trust ratio in every group with weight decay).
    accumulate: micro-batches per optimizer step; each rank splits its share of the batch
    into ``accumulate`` equal parts and sums their gradients (same data stream, less activation
    memory). Exact except for batch-norm statistics, which are taken per micro-batch. Default 1.
    """

    name: Literal["sgd", "adamw", "lamb"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.333, 0.667, 0.889])
    gamma: float = 0.1
    grad_clip: float = 0.0
    accumulate: int = 1


@dataclass
class WideStageConfig:
    """Stage 1: train the wide twin with the task loss (to convergence: its cost is reported
    apart from the thin-net budget).

    steps: training steps of the wide twin; 0 (only with ``init``) loads, scores and saves the
    ``init`` weights as the finished teacher.
    init: weights to start the wide twin from (bring your own teacher). A ResNet: a .pt/.pth
    of tensors (or a dict holding them under ``state_dict`` or ``model``) or a .safetensors
    file, in our, torchvision's or timm's parameter names (torchvision's wide_resnet50_2 is
    ``configs/imagenet_resnet50.yaml`` with ``model.widen.inner_mult: 2``). A BERT: a Hugging
    Face BertForMaskedLM folder (config.json + model.safetensors or pytorch_model.bin), which
    fills a twin only where heads × head_dim = hidden (``widen.attention_mult`` equal to
    ``widen.boundary_mult``; docs/bert.md). ``model.*`` and ``model.widen.*`` must describe its
    shape. Empty (the default): a fresh init.
    cache: a folder of finished teachers, keyed by everything that decides the teacher
    (model, data, this section, seed; see ``stages/teacher_cache.py``). A wide stage whose
    teacher is there copies it instead of training; one that trains puts its result there.
    Empty (the default) turns the cache off.
    """

    steps: int = 1000
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: str = ""
    cache: str = ""


@dataclass
class ImitateStageConfig:
    """Stage 2: bottom-to-top imitation of the wide net's outputs at the imitation points.

    steps_per_point: steps of each phase (one phase per point); unknown in the paper.
    lower_lr_mult: lr multiplier of the blocks below the current point (MobileBERT's soft freeze
    0.1; 1.0 trains them fully, 0 freezes them). Blocks above the point are not run.
    target_norm: ``none`` compares raw outputs; ``layernorm`` normalises thin and wide outputs
    over channels at each position first (MobileBERT's choice).
    loss_backend: ``auto`` (fused Triton kernel on CUDA, PyTorch reference on CPU), ``triton``
    or ``reference``.
    init_head: ``wide`` starts the thin classifier from the wide one (composed with the last
    lift) when the last point is the last block, since the thin features imitate the wide
    ones there; ``random`` keeps the fresh head. The paper does not say; default ``wide``.
    For BERT, ``wide`` copies the wide masked-LM head's transform and bias (the decoder is tied
    to the thin net's own word embeddings).
    attention_weight: BERT only; weight of the attention-map transfer added to each phase's
    MSE: KL(wide ‖ thin) of the attention probabilities of the phase's layer, per head (the
    twins have the same heads), averaged over heads and unpadded query positions. MobileBERT
    uses it; default 0 (off).
    schedule: ``sequential`` (the paper's: one phase per point, bottom to top) or
    ``parallel``: every thin segment (the blocks between consecutive points) trains at once,
    each fed by the teacher's output at the point below it (mapped down to the thin width by
    the pair there; no gradient to the teacher), one teacher pass per batch for all points;
    the loss is the sum of the per-point losses. The stage keeps the sequential budget of
    K × steps_per_point thin-net steps (K points), so ``gwtn compare`` budgets are unchanged:
    one parallel phase of K × (steps_per_point − parallel_polish_steps) steps, then the
    polish. ``lower_lr_mult`` applies to the polish only. Default ``sequential``; see
    ``docs/method.md``.
    parallel_polish_steps: with ``schedule: parallel``, the steps of a short sequential pass
    per point after the parallel phase (lower_lr_mult applies there), where each segment
    meets the thin net's own input instead of the teacher's; must be < steps_per_point.
    Default 0 (none).
    channel_reduction: how the MSE reduces over a point's channels: ``mean`` (the default,
    an average over every element, so its scale, and SGD's step on each channel's weights,
    falls as 1/C with the width C) or ``sum`` (summed over channels, averaged over positions:
    the same per-channel scale at every width). Adam-type optimizers barely see the
    difference; SGD's effective lr is C times larger with ``sum``.
    point_site: ResNet only; ``output`` compares each imitation point's block output (after
    its final ReLU, the default) and ``preact`` the sum before that ReLU, as feature
    distillation commonly does (Heo et al., ICCV 2019): where the thin net is negative and
    the teacher positive, the ReLU output gives no gradient. Needs ``schedule: sequential``
    and equal boundary widths (``model.widen.boundary_mult: 1``).
    health_max_error: after the stage, a point whose relative error (MSE over the target's
    variance, 0 = exact, 1 = the teacher's mean) stays above this logs a warning that the warm
    start did not reach the teacher; stage.json and compare.md record it. Default 0.3.
    init: the thin net's starting weights for imitation (empty, the default: a fresh init);
    a Hugging Face BertForMaskedLM folder (or a weights file in HF's or our names) for a BERT, a
    state dict in our, torchvision's or timm's names for a ResNet, whose shape ``model.*`` must
    describe. The baselines still start fresh.
    """

    steps_per_point: int = 150
    lower_lr_mult: float = 0.1
    target_norm: Literal["none", "layernorm"] = "none"
    loss_backend: Literal["auto", "triton", "reference"] = "auto"
    init_head: Literal["wide", "random"] = "wide"
    attention_weight: float = 0.0
    schedule: Literal["sequential", "parallel"] = "sequential"
    parallel_polish_steps: int = 0
    channel_reduction: Literal["mean", "sum"] = "mean"
    point_site: Literal["output", "preact"] = "output"
    health_max_error: float = 0.3
    init: str = ""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=0.05, weight_decay=0.0)
    )


@dataclass
class DistillConfig:
    """Logit distillation: alpha·T²·KL(teacher_T ‖ student_T) + (1 − alpha)·CE."""

    alpha: float = 0.9
    temperature: float = 4.0


@dataclass
class FinetuneStageConfig:
    """Stage 3: train the warmed-up thin net to the end.

    kd_steps steps of logit distillation from the wide net (0 to skip), then label_steps steps
    with the task loss. Each phase restarts its own schedule from ``optim.lr``.
    """

    kd_steps: int = 0
    label_steps: int = 1000
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05))


@dataclass
class BaselineConfig:
    """The recipe of the baseline arms (``scratch``, ``kd``, ``deeper``): how a thin net is
    trained from a fresh init. kd distils with ``distill`` for the whole budget. Kept apart
    from ``wide.optim`` so that tuning a baseline never changes the teacher.
    """

    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class CompareConfig:
    """``gwtn compare``: the arms of the top-level ``arms`` list at the same thin-net step
    budget, over paired seeds (every arm runs every seed; see ``docs/protocol.md``).

    The budget is imitate steps + finetune steps of the method; ``scratch``, ``kd`` and
    ``deeper`` train with ``baseline`` (the from-scratch recipe) for that many steps;
    ``deeper`` uses ``deeper_blocks`` (ResNet) or ``deeper_layers`` (BERT; 0 = twice
    ``model.layers``). ``share_teacher`` trains one wide net (with ``seed``) for all seeds
    instead of one per seed. Outputs go to ``run_dir/compare/``.

    tune: a small grid per arm, ``{arm: {dotted.key: [values, …]}}`` (the product of an arm's
    lists). Each point runs on ``tune_seeds``, which are never reported seeds, and is scored
    on the validation split only (no tuning run reads the test split); the best point per arm
    (mean over tuning seeds; ties go to the first) is what the reported seeds run with. Every
    arm of ``arms`` gets a grid of the same size (equal tuning effort); grids of arms not in
    ``arms`` are checked and left unused (so ``arms=[…]`` can narrow a comparison without
    editing the grids). Keys an arm may tune:
    ``imitate.*`` and ``finetune.*`` for ``win``, ``baseline.*`` for the baselines.
    budget_mults: thin-net budgets to report, as multiples of the method's (e.g. [1, 2]: does
    a gain last or is it a head start); each runs every arm and seed with the tuned choice.
    headroom_min: the teacher must beat the thin net from scratch by at least this much on the
    validation metric (and by 2 sd of scratch over seeds) or ``compare.md`` warns that there
    is little to transfer.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    deeper_blocks: list[int] = field(default_factory=lambda: [8, 8, 8])
    deeper_layers: int = 0
    share_teacher: bool = False
    tune: dict = field(default_factory=dict)
    tune_seeds: list[int] = field(default_factory=lambda: [100])
    budget_mults: list[float] = field(default_factory=lambda: [1.0])
    headroom_min: float = 0.005


@dataclass
class RegimeConfig:
    """``gwtn regime``: where the method pays — one ``gwtn compare`` per cell of a grid.

    axes: one or two axes, ``{name: [values]}``. A dotted key's values set that key
    (``data.train_samples: [5000, 20000, 0]``); any other name's values are mappings of
    overrides applied together (``depth: [{model.blocks: [2,2,2], compare.deeper_blocks:
    [3,3,3]}, …]``, with an optional ``label`` naming the value in tables), so the deeper
    baseline can follow the thin net's depth. Each cell is a
    complete comparison (its own teacher, tuning, seeds) under ``run_dir/regime/<cell>/``.
    """

    axes: dict = field(default_factory=dict)


@dataclass
class DistConfig:
    """How the stages run over ranks (processes) under ``torchrun``, ``deepspeed`` or ``srun``.

    engine: ``auto`` uses DeepSpeed when the launcher started more than one rank and plain torch
    on a single process; ``deepspeed`` forces DeepSpeed engines on one rank too.
    backend: the process-group backend; ``auto`` is nccl on CUDA, gloo on CPU.
    precision: ``auto`` is bf16 on CUDA and fp32 on CPU. On one process (torch engine) bf16 and
    fp16 run the forward under autocast with fp32 weights (fp16 with a gradient scaler);
    DeepSpeed trains a bf16/fp16 copy with fp32 master weights (fp16 only on CUDA), except with
    LAMB, whose per-parameter trust ratio needs whole parameters: there DeepSpeed keeps fp32
    weights (ZeRO stage 0) and the forward runs under autocast.
    tf32: on CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (default true).
    wide_zero_stage: ZeRO stage of stage 1 (the wide twin's training); default 2.
    student_zero_stage: ZeRO stage of the thin net in stages 2 and 3 and in the baselines; the
    student is data-parallel, so 0, 1 or 2 (its blocks are called one by one, which ZeRO-3's
    parameter gathering does not allow). Default 0.
    teacher: the frozen wide net during imitation and distillation: ``shard`` holds it as a
    ZeRO-3 engine with no optimizer (parameters partitioned over all ranks, gathered block by
    block just in time), ``replicate`` keeps a full copy on every rank, ``auto`` replicates when
    the whole teacher takes at most ``teacher_memory_fraction`` of a rank's free memory, and
    shards otherwise (the choice and its reason are logged and saved in stage.json).
    sync_batchnorm: with more than one rank, batch-norm statistics are taken over the global
    batch (an all-reduce per BN layer), so N ranks × b compute what 1 rank × N·b does; false
    keeps per-rank statistics (cheaper; rank 0's running statistics are saved). Default true.
    timeout_s: a collective that waits longer than this fails, so a job whose rank died exits
    instead of hanging (the launchers also stop the other ranks when one fails). A lost host
    (no answer at all) stops the others after this plus a 3 s roll call that names the lost
    ranks and hosts (exit 69). Default 600.
    rendezvous_timeout_s: under ``gwtn launch --style srun-torchrun``, how long a node waits to
    reach the rendezvous host and for every node to join, before it stops with one line (exit
    69). Default 300.
    deepspeed: DeepSpeed config keys merged last over the generated config (the escape hatch),
    e.g. ``{zero_optimization: {overlap_comm: true}}``. The optimizer and schedule always come
    from the phase's ``optim``.
    """

    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = True
    wide_zero_stage: Literal[0, 1, 2, 3] = 2
    student_zero_stage: Literal[0, 1, 2] = 0
    teacher: Literal["auto", "shard", "replicate"] = "auto"
    teacher_memory_fraction: float = 0.25
    sync_batchnorm: bool = True
    timeout_s: int = 600
    rendezvous_timeout_s: int = 300
    deepspeed: dict = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Atomic checkpoints every ``every`` steps (and at every phase end)."""

    every: int = 200


@dataclass
class ProfileConfig:
    """Where the time of a training step goes (``gwtn profile RUN_DIR`` shows it).

    sample_every: time the regions of every N-th step of each phase (0: never); the per-region
    means go to ``stage.json``. trace_start: the step of each stage (counted over its phases,
    from 1) at which a ``torch.profiler`` trace of ``trace_steps`` steps starts (0: no trace);
    each rank writes ``<stage>/trace/<phase>-rank<r>.json`` (Chrome trace format).
    """

    sample_every: int = 50
    trace_start: int = 0
    trace_steps: int = 5


@dataclass
class LoggingConfig:
    """Dashboards that get every ``metrics.jsonl`` record too (rank 0; see ``metric_sinks``).

    tensorboard: also write TensorBoard event files under ``<stage>/tb`` (needs the
    ``tensorboard`` package; without it one warning line, no crash). wandb: a Weights & Biases
    project to log each stage to as a run (empty: off; needs the ``wandb`` package).
    """

    tensorboard: bool = False
    wandb: str = ""


@dataclass
class Config:
    """A whole run. ``resume=true`` continues a run directory that a crash left behind.

    run_dir: the run's folder, which may hold ``{date}`` and ``{seed}``, filled when a command
    starts a run (the date as YYYYmmdd-HHMMSS), so ``runs/fmnist-{date}`` gives every run a new
    folder. A resume, ``gwtn imitate|finetune`` and a requeued SLURM job continue a run: give
    them its folder (a ``{date}`` is refused there).
    seed: the seed of weights, data order and augmentation.
    eval_every: score the net being trained every N thin-net steps on the first
    ``eval_samples`` validation images (``data.val_samples``; text: val sequences; 0 = the
    whole split), for accuracy-vs-steps curves; 0 turns it off. Every stage's final net is
    scored on the whole validation and test splits (text: the val and test documents; old
    two-split token shards: the val split).
    eval_test: score finished nets on the test split too (default true); ``gwtn compare``'s
    tuning runs set it false, so that no choice can read the test split.
    arms: the one list of arms, in table order: ``win`` (the method: wide → imitate →
    finetune), ``scratch`` (the thin net from scratch), ``kd`` (logit distillation from the
    same teacher), ``deeper`` (a deeper thin net from scratch). ``gwtn run`` trains the method
    and every other arm listed, at the method's thin-net budget; ``gwtn compare`` compares
    exactly these arms over its seeds. Default: the method alone.
    threads: torch CPU threads (0 = torch's default).
    log_every: every N steps a metrics record also carries the step time, data wait,
    throughput, peak memory and gradient norm (measured without stopping the device).
    channels_last: keep conv activations in NHWC memory order (measured ~28% faster per
    training step on 2 CPU cores for the default nets; also what GPU tensor cores prefer).
    """

    run_dir: str = "runs/fmnist"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    channels_last: bool = True
    resume: bool = False
    progress: bool = True
    eval_every: int = 0
    eval_samples: int = 2000
    eval_test: bool = True
    log_every: int = 20
    arms: list[str] = field(default_factory=lambda: ["win"])
    model: ModelConfig = field(default_factory=default_model)
    data: DataConfig = field(default_factory=DataConfig)
    wide: WideStageConfig = field(default_factory=WideStageConfig)
    imitate: ImitateStageConfig = field(default_factory=ImitateStageConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)


ARMS = ("scratch", "kd", "win", "deeper")
BASELINES = tuple(arm for arm in ARMS if arm != "win")


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key.


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        if getattr(tp, "TAG", None):
            tp = _variant(tp, value, key)
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{key}: union types are not supported in configs")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # torch, numpy and C libraries overflow past int64
            raise ConfigError(f"{key}: {value} does not fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string, not a float
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every `<` check, so refuse it here
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def _variant(tp: type, data: dict, key: str) -> type:
    """The class of a tagged section (a dataclass with a ``TAG`` and ``variants()``): the one
    its tag key selects, checked so that a key of another variant is an error naming it."""
    variants = tp.variants()
    name = data.get(tp.TAG, getattr(tp, tp.TAG))
    if name not in variants:
        raise ConfigError(f"{key}.{tp.TAG}: {name!r} is not allowed; choose one of "
                          f"{' | '.join(repr(v) for v in variants)}")
    cls = variants[name]
    own = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        others = [v for v, c in variants.items() if k in {f.name for f in dataclasses.fields(c)}]
        if k not in own and others:
            raise ConfigError(f"{key}.{k} is not a key of a {name} model (it is a "
                              f"{' and '.join(others)} key; {key}.{tp.TAG} selects the "
                              f"keys); allowed here: {', '.join(own)}")
    return cls


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown key {prefix}{k}; allowed here: {', '.join(names)}")
    default = cls()
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently, so a typo'd second ``lr:`` would win unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, where: str) -> Any:
    """Parse YAML; a syntax error or a key given twice is a ConfigError naming ``where`` and
    the parser's reason."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML ({reason})") from None


def _parse_scalar(text: str, key: str = "override") -> Any:
    """An override's value is read as YAML, so ``3``, ``0.1``, ``true``, ``[2,2]`` keep their
    types."""
    return _yaml(text, key) if text != "" else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_scalar(text, f"override {item!r}"))
    return tree


def config_from_dict(tree: dict) -> Config:
    """Build and validate a Config from a nested dict (e.g. a parsed YAML file)."""
    old = "baselines" if "baselines" in tree else \
        "compare.arms" if isinstance(tree.get("compare"), dict) and "arms" in tree["compare"] \
        else None
    if old:
        raise ConfigError(f"{old}: replaced by the one top-level list `arms` (what gwtn run "
                          f"trains and gwtn compare compares), e.g. arms: [scratch, kd, win]")
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
                              ) from None
        loaded = _yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        tree = loaded or {}
    apply_overrides(tree, list(overrides))
    return config_from_dict(tree)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set to values (checked like a loaded config)."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


# --------------------------------------------------------------------------------------------
# run_dir placeholders.

RUN_DIR_FIELDS = ("date", "seed")


def check_run_dir(run_dir: str) -> None:
    """Refuse braces in ``run_dir`` other than the ``{date}`` and ``{seed}`` placeholders."""
    rest = re.sub(r"\{(?:date|seed)\}", "", run_dir)
    if "{" in rest or "}" in rest:
        raise ConfigError(f"run_dir: {run_dir!r} may hold only the placeholders "
                          f"{{date}} and {{seed}}")


def date_stamp(when: float | None = None) -> str:
    """The ``{date}`` of a run folder: local time as YYYYmmdd-HHMMSS."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(when))


def fill_run_dir(cfg: Config, stamp: str, *, continuing: bool = False) -> Config:
    """``cfg`` with ``{date}`` (as ``stamp``) and ``{seed}`` filled in ``run_dir``.

    A ``{date}`` names a new folder at every start, so it cannot name a run to continue:
    with ``resume=true`` or ``continuing`` (``gwtn imitate|finetune``) it is a ConfigError.
    """
    if "{date}" in cfg.run_dir and (cfg.resume or continuing):
        raise ConfigError(f"run_dir: {cfg.run_dir!r} has {{date}}, which names a new folder at "
                          f"every start; to continue a run, give its folder (run_dir=…)")
    run_dir = cfg.run_dir.replace("{date}", stamp).replace("{seed}", str(cfg.seed))
    return dataclasses.replace(cfg, run_dir=run_dir)


def flat_model_section(m: ModelConfig) -> dict:
    """``m`` as a dict with every other family's keys at their defaults: the one flat
    ``model`` section of configs before each family had its own. Teacher-cache keys hash this
    form, so that teachers cached before stay found."""
    flat: dict = {}
    widen: dict = {}  # the one widen section of then: every family's multipliers
    for cls in ModelConfig.variants().values():
        flat.update(dataclasses.asdict(cls()))
        widen.update(flat["widen"])
    own = dataclasses.asdict(m)
    return {**flat, **own, "widen": {**widen, **own["widen"]}}


def upgrade_saved_tree(tree: dict) -> dict:
    """A saved config's tree (``config.yaml`` of a run) in today's form: a ``model`` section
    written before each family had its own (every family's keys, flat, ``widen`` included)
    keeps only the keys of its ``model.family``, which are all that ever decided what the run
    computed. The two arm lists of old configs (``baselines`` for ``gwtn run``, ``compare.arms``)
    become the one ``arms``: the compared arms, then any other baseline that was trained."""
    if "baselines" in tree or "arms" in (tree.get("compare") or {}):
        compare = dict(tree.get("compare") or {})
        arms = list(compare.pop("arms", ARMS))  # ARMS was compare.arms's default
        arms += [a for a in tree.get("baselines") or [] if a not in arms]
        tree = {**{k: v for k, v in tree.items() if k != "baselines"}, "arms": arms,
                "compare": compare}
    model = tree.get("model")
    variants = ModelConfig.variants()
    if not isinstance(model, dict) or model.get("family", DEFAULT_FAMILY) not in variants:
        return tree
    cls = variants[model.get("family", DEFAULT_FAMILY)]
    own = {f.name for f in dataclasses.fields(cls)}
    model = {k: v for k, v in model.items() if k in own}
    if isinstance(model.get("widen"), dict):  # then shared: it held every family's multipliers
        own_widen = {f.name for f in dataclasses.fields(cls().widen)}
        model["widen"] = {k: v for k, v in model["widen"].items() if k in own_widen}
    return {**tree, "model": model}


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used), atomically: a full disk
    leaves the old file or none, never a torn one that a resume would read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tmp.replace(path)
    except OSError as exc:  # a full disk: name the file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Checks that span several fields.


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# Bounds on counts that no run reaches, so that a typo (an extra digit group, 1e23 as an
# integer) is an error naming the key instead of an overflow deep inside torch or a run that
# never ends: seeds as numpy and torch take them, threads a machine has, steps and samples.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_STEPS = 10**9


def _at_most(key: str, value: int, bound: int) -> None:
    if value > bound:
        raise ConfigError(f"{key}: at most {bound:,}, got {value:,}")


def _check_bounds(cfg: Config) -> None:
    """The upper bounds above (lower bounds are checked with each key)."""
    seeds = {"seed": [cfg.seed], "data.val_seed": [cfg.data.val_seed],
             "compare.seeds": cfg.compare.seeds, "compare.tune_seeds": cfg.compare.tune_seeds}
    for key, values in seeds.items():
        for value in values:
            if not 0 <= value <= MAX_SEED:
                raise ConfigError(f"{key}: a seed in [0, {MAX_SEED}] (2**32 - 1), got {value}")
    _at_most("threads", cfg.threads, MAX_THREADS)
    counts = {"wide.steps": cfg.wide.steps, "imitate.steps_per_point":
              cfg.imitate.steps_per_point, "finetune.kd_steps": cfg.finetune.kd_steps,
              "finetune.label_steps": cfg.finetune.label_steps, "eval_every": cfg.eval_every,
              "eval_samples": cfg.eval_samples, "log_every": cfg.log_every,
              "checkpoint.every": cfg.checkpoint.every, "data.batch_size": cfg.data.batch_size,
              "data.eval_batch_size": cfg.data.eval_batch_size,
              "data.train_samples": cfg.data.train_samples,
              "data.val_samples": cfg.data.val_samples,
              "data.shuffle_buffer": cfg.data.shuffle_buffer,
              "profile.sample_every": cfg.profile.sample_every,
              "profile.trace_start": cfg.profile.trace_start,
              "profile.trace_steps": cfg.profile.trace_steps}
    counts.update({f"{prefix}.warmup_steps": o.warmup_steps for prefix, o in optim_sections(cfg)})
    for key, value in counts.items():
        _at_most(key, value, MAX_STEPS)


def optim_sections(cfg: Config) -> list[tuple[str, OptimConfig]]:
    """Every phase's optimizer section, by its dotted key."""
    return [("wide.optim", cfg.wide.optim), ("imitate.optim", cfg.imitate.optim),
            ("finetune.optim", cfg.finetune.optim), ("baseline.optim", cfg.baseline.optim)]


def _check_optim(prefix: str, o: OptimConfig, batch_size: int) -> None:
    _positive(f"{prefix}.lr", o.lr)
    _positive(f"{prefix}.accumulate", o.accumulate)
    if batch_size % o.accumulate:
        raise ConfigError(f"{prefix}.accumulate: data.batch_size {batch_size} does not split "
                          f"into {o.accumulate} equal micro-batches")
    _positive(f"{prefix}.weight_decay", o.weight_decay, allow_zero=True)
    _positive(f"{prefix}.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive(f"{prefix}.grad_clip", o.grad_clip, allow_zero=True)
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"{prefix}.momentum: must be in [0, 1), got {o.momentum}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{prefix}.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"{prefix}.betas: must be two numbers in [0, 1), got {o.betas}")
    if any(not 0 < m < 1 for m in o.milestones) or o.milestones != sorted(o.milestones):
        raise ConfigError(
            f"{prefix}.milestones: fractions of the phase in (0, 1), ascending; got {o.milestones}"
        )


def _check_model(cfg: Config) -> None:
    """The model section through its family's class (which also checks the family's keys
    elsewhere, such as ``compare.deeper_*``), and that the family trains on the data given."""
    datasets = type(cfg.model).DATASETS
    if cfg.data.dataset not in datasets:
        raise ConfigError(
            f"data.dataset: {cfg.data.dataset!r} does not fit model.family "
            f"{cfg.model.family!r}, which trains on {' or '.join(repr(d) for d in datasets)}")
    _positive("model.widen.boundary_mult", cfg.model.widen.boundary_mult)
    cfg.model.check(cfg)


# What each arm may tune: the method its own stages, the baselines their recipe.
TUNABLE = {"win": ("imitate.", "finetune."), "scratch": ("baseline.optim.",),
           "deeper": ("baseline.optim.",), "kd": ("baseline.",)}


BUDGET_KEYS = ("imitate.steps_per_point", "finetune.kd_steps", "finetune.label_steps")


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            keys |= _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def tune_points(grid: dict) -> list[dict]:
    """The points of one arm's grid ``{key: [values]}``: every combination, in order."""
    points: list[dict] = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def regime_cells(cfg: Config) -> list[tuple[list[str], dict]]:
    """The cells of ``cfg.regime``: (a label per axis, the cell's overrides), in grid order."""
    cells: list[tuple[list[str], dict]] = [([], {})]
    for name, values in cfg.regime.axes.items():
        grown = []
        for labels, overrides in cells:
            for value in values:
                if isinstance(value, dict):
                    extra = {k: v for k, v in value.items() if k != "label"}
                    label = str(value.get("label", ",".join(str(v) for v in extra.values())))
                else:
                    label, extra = str(value), {name: value}
                grown.append(([*labels, label], {**overrides, **extra}))
        cells = grown
    return cells if cfg.regime.axes else []


def _check_regime(cfg: Config) -> None:
    axes = cfg.regime.axes
    if not axes:
        return
    if len(axes) > 2:
        raise ConfigError(f"regime.axes: one or two axes (a table and a heat map), got "
                          f"{len(axes)}")
    known = _leaf_keys(to_dict(cfg))
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"regime.axes.{name}: expected a list of values, got {values!r}")
        for value in values:
            keys = [k for k in value if k != "label"] if isinstance(value, dict) else [name]
            for key in keys:
                if key not in known or key.startswith(("regime.", "run_dir", "compare.seeds")):
                    raise ConfigError(f"regime.axes.{name}: {key!r} is not a key a cell may set")
    for _, overrides in regime_cells(cfg):
        with_overrides(dataclasses.replace(cfg, regime=RegimeConfig()), overrides)


def _check_compare(cfg: Config) -> None:
    _check_regime(cfg)
    c = cfg.compare
    if len(set(c.seeds)) != len(c.seeds):
        raise ConfigError(f"compare.seeds: seeds must differ, got {c.seeds}")
    if not c.budget_mults or any(not 0 < b < 100 for b in c.budget_mults):
        raise ConfigError(f"compare.budget_mults: positive multiples of the budget, got "
                          f"{c.budget_mults}")
    _positive("compare.headroom_min", c.headroom_min, allow_zero=True)
    if not c.tune:
        return
    if not c.tune_seeds or set(c.tune_seeds) & set(c.seeds):
        raise ConfigError(f"compare.tune_seeds: tuning seeds are never reported seeds; got "
                          f"{c.tune_seeds} against compare.seeds {c.seeds}")
    from .data.datasets import dataset_of  # data/ imports this module: import on use

    if dataset_of(cfg).carved_val_samples(cfg) == 0:  # a carved validation split left empty
        raise ConfigError("compare.tune: choices are made on the validation split; set "
                          "data.val_samples > 0")
    known = _leaf_keys(to_dict(cfg))
    sizes = {}
    for arm in cfg.arms:
        if arm not in c.tune:
            raise ConfigError(f"compare.tune: every arm gets the same tuning effort; give "
                              f"{arm!r} a grid too (or drop it from arms)")
    for arm, grid in c.tune.items():  # grids of arms left out of `arms` are checked, unused
        if arm not in ARMS:
            raise ConfigError(f"compare.tune.{arm}: {arm!r} is not an arm; choose from "
                              f"{', '.join(ARMS)}")
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"compare.tune.{arm}: expected a mapping of dotted keys to lists "
                              f"of values, got {grid!r}")
        for key, values in grid.items():
            if key in BUDGET_KEYS:
                raise ConfigError(f"compare.tune.{arm}: {key} sets the thin-net budget, which "
                                  f"every arm shares; it cannot be tuned per arm")
            if key not in known or not key.startswith(TUNABLE[arm]):
                raise ConfigError(f"compare.tune.{arm}: {key!r} is not a key {arm} may tune; "
                                  f"use one under {', '.join(TUNABLE[arm])}")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"compare.tune.{arm}.{key}: expected a list of values, got "
                                  f"{values!r}")
        if arm in cfg.arms:
            sizes[arm] = len(tune_points(grid))
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"compare.tune: every arm gets the same tuning effort, but the grids "
                          f"have {sizes} points")


def _check_wide(cfg: Config) -> None:
    w = cfg.wide
    if w.steps < 0 or (w.steps == 0 and not w.init):
        raise ConfigError(f"wide.steps: must be > 0 (0 only with wide.init, a teacher that is "
                          f"loaded, not trained), got {w.steps}")


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    check_run_dir(cfg.run_dir)
    _check_bounds(cfg)
    _check_model(cfg)
    d = cfg.data
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    _positive("data.shuffle_buffer", d.shuffle_buffer)
    _positive("data.train_samples", d.train_samples, allow_zero=True)
    _positive("data.val_samples", d.val_samples, allow_zero=True)
    _positive("data.crop_padding", d.crop_padding, allow_zero=True)
    _positive("data.std", d.std)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    _positive("data.prefetch", d.prefetch, allow_zero=True)
    _positive("data.image_size", d.image_size)
    _positive("data.eval_resize", d.eval_resize)
    if not 0 < d.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability: must be in (0, 1), got {d.mlm_probability}")
    if not 0 <= d.eval_missing_ok < 1:
        raise ConfigError(f"data.eval_missing_ok: a fraction in [0, 1), got {d.eval_missing_ok}")
    _check_wide(cfg)
    _positive("imitate.steps_per_point", cfg.imitate.steps_per_point)
    if cfg.imitate.lower_lr_mult < 0:
        raise ConfigError(f"imitate.lower_lr_mult: must be >= 0, got {cfg.imitate.lower_lr_mult}")
    polish = cfg.imitate.parallel_polish_steps
    _positive("imitate.parallel_polish_steps", polish, allow_zero=True)
    if polish and cfg.imitate.schedule != "parallel":
        raise ConfigError("imitate.parallel_polish_steps: a polish follows the parallel "
                          "schedule only; set imitate.schedule=parallel or leave it 0")
    if polish >= cfg.imitate.steps_per_point:
        raise ConfigError(f"imitate.parallel_polish_steps: must be < imitate.steps_per_point "
                          f"({cfg.imitate.steps_per_point}), the budget it comes out of; "
                          f"got {polish}")
    _positive("imitate.health_max_error", cfg.imitate.health_max_error)
    if cfg.imitate.point_site == "preact" and cfg.imitate.schedule != "sequential":
        raise ConfigError("imitate.point_site: preact needs imitate.schedule=sequential (a "
                          "parallel segment starts from the teacher's output after the ReLU)")
    f = cfg.finetune
    _positive("finetune.kd_steps", f.kd_steps, allow_zero=True)
    _positive("finetune.label_steps", f.label_steps, allow_zero=True)
    if f.kd_steps + f.label_steps == 0:
        raise ConfigError("finetune: kd_steps + label_steps must be > 0")
    if not 0 <= f.distill.alpha <= 1:
        raise ConfigError(f"finetune.distill.alpha: must be in [0, 1], got {f.distill.alpha}")
    _positive("finetune.distill.temperature", f.distill.temperature)
    for prefix, o in optim_sections(cfg):
        _check_optim(prefix, o, cfg.data.batch_size)
    if not 0 <= cfg.baseline.distill.alpha <= 1:
        raise ConfigError(f"baseline.distill.alpha: must be in [0, 1], got "
                          f"{cfg.baseline.distill.alpha}")
    _positive("baseline.distill.temperature", cfg.baseline.distill.temperature)
    c = cfg.compare
    if not c.seeds:
        raise ConfigError("compare.seeds: give at least one seed")
    for arm in cfg.arms:
        if arm not in ARMS:
            raise ConfigError(f"arms: {arm!r} is not an arm; choose from {', '.join(ARMS)}")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise ConfigError(f"arms: each arm once, got {cfg.arms}")
    _check_compare(cfg)
    _positive("eval_samples", cfg.eval_samples, allow_zero=True)
    _positive("checkpoint.every", cfg.checkpoint.every)
    _positive("eval_every", cfg.eval_every, allow_zero=True)
    _positive("log_every", cfg.log_every)
    _positive("profile.sample_every", cfg.profile.sample_every, allow_zero=True)
    _positive("profile.trace_start", cfg.profile.trace_start, allow_zero=True)
    _positive("profile.trace_steps", cfg.profile.trace_steps)
    _positive("threads", cfg.threads, allow_zero=True)
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    _positive("dist.rendezvous_timeout_s", cfg.dist.rendezvous_timeout_s)
    if not 0 < cfg.dist.teacher_memory_fraction <= 1:
        raise ConfigError(f"dist.teacher_memory_fraction: must be in (0, 1], got "
                          f"{cfg.dist.teacher_memory_fraction}")
    for key in ("optimizer", "scheduler"):
        if key in cfg.dist.deepspeed:
            raise ConfigError(f"dist.deepspeed.{key}: the optimizer and its schedule come from "
                              f"each stage's optim section, not from the DeepSpeed config")
