"""The model's scans in parallel while the library runs it (implicit_attention.scans)."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from implicit_attention import scans

from conftest import tiny_mamba

pytest.importorskip("mambapy")


def test_parallel_scans_switch_and_restore_each_module():
    model = tiny_mamba()
    mixers = [m for m in model.modules() if hasattr(m, "use_mambapy")]
    mixers[1].use_mambapy = True                        # the user's own setting, kept
    with scans.parallel_scans(model) as switched:
        assert switched == ["backbone.layers.0.mixer"]
        assert all(m.use_mambapy for m in mixers)
    assert [m.use_mambapy for m in mixers] == [False, True]
    with pytest.raises(RuntimeError), scans.parallel_scans(model):
        raise RuntimeError("inside")
    assert [m.use_mambapy for m in mixers] == [False, True]


def test_explanations_with_parallel_scans_equal_the_token_loop(monkeypatch):
    """Same relevance and matrices with mambapy's scan as with the stock token loop (float32 rounding)."""
    model = tiny_mamba(hidden_size=16, num_hidden_layers=3)
    ids = torch.randint(0, 40, (2, 23), generator=torch.Generator().manual_seed(0))
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(scans, "ENABLED", enabled)
        called = []
        original = scans.parallel_scans

        def spy(model, *args, original=original, called=called, **kwargs):
            called.append(True)
            return original(model, *args, **kwargs)
        monkeypatch.setattr("implicit_attention.explanations.api.parallel_scans", spy)
        results[enabled] = {method: ia.explain(model, ids, method=method) for method in ("attribution", "raw")}
        results[enabled]["matrix"] = ia.decompose(model, ids).layers[1].matrix
        assert called
    for key, stock in results[False].items():
        assert torch.allclose(results[True][key], stock, rtol=1e-4, atol=1e-6), key
    assert not any(m.use_mambapy for m in model.modules() if hasattr(m, "use_mambapy"))


def test_to_batch_puts_an_unpadded_layer_tensor_back_in_the_batch_layout():
    """fla runs a padded batch as one sequence of its real tokens: [1, T, C] back to [B, L, C], zero on padding."""
    from implicit_attention.architectures.primitives import to_batch

    inputs = torch.zeros(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    real = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 2)        # the 5 real tokens, in batch order
    batched = to_batch(real, inputs, mask)
    assert batched.shape == (2, 4, 2)
    assert batched[0, 1:].tolist() == [[0, 1], [2, 3], [4, 5]] and batched[1, 2:].tolist() == [[6, 7], [8, 9]]
    assert batched[0, 0].abs().sum() == 0 and batched[1, :2].abs().sum() == 0
    same = torch.randn(2, 4, 2)
    assert to_batch(same, inputs, mask) is same
    with pytest.raises(ValueError, match="fits neither the batch 2 x 4 nor its 5 real tokens"):
        to_batch(torch.zeros(1, 6, 2), inputs, mask)


def test_kept_state_bytes_by_hand():
    model = tiny_mamba(hidden_size=16, num_hidden_layers=3)
    mixers = [m for m in model.modules() if hasattr(m, "use_mambapy")]
    channels, state = mixers[0].intermediate_size, mixers[0].ssm_state_size
    assert scans.kept_state_bytes(mixers, 2, 50) == 3 * scans.STATE_COPIES * 2 * 50 * channels * state * 4
    assert scans.kept_state_bytes([torch.nn.Linear(2, 2)], 2, 50) == 0        # not a Mamba mixer


def test_blocks_recomputed_in_the_backward_give_the_same_explanations(monkeypatch, caplog):
    """Recomputing each block in the backward (what long inputs need) changes no map, records each layer once,
    and leaves the blocks as they were; only the gradient methods run the blocks twice."""
    model = tiny_mamba(hidden_size=16, num_hidden_layers=3)
    ids = torch.randint(0, 40, (2, 23), generator=torch.Generator().manual_seed(1))
    mixers = [m for m in model.modules() if hasattr(m, "use_mambapy")]
    calls = [0]
    for mixer in mixers:   # a pre-hook: the recomputation stops once it has what the backward needs
        mixer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    methods = ("attribution", "paper", "rollout", "raw")
    plain = {}
    from implicit_attention.explanations.api import run_explanation

    for method in methods:
        calls[0] = 0
        plain[method] = run_explanation(model, ids, method=method)
        assert calls[0] == 3, method                            # far below the memory limit: one pass
    assert "recomputing" not in caplog.text
    monkeypatch.setattr(scans, "RECOMPUTE_ABOVE", 0.0)          # any kept state is too much now
    monkeypatch.setattr(scans, "_TOLD", set())
    for method in methods:
        calls[0] = 0
        again = run_explanation(model, ids, method=method)
        assert calls[0] == (6 if method in ("attribution", "paper") else 3), method
        assert len(again.decomposition.layers) == 3
        assert torch.allclose(again.relevance, plain[method].relevance, rtol=1e-5, atol=1e-7), method
        assert torch.equal(again.logits, plain[method].logits)
    blocks = [model.get_submodule(f"backbone.layers.{i}") for i in range(3)]
    assert not any("forward" in vars(block) for block in blocks)
    # the switch is said, once for the four explanations, with the states' size for this 2 x 23 input
    told = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    kept = scans.kept_state_bytes(mixers, 2, 23) / 2**30
    assert len(told) == 1 and f"{kept:.1f} GiB of states for a 2 x 23 input" in told[0]


def test_recompute_switch_and_a_users_own_forward():
    model = tiny_mamba(hidden_size=16, num_hidden_layers=2)
    blocks = [model.get_submodule(f"backbone.layers.{i}") for i in range(2)]
    own = blocks[1].forward
    blocks[1].forward = own                                     # the user's own instance attribute: left alone
    with scans.parallel_scans(model, (1, 8), recompute=True):
        assert "forward" in vars(blocks[0]) and vars(blocks[1])["forward"] is own
    assert "forward" not in vars(blocks[0]) and vars(blocks[1])["forward"] is own
    with scans.parallel_scans(model, (1, 8), recompute=False):
        assert "forward" not in vars(blocks[0])
    with scans.parallel_scans(model, (1, 8)):                   # a few bytes of states: no recomputation
        assert "forward" not in vars(blocks[0])
    with pytest.raises(RuntimeError), scans.parallel_scans(model, (1, 8), recompute=True):
        raise RuntimeError("inside")
    assert "forward" not in vars(blocks[0])


def test_blocks_behind_accelerate_hooks_are_recomputed_and_their_hooks_put_back(monkeypatch):
    """A ``device_map`` model's blocks run accelerate's hook as their forward: recomputed too (else such models
    keep every scan state), with the hook inside, and the hook's forward back on exit."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    from implicit_attention.explanations.api import run_explanation

    model = tiny_mamba(hidden_size=16, num_hidden_layers=2)
    ids = torch.randint(0, 40, (1, 17), generator=torch.Generator().manual_seed(2))
    plain = run_explanation(model, ids, method="attribution")
    blocks = [model.get_submodule(f"backbone.layers.{i}") for i in range(2)]
    calls = [0]

    class Counting(accelerate_hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls[0] += 1
            return args, kwargs

    for block in blocks:
        accelerate_hooks.add_hook_to_module(block, Counting())
    hooked = [vars(block)["forward"] for block in blocks]
    with scans.parallel_scans(model, (1, 17), recompute=True):
        assert all(getattr(vars(b)["forward"], "_ia_recompute", False) for b in blocks)
    assert [vars(block)["forward"] for block in blocks] == hooked
    monkeypatch.setattr(scans, "RECOMPUTE_ABOVE", 0.0)
    calls[0] = 0
    again = run_explanation(model, ids, method="attribution")
    assert calls[0] == 4                           # each hooked block run twice: forward, then recomputed
    assert torch.allclose(again.relevance, plain.relevance, rtol=1e-5, atol=1e-7)
    assert [vars(block)["forward"] for block in blocks] == hooked
    for block in blocks:                           # accelerate takes its hooks off as if we had never been there
        accelerate_hooks.remove_hook_from_module(block)
    calls[0] = 0
    assert torch.allclose(model(ids).logits, plain.logits, atol=1e-5) and calls[0] == 0
