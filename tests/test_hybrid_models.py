"""Hybrid models (SSM + attention) in one decomposition, rollout and attribution; a Mamba vs a GPT-2.

The attention layers of Jamba, Zamba, Bamba, Zamba2, NemotronH, GraniteMoeHybrid and Falcon-H1
against their forward; every registered layer of a hybrid found in model order and decomposed in
call order; explain with every method on the hybrids; a Mamba and a Transformer compared in one call.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures import find_layers
from implicit_attention.architectures.attention import AttentionLayerDecomposition

from conftest import assert_close, check_explanation, left_padded, own_options, tiny_mamba

tf.logging.set_verbosity_error()

TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
VOCAB = 40

#: tiny stock configs (hidden 8, one or two attention layers among Mamba layers, GQA where offered).
CONFIGS = {
    "JambaForCausalLM": (tf.JambaConfig, tf.JambaForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_period=3, attn_layer_offset=1, num_experts=1, mamba_d_state=3, mamba_dt_rank=2,
        mamba_d_conv=4, mamba_proj_bias=True, mamba_conv_bias=True)),
    "ZambaForCausalLM": (tf.ZambaConfig, tf.ZambaForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3,
        layers_block_type=["hybrid", "linear_attention", "hybrid"], num_attention_heads=2,
        num_key_value_heads=2, n_mamba_heads=2, mamba_d_state=3, mamba_dt_rank=2, mamba_d_conv=4,
        mamba_proj_bias=True, mamba_conv_bias=True)),
    "BambaForCausalLM": (tf.BambaConfig, tf.BambaForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=4, mamba_n_groups=2, mamba_d_state=3,
        mamba_chunk_size=4, mamba_proj_bias=True, attention_bias=True, partial_rotary_factor=0.5)),
    # Zamba2 with its per-call LoRA adapters and rotary embeddings on the shared blocks
    "Zamba2ForCausalLM": (tf.Zamba2Config, tf.Zamba2ForCausalLM, dict(
        hidden_size=8, num_hidden_layers=3, layers_block_type=["hybrid", "linear_attention", "hybrid"],
        mamba_d_state=3, n_mamba_heads=4, mamba_ngroups=2, chunk_size=4, num_attention_heads=2,
        intermediate_size=16, add_bias_linear=True, use_shared_attention_adapter=True, adapter_rank=3,
        use_mem_rope=True)),
    "NemotronHForCausalLM": (tf.NemotronHConfig, tf.NemotronHForCausalLM, dict(
        hidden_size=8, layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16, ssm_state_size=3,
        mamba_num_heads=4, mamba_head_dim=4, n_groups=2, chunk_size=4, use_bias=True)),
    "GraniteMoeHybridForCausalLM": (tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mamba_n_heads=4, mamba_n_groups=2,
        mamba_d_state=3, mamba_chunk_size=4, num_local_experts=0, shared_intermediate_size=16,
        mamba_proj_bias=True, attention_multiplier=0.3, position_embedding_type="rope")),
    "FalconH1ForCausalLM": (tf.FalconH1Config, tf.FalconH1ForCausalLM, dict(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        mamba_d_ssm=16, mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=3, mamba_chunk_size=4,
        mamba_rms_norm=True, mamba_norm_before_gate=False, key_multiplier=0.6, mamba_proj_bias=True)),
}
#: the three hybrids every method is run on
MAIN = ["JambaForCausalLM", "ZambaForCausalLM", "BambaForCausalLM"]


def randomise(model: torch.nn.Module) -> None:
    """Every parameter non-trivial: A_log in (-1, 1), dt biases ~ N(0, 1), constants perturbed."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif name.endswith("dt_bias") or ("dt_proj" in name and name.endswith("bias")):
                param.copy_(torch.randn_like(param))
            elif name.endswith(("bias", ".D")) or param.numel() == 1 or bool((param == param.flatten()[0]).all()):
                param.add_(torch.randn_like(param) * 0.5)


def tiny(class_name: str, *, dtype=torch.float64, attn="sdpa", seed: int = 0):
    config_cls, model_cls, settings = CONFIGS[class_name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **settings))
    randomise(model)
    model.set_attn_implementation(attn)
    return model.to(dtype).eval()


def attention_indices(model) -> list[int]:
    return [i for i, (_, _, arch) in enumerate(find_layers(model)) if arch.name.startswith("attention")]


def call_order(model, ids, mask) -> list[str]:
    """Names of the registered layers in the order the forward pass calls them (plain hooks)."""
    order, handles = [], []
    for name, module, _ in find_layers(model):
        handles.append(module.register_forward_pre_hook(lambda module, args, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return order


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_attention_layers_reconstruct_module_output(class_name, dtype, attn):
    model = tiny(class_name, dtype=dtype, attn=attn)
    ids, mask = left_padded(batch=3, length=7, vocab=VOCAB)
    if attn == "eager" and dtype == torch.float64:
        mask = None  # the stock eager softmax in float32 turns a float64 finfo.min mask into NaN rows
    indices = attention_indices(model)
    assert indices, f"no attention layer found in {class_name}"
    result = ia.decompose(model, ids, mask, layers=indices)
    assert len(result.layers) == len(indices)
    for layer in result.layers:
        assert isinstance(layer, AttentionLayerDecomposition)
        assert layer.error <= TOL[dtype], (layer.name, layer.error)
        rebuilt = torch.einsum("bcij,bjc->bic", layer.matrix, layer.values)
        assert_close(rebuilt, layer.output, TOL[dtype], layer.name)
        if mask is not None:
            assert torch.equal(layer.mask, mask.to(dtype))


@pytest.mark.parametrize("class_name", list(CONFIGS))
def test_every_layer_found_in_model_order_and_decomposed_in_call_order(class_name):
    model = tiny(class_name)
    found = find_layers(model)
    kinds = [arch.name for _, _, arch in found]
    assert any(k.startswith("attention") for k in kinds)
    names = [name for name, _, _ in found]
    assert names == [name for name, _ in model.named_modules() if name in set(names)]   # model order
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    if not any(not k.startswith("attention") for k in kinds):
        pytest.skip(f"the Mamba mixers of {class_name} are not registered yet (architectures/mamba2, "
                    "architectures/mamba): only its attention layers are found")
    result = ia.decompose(model, ids, mask)
    # rollout multiplies maps in the order the layers run: decompose keeps the call order (Zamba2
    # registers a hybrid layer's Mamba block before the shared attention block it calls first)
    assert [layer.name for layer in result.layers] == call_order(model, ids, mask)
    assert sorted(layer.index for layer in result.layers) == list(range(len(found)))
    assert all(layer.error <= 1e-6 for layer in result.layers if layer.exact), result.errors


# ---------------------------------------------------------------------------------------- explain
@pytest.mark.parametrize("method", ia.METHODS)
@pytest.mark.parametrize("class_name", MAIN)
def test_explain_every_method_on_a_hybrid(class_name, method):
    model = tiny(class_name, dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=5, vocab=VOCAB)
    expl = check_explanation(model, ids, mask, method=method, steps=4, samples=2)
    if expl is not None and expl.decomposition is not None:
        kinds = {type(layer).__name__ for layer in expl.decomposition.layers}
        assert "AttentionLayerDecomposition" in kinds
        assert len(expl.decomposition.layers) == len(find_layers(model))


def test_a_mamba_and_a_transformer_explained_alike():
    mamba = tiny_mamba(dtype=torch.float32)
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=VOCAB)).eval()
    ids, mask = left_padded(batch=2, length=6, vocab=VOCAB)
    for method in ia.METHODS:
        a = ia.explain(mamba, ids, mask, method=method, target=3, **own_options(method, steps=4, samples=2))
        b = ia.explain(gpt2, ids, mask, method=method, target=3, **own_options(method, steps=4, samples=2))
        assert a.shape == b.shape == (2, 6) and a.dtype == b.dtype, method
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(a[mask == 0], b[mask == 0])                     # both 0 on padding


def test_a_recurrent_variant_runs_on_a_hybrid_and_leaves_its_attention_layers_as_they_are():
    """variant="s6" on Jamba: the Mamba layers give their S6-only matrices, the attention layer the
    same softmax attention as under "unified"; a Transformer (no layer offers s6) still refuses it."""
    model = tiny("JambaForCausalLM")
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    unified = ia.decompose(model, ids)
    s6 = ia.decompose(model, ids, variant="s6")
    attention = attention_indices(model)
    assert attention and len(attention) < len(s6.layers)
    for index, (a, b) in enumerate(zip(unified.layers, s6.layers)):
        if index in attention:
            assert b.variant == "unified"
            torch.testing.assert_close(b.matrix, a.matrix)
        else:
            assert b.variant == "s6" and not torch.allclose(b.matrix, a.matrix)
    with pytest.raises(ValueError, match="not offered for attention"):
        ia.decompose(model, ids, variant="s6", layers=attention)
