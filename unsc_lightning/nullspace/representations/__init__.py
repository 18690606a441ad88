"""Layer inputs to rows of the layer's representation matrices: the table of layer handlers.

:mod:`.registry` holds :class:`WeightRows`, the table :data:`REPRESENTATIONS` and the lookups;
one module per layer family registers its handlers there (see ``README.md`` in this folder for
adding a layer). Importing this package imports every family, so the table is complete.
"""

from unsc_lightning.nullspace.representations import (  # noqa: F401  (registers the handlers)
    attention,
    conv,
    conv_transpose,
    embedding,
    linear,
    recurrent,
)
from unsc_lightning.nullspace.representations.attention import (
    attention_output_rows,
    attention_representation,
)
from unsc_lightning.nullspace.representations.conv import (
    channels_last_gram_to_weight_order,
    channels_last_padded,
    channels_last_weight_index,
    conv1d_rows,
    conv2d_rows,
    conv_forward_rows,
    conv_representation,
    conv_rows,
    conv_rows_channels_last,
    conv_shift_borders,
)
from unsc_lightning.nullspace.representations.conv_transpose import (
    conv_transpose_representation,
    conv_transpose_rows,
)
from unsc_lightning.nullspace.representations.embedding import (
    embedding_representation,
    embedding_rows,
)
from unsc_lightning.nullspace.representations.linear import (
    linear_forward_rows,
    linear_representation,
    linear_rows,
)
from unsc_lightning.nullspace.representations.recurrent import (
    recurrent_cell_representation,
    recurrent_representation,
)
from unsc_lightning.nullspace.representations.registry import (
    REPRESENTATIONS,
    Handler,
    RowsFn,
    WeightRows,
    is_supported,
    layer_rows,
    register_representation,
    representation_dim,
    representations_of,
    resolve_parameter,
    supported_layer_types,
    weight_as_matrix,
)

__all__ = [
    "REPRESENTATIONS",
    "Handler",
    "RowsFn",
    "WeightRows",
    "attention_output_rows",
    "attention_representation",
    "channels_last_gram_to_weight_order",
    "channels_last_padded",
    "channels_last_weight_index",
    "conv1d_rows",
    "conv2d_rows",
    "conv_forward_rows",
    "conv_representation",
    "conv_rows",
    "conv_rows_channels_last",
    "conv_shift_borders",
    "conv_transpose_representation",
    "conv_transpose_rows",
    "embedding_representation",
    "embedding_rows",
    "is_supported",
    "layer_rows",
    "linear_forward_rows",
    "linear_representation",
    "linear_rows",
    "recurrent_cell_representation",
    "recurrent_representation",
    "register_representation",
    "representation_dim",
    "representations_of",
    "resolve_parameter",
    "supported_layer_types",
    "weight_as_matrix",
]
