"""Our Vision Mamba, registered with the ``transformers`` Auto classes as ``model_type = "vim"``."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_vim import VimConfig
from .modeling_vim import (
    VimBlock,
    VimForImageClassification,
    VimMixer,
    VimModel,
    VimPreTrainedModel,
    config_from_state_dict,
)

AutoConfig.register(VimConfig.model_type, VimConfig, exist_ok=True)
AutoModel.register(VimConfig, VimModel, exist_ok=True)
AutoModelForImageClassification.register(VimConfig, VimForImageClassification, exist_ok=True)

__all__ = ["VimBlock", "VimConfig", "VimForImageClassification", "VimMixer", "VimModel", "VimPreTrainedModel",
           "config_from_state_dict"]
