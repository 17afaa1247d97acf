"""The bytes a rank holds for a net it trains (parameters, gradients, optimizer states) and for
a frozen teacher, under the engine, ZeRO stage and precision a phase runs with.

Written from how ``distributed/engines.py`` drives each engine, and from what the DeepSpeed
version it runs with allocates (read in its ``runtime/zero/stage_1_and_2.py`` and
``stage3.py``; its ``estimate_zero{2,3}_model_states_mem_needs`` give the usual 2 + 2 + 12
bytes per parameter for bf16 Adam, which these terms reduce to there). Counts are in
parameters, sizes in bytes; ``world`` is the number of data-parallel ranks. Every function is
plain arithmetic, so the tests check it against bytes counted by hand.

The terms, per rank, for ``trainable`` of the module's ``params`` parameters (weights of ``w``
bytes: 4 fp32, 2 bf16/fp16; ``k`` bytes of optimizer state per parameter):

- plain torch (one process): weights 4·params, gradients 4·trainable, states k·trainable;
  under autocast the forward also keeps a low-precision copy of the weights it uses.
- DeepSpeed ZeRO-0, fp32 weights: as torch, plus the flat bucket the gradients are all-reduced
  in (``allreduce_bucket_size`` elements at most); with bf16 weights DeepSpeed's unfused FP16
  optimizer adds a whole fp32 master copy and fp32 gradients at each step.
- DeepSpeed ZeRO-1/2: weights w·params (flattened, with a second copy while flattening),
  fp32 master weights 4·trainable/world (a copy even when the weights are fp32), gradients
  gathered in a contiguous bucket of ``reduce_bucket_size`` elements during the backward
  (on a GPU the whole bucket is allocated; on a CPU only the pages written count), the
  rank's fp32 gradient partition 4·trainable/world, states k·trainable/world.
- DeepSpeed ZeRO-3: weights w·(partition), where parameters under
  ``stage3_param_persistence_threshold`` elements stay whole on every rank; the fp32 master
  partition (shared with the weights when they are fp32); an fp32 gradient partition, and a
  zeroed gradient buffer the size of the whole net (``initialize_optimizer_states`` sizes it
  by the largest sub-group's full numel and keeps it as the partition's ``.grad``); and the
  gathered working set while it runs (``gathered``).

ZeRO-3's gathered working set, measured here on CPU ranks before it was written down: once
its first forward has recorded the order of the modules, DeepSpeed prefetches parameters ahead
of the forward and releases a module's only when more than ``stage3_max_live_parameters``
(default 1e9) are live or they are not used again within ``stage3_max_reuse_distance`` (1e9)
in the step: so a net of fewer than 1e9 parameters ends up whole on every rank while a step
runs, plus the flat buffer of one coalesced all-gather (``stage3_prefetch_bucket_size`` plus
the module it fetched for) out of which each parameter is copied. A sharded teacher of 223 M
fp32 parameters on 2 CPU ranks rose from 0.9 to 2.2 GB during each of its forwards after the
first; with ``stage3_max_live_parameters: 1e7`` to 1.5 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

# DeepSpeed's defaults for what its config may set (``dist.deepspeed`` overrides them).
REDUCE_BUCKET = 500_000_000  # zero_optimization.reduce_bucket_size (elements)
ALLREDUCE_BUCKET = 500_000_000  # allreduce_bucket_size, ZeRO-0's gradient all-reduce
PERSISTENCE = 100_000  # zero_optimization.stage3_param_persistence_threshold (elements)
PREFETCH = 50_000_000  # zero_optimization.stage3_prefetch_bucket_size (elements)
SUB_GROUP = 1_000_000_000  # zero_optimization.sub_group_size (elements)
MAX_LIVE = 1_000_000_000  # zero_optimization.stage3_max_live_parameters (elements)


def state_bytes_per_param(name: str, momentum: float) -> int:
    """Optimizer state per trained parameter, fp32: SGD's momentum buffer (none without
    momentum), Adam's and LAMB's two moments."""
    if name == "sgd":
        return 4 if momentum > 0 else 0
    return 8


def update_temp_bytes(name: str, trainable: int, largest: int, *, nesterov: bool,
                      weight_decay: float, fused: bool) -> int:
    """Temporaries of one optimizer step over ``trainable`` parameters (fp32): torch's
    multi-tensor SGD makes one gradient-sized list for weight decay or Nesterov; multi-tensor
    AdamW one for the square roots of the second moment (none when fused, on CUDA); LAMB
    (per parameter) a few copies of the largest parameter."""
    if name == "sgd":
        return 4 * trainable if (weight_decay or nesterov) else 0
    if name == "adamw":
        return 0 if fused else 4 * trainable
    return 3 * 4 * largest


@dataclass(frozen=True)
class Engine:
    """How a phase trains: ``kind`` torch or deepspeed, its ZeRO stage, the weight bytes,
    autocast (a low-precision forward of fp32 weights), the world size, the device (a GPU
    allocates buckets whole; a CPU holds only the pages written), and DeepSpeed's sizes."""

    kind: str
    zero: int
    weight_bytes: int
    autocast: bool
    world: int
    cuda: bool
    reduce_bucket: int = REDUCE_BUCKET
    allreduce_bucket: int = ALLREDUCE_BUCKET
    persistence: int = PERSISTENCE
    prefetch: int = PREFETCH
    sub_group: int = SUB_GROUP
    max_live: int = MAX_LIVE

    def bucket_bytes(self, elements: int, written: int, dtype_bytes: int) -> int:
        """A buffer of ``elements`` of which ``written`` are written: all of it on a GPU,
        the written pages on a CPU."""
        return dtype_bytes * (elements if self.cuda else min(elements, written))


@dataclass(frozen=True)
class NetStates:
    """Bytes per rank for a trained net: persistent (``params``, ``grads``, ``optimizer``:
    master weights and states), and the extras of four moments: ``backward`` (buffers alive
    while gradients are made, beside the activations: the gradient bucket, ZeRO-3's gathered
    parameters, autocast's copies), ``reduce`` (the gradients' reduction after the backward,
    when the activations are gone: the bucket and, on a CPU, gloo's copy of it), ``update``
    (the optimizer step's temporaries), ``build`` (setting the engine up)."""

    params: int
    grads: int
    optimizer: int
    backward: int
    reduce: int
    update: int
    build: int

    @property
    def persistent(self) -> int:
        return self.params + self.grads + self.optimizer


def gathered(e: Engine, used: int, largest_module: int) -> int:
    """Bytes ZeRO-3 holds gathered while a forward (and backward) through ``used`` parameters
    runs: the live parameters, up to ``max_live``, and one coalesced all-gather's flat
    buffer (the prefetch bucket and the module it was made for)."""
    live = min(used, max(e.max_live, largest_module))
    return e.weight_bytes * (live + min(used, e.prefetch + largest_module))


def partitioned(sizes: list[int], world: int, persistence: int) -> int:
    """Elements a rank holds of parameters ``sizes`` under ZeRO-3: 1/world of each, and the
    whole of those under ``persistence`` elements (kept on every rank, plus their part)."""
    held = 0
    for n in sizes:
        part = -(-n // world)
        held += part + (n if n < persistence else 0)
    return held


def trained_states(e: Engine, sizes: list[int], trainable: int, k: int, temp: int,
                   largest_module: int) -> NetStates:
    """The bytes of a trained module of parameter ``sizes`` (every tensor's numel), of which
    ``trainable`` elements train, with ``k`` state bytes per parameter and ``temp`` bytes of
    optimizer-step temporaries over all trainable parameters; ``largest_module``: the most
    elements one submodule's forward needs at once (ZeRO-3 gathers them).

    On a CPU, gloo's all-reduce and reduce-scatter hold a copy of the buffer they reduce (a
    50 M-parameter net on 2 CPU ranks: ZeRO-0, -2 and -3 all peaked about one gradient copy
    above these terms without it); NCCL reduces in place."""
    params = sum(sizes)
    w, n = e.weight_bytes, e.world
    autocast_copy = 2 * params if e.autocast else 0
    if e.kind == "torch":
        return NetStates(params=4 * params, grads=4 * trainable, optimizer=k * trainable,
                         backward=autocast_copy, reduce=0, update=temp, build=0)
    gloo = 1 if not e.cuda else 0  # copies of a reduced buffer the collective holds
    if e.zero == 0:
        # The gradients are flattened into a bucket and all-reduced at the end of the
        # backward. bf16/fp16 weights: DeepSpeed's (unfused) FP16 optimizer keeps a whole
        # fp32 master copy with its states and makes fp32 gradients at each step.
        flat = w * min(trainable, e.allreduce_bucket)
        master = 0 if w == 4 else 4 * trainable
        return NetStates(params=w * params, grads=w * trainable,
                         optimizer=master + k * trainable, backward=autocast_copy,
                         reduce=flat * (1 + gloo), update=master + temp, build=0)
    bucket = e.bucket_bytes(e.reduce_bucket, trainable, w)
    if e.zero in (1, 2):
        grads = (w * trainable // n if e.zero == 2 else 0) + 4 * trainable // n
        return NetStates(params=w * params, grads=grads, optimizer=(4 + k) * trainable // n,
                         backward=bucket + autocast_copy, reduce=bucket * (1 + gloo),
                         update=temp // n, build=w * trainable)
    held = partitioned(sizes, n, e.persistence)
    master = 0 if w == 4 else 4 * trainable // n
    # The gradient buffer initialize_optimizer_states zeroes is as large as the whole
    # sub-group and stays alive as the fp32 partition's .grad.
    grads = 4 * trainable // n + 4 * min(trainable, e.sub_group)
    live = gathered(e, params, largest_module)
    return NetStates(params=w * held, grads=grads, optimizer=master + k * trainable // n,
                     backward=live + bucket, reduce=live + bucket * (1 + gloo),
                     update=temp // n, build=0)


def teacher_bytes(e: Engine, sizes: list[int], mode: str, largest_module: int,
                  used: int) -> tuple[int, int]:
    """(bytes a rank holds, the extra while it runs a forward through ``used`` of its
    parameters) for a frozen teacher of parameter ``sizes`` in the weight dtype: whole when
    replicated; under ZeRO-3 (``shard``) its partition, the parameters under the persistence
    threshold whole, and what ``gathered`` holds while it runs."""
    w = e.weight_bytes
    if mode == "replicate":
        return w * sum(sizes), 0
    return w * partitioned(sizes, e.world, e.persistence), gathered(e, used, largest_module)


def teacher_load_bytes(total_params: int, weight_bytes: int) -> int:
    """What loading the teacher holds for a moment on every rank, on the host: the whole wide
    net built in fp32 and its state dict read from disk (``distributed/teacher.load_teacher``
    builds and loads the whole net before it is sharded), plus its cast to a lower
    precision."""
    return 8 * total_params + (weight_bytes * total_params if weight_bytes != 4 else 0)


def comm_bytes(e: Engine, trainable: int, params: int, teacher_used: int,
               teacher_mode: str) -> int:
    """Bytes a rank sends per optimizer step (ring collectives, ``(world-1)/world`` of each
    buffer): the gradients' all-reduce (ZeRO-0) or reduce-scatter plus the weights' all-gather
    (ZeRO-1/2), both twice (w·trainable each way); ZeRO-3 gathers the weights for the forward
    and again for the backward and reduce-scatters the gradients; a sharded teacher gathers
    the ``teacher_used`` parameters its forward runs through."""
    if e.world == 1 or e.kind == "torch":
        return 0
    ring = (e.world - 1) / e.world
    w = e.weight_bytes
    if e.zero in (0, 1, 2):
        student = 2 * w * trainable
    else:
        student = 2 * w * params + w * trainable
    teacher = w * teacher_used if teacher_mode == "shard" else 0
    return int(ring * (student + teacher))
