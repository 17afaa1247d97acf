"""The config's schema: the plain dataclasses of a run (``Config`` and every section), with
each field's default and meaning in its class docstring, and ``ConfigError``.

No YAML and no torch here, and nothing else of gwtn_dist is imported when this module is
(only ``models/__init__.py``'s table of family packages, on first use), so ``data/`` and the
families' ``config`` modules can take these classes without pulling in loading, validation or
planning. The ``model`` section's class depends on ``model.family``: each family's ``config``
module registers it (``ModelConfig.register``), and ``ModelConfig.variants`` imports the
built-in ones by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import ClassVar, Literal


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the dotted key."""


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    """The check of a count or size that must be > 0 (or >= 0): each section's checks use it,
    the families' ``ModelConfig.check`` too."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


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
    NOUN: ClassVar[str] = "model"  # what a value of the tag names, in errors

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
        # Imported on use: each family's config module imports this module. The families'
        # registry (models/__init__.py) is a dict of package names and imports nothing.
        from ..models import BUILTIN_FAMILIES

        for package in BUILTIN_FAMILIES.values():
            importlib.import_module(f"{package}.config")
        return dict(ModelConfig._variants)

    def check(self, cfg: Config) -> None:
        """Raise ConfigError naming the key for any ``model.*`` value (and any family-specific
        key elsewhere: ``compare.deeper_*``, ``imitate.attention_weight``) that cannot work."""


def default_model() -> ModelConfig:
    """The ``model`` section of a config that gives none: the default family's defaults."""
    return ModelConfig.variants()[DEFAULT_FAMILY]()


DEFAULT_DATASET = "fashion-mnist"  # the dataset of a config that does not name one
# Bounds on counts that no run reaches, so that a typo (an extra digit group, 1e23 as an
# integer) is an error naming the key instead of an overflow deep inside torch or a run that
# never ends: seeds as numpy and torch take them, threads a machine has, steps and samples.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_STEPS = 10**9


def _at_most(key: str, value: int, bound: int) -> None:
    if value > bound:
        raise ConfigError(f"{key}: at most {bound:,}, got {value:,}")


@dataclass
class DataConfig:
    """Where the shards are and how batches are made.

    dataset: ``fashion-mnist`` (``gwtn shards fashion-mnist``; written on first use),
    ``imagefolder`` (``gwtn shards imagefolder``: JPEGs, train/val) or ``text`` (``gwtn shards
    text|wikipedia``: token sequences, train/val, masked-LM batches); see ``data.batches``. It
    selects this section's class and with it the other keys a ``data`` section may hold
    (``FashionMnistDataConfig``, ``ImageFolderDataConfig``, ``TextDataConfig``; a key of
    another dataset is an error naming it).
    shards: a folder written by ``gwtn shards`` (``train-*.tar``, ``test-*.tar``, index.json).
    batch_size: the global batch, split evenly over the ranks.
    eval_batch_size: the samples each rank scores at a time in evaluation.
    shuffle_buffer: the samples a training stream's shuffle buffer holds.
    prefetch: training batches made ahead in a background thread (read, decoded, augmented,
    and pinned for the copy to a GPU) while the step runs; 0 makes each one on the training
    thread when it is due (see ``data.prefetch``).
    eval_missing_ok: the fraction of an evaluation split (validation or test) that damaged
    shards or undecodable samples may take away before an evaluation refuses to score (exit 4,
    naming the shard); default 0: every sample ``index.json`` lists must be read. Damaged
    training data is skipped and counted (``skipped_samples``) instead.

    Token shards carry their own validation and test splits of whole documents (``gwtn shards
    text|wikipedia --val-every/--test-every``); token shards written without a test split, and
    image-folder shards, have one held-out split, ``val``, read for both.
    """

    dataset: Literal["fashion-mnist", "imagefolder", "text"] = DEFAULT_DATASET
    shards: str = "runs/data/fashion-mnist"
    batch_size: int = 128
    eval_batch_size: int = 500
    shuffle_buffer: int = 5000
    prefetch: int = 2
    eval_missing_ok: float = 0.0
    TAG: ClassVar[str] = "dataset"  # the key whose value selects the section's class
    NOUN: ClassVar[str] = "dataset"  # what a value of the tag names, in errors

    @classmethod
    def variants(cls) -> dict[str, type[DataConfig]]:
        """The ``data`` section's class of every dataset, by ``data.dataset``."""
        return {"fashion-mnist": FashionMnistDataConfig, "imagefolder": ImageFolderDataConfig,
                "text": TextDataConfig}

    def check(self) -> None:
        """Raise ConfigError naming the key for any ``data.*`` value that cannot work."""
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        _positive("data.shuffle_buffer", self.shuffle_buffer)
        _positive("data.prefetch", self.prefetch, allow_zero=True)
        for key in ("batch_size", "eval_batch_size", "shuffle_buffer"):
            _at_most(f"data.{key}", getattr(self, key), MAX_STEPS)
        if not 0 <= self.eval_missing_ok < 1:
            raise ConfigError(f"data.eval_missing_ok: a fraction in [0, 1), got "
                              f"{self.eval_missing_ok}")


@dataclass
class FashionMnistDataConfig(DataConfig):
    """Fashion-MNIST's ``data`` section (``data.dataset: fashion-mnist``): every rank reads the
    global batch, augmented and normalised (``data.batches.GlobalBatches``).

    train_samples: use only the first N training samples (by index, the validation split left
    out; 0 = all); handy for quick runs and for the data-size axis of a regime study.
    val_samples: Fashion-MNIST's validation split, carved out of the training data (seeded by
    ``val_seed``, stratified by class) and never trained on: evaluation curves
    (``eval_every``) and every choice ``gwtn compare`` makes (its tuning grid) read it, and the
    test split is read only for the report. Default 5000 (of 60,000); 0 = none (curves then
    read the test split).
    val_seed: the seed of the validation split's draw.
    crop_padding: augmentation's random crop, with this many pixels of zero padding.
    hflip: augmentation's random horizontal flip.
    mean: the pixels' mean, subtracted (on the 0–1 scale).
    std: the pixels' standard deviation, divided by.
    """

    dataset: Literal["fashion-mnist"] = "fashion-mnist"
    train_samples: int = 0
    val_samples: int = 5000
    val_seed: int = 0
    crop_padding: int = 2
    hflip: bool = True
    mean: float = 0.2860
    std: float = 0.3530

    def check(self) -> None:
        super().check()
        _positive("data.train_samples", self.train_samples, allow_zero=True)
        _positive("data.val_samples", self.val_samples, allow_zero=True)
        _positive("data.crop_padding", self.crop_padding, allow_zero=True)
        _positive("data.std", self.std)
        if not 0 <= self.val_seed <= MAX_SEED:
            raise ConfigError(f"data.val_seed: a seed in [0, {MAX_SEED}] (2**32 - 1), got "
                              f"{self.val_seed}")
        _at_most("data.train_samples", self.train_samples, MAX_STEPS)
        _at_most("data.val_samples", self.val_samples, MAX_STEPS)


@dataclass
class StreamDataConfig(DataConfig):
    """The keys of the datasets each rank reads its own share of through DataLoader workers
    (image folders and token shards, ``gwtn_dist.data.streams``).

    num_workers: DataLoader worker processes per rank (default 0: read in the training
    process).
    """

    num_workers: int = 0

    def check(self) -> None:
        super().check()
        _positive("data.num_workers", self.num_workers, allow_zero=True)


@dataclass
class ImageFolderDataConfig(StreamDataConfig):
    """An image folder's ``data`` section (``data.dataset: imagefolder``): random-resized crops
    and flips, ImageNet's normalisation.

    image_size: side of the random-resized crop and of the eval centre crop (default 224).
    eval_resize: eval images' shorter side before the centre crop (default 256).
    """

    dataset: Literal["imagefolder"] = "imagefolder"
    image_size: int = 224
    eval_resize: int = 256

    def check(self) -> None:
        super().check()
        _positive("data.image_size", self.image_size)
        _positive("data.eval_resize", self.eval_resize)


@dataclass
class TextDataConfig(StreamDataConfig):
    """Token shards' ``data`` section (``data.dataset: text``): masked-LM batches.

    mlm_probability: share of tokens chosen for masked-LM (default 0.15, BERT's).
    """

    dataset: Literal["text"] = "text"
    mlm_probability: float = 0.15

    def check(self) -> None:
        super().check()
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"data.mlm_probability: must be in (0, 1), got "
                              f"{self.mlm_probability}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of one training phase.

    schedule: ``cosine`` (to ``min_lr_ratio`` × lr) or ``multistep`` (× gamma at each milestone,
    given as fractions of the phase's steps), after ``warmup_steps`` of linear warm-up.
    name: ``sgd``, ``adamw`` (torch's, fused on CUDA) or ``lamb`` (layer-wise adaptive Adam for
    large batches: apex's FusedLAMB on CUDA when apex is installed, else our plain-torch
    ``optim/lamb.py``; Adam moments with ``betas``, decoupled ``weight_decay``, and a
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
    data: DataConfig = field(default_factory=FashionMnistDataConfig)
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


def optim_sections(cfg: Config) -> list[tuple[str, OptimConfig]]:
    """Every phase's optimizer section, by its dotted key."""
    return [("wide.optim", cfg.wide.optim), ("imitate.optim", cfg.imitate.optim),
            ("finetune.optim", cfg.finetune.optim), ("baseline.optim", cfg.baseline.optim)]
