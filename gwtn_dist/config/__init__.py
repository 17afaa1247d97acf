"""The one source of configuration: typed dataclasses, loaded from YAML plus dotted overrides.

``load_config("configs/fmnist_resnet.yaml", ["run_dir=runs/x", "imitate.steps_per_point=200"])``
reads the file, applies the overrides, checks every key and value, and returns a ``Config``.
Unknown keys and bad values raise ``ConfigError`` naming the dotted key and what is allowed.
Every setting the paper leaves open is a field here with its default stated in the docstring.

One job per module, each importing only the ones above it in this list:

- ``schema``: ``Config`` and every section as plain dataclasses, ``ConfigError``; no YAML, no
  torch (``data/`` and the families' ``config`` modules import it).
- ``coerce``: a nested dict to a ``Config``, each value checked against its field's type.
- ``rundir``: the ``{date}`` and ``{seed}`` placeholders of ``run_dir``.
- ``experiments``: the arms and what each may tune, tuning grids, regime cells, and the checks
  of ``arms``, ``compare`` and ``regime``.
- ``validate``: the checks across fields and sections (``validate``).
- ``load``: YAML and overrides in, a checked ``Config`` out (``load_config``); ``dump_config``.
- ``migrate``: the forms older versions wrote (a run's saved ``config.yaml``, the flat
  ``model`` section of older teacher-cache keys).

``from gwtn_dist.config import X`` finds every public name of these here.
"""

from .coerce import to_dict
from .experiments import regime_cells, tune_points
from .load import apply_overrides, config_from_dict, dump_config, load_config, with_overrides
from .migrate import flat_data_section, flat_model_section, upgrade_saved_tree
from .rundir import RUN_DIR_FIELDS, check_run_dir, date_stamp, fill_run_dir
from .schema import (
    DEFAULT_DATASET,
    DEFAULT_FAMILY,
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
    BaselineConfig,
    CheckpointConfig,
    CompareConfig,
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    DistillConfig,
    FashionMnistDataConfig,
    FinetuneStageConfig,
    ImageFolderDataConfig,
    ImitateStageConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ProfileConfig,
    RegimeConfig,
    StreamDataConfig,
    TextDataConfig,
    WideningConfig,
    WideStageConfig,
    _positive,
    default_model,
    optim_sections,
)
from .validate import validate

__all__ = [
    "DEFAULT_DATASET", "DEFAULT_FAMILY", "MAX_SEED", "MAX_STEPS", "MAX_THREADS",
    "RUN_DIR_FIELDS", "BaselineConfig", "CheckpointConfig", "CompareConfig", "Config",
    "ConfigError", "DataConfig", "DistConfig", "DistillConfig", "FashionMnistDataConfig",
    "FinetuneStageConfig", "ImageFolderDataConfig", "ImitateStageConfig", "LoggingConfig",
    "ModelConfig", "OptimConfig", "ProfileConfig", "RegimeConfig", "StreamDataConfig",
    "TextDataConfig", "WideStageConfig", "WideningConfig", "_positive", "apply_overrides",
    "check_run_dir", "config_from_dict", "date_stamp", "default_model", "dump_config",
    "fill_run_dir", "flat_data_section", "flat_model_section", "load_config", "optim_sections",
    "regime_cells", "to_dict", "tune_points", "upgrade_saved_tree", "validate", "with_overrides",
]
