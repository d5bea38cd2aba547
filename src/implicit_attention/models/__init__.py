"""Models that ``transformers`` lacks, as ``PreTrainedModel`` classes registered with its Auto classes.

Importing this package registers every model (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``).
"""

from . import retnet  # noqa: F401  ia_retnet
from . import hgrn  # noqa: F401  ia_hgrn
from . import gla  # noqa: F401  ia_gla
from . import rwkv6  # noqa: F401  ia_rwkv6
from . import rwkv7  # noqa: F401  ia_rwkv7
