"""The memory estimate bounds what each path really allocates, and a budget below it refuses early.

Peaks are measured with the PyTorch profiler's allocation events on the CPU, inside the profiler
range the library puts around its own work (:data:`~implicit_attention.decomposition.PHASE`:
building the layers, then combining their maps), and over the whole call. Small block sizes
(:func:`~implicit_attention.memory.block_bytes`) make the chunked loops split, so the bound is
tested where the chunking matters rather than swamped by a 64 MiB block.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

import implicit_attention as ia
from implicit_attention import memory
from implicit_attention.decomposition import PHASE, ensure_decomposition_fits, estimate_memory
from implicit_attention.hooks import select_layers
from implicit_attention.models.gla import GLAConfig, GLAForCausalLM
from implicit_attention.models.hgrn import HGRNConfig, HGRNForCausalLM
from implicit_attention.models.rwkv6 import Rwkv6Config, Rwkv6ForCausalLM

from conftest import tiny_mamba

tf.logging.set_verbosity_error()

VOCAB = 50
#: small models whose paths differ: Mamba's fast mean and rows, Mamba-2's heads, eager attention
#: (its weights are captured), a hybrid, per-head matrices kept (RWKV-6), chunked scans while the
#: factors are computed (HGRN, GLA).
MODELS = {
    "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=VOCAB, hidden_size=24, state_size=8, num_hidden_layers=2, expand=2, time_step_rank=4)),
    "mamba2": lambda: tf.Mamba2ForCausalLM(tf.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=1, num_hidden_layers=2,
        expand=2, chunk_size=16)),
    "gpt2_eager": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, n_positions=64, attn_implementation="eager")),
    "jamba": lambda: tf.JambaForCausalLM(tf.JambaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1, num_experts=1, mamba_d_state=8,
        mamba_dt_rank=4, mamba_d_conv=4, attn_implementation="sdpa")),
    "rwkv6": lambda: Rwkv6ForCausalLM(Rwkv6Config(vocab_size=VOCAB, hidden_size=32, head_size=8, num_hidden_layers=2)),
    "hgrn": lambda: HGRNForCausalLM(HGRNConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, chunk_size=16)),
    "gla": lambda: GLAForCausalLM(GLAConfig(vocab_size=VOCAB, hidden_size=32, num_heads=2, num_hidden_layers=2,
                                            chunk_size=32)),
}
#: (method, aggregate) pairs: every path of explain, and decompose alone
PATHS = [("decompose", None), ("raw", "abs"), ("raw", "mean"), ("rollout", "abs"), ("rollout", "pos"), ("attribution", None),
         ("paper", None)]
BATCH, LENGTH, BLOCK = 2, 40, 192 * 1024


def peaks(fn) -> tuple[int, int | None]:
    """``(whole call, library phase)``: peak bytes allocated above the level each started at
    (``None`` for the phase when ``fn`` has none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = list(prof.profiler.kineto_results.events())
    allocations = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    phase = next((e for e in events if e.name() == PHASE), None)

    def peak(selected) -> int:
        level = best = 0
        for event in selected:
            level += event.nbytes()
            best = max(best, level)
        return best

    if phase is None:
        return peak(allocations), None
    return peak(allocations), peak(e for e in allocations if phase.start_ns() <= e.start_ns() <= phase.end_ns())


def model_pass(model, ids, gradient: bool) -> None:
    """The model's own forward (and backward of one logit): what the estimate does not count."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(gradient)
    with torch.set_grad_enabled(gradient):
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        if gradient:
            logits[:, -1].max(dim=-1).values.sum().backward()


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return request.param, model, ids


def test_estimate_bounds_the_measured_peak_of_every_path(case):
    name, model, ids = case
    targets = select_layers(model, None)
    report = []
    with memory.block_bytes(BLOCK):
        passes = {gradient: peaks(lambda: model_pass(model, ids, gradient))[0] for gradient in (False, True)}
        for method, aggregate in PATHS:
            if method == "decompose":
                whole, phase = peaks(lambda: ia.decompose(model, ids))
            else:
                whole, phase = peaks(lambda: ia.explain(model, ids, method=method, aggregate=aggregate or "abs"))
            (entry,) = estimate_memory(targets, BATCH, LENGTH, torch.float32, method=method).values()
            library = entry.kept + entry.working + entry.combining   # captured tensors exist before the phase
            gradient = method in ("attribution", "paper")
            report.append(f"{method}/{aggregate}: phase {phase} <= {library}; whole {whole} <= "
                          f"{passes[gradient]} + {entry.total}")
            assert phase <= library, report[-1]
            assert whole <= passes[gradient] + entry.total, report[-1]
            # an estimate, not a blanket: within a small factor of what the phase really takes
            assert library <= 10 * phase, report[-1]


def test_a_budget_below_the_estimate_refuses_with_advice(monkeypatch):
    model = tiny_mamba()
    ids = torch.randint(1, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = select_layers(model, None)
    with memory.block_bytes(BLOCK):
        (entry,) = estimate_memory(targets, 2, 24, torch.float32, method="rollout").values()
        enough = int(entry.total / memory.USABLE_FRACTION) + 64
        monkeypatch.setattr(memory, "available_bytes", lambda device: enough - 128)
        with pytest.raises(ia.MemoryBudgetError, match=r"rollout explanation over 2 layer\(s\) of a \[B=2, L=24\] "
                           r"input .* on cpu \(2 layer\(s\): .* kept, .* working, .* combining maps\).*"
                           r"layers=.*block_bytes") as info:
            ia.explain(model, ids, method="rollout")
        assert info.value.needed_bytes == entry.total
        monkeypatch.setattr(memory, "available_bytes", lambda device: enough)
        assert ia.explain(model, ids, method="rollout").shape == (2, 24)
        # other methods name their own way out
        monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000)
        with pytest.raises(ia.MemoryBudgetError, match=r"attribution explanation over 2 layer\(s\)"):
            ia.explain(model, ids, method="attribution")
        with pytest.raises(ia.MemoryBudgetError, match=r"decomposing 1 layer\(s\).*layers="):
            ia.decompose(model, ids, layers=[0])


def test_each_device_is_estimated_and_checked_on_its_own(monkeypatch):
    """Layers on two GPUs (as accelerate reports them): each device gets its layers, home the combining."""
    model = tiny_mamba()
    targets = select_layers(model, None)
    for (_, module, _), index in zip(targets, (0, 1)):
        module._hf_hook = SimpleNamespace(execution_device=index)
    home, second = torch.device("cuda", 0), torch.device("cuda", 1)
    inputs = SimpleNamespace(shape=(2, 64), device=home)
    with memory.block_bytes(BLOCK):
        per_device = estimate_memory(targets, 2, 64, torch.float32, method="rollout", home=home)
        assert set(per_device) == {home, second}
        assert per_device[home].layers == ["backbone.layers.0.mixer"]
        assert per_device[second].layers == ["backbone.layers.1.mixer"]
        assert per_device[home].combining == 6 * 2 * 64 * 64 * 4 and per_device[second].combining == 0
        assert per_device[home].kept == per_device[second].kept > 0
        free = {home: 10 * 2**30, second: 10 * 2**30}
        monkeypatch.setattr(memory, "available_bytes", lambda device: free[torch.device(device)])
        ensure_decomposition_fits(targets, inputs, torch.float32, method="rollout")
        free[second] = int(per_device[second].total / memory.USABLE_FRACTION) - 64
        with pytest.raises(ia.MemoryBudgetError, match=r"on cuda:1 \(1 layer\(s\)"):
            ensure_decomposition_fits(targets, inputs, torch.float32, method="rollout")


def test_gpu_available_bytes_count_the_allocators_unused_cache(monkeypatch) -> None:
    """Free driver memory plus the blocks PyTorch's caching allocator holds unused (it reuses them)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 100 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 30 * gib)
    assert memory.available_bytes("cuda:0") == 76 * gib
    # allocated above reserved cannot happen, but must never lower the figure
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 120 * gib)
    assert memory.available_bytes("cuda:0") == 6 * gib


def test_estimate_where_the_check_reads_rows_instead_of_channels():
    """On a long input Mamba's exactness check reads 8 rows of every channel, not groups of channels'
    blocks: the estimate leaves out the groups' blocks (which would have refused 16k tokens on an H200)
    and still bounds the measured peak."""
    import dataclasses

    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=8, state_size=4, num_hidden_layers=1,
                                               expand=2, time_step_rank=2)).eval()
    length = 640                      # B C L^2 = 6.6e6 > FULL_CHECK_ENTRIES; 4 * 8 * 16 <= 32 * 640: rows
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
    targets = select_layers(model, None)
    name, module, arch = targets[0]
    assert arch.footprint.fast_rows
    by_groups = [(name, module, dataclasses.replace(arch, footprint=dataclasses.replace(arch.footprint,
                                                                                        fast_rows=False)))]
    group_blocks = memory.CHUNK_SAFETY * (memory.SAMPLED_CHANNELS // memory.SAMPLED_GROUPS) * 5 * length ** 2 * 4
    with memory.block_bytes(BLOCK):
        for method in ("decompose", "attribution"):
            _, phase = peaks(lambda: ia.decompose(model, ids) if method == "decompose"
                             else ia.explain(model, ids, method=method))
            (entry,) = estimate_memory(targets, 1, length, torch.float32, method=method).values()
            (groups,) = estimate_memory(by_groups, 1, length, torch.float32, method=method).values()
            library = entry.kept + entry.working + entry.combining
            assert phase <= library < groups.kept + groups.working + groups.combining, (method, phase, library)
            assert groups.working >= group_blocks > entry.working, (method, groups.working, entry.working)
