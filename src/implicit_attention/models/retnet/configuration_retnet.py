"""Configuration of our RetNet (Sun et al. 2023, "Retentive Network"), ``model_type = "ia_retnet"``."""

from __future__ import annotations

from .._scaffold import PreNormDecoderConfig


class RetNetConfig(PreNormDecoderConfig):
    """A decoder-only RetNet: pre-norm blocks of multi-scale retention + GLU MLP, tied LM head.

    Args (besides those of :class:`~implicit_attention.models._scaffold.PreNormDecoderConfig`):
        num_heads: ``H`` retention heads; head ``h`` decays with ``gamma_h = 1 - 2^(-5-h)``.
        value_factor: value (and gate) width is ``value_factor * D`` (2 in the paper).
        attention_bias: biases in the q/k/v/gate projections.
        rotary_base: base of the rotary (xPos-style) rotation of q and k.
        group_norm_eps: epsilon of the per-head group norm.
    """

    model_type = "ia_retnet"

    num_heads: int = 4
    value_factor: int = 2
    rotary_base: float = 10000.0
    group_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size "
                             "(rotary pairs)")
        super().__post_init__(**kwargs)


__all__ = ["RetNetConfig"]
