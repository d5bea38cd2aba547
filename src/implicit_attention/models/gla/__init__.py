"""Our GLA, registered with the ``transformers`` Auto classes as ``model_type = "ia_gla"``."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gla import GLAConfig
from .modeling_gla import GLAAttention, GLAForCausalLM, GLAModel, GLAPreTrainedModel

AutoConfig.register(GLAConfig.model_type, GLAConfig, exist_ok=True)
AutoModel.register(GLAConfig, GLAModel, exist_ok=True)
AutoModelForCausalLM.register(GLAConfig, GLAForCausalLM, exist_ok=True)

__all__ = ["GLAAttention", "GLAConfig", "GLAForCausalLM", "GLAModel", "GLAPreTrainedModel"]
