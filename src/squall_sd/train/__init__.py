"""Training: sharded datasets from SpatialData and the three training phases on PyTorch Lightning.

.. code-block:: python

    import squall_sd as squall
    from squall_sd import train

    sdata = squall.datasets.example()                         # or squall.io.legacy_st / visium /
    ...
    train.prepare([sdata], "shards/", model_config_or_name="squall-tiny", mpp=4.0)
    res = train.pretrain_image("configs/pretrain_image_tiny.yaml")   # phase 1: H&E only
    res = train.align("configs/align_tiny.yaml")                     # phase 2: H&E + expression
    res = train.finetune("configs/finetune_expression_tiny.yaml")    # phase 3: heads
    model = squall.models.load(res.model_dir)

From a shell: ``squall prepare ...`` and ``squall train <phase> CONFIG.yaml`` (auto-resumes from
``run_dir/checkpoints/last.ckpt``). The configuration schema is documented in
:mod:`squall_sd.train._config` (:data:`DEFAULTS`).
"""

from __future__ import annotations

from squall_sd.train._config import DEFAULTS, PHASES, load_config, merge_config
from squall_sd.train._data import (
    ShardDataModule,
    ShardDataset,
    augment_tile,
    collate_tiles,
    expression_grid,
)
from squall_sd.train._losses import (
    GatedAttentionMIL,
    cox_partial_likelihood,
    empty_expression_token,
    info_nce,
    masked_image_loss,
)
from squall_sd.train._modules import (
    AlignModule,
    ClassificationFinetuneModule,
    ExpressionFinetuneModule,
    ImagePretrainModule,
    MILModule,
    SquallModule,
    enable_gradient_checkpointing,
)
from squall_sd.train._optim import build_optimizer, cosine_with_warmup, param_groups
from squall_sd.train._prepare import prepare, resolve_model_config
from squall_sd.train._run import (
    ExportCheckpoint,
    TrainResult,
    align,
    finetune,
    pretrain_image,
    run_phase,
)
from squall_sd.train._shards import read_manifest

__all__ = [
    "DEFAULTS",
    "PHASES",
    "AlignModule",
    "ClassificationFinetuneModule",
    "ExportCheckpoint",
    "ExpressionFinetuneModule",
    "GatedAttentionMIL",
    "ImagePretrainModule",
    "MILModule",
    "ShardDataModule",
    "ShardDataset",
    "SquallModule",
    "TrainResult",
    "align",
    "augment_tile",
    "build_optimizer",
    "collate_tiles",
    "cosine_with_warmup",
    "cox_partial_likelihood",
    "empty_expression_token",
    "enable_gradient_checkpointing",
    "expression_grid",
    "finetune",
    "info_nce",
    "load_config",
    "masked_image_loss",
    "merge_config",
    "param_groups",
    "prepare",
    "pretrain_image",
    "read_manifest",
    "resolve_model_config",
    "run_phase",
]
