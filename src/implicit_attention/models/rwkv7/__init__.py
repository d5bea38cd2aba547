"""Our RWKV-7 ("Goose") model; importing registers ``ia_rwkv7`` with the ``transformers`` Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_rwkv7 import Rwkv7Config
from .modeling_rwkv7 import Rwkv7ForCausalLM, Rwkv7Model, Rwkv7PreTrainedModel, Rwkv7TimeMix

AutoConfig.register(Rwkv7Config.model_type, Rwkv7Config, exist_ok=True)
AutoModel.register(Rwkv7Config, Rwkv7Model, exist_ok=True)
AutoModelForCausalLM.register(Rwkv7Config, Rwkv7ForCausalLM, exist_ok=True)

__all__ = ["Rwkv7Config", "Rwkv7ForCausalLM", "Rwkv7Model", "Rwkv7PreTrainedModel", "Rwkv7TimeMix"]
