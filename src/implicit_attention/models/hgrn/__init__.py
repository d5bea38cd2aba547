"""Our HGRN, registered with the ``transformers`` Auto classes as ``model_type = "ia_hgrn"``."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hgrn import HGRNConfig
from .modeling_hgrn import HGRNForCausalLM, HGRNModel, HGRNPreTrainedModel, HGRNRecurrence

AutoConfig.register(HGRNConfig.model_type, HGRNConfig, exist_ok=True)
AutoModel.register(HGRNConfig, HGRNModel, exist_ok=True)
AutoModelForCausalLM.register(HGRNConfig, HGRNForCausalLM, exist_ok=True)

__all__ = ["HGRNConfig", "HGRNForCausalLM", "HGRNModel", "HGRNPreTrainedModel", "HGRNRecurrence"]
