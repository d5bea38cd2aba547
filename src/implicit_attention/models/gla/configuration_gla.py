"""Configuration of our GLA (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training"), ``model_type = "ia_gla"``."""

from __future__ import annotations

from transformers import PretrainedConfig


class GLAConfig(PretrainedConfig):
    """A decoder-only GLA: pre-norm blocks of gated linear attention + GLU MLP, tied LM head.

    Args:
        vocab_size: tokens of the embedding and the LM head.
        hidden_size: ``D``, the residual width.
        num_hidden_layers: number of blocks.
        num_heads: ``H`` heads.
        expand_k: key width ``expand_k * D`` (0.5 in the paper); expand_v: value width ``expand_v * D``.
        gate_low_rank_dim: rank of the low-rank forget-gate projection (16 in the paper).
        gate_logit_normalizer: ``tau`` in ``alpha = sigmoid(.)^(1/tau)`` (16 in the paper).
        attention_bias: biases in the q/k/v/output-gate projections.
        chunk_size: tokens per chunk of the chunked parallel form.
        intermediate_size: GLU hidden width (default ``2 * D``).
        group_norm_eps: epsilon of the per-head group norm; rms_norm_eps: of the block RMS norms.
        initializer_range: std of the normal initialisation.
    """

    model_type = "ia_gla"

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    attention_bias: bool = False
    chunk_size: int = 64
    intermediate_size: int | None = None
    group_norm_eps: float = 1e-5
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
        for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            width = int(expand * self.hidden_size)
            if width < self.num_heads or width % self.num_heads:
                raise ValueError(f"{name} * hidden_size = {width} must split into {self.num_heads} heads")
        super().__post_init__(**kwargs)


__all__ = ["GLAConfig"]
