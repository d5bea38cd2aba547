"""Configuration of our RetNet (Sun et al. 2023, "Retentive Network"), ``model_type = "ia_retnet"``."""

from __future__ import annotations

from transformers import PretrainedConfig


class RetNetConfig(PretrainedConfig):
    """A decoder-only RetNet: pre-norm blocks of multi-scale retention + GLU MLP, tied LM head.

    Args:
        vocab_size: tokens of the embedding and the LM head.
        hidden_size: ``D``, the residual width.
        num_hidden_layers: number of blocks.
        num_heads: ``H`` retention heads; head ``h`` decays with ``gamma_h = 1 - 2^(-5-h)``.
        value_factor: value (and gate) width is ``value_factor * D`` (2 in the paper).
        intermediate_size: GLU hidden width (default ``2 * D``).
        attention_bias: biases in the q/k/v/gate projections.
        rotary_base: base of the rotary (xPos-style) rotation of q and k.
        group_norm_eps: epsilon of the per-head group norm.
        rms_norm_eps: epsilon of the block RMS norms.
        initializer_range: std of the normal initialisation.
    """

    model_type = "ia_retnet"

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_heads: int = 4
    value_factor: int = 2
    intermediate_size: int | None = None
    attention_bias: bool = False
    rotary_base: float = 10000.0
    group_norm_eps: float = 1e-6
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
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size "
                             "(rotary pairs)")
        super().__post_init__(**kwargs)


__all__ = ["RetNetConfig"]
