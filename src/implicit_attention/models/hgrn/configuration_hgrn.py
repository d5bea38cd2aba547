"""Configuration of our HGRN (Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network"), ``model_type = "ia_hgrn"``."""

from __future__ import annotations

from transformers import PretrainedConfig


class HGRNConfig(PretrainedConfig):
    """A decoder-only HGRN: pre-norm blocks of the gated linear recurrence (HGRU) + GLU MLP, tied LM head.

    Args:
        vocab_size: tokens of the embedding and the LM head.
        hidden_size: ``D``, the residual width.
        num_hidden_layers: number of blocks.
        expand_ratio: recurrence width ``E = expand_ratio * D``.
        use_short_conv: a causal depthwise conv (the token-mixing input) on the input branch.
        conv_size: its width ``K``; conv_bias: whether it has a bias.
        use_lower_bound: lower-bound the forget gates, increasingly with depth (``cumsum(softmax)``
            over layers, 0 for the first layer).
        attention_bias: biases in the input / forget / output-gate projections.
        chunk_size: tokens per chunk of the chunked parallel scan.
        intermediate_size: GLU hidden width (default ``2 * D``).
        rms_norm_eps: epsilon of the RMS norms (blocks and the recurrence output).
        initializer_range: std of the normal initialisation.
    """

    model_type = "ia_hgrn"

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 2
    expand_ratio: int = 1
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = True
    use_lower_bound: bool = True
    attention_bias: bool = False
    chunk_size: int = 64
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    use_cache: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 2 * self.hidden_size
        super().__post_init__(**kwargs)


__all__ = ["HGRNConfig"]
