"""Null-space engine: torch (and SciPy's LAPACK wrappers on CPU), no Lightning; usable from any
training loop."""

from unsc_lightning.nullspace.accounting import (
    NORM_LAYERS,
    Accounting,
    Constraint,
    account_parameters,
)
from unsc_lightning.nullspace.cache import ClassCovarianceCache, model_fingerprint
from unsc_lightning.nullspace.covariance import (
    ActivationRecorder,
    CovarianceAccumulator,
    accumulate_covariances,
    layer_dims,
    recording,
)
from unsc_lightning.nullspace.eigen import RELATIVE_TOLERANCE, eigh_descending, energy_rank
from unsc_lightning.nullspace.engine import (
    SECOND_PROJECTION_BELOW,
    BuildReport,
    NullSpaceEngine,
    NullSpaceEngineError,
    call_model,
    default_batch_adapter,
    guarding_engines,
    output_logits,
)
from unsc_lightning.nullspace.gram import GramOptions
from unsc_lightning.nullspace.projection import (
    NullSpaceProjector,
    null_space_complement,
    project_to_null_space,
)
from unsc_lightning.nullspace.representations import (
    REPRESENTATIONS,
    conv1d_rows,
    conv2d_rows,
    is_supported,
    layer_rows,
    linear_rows,
    representation_dim,
    weight_as_matrix,
)
from unsc_lightning.nullspace.rules import (
    BasisInfo,
    class_threshold_schedule,
    per_class_basis,
    pooled_basis,
)

__all__ = [
    "NORM_LAYERS",
    "Accounting",
    "BuildReport",
    "Constraint",
    "NullSpaceEngine",
    "NullSpaceEngineError",
    "account_parameters",
    "call_model",
    "default_batch_adapter",
    "guarding_engines",
    "output_logits",
    "REPRESENTATIONS",
    "RELATIVE_TOLERANCE",
    "SECOND_PROJECTION_BELOW",
    "ActivationRecorder",
    "ClassCovarianceCache",
    "GramOptions",
    "BasisInfo",
    "CovarianceAccumulator",
    "NullSpaceProjector",
    "accumulate_covariances",
    "class_threshold_schedule",
    "conv1d_rows",
    "conv2d_rows",
    "eigh_descending",
    "energy_rank",
    "is_supported",
    "layer_dims",
    "layer_rows",
    "model_fingerprint",
    "linear_rows",
    "null_space_complement",
    "per_class_basis",
    "pooled_basis",
    "project_to_null_space",
    "recording",
    "representation_dim",
    "weight_as_matrix",
]
