"""The model zoo: one small causal LM per architecture, size-matched, built from its config.

Every entry is the stock class a user loads (``transformers``' own, or this package's classes for
the architectures ``transformers`` lacks) at the same width and depth; feed-forward and low-rank
sizes are set per architecture so that the non-embedding parameter counts stay within 20% of the
zoo's median (:func:`non_embedding_count`, checked by ``tests/test_zoo.py``; the embeddings are the
same for all). ``scripts/train_zoo.py`` trains them; the trained sentiment models live in
``zoo/<name>/`` of the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ZOO", "ZOO_LAYERS", "ZOO_WIDTH", "ZooEntry", "build_model", "non_embedding_count", "parameter_count",
           "zoo_entry"]

#: Width (hidden size) and depth shared by every model of the zoo.
ZOO_WIDTH = 128
ZOO_LAYERS = 4


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo.

    Attributes:
        name: short id used on the command line and as the directory name (``"mamba"``).
        title: display name in tables (``"Mamba"``).
        kind: ``"recurrent"`` (gated-linear RNN / SSM), ``"hybrid"`` or ``"transformer"``.
        settings: ``(width, layers, vocab) -> (config class, model class, config keyword arguments)``.
        ablations: the explanation variants that switch off one part of the operator
            (``no_conv``, ``no_gate``, ...) that apply to this architecture.
    """

    name: str
    title: str
    kind: str
    settings: Callable[[int, int, int], tuple[type, type, dict[str, Any]]] = field(repr=False)
    ablations: tuple[str, ...] = ()


def _tf():
    import transformers

    return transformers


def _ours(module: str, config: str, model: str) -> tuple[type, type]:
    import importlib

    package = importlib.import_module(f"implicit_attention.models.{module}")
    return getattr(package, config), getattr(package, model)


def _heads(width: int) -> int:
    return max(1, width // 64)


def _mamba(h, n, v):
    tf = _tf()
    return tf.MambaConfig, tf.MambaForCausalLM, dict(
        vocab_size=v, hidden_size=h, state_size=16, num_hidden_layers=n, expand=2, conv_kernel=4,
        time_step_rank=max(1, h // 8), use_bias=False, use_conv_bias=True, tie_word_embeddings=True)


def _mamba2(h, n, v):
    tf = _tf()
    return tf.Mamba2Config, tf.Mamba2ForCausalLM, dict(
        vocab_size=v, hidden_size=h, num_heads=2 * h // 32, head_dim=32, state_size=128, n_groups=1,
        num_hidden_layers=n, expand=2, conv_kernel=4, chunk_size=64, tie_word_embeddings=True)


def _rwkv4(h, n, v):
    tf = _tf()
    return tf.RwkvConfig, tf.RwkvForCausalLM, dict(
        vocab_size=v, context_length=1024, hidden_size=h, num_hidden_layers=n, attention_hidden_size=h,
        intermediate_size=2 * h, rescale_every=0, tie_word_embeddings=True)


def _griffin(h, n, v):
    tf = _tf()
    return tf.RecurrentGemmaConfig, tf.RecurrentGemmaForCausalLM, dict(
        vocab_size=v, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=n,
        num_attention_heads=_heads(h), num_key_value_heads=1, lru_width=h, attention_window_size=128,
        conv1d_width=4, attn_implementation="eager", block_types=["recurrent", "recurrent", "attention"])


def _xlstm(h, n, v):
    tf = _tf()
    return tf.xLSTMConfig, tf.xLSTMForCausalLM, dict(
        vocab_size=v, hidden_size=h, num_hidden_layers=n, num_heads=_heads(h), use_bias=True,
        ffn_proj_factor=1.333, ffn_round_up_to_multiple_of=64, chunk_size=64, tie_word_embeddings=True)


def _jamba(h, n, v):
    tf = _tf()
    return tf.JambaConfig, tf.JambaForCausalLM, dict(
        vocab_size=v, hidden_size=h, intermediate_size=h, num_hidden_layers=n,
        num_attention_heads=_heads(h), num_key_value_heads=1, attn_layer_period=n, attn_layer_offset=n // 2,
        num_experts=1, mamba_d_state=16, mamba_dt_rank=max(1, h // 16), mamba_d_conv=4,
        attn_implementation="eager", tie_word_embeddings=True)


def _gpt2(h, n, v):
    tf = _tf()
    return tf.GPT2Config, tf.GPT2LMHeadModel, dict(
        vocab_size=v, n_layer=n, n_head=_heads(h), n_embd=h, n_inner=2 * h, n_positions=512,
        attn_implementation="eager", tie_word_embeddings=True)


def _llama(h, n, v):
    tf = _tf()
    return tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        vocab_size=v, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
        num_attention_heads=_heads(h), num_key_value_heads=_heads(h), max_position_embeddings=512,
        attn_implementation="eager", tie_word_embeddings=True)


def _retnet(h, n, v):
    config, model = _ours("retnet", "RetNetConfig", "RetNetForCausalLM")
    return config, model, dict(vocab_size=v, hidden_size=h, num_heads=_heads(h), num_hidden_layers=n,
                               value_factor=1, intermediate_size=3 * h // 2, tie_word_embeddings=True)


def _hgrn(h, n, v):
    config, model = _ours("hgrn", "HGRNConfig", "HGRNForCausalLM")
    return config, model, dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, intermediate_size=3 * h // 2,
                               tie_word_embeddings=True)


def _gla(h, n, v):
    config, model = _ours("gla", "GLAConfig", "GLAForCausalLM")
    return config, model, dict(vocab_size=v, hidden_size=h, num_heads=_heads(h), num_hidden_layers=n,
                               expand_k=0.5, expand_v=1.0, intermediate_size=3 * h // 2, tie_word_embeddings=True)


def _rwkv6(h, n, v):
    config, model = _ours("rwkv6", "Rwkv6Config", "Rwkv6ForCausalLM")
    return config, model, dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, head_size=64,
                               intermediate_size=h, time_mix_extra_dim=16, time_decay_extra_dim=32,
                               tie_word_embeddings=True)


def _rwkv7(h, n, v):
    config, model = _ours("rwkv7", "Rwkv7Config", "Rwkv7ForCausalLM")
    return config, model, dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, head_size=64,
                               intermediate_size=h, decay_low_rank_dim=32, a_low_rank_dim=32,
                               v_low_rank_dim=16, gate_low_rank_dim=64, tie_word_embeddings=True)


#: Every architecture of the zoo, in table order (recurrent models, the hybrid, then Transformers).
ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in (
    ZooEntry("mamba", "Mamba", "recurrent", _mamba, ("no_conv", "no_gate", "no_act")),
    ZooEntry("mamba2", "Mamba-2", "recurrent", _mamba2, ("no_conv", "no_gate", "no_act")),
    ZooEntry("rwkv4", "RWKV-4", "recurrent", _rwkv4, ("no_shift", "no_gate")),
    ZooEntry("griffin", "Griffin", "hybrid", _griffin, ("no_conv", "no_gate")),
    ZooEntry("xlstm", "xLSTM", "recurrent", _xlstm, ()),
    ZooEntry("retnet", "RetNet", "recurrent", _retnet, ()),
    ZooEntry("hgrn", "HGRN", "recurrent", _hgrn, ()),
    ZooEntry("gla", "GLA", "recurrent", _gla, ()),
    ZooEntry("rwkv6", "RWKV-6", "recurrent", _rwkv6, ()),
    ZooEntry("rwkv7", "RWKV-7", "recurrent", _rwkv7, ()),
    ZooEntry("jamba", "Jamba", "hybrid", _jamba, ("no_conv", "no_gate", "no_act")),
    ZooEntry("gpt2", "GPT-2", "transformer", _gpt2, ()),
    ZooEntry("llama", "Llama", "transformer", _llama, ()),
)}


def zoo_entry(name: str) -> ZooEntry:
    """The entry called ``name``; a clear error lists the known names."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build_model(name: str, vocab_size: int, *, width: int = ZOO_WIDTH, layers: int = ZOO_LAYERS,
                special_tokens: dict[str, int] | None = None, seed: int = 0):
    """A freshly initialised zoo model (float32, on the CPU).

    Args:
        name: a key of :data:`ZOO`.
        vocab_size: the shared tokenizer's size.
        special_tokens: ``{"pad_token_id": ..., "bos_token_id": ..., "eos_token_id": ...}``.
        seed: the initialisation seed.
    """
    import torch

    config_class, model_class, settings = zoo_entry(name).settings(width, layers, vocab_size)
    config = config_class(**settings, **(special_tokens or {}))
    torch.manual_seed(seed)
    return model_class(config)


def parameter_count(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def non_embedding_count(model) -> int:
    """Parameters outside the input and output embedding matrices: what the zoo size-matches
    (the embeddings are the same ``vocab x width`` for every entry, except that xLSTM's class does
    not tie its output matrix)."""
    embeddings = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def zoo_model_dir(name: str, task: str = "sentiment", *, repo: str | None = None, work: str | None = None):
    """Where a trained zoo model lives: the sentiment models in the repository's ``zoo/<name>``,
    the ground-truth models in the training work
    directory (``out/zoo/<name>/groundtruth``, not shipped).

    Args:
        repo: the repository root (default: found from this file, for a checkout).
        work: the training work directory (default ``<repo>/out/zoo``).
    """
    from pathlib import Path

    zoo_entry(name)
    root = Path(repo) if repo else Path(__file__).resolve().parents[3]
    if task == "sentiment":
        return root / "zoo" / name
    return (Path(work) if work else root / "out" / "zoo") / name / task
