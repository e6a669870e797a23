"""The main job as a pipeline: :mod:`.config` (what to run) → :mod:`.run` (train, score,
prune, fine-tune, evaluate; one row per result) → :mod:`.report` (tables, verdict, CSV,
plot). :mod:`spamkern.cli` parses the command line and wires the three.
"""

from spamkern.experiment.config import (
    BUILTIN,
    CSV_FIELDS,
    DEFAULT_TRAINING,
    LOCAL,
    METHODS,
    PATTERNS,
    SPARSITIES,
    TrainConfig,
    check_local_root,
    parse_dataset,
    training_config,
)
from spamkern.experiment.report import (
    accuracy_tables,
    compression_table,
    dense_table,
    plot,
    summary,
    verdict,
    write_csv,
)
from spamkern.experiment.run import Trained, method_scores, run_one, train_models

__all__ = [
    "BUILTIN",
    "CSV_FIELDS",
    "DEFAULT_TRAINING",
    "LOCAL",
    "METHODS",
    "PATTERNS",
    "SPARSITIES",
    "TrainConfig",
    "Trained",
    "accuracy_tables",
    "check_local_root",
    "compression_table",
    "dense_table",
    "method_scores",
    "parse_dataset",
    "plot",
    "run_one",
    "summary",
    "train_models",
    "training_config",
    "verdict",
    "write_csv",
]
