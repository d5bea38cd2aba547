"""Configuration of our RWKV-7 ("Goose") language model (``model_type = "ia_rwkv7"``)."""

from __future__ import annotations

from .._scaffold import RwkvBaseConfig


class Rwkv7Config(RwkvBaseConfig):
    """Hyper-parameters of :class:`~implicit_attention.models.rwkv7.Rwkv7ForCausalLM`.

    The low-rank widths are the reference code's (``RWKV-LM/RWKV-v7``, ``RWKV_Tmix_x070``)
    ``D_DECAY_LORA``, ``D_AAA_LORA``, ``D_MV_LORA`` and ``D_GATE_LORA``.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width ``C`` (also the width of the time mixing).
        num_hidden_layers: number of blocks.
        head_size: channels per head ``N``; the wkv state of a head is ``[N, N]``.
        intermediate_size: width of the channel mixing (default ``4 C``).
        decay_low_rank_dim: rank of the decay LoRA (``w1, w2``).
        a_low_rank_dim: rank of the in-context learning rate LoRA (``a1, a2``).
        v_low_rank_dim: rank of the value-residual mix LoRA (``v1, v2``).
        gate_low_rank_dim: rank of the output gate LoRA (``g1, g2``).
        layer_norm_epsilon: eps of the block layer norms.
        group_norm_epsilon: eps of the per-head group norm ``ln_x`` (reference: ``64e-5``).
        chunk_size: tokens per chunk of the time mixing's chunked wkv.
        wkv_mode: ``"chunk"`` (the WY/UT-transform chunked form, default) or ``"recurrent"`` (the
            slow token-by-token reference, for tests).
        initializer_range: std of the normal init of linear and embedding weights.
    """

    model_type = "ia_rwkv7"

    def __init__(self, vocab_size: int = 65536, hidden_size: int = 768, num_hidden_layers: int = 12,
                 head_size: int = 64, intermediate_size: int | None = None, decay_low_rank_dim: int = 64,
                 a_low_rank_dim: int = 64, v_low_rank_dim: int = 32, gate_low_rank_dim: int = 128,
                 layer_norm_epsilon: float = 1e-5, group_norm_epsilon: float = 64e-5, chunk_size: int = 16,
                 wkv_mode: str = "chunk", initializer_range: float = 0.02, bos_token_id: int | None = 0,
                 eos_token_id: int | None = 0, pad_token_id: int | None = None,
                 tie_word_embeddings: bool = False, **kwargs):
        self.decay_low_rank_dim = decay_low_rank_dim
        self.a_low_rank_dim = a_low_rank_dim
        self.v_low_rank_dim = v_low_rank_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         head_size=head_size,
                         intermediate_size=intermediate_size if intermediate_size is not None else 4 * hidden_size,
                         layer_norm_epsilon=layer_norm_epsilon, group_norm_epsilon=group_norm_epsilon,
                         chunk_size=chunk_size, wkv_mode=wkv_mode, initializer_range=initializer_range,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["Rwkv7Config"]
