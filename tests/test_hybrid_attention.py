"""The softmax attention layers of the newer hybrids as exact implicit attention.

Qwen3-Next, Qwen3.5 (dense and MoE) and Qwen4-Exp (an output gate per channel from ``q_proj``, q/k
RMS norms, partial rotary embeddings; Qwen4-Exp's QSA indexer selects the keys), OLMo-Hybrid (q/k
norms over all heads), Lara (per-head norms, NoPE full attention, sliding-window attention), Kimi
Linear (multi-head latent attention without rotary embeddings, value heads narrower than the
query/key heads), Bailing (latent attention with interleaved rotary embeddings and a per-head
output gate) and GLM-5 Next (latent attention whose mask is a top-k selection, own or shared).
Their delta-rule layers belong to another package: these tests select the attention layers.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import AGGREGATES, LayerDecomposition, find_layers
from implicit_attention.architectures.attention import AttentionLayerDecomposition
from implicit_attention.architectures.attention.naive import attention_probabilities_naive

from conftest import assert_close, check_explanation, left_padded

tf.logging.set_verbosity_error()

TOL = {torch.float32: 1e-5, torch.float64: 1e-6}
VOCAB = 40
IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=16, intermediate_size=16)
DELTA = dict(linear_conv_kernel_dim=3, linear_key_head_dim=4, linear_value_head_dim=4, linear_num_key_heads=2,
             linear_num_value_heads=2)
MOE = dict(moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=2, num_experts_per_tok=1)
LATENT = dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=6, q_lora_rank=5, v_head_dim=3,
              qk_nope_head_dim=4, moe_intermediate_size=8, num_experts_per_tok=1)
GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=4, attention_bias=True)

#: tiny stock configs: a delta-rule layer, then attention (GQA, biases where offered)
CONFIGS = {
    "Qwen3NextForCausalLM": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM, dict(
        layer_types=["linear_attention", "full_attention"], **GQA, **MOE, **DELTA)),
    "Qwen3_5ForCausalLM": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM, dict(
        layer_types=["linear_attention", "full_attention"], **GQA, **DELTA)),
    "Qwen3_5MoeForCausalLM": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM, dict(
        layer_types=["linear_attention", "full_attention"], **GQA, **MOE, **DELTA)),
    "Qwen4ExpForCausalLM": (tf.Qwen4ExpTextConfig, tf.Qwen4ExpForCausalLM, dict(
        layer_types=["linear_attention", "indexed_attention"], hc_count=2, hc_lowrank=4, indexer_n_heads=2,
        indexer_kv_heads=1, indexer_head_dim=4, indexer_budget=4, indexer_compress_ratio=2, **GQA, **MOE, **DELTA)),
    "OlmoHybridForCausalLM": (tf.OlmoHybridConfig, tf.OlmoHybridForCausalLM, dict(
        layer_types=["linear_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
        attention_bias=True, **DELTA)),
    "LaraMiniForCausalLM": (tf.LaraMiniConfig, tf.LaraMiniForCausalLM, dict(
        layer_types=["linear_attention", "full_attention", "sliding_attention"], sliding_window=3,
        **GQA, **MOE, **DELTA)),
    "KimiLinearForCausalLM": (tf.KimiLinearConfig, tf.KimiLinearForCausalLM, dict(
        layer_types=["linear_attention", "full_attention"], qk_rope_head_dim=2, num_local_experts=2,
        linear_head_dim=4, linear_num_heads=2, linear_conv_kernel_dim=3, **LATENT)),
    "BailingHybridForCausalLM": (tf.BailingHybridConfig, tf.BailingHybridForCausalLM, dict(
        layer_types=["linear_attention", "full_attention"], qk_rope_head_dim=2, num_local_experts=2, n_group=1,
        topk_group=1, first_k_dense_replace=2, head_dim=4, short_conv_kernel_size=3, num_mtp_layers=0, **LATENT)),
    # the third layer shares the second one's top-k selection
    "Glm5NextTextModel": (tf.Glm5NextTextConfig, tf.Glm5NextTextModel, dict(
        layer_types=["linear_attention", "indexed_attention", "indexed_attention"],
        indexer_types=["full", "full", "shared"], qk_rope_head_dim=0, n_routed_experts=2, index_topk=4,
        index_head_dim=4, index_n_heads=2, index_kpool=2, linear_head_dim=4, linear_num_heads=2,
        linear_conv_kernel_dim=3, hc_mult=2, **LATENT)),
}
#: the gated attentions: one gate per channel (Qwen), one per head (Bailing)
GATED = ["Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen4ExpForCausalLM",
         "BailingHybridForCausalLM"]
#: sparse attentions: the mask is a top-k selection of the causally visible keys
SPARSE = ["Qwen4ExpForCausalLM", "Glm5NextTextModel"]


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: biases and constant-initialised weights (norms, gates) perturbed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or param.numel() == 1 or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)


def tiny(class_name: str, *, dtype=torch.float64, attn: str = "sdpa", seed: int = 0):
    config_cls, model_cls, settings = CONFIGS[class_name]
    torch.manual_seed(seed)
    config = config_cls(**IDS, num_hidden_layers=len(settings["layer_types"]), **settings)
    config._experts_implementation = "eager"  # the grouped-mm experts refuse float64
    model = model_cls(config)
    randomise(model)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def attention_indices(model) -> list[int]:
    return [i for i, (_, _, arch) in enumerate(find_layers(model)) if arch.name.startswith("attention")]


def attention_layers(class_name: str, *, dtype=torch.float64, attn: str = "sdpa", batch: int = 3, length: int = 7,
                     padded: bool = True):
    model = tiny(class_name, dtype=dtype, attn=attn)
    ids, mask = left_padded(batch=batch, length=length, vocab=VOCAB)
    mask = mask if padded else None
    return model, ids, mask, ia.decompose(model, ids, mask, layers=attention_indices(model)).layers


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_attention_layers_reconstruct_module_output(class_name, dtype, attn):
    # the stock eager softmax runs in float32, where a float64 finfo.min mask turns padded rows into NaN:
    # unpadded there, and its float32 rounding (~5e-8) is the module's own
    padded = not (attn == "eager" and dtype == torch.float64)
    model, ids, mask, layers = attention_layers(class_name, dtype=dtype, attn=attn, padded=padded)
    assert len(layers) == len(attention_indices(model)) >= 1
    tol = TOL[dtype] if padded else 1e-7
    for layer in layers:
        assert isinstance(layer, AttentionLayerDecomposition) and layer.exact
        assert layer.output.norm() > 0 and layer.error <= tol, (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        assert_close(rebuilt, layer.output, tol, layer.name)
        assert torch.equal(layer.mask, (mask if mask is not None else torch.ones_like(ids)).to(dtype))
        assert (layer.gate is not None) == (class_name in GATED)


@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "LaraMiniForCausalLM", "KimiLinearForCausalLM"])
@pytest.mark.parametrize("length", [1, 2, 5])
def test_odd_lengths_and_unbatched_input(class_name, length):
    model = tiny(class_name)
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    result = ia.decompose(model, ids, layers=attention_indices(model))
    assert all(e <= 1e-6 for e in result.errors) and result.layers[0].matrix.shape[-2:] == (length, length)


@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_padding_does_not_change_the_real_tokens_maps(class_name):
    """Real tokens never attend to padding, and a padded row's map is the unpadded example's."""
    model, ids, mask, padded = attention_layers(class_name)
    alone = ia.decompose(model, ids[2:, 2:], layers=attention_indices(model)).layers
    for a, b in zip(padded, alone, strict=True):
        P = a.probs[2]                                                      # [H, L, L]
        assert torch.all(P[:, 2:, :2] == 0)
        assert_close(a.aggregate("abs")[2, 2:, 2:], b.aggregate("abs")[0], 1e-10, a.name)


def test_the_readers_follow_each_module():
    """Sliding window and NoPE (Lara), narrow value heads (Kimi), sparse masks (Qwen4-Exp, GLM-5 Next)."""
    _, _, _, lara = attention_layers("LaraMiniForCausalLM", padded=False)
    assert lara[0].factors.window is None and lara[1].factors.window == 3
    assert torch.count_nonzero(torch.tril(lara[1].probs, -3)) == 0 and torch.count_nonzero(torch.tril(lara[0].probs, -3))
    _, _, _, kimi = attention_layers("KimiLinearForCausalLM")
    assert kimi[0].head_dim == 3 and kimi[0].factors.q.shape[-1] == 6 and kimi[0].channels == 6
    for class_name in SPARSE:
        _, _, mask, layers = attention_layers(class_name, length=9)
        for layer in layers:
            P = layer.probs
            causal = torch.ones(9, 9, dtype=torch.bool).tril()
            visible = causal & mask.bool()[:, None, None, :] & mask.bool()[:, None, :, None]
            assert torch.all(P[~visible.expand_as(P)] == 0)
            assert torch.count_nonzero(P[visible.expand_as(P)] == 0) > 0, "the selection drops some keys"


# ------------------------------------------------------------------------------------ gates and fast paths
@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "BailingHybridForCausalLM"])
def test_gated_attention_against_the_naive_loops(class_name):
    model, ids, mask, layers = attention_layers(class_name, batch=2, length=6)
    layer = layers[0]
    f = layer.factors
    bias, empty = f.bias(layer.length, layer.dtype, layer.device)
    k = f.k.repeat_interleave(layer.heads // f.k.shape[1], dim=1)
    P = attention_probabilities_naive(f.q, k, f.scale, bias, empty)               # [B, H, L, L]
    v = layer.values.unflatten(-1, (layer.heads, layer.head_dim))
    out = torch.zeros_like(layer.output)
    for b in range(layer.batch_size):
        for c in range(layer.channels):
            for i in range(layer.length):
                out[b, i, c] = f.gate[b, i, c] * sum(P[b, c // layer.head_dim, i, j] * v[b, j, c // layer.head_dim,
                                                                                          c % layer.head_dim]
                                                     for j in range(layer.length))
    assert_close(out, layer.output, 1e-6, "naive gated attention")
    expected = torch.stack([f.gate[:, :, c, None] * P[:, c // layer.head_dim] for c in range(layer.channels)], 1)
    assert_close(layer.matrix, expected, 1e-12, "matrices")
    per_head = f.gate.unflatten(-1, (layer.heads, layer.head_dim))
    assert torch.equal(per_head, per_head[..., :1].expand_as(per_head)) == (class_name == "BailingHybridForCausalLM")


@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "BailingHybridForCausalLM", "Glm5NextTextModel"])
def test_per_head_aggregates_and_attribution_equal_the_generic_code(class_name):
    _, _, _, layers = attention_layers(class_name)
    layer = layers[-1]
    grad = torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for how in AGGREGATES:
        layer._aggregates.clear()
        generic = layer.aggregate_by_blocks(how)
        layer._aggregates.clear()
        assert_close(layer.aggregate(how), generic, 1e-12, how)
        assert_close(layer.aggregate_rows([0, 3, -1], how), layer.rows_by_blocks([0, 3, -1], how), 1e-12, how)
    for channel in (0, layer.head_dim + 1, -1):
        assert_close(layer.aggregate(channel=channel),
                     LayerDecomposition.channel_matrix(layer, channel % layer.channels), 1e-15, "channel")
    # Chefer et al.'s rule per head on the gated matrices diag(g_c) P_h: dM_c = g_i v_j, summed over the head
    gated = grad if layer.gate is None else grad * layer.gate
    heads = lambda t: t.unflatten(-1, (layer.heads, layer.head_dim)).transpose(1, 2)  # noqa: E731
    dP = torch.einsum("bhid,bhjd->bhij", heads(gated), heads(layer.values))
    assert_close(layer.attribution(grad), (dP * layer.probs).clamp(min=0).mean(dim=1), 1e-12, "attribution")
    assert_close(layer.reconstruct(), LayerDecomposition.reconstruct(layer), 1e-12, "per-head reconstruction")
    layer.block_bytes, layer._aggregates = 1, {}
    assert_close(layer.aggregate("pos"), layer.aggregate_by_blocks("pos"), 1e-12, "one head at a time")


# ------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("method", ["attribution", "rollout", "raw", "grad_x_input"])
@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "KimiLinearForCausalLM"])
def test_explain_main_methods_on_the_attention_layers(class_name, method):
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    expl = check_explanation(model, ids, mask, method=method, layers=attention_indices(model))
    if expl is not None and expl.decomposition is not None:
        assert all(isinstance(layer, AttentionLayerDecomposition) for layer in expl.decomposition.layers)


def test_float64_grouped_mm_experts_are_refused_with_the_fix_and_our_loader_applies_it(tmp_path):
    """transformers' grouped-mm experts refuse float64: the API says how to switch to the eager experts
    (the same function), and load_model, which makes the model itself, switches."""
    from implicit_attention.loading import load_model

    config = tf.Qwen3NextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                layer_types=["linear_attention", "full_attention"], num_attention_heads=2,
                                num_key_value_heads=1, head_dim=8, num_experts=2, num_experts_per_tok=1,
                                moe_intermediate_size=8, linear_num_key_heads=1, linear_num_value_heads=2,
                                linear_key_head_dim=4, linear_value_head_dim=4)
    torch.manual_seed(0)
    model = tf.Qwen3NextForCausalLM(config).double().eval()
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(ValueError, match=r"set_experts_implementation\('eager'\)"):
        ia.decompose(model, ids)
    model.save_pretrained(tmp_path)
    import shutil
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[1] / "zoo" / "gla"  # any tokenizer: load_model wants one
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo / name, tmp_path / name)
    loaded = load_model(tmp_path, dtype=torch.float64)
    assert loaded.model.config._experts_implementation == "eager"
    assert max(ia.decompose(loaded.model, ids).errors) < 1e-6


# ------------------------------------------------------------------------------------ no_gate
@pytest.mark.parametrize("class_name", ["Qwen3NextForCausalLM", "BailingHybridForCausalLM"])
def test_no_gate_drops_the_attention_output_gate(class_name):
    """``no_gate`` on a gated attention: each channel's matrix is the head's probabilities without the row
    scale, ``A_c = P_h = diag(g_c)^-1 A_c(unified)``; an ablation that misses the module's output by what
    the gate did; the hybrid's delta-rule layers drop their own gate under the same name."""
    model = tiny(class_name)
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    unified = ia.decompose(model, ids, mask, layers=attention_indices(model)).layers[0]
    ablated = ia.decompose(model, ids, mask, layers=attention_indices(model), variant="no_gate").layers[0]
    assert (unified.variant, unified.exact, ablated.variant, ablated.exact) == ("unified", True, "no_gate", False)
    gate = unified.factors.gate                                                   # [B, L, C]
    expected = unified.matrix / gate.transpose(1, 2)[..., None]               # [B, C, L, L]
    real = mask.bool()
    keep = (real[:, None, :, None] & real[:, None, None, :]).expand_as(expected)  # real rows and columns
    assert_close(ablated.matrix[keep], expected[keep], 1e-10, "ungated matrices")
    assert unified.error < 1e-6 < ablated.error
    whole = ia.decompose(model, ids, mask, variant="no_gate")
    assert [layer.variant for layer in whole.layers] == ["no_gate", "no_gate"]


def test_a_gateless_attention_under_no_gate_stays_exact_and_other_variants_keep_it_unified():
    model = tiny("OlmoHybridForCausalLM")                               # its attention has no output gate
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    layer = ia.decompose(model, ids, mask, variant="no_gate").layers[-1]
    assert layer.variant == "no_gate" and layer.exact and layer.error < 1e-6
    delta = ia.decompose(model, ids, mask, variant="delta").layers       # the delta-rule core alone
    assert [(layer.variant, layer.exact) for layer in delta][-1] == ("unified", True)
    with pytest.raises(ValueError, match="variant 's6' is not offered"):
        ia.decompose(model, ids, mask, variant="s6")
