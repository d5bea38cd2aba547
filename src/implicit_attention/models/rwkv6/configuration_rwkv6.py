"""Configuration of our RWKV-6 ("Finch") language model (``model_type = "ia_rwkv6"``)."""

from __future__ import annotations

from .._scaffold import RwkvBaseConfig


class Rwkv6Config(RwkvBaseConfig):
    """Hyper-parameters of :class:`~implicit_attention.models.rwkv6.Rwkv6ForCausalLM`.

    Names follow the RWKV-6 reference code (``RWKV-LM/RWKV-v5``, ``RWKV_Tmix_x060``) where it has
    them: ``D_MIX_LORA`` is ``time_mix_extra_dim``, ``D_DECAY_LORA`` is ``time_decay_extra_dim``.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width ``C`` (also the width of the time mixing, ``dim_att``).
        num_hidden_layers: number of blocks.
        head_size: channels per head ``N``; the wkv state of a head is ``[N, N]``.
        intermediate_size: width of the channel mixing (default ``int(3.5 C) // 32 * 32``).
        time_mix_extra_dim: rank of the LoRA of the data-dependent token shift (ddlerp).
        time_decay_extra_dim: rank of the LoRA of the data-dependent decay.
        layer_norm_epsilon: eps of the block layer norms.
        group_norm_epsilon: eps of the per-head group norm ``ln_x`` (reference: ``1e-5 * 8**2``).
        chunk_size: tokens per chunk of the time mixing's chunked wkv.
        wkv_mode: ``"chunk"`` (vectorised within chunks, the default) or ``"recurrent"`` (the slow
            token-by-token reference, for tests).
        initializer_range: std of the normal init of linear and embedding weights.
    """

    model_type = "ia_rwkv6"

    def __init__(self, vocab_size: int = 65536, hidden_size: int = 768, num_hidden_layers: int = 12,
                 head_size: int = 64, intermediate_size: int | None = None, time_mix_extra_dim: int = 32,
                 time_decay_extra_dim: int = 64, layer_norm_epsilon: float = 1e-5,
                 group_norm_epsilon: float = 64e-5, chunk_size: int = 32, wkv_mode: str = "chunk",
                 initializer_range: float = 0.02, bos_token_id: int | None = 0, eos_token_id: int | None = 0,
                 pad_token_id: int | None = None, tie_word_embeddings: bool = False, **kwargs):
        if intermediate_size is None:  # the reference's 3.5 C rounded down to a multiple of 32
            intermediate_size = int(hidden_size * 3.5) // 32 * 32 or int(hidden_size * 3.5)
        self.time_mix_extra_dim = time_mix_extra_dim
        self.time_decay_extra_dim = time_decay_extra_dim
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                         head_size=head_size, intermediate_size=intermediate_size,
                         layer_norm_epsilon=layer_norm_epsilon, group_norm_epsilon=group_norm_epsilon,
                         chunk_size=chunk_size, wkv_mode=wkv_mode, initializer_range=initializer_range,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["Rwkv6Config"]
