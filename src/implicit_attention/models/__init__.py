"""Models that ``transformers`` lacks, as ``PreTrainedModel`` classes registered with its Auto classes.

Importing this package registers every model (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``; Vision Mamba
``AutoModelForImageClassification``).
"""

from . import (
    gla,  # noqa: F401  ia_gla
    hgrn,  # noqa: F401  ia_hgrn
    retnet,  # noqa: F401  ia_retnet
    rwkv6,  # noqa: F401  ia_rwkv6
    rwkv7,  # noqa: F401  ia_rwkv7
    vim,  # noqa: F401  vim (also AutoModelForImageClassification)
)
