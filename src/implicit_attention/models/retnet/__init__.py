"""Our RetNet, registered with the ``transformers`` Auto classes as ``model_type = "ia_retnet"``."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_retnet import RetNetConfig
from .modeling_retnet import RetNetForCausalLM, RetNetModel, RetNetPreTrainedModel, RetNetRetention

AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)

__all__ = ["RetNetConfig", "RetNetForCausalLM", "RetNetModel", "RetNetPreTrainedModel", "RetNetRetention"]
