"""Our RWKV-6 ("Finch") model; importing registers ``ia_rwkv6`` with the ``transformers`` Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_rwkv6 import Rwkv6Config
from .modeling_rwkv6 import Rwkv6ForCausalLM, Rwkv6Model, Rwkv6PreTrainedModel, Rwkv6TimeMix

AutoConfig.register(Rwkv6Config.model_type, Rwkv6Config, exist_ok=True)
AutoModel.register(Rwkv6Config, Rwkv6Model, exist_ok=True)
AutoModelForCausalLM.register(Rwkv6Config, Rwkv6ForCausalLM, exist_ok=True)

__all__ = ["Rwkv6Config", "Rwkv6ForCausalLM", "Rwkv6Model", "Rwkv6PreTrainedModel", "Rwkv6TimeMix"]
