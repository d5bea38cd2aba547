"""Models that ``transformers`` lacks, as ``PreTrainedModel`` classes registered with its Auto classes.

Importing this package registers every model (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``).
"""

from . import retnet  # noqa: F401  ia_retnet
from . import hgrn  # noqa: F401  ia_hgrn
from . import gla  # noqa: F401  ia_gla
