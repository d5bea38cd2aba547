"""Configuration of our HGRN (Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network"), ``model_type = "ia_hgrn"``."""

from __future__ import annotations

from .._scaffold import PreNormDecoderConfig


class HGRNConfig(PreNormDecoderConfig):
    """A decoder-only HGRN: pre-norm blocks of the gated linear recurrence (HGRU) + GLU MLP, tied LM head.

    Args (besides those of :class:`~implicit_attention.models._scaffold.PreNormDecoderConfig`):
        expand_ratio: recurrence width ``E = expand_ratio * D``.
        use_short_conv: a causal depthwise conv (the token-mixing input) on the input branch.
        conv_size: its width ``K``; conv_bias: whether it has a bias.
        use_lower_bound: lower-bound the forget gates, increasingly with depth (``cumsum(softmax)``
            over layers, 0 for the first layer).
        attention_bias: biases in the input / forget / output-gate projections.
        chunk_size: tokens per chunk of the chunked parallel scan.
        rms_norm_eps: epsilon of the RMS norms (blocks and the recurrence output).
    """

    model_type = "ia_hgrn"

    expand_ratio: int = 1
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = True
    use_lower_bound: bool = True
    chunk_size: int = 64


__all__ = ["HGRNConfig"]
