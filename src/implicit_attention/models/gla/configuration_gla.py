"""Configuration of our GLA (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training"), ``model_type = "ia_gla"``."""

from __future__ import annotations

from .._scaffold import PreNormDecoderConfig


class GLAConfig(PreNormDecoderConfig):
    """A decoder-only GLA: pre-norm blocks of gated linear attention + GLU MLP, tied LM head.

    Args (besides those of :class:`~implicit_attention.models._scaffold.PreNormDecoderConfig`):
        num_heads: ``H`` heads.
        expand_k: key width ``expand_k * D`` (0.5 in the paper); expand_v: value width ``expand_v * D``.
        gate_low_rank_dim: rank of the low-rank forget-gate projection (16 in the paper).
        gate_logit_normalizer: ``tau`` in ``alpha = sigmoid(.)^(1/tau)`` (16 in the paper).
        attention_bias: biases in the q/k/v/output-gate projections.
        chunk_size: tokens per chunk of the chunked parallel form.
        group_norm_eps: epsilon of the per-head group norm.
    """

    model_type = "ia_gla"

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    chunk_size: int = 64
    group_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            width = int(expand * self.hidden_size)
            if width < self.num_heads or width % self.num_heads:
                raise ValueError(f"{name} * hidden_size = {width} must split into {self.num_heads} heads")
        super().__post_init__(**kwargs)


__all__ = ["GLAConfig"]
