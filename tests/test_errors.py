"""Bad input gets a clear error, raised before anything is computed or written."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import implicit_attention as ia
from implicit_attention import memory
from implicit_attention.architectures import registry

from conftest import tiny_mamba


def test_empty_input():
    model = tiny_mamba()
    for empty in ([], [[]], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ia.EmptyInputError, match="empty"):
            ia.decompose(model, empty)
    with pytest.raises(ia.EmptyInputError, match="all padding"):
        ia.explain(model, [[1, 2]], [[0, 0]])


def test_mask_shape_and_dtype_checks():
    model = tiny_mamba()
    with pytest.raises(ValueError, match="attention_mask shape"):
        ia.decompose(model, [[1, 2, 3]], [[1, 1]])
    with pytest.raises(TypeError, match="integer"):
        ia.decompose(model, torch.rand(1, 3))


class LSTMLanguageModel(torch.nn.Module):
    """A model with no layer the library knows: a classic LSTM."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.lstm = torch.nn.LSTM(8, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 20)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        hidden, _ = self.lstm(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)
        return SimpleNamespace(logits=self.head(hidden))


def test_unsupported_model_names_the_supported_classes():
    model = LSTMLanguageModel()
    with pytest.raises(ia.UnsupportedModelError, match="MambaForCausalLM.*FalconMambaForCausalLM"):
        ia.decompose(model, [[1, 2, 3]])
    with pytest.raises(ia.UnsupportedModelError, match="LSTMLanguageModel"):
        ia.explain(model, [[1, 2, 3]], method="rollout")
    # the baselines need no decomposition and work on any model with embeddings
    assert ia.explain(model, [[1, 2, 3]], method="grad_x_input").shape == (1, 3)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant 'full'.*unified"):
        ia.decompose(tiny_mamba(), [[1, 2]], variant="full")


def test_memory_estimate_refuses_before_computing(monkeypatch):
    model = tiny_mamba()
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000)
    with pytest.raises(ia.MemoryBudgetError, match=r"needs about .* but only .*layers=") as info:
        ia.decompose(model, torch.randint(0, 40, (2, 64)))
    assert info.value.needed_bytes > info.value.available_bytes
    with pytest.raises(ia.MemoryBudgetError):
        ia.explain(model, torch.randint(0, 40, (2, 64)))


def test_full_matrix_is_estimated_before_allocation(monkeypatch):
    model = tiny_mamba()
    result = ia.decompose(model, torch.randint(0, 40, (1, 32)))
    layer = result.layers[0]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(ia.MemoryBudgetError, match=r"per-channel matrices \[B=1, C=24, L=32, L=32\].*aggregate"):
        layer.matrix
    assert layer.aggregate("abs").shape == (1, 32, 32)  # blocks still work


def test_reconstruction_error_names_the_layer(monkeypatch):
    """If the module computed something we do not model, decompose raises; check=False lets it through."""
    model = tiny_mamba(dtype=torch.float64)
    mamba = next(arch for arch in registry.architectures() if arch.name == "mamba")

    def drifted(captured, **kwargs):
        layer = mamba.build(captured, **kwargs)
        layer.factors.D = layer.factors.D + 0.1   # as if the module's skip term changed under us
        return layer

    monkeypatch.setattr(registry, "_REGISTRY", [dataclasses.replace(arch, build=drifted) if arch is mamba else arch
                                                for arch in registry.architectures()])
    with pytest.raises(ia.ReconstructionError, match=r"backbone.layers.0.mixer.*relative error .*check=False") as info:
        ia.decompose(model, [[1, 2, 3, 4]])
    assert info.value.error > 1e-6
    result = ia.decompose(model, [[1, 2, 3, 4]], check=False)
    assert result.layers[0].error > 1e-6
    assert len(ia.decompose(model, [[1, 2, 3, 4]], tolerance=1.0).layers) == 2


def test_hooks_are_removed_after_errors():
    model = tiny_mamba()
    with pytest.raises(IndexError):
        ia.explain(model, [[1, 2]], position=7)
    for module in model.modules():
        assert not module._forward_pre_hooks


def test_matrix_property_refuses_above_its_limit_and_full_matrix_allocates(monkeypatch):
    """`.matrix` is for small inputs: above MATRIX_PROPERTY_BYTES it names the alternatives instead of allocating."""
    layer = ia.decompose(tiny_mamba(), torch.randint(0, 40, (1, 32))).layers[0]      # 1 * 24 * 32 * 32 * 4 bytes
    monkeypatch.setattr(memory, "MATRIX_PROPERTY_BYTES", 24 * 32 * 32 * 4 - 1)
    with pytest.raises(ia.MemoryBudgetError, match=r"\.matrix would allocate \[B=1, C=24, L=32, L=32\].*"
                                                    r"\.aggregate.*\.blocks\(\).*\.full_matrix\(\)"):
        layer.matrix
    full = layer.full_matrix()
    assert full.shape == (1, 24, 32, 32)
    rebuilt = torch.einsum("bcij,bjc->bic", full, layer.values) + layer.offset
    assert float((rebuilt - layer.output).norm() / layer.output.norm()) <= 1e-4
    monkeypatch.setattr(memory, "MATRIX_PROPERTY_BYTES", 24 * 32 * 32 * 4)
    assert torch.equal(layer.matrix, full)


def test_block_bytes_is_per_context():
    """memory.block_bytes(n) holds in its own thread only; another thread keeps the default."""
    import threading

    seen = {}
    inside, release = threading.Event(), threading.Event()

    def worker():
        with memory.block_bytes(12345):
            seen["worker"] = memory.default_block_bytes("cpu")
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    seen["main"] = memory.default_block_bytes("cpu")
    release.set()
    thread.join()
    assert seen["worker"] == 12345
    assert seen["main"] == min(memory.CPU_BLOCK_BYTES, max(2**20, int(0.05 * memory.available_bytes("cpu")))) != 12345
    with memory.block_bytes(777):
        assert memory.default_block_bytes("cpu") == 777
        with memory.block_bytes(888):
            assert memory.default_block_bytes("cpu") == 888
        assert memory.default_block_bytes("cpu") == 777
