"""Models spread over devices (``device_map``): the same code path on the CPU, and the gathering logic.

A CPU machine has one real device, so these tests check what can be checked there:

- a model dispatched by ``accelerate`` with hooks on every block (and one mixer split from its
  block, so its hook moves its inputs after our capture hooks ran) explains exactly as the plain
  model, with every matrix method, for a Mamba and a hybrid (Mamba + attention);
- the maps of layers on one device are combined on another one (``meta`` standing in for a
  second device): every method's combination runs on the home device only;
- captured records move to the layer's execution device, including nested call arguments;
- offloaded layers (parameters on ``meta``) are refused with a clear error.

``benchmarks/multi_gpu_check.py`` runs the real thing on two GPUs.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures.registry import CapturedLayer
from implicit_attention.devices import execution_device, record_on_device
from implicit_attention.explanations import MATRIX_METHODS, combine, layer_maps
from implicit_attention.hooks import select_layers

from conftest import assert_close, left_padded, tiny_mamba

tf.logging.set_verbosity_error()
accelerate = pytest.importorskip("accelerate")


def dispatched(model: torch.nn.Module, device_map: dict[str, str]) -> torch.nn.Module:
    """A copy of ``model`` dispatched by accelerate with ``device_map`` (hooks forced on one device)."""
    copied = copy.deepcopy(model)
    return accelerate.dispatch_model(copied, device_map=device_map, main_device="cpu", force_hooks=True)


def tiny_jamba() -> torch.nn.Module:
    """Mamba, attention, Mamba layers (hidden 8), float64, every parameter randomised."""
    torch.manual_seed(0)
    config = tf.JambaConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, attn_layer_period=3, attn_layer_offset=1,
                            num_experts=1, mamba_d_state=3, mamba_dt_rank=2, mamba_d_conv=4, mamba_proj_bias=True,
                            mamba_conv_bias=True)
    model = tf.JambaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif name.endswith(("bias", ".D")):
                param.add_(torch.randn_like(param) * 0.5)
            if name.endswith("in_proj.bias"):   # as released checkpoints: padding stays out of real tokens
                param.zero_()
    model.set_attn_implementation("sdpa")
    return model.double().eval()


MAPS = {
    "mamba": (lambda: tiny_mamba(dtype=torch.float64), {
        "backbone.embeddings": "cpu", "backbone.layers.0": "cpu", "backbone.layers.1.norm": "cpu",
        "backbone.layers.1.mixer": "cpu", "backbone.norm_f": "cpu", "lm_head": "cpu"}),
    "jamba": (tiny_jamba, {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
        "model.layers.2.input_layernorm": "cpu", "model.layers.2.mamba": "cpu",
        "model.layers.2.pre_ff_layernorm": "cpu", "model.layers.2.feed_forward": "cpu",
        "model.final_layernorm": "cpu", "lm_head": "cpu"}),
}


@pytest.mark.parametrize("name", list(MAPS))
def test_dispatched_model_explains_like_the_plain_one(name):
    build, device_map = MAPS[name]
    model = build()
    split = dispatched(model, device_map)
    hooked = [n for n, m in split.named_modules() if hasattr(m, "_hf_hook")]
    mixer = next(n for n in device_map if n.endswith(("mixer", "mamba")))
    assert mixer in hooked, hooked  # the mixer moves its own inputs: our hooks see them first
    ids, mask = left_padded(2, 9)
    for method in MATRIX_METHODS:
        expected = ia.explain(model, ids, mask, method=method)
        actual = ia.explain(split, ids, mask, method=method)
        assert actual.device == ids.device
        assert_close(actual, expected, 1e-12, f"{name} {method}")
    assert split.hf_device_map == device_map


def test_maps_are_combined_on_the_home_device():
    """Layers on the CPU, home on ``meta``: every method's combination must run on the home device."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(2, 7)
    home = mask.double().to("meta")
    for method in MATRIX_METHODS:
        layers = ia.run_explanation(model, ids, mask, method=method).decomposition.layers
        width = {"attribution": layers[0].channels, "signed_attribution": layers[0].channels, "paper": 12}.get(method, 1)
        grads = [torch.randn(2, 7, width, dtype=torch.float64) for _ in layers]
        relevance = combine(method, layers, list(grads), 6, home)
        assert relevance.device.type == "meta" and relevance.shape == (2, 7), method
        on_cpu = combine(method, layers, list(grads), 6, mask.double())
        assert on_cpu.device.type == "cpu" and torch.isfinite(on_cpu).all()


def test_layer_maps_takes_one_layer_at_a_time():
    """The maps are computed lazily, moved home, and each layer's cached aggregates released."""
    model = tiny_mamba(dtype=torch.float64)
    ids, _ = left_padded(1, 6)
    layers = ia.decompose(model, ids).layers
    calls = []

    def compute(index, layer):
        calls.append(index)
        return layer.aggregate("abs")

    maps = layer_maps(layers, compute, "meta")
    assert calls == []
    first = next(maps)
    assert calls == [0] and first.device.type == "meta"
    assert not layers[0]._aggregates and layers[1]._aggregates == {}
    rest = list(maps)
    assert calls == [0, 1] and len(rest) == 1 and not layers[1]._aggregates
    # released maps are recomputed on demand, identically
    assert torch.equal(layers[0].aggregate("abs"), ia.decompose(model, ids).layers[0].aggregate("abs"))


def test_records_move_to_the_execution_device():
    model = tiny_mamba()
    (name, module, arch), = select_layers(model, [1])
    assert execution_device(module) == torch.device("cpu")
    module._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device=None),
                                             SimpleNamespace(execution_device=1)])
    assert execution_device(module) == torch.device("cuda", 1)  # accelerate's GPU index
    del module._hf_hook
    output = torch.randn(1, 3, 4, requires_grad=True) * 2
    record = CapturedLayer(name=name, module=module, architecture=arch, inputs=torch.randn(1, 3, 4),
                           attention_mask=torch.ones(1, 3), output=output, block_input=torch.randn(1, 3, 4),
                           kwargs={"position_embeddings": (torch.ones(3), torch.zeros(3)), "flag": True},
                           extra={"arguments": {"**": {"mask": torch.ones(1, 1, 3, 3)}}})
    moved = record_on_device(record, "meta")
    assert moved.inputs.device.type == moved.attention_mask.device.type == moved.output.device.type == "meta"
    assert [t.device.type for t in moved.kwargs["position_embeddings"]] == ["meta", "meta"]
    assert moved.kwargs["flag"] is True and moved.extra["arguments"]["**"]["mask"].device.type == "meta"
    assert not moved.output.requires_grad and moved.block_input is None
    assert record.output is output and record.inputs.device.type == "cpu"  # the original is untouched
    same = record_on_device(record)  # already on its execution device: nothing is copied
    assert same.inputs is record.inputs and same.kwargs["position_embeddings"][0] is record.kwargs[
        "position_embeddings"][0]


def test_offloaded_layers_are_refused():
    model = tiny_mamba()
    ids, _ = left_padded(1, 5)
    model.backbone.layers[1].mixer.out_proj.to("meta")  # as accelerate leaves an offloaded module
    with pytest.raises(ia.OffloadedLayerError, match=r"backbone.layers.1.mixer.*out_proj.weight.*meta"):
        ia.explain(model, ids, method="rollout")
    with pytest.raises(ia.OffloadedLayerError):
        ia.decompose(model, ids, layers=[1])
    assert ia.decompose(model, ids, layers=[0]).layers[0].error < 1e-4  # the other layer still works
