"""Shared fixtures: tiny, randomly initialised stock ``transformers`` models (no mocks)."""

from __future__ import annotations

import pytest
import torch
from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM, MambaModel

MAMBA_CLASSES = {
    "MambaForCausalLM": (MambaConfig, MambaForCausalLM),
    "MambaModel": (MambaConfig, MambaModel),
    "FalconMambaForCausalLM": (FalconMambaConfig, FalconMambaForCausalLM),
}


def tiny_mamba(class_name: str = "MambaForCausalLM", *, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny model of ``class_name`` with every parameter randomised (non-trivial D, biases, A)."""
    config_cls, model_cls = MAMBA_CLASSES[class_name]
    settings = dict(vocab_size=40, hidden_size=12, state_size=4, num_hidden_layers=2, expand=2,
                    conv_kernel=4, time_step_rank=3, use_bias=False, use_conv_bias=True)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            elif name.endswith(".D") or name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.5)
    return model.to(dtype).eval()


def left_padded(batch: int, length: int, vocab: int = 40, seed: int = 0):
    """Random ids ``[batch, length]`` and a mask whose rows are left-padded by 0, 1, 2, ... tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        mask[b, : min(b, length - 1)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error; reported in assertion messages with the absolute error."""
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    actual, expected = actual.detach(), expected.detach()
    rel = relative_error(actual, expected)
    abs_err = float((actual - expected).abs().max())
    assert rel <= rtol, f"{what}: relative error {rel:.3e} > {rtol:.1e} (max abs error {abs_err:.3e})"


def assert_attribution_matches_blocks(layer, what: str = "", *, fast_path: bool = False) -> None:
    """The attribution of a random gradient at ``layer``'s output, clamped and signed, equals the rule on the
    generic channel blocks (``fast_path``: the layer's ``_fast_attribution`` itself, not ``attribution``)."""
    grad = torch.randn(layer.output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(layer.index))
    at_matrix = layer.matrix_gradient(grad)
    for signed in (False, True):
        expected = layer.attribution_by_blocks(at_matrix, signed)
        assert float(expected.abs().max()) > 0
        got = layer._fast_attribution(at_matrix, signed) if fast_path else layer.attribution(grad, signed)
        assert_close(got, expected, 1e-12, f"{what} signed={signed}")


@pytest.fixture
def model_f32():
    return tiny_mamba(dtype=torch.float32)


def fresh_aggregates(layer, how, rows=None):
    """(generic per-channel-block result, fast result) of ``aggregate`` or ``aggregate_rows``, uncached."""

    layer._aggregates.clear()
    generic = layer.aggregate_by_blocks(how) if rows is None \
        else layer.rows_by_blocks(rows, how)
    layer._aggregates.clear()
    fast = layer.aggregate(how) if rows is None else layer.aggregate_rows(rows, how)
    return generic, fast


def check_fast_aggregates(layer, blocks, rows, label: str, tolerance: float = 1e-12) -> None:
    """A layer's own aggregates (every tile block in ``blocks``) and ``rows`` against the generic blocks."""
    from implicit_attention.architectures.base import LayerDecomposition

    assert type(layer)._fast_aggregate is not LayerDecomposition._fast_aggregate
    for block in blocks:
        layer.tile_block = block
        for how in ("mean", "abs", "pos"):
            generic, fast = fresh_aggregates(layer, how)
            assert_close(fast, generic, tolerance, f"{label} {how} block {block}")
    for how in ("mean", "abs", "pos"):
        generic, fast = fresh_aggregates(layer, how, rows=rows)
        assert_close(fast, generic, tolerance, f"{label} {how} rows")


def check_long_fast_mean(f64, f32, label: str = "L=1024") -> None:
    """float32 and float64 fast means of one long layer against the float64 generic blocks."""

    reference = f64.aggregate_by_blocks("mean")
    fast = f32.aggregate("mean")
    assert torch.isfinite(fast).all()
    assert_close(fast.double(), reference, 1e-5, f"float32 fast mean, {label}")
    f64._aggregates.clear()                                              # the reference was cached
    assert_close(f64.aggregate("mean"), reference, 1e-10, f"float64 fast mean, {label}")


def check_explanation(model, x, mask=None, *, method: str, causal: bool = True, tol: float | None = None,
                      **options):
    """Run ``method`` with assertions that fail if it is wrong, and return the ``Explanation``.

    - A model that reads padding refuses a padded batch (``PaddingError``); it then runs unpadded.
    - Each example gets the relevance it gets alone (batching mixes nothing), within ``tol``.
    - Some token gets non-zero relevance (``random`` aside, a seeded draw).
    - In a causal model explained one position earlier, the last token, which cannot influence
      that prediction, gets no relevance.
    """
    import implicit_attention as ia
    from implicit_attention.architectures.registry import padding_leaks
    from implicit_attention.explanations.lrp import supports_lrp

    options.setdefault("samples", 2)                    # smoothgrad: two noisy copies are enough to check
    options = own_options(method, **options)
    if method == "lrp" and not supports_lrp(model):      # rules for the Mamba family only: a clear refusal
        with pytest.raises(NotImplementedError, match="'lrp' has rules for"):
            ia.explain(model, x, mask, method=method, **options)
        return None
    if mask is not None and bool((mask == 0).any()) and padding_leaks(model):
        with pytest.raises(ia.PaddingError):
            ia.explain(model, x, mask, method=method, **options)
        x, mask = x.clamp(min=1), None
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    # float32 gradients of tiny models cancel: batched and single reductions differ by ~1e-3 of the largest value
    tol = tol if tol is not None else (1e-6 if dtype == torch.float64 else 5e-3)
    expl = ia.run_explanation(model, x, mask, method=method, **options)
    rel = expl.relevance
    assert rel.shape[0] == x.shape[0] and torch.isfinite(rel).all()
    if method == "random":
        return expl
    assert torch.count_nonzero(rel) > 0
    for b in range(x.shape[0]):
        real = mask[b].bool() if mask is not None else torch.ones(rel.shape[1], dtype=torch.bool)
        alone = ia.explain(model, x[b:b + 1] if mask is None else x[b:b + 1, real], method=method,
                           target=int(expl.target.ids[b]), **options)[0]
        difference = float((rel[b][real] - alone).abs().max())
        scale = max(float(alone.abs().max()), float(rel[b].abs().max()))
        assert difference <= tol * scale, (method, b, difference, scale)
    if causal:
        early = ia.explain(model, x, mask, method=method, position=-2, **options)
        assert float(early[:, -1].abs().max()) <= 1e-7 * float(early.abs().max()), (method, early[:, -1])
    return expl


def gradient_at(projection: torch.nn.Module, output: torch.Tensor, model, ids: torch.Tensor, target: int) -> torch.Tensor:
    """``d logits[0, -1, target] / d output``: ``output`` (a layer's output before ``projection``) fed as a leaf
    tensor into ``projection`` while ``model`` runs on ``ids``: the gradient computed independently."""
    leaf = output.detach().clone().requires_grad_(True)
    handle = projection.register_forward_pre_hook(lambda module, args: (leaf,))
    try:
        logits = model(ids).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, -1, target], leaf)
    return grad


def own_options(method: str, **options) -> dict:
    """``options`` without the other methods' own options (the tests pass one set to every method)."""
    from implicit_attention.catalog import METHOD_OPTIONS, OPTION_KINDS

    return {k: v for k, v in options.items() if k not in OPTION_KINDS or k in METHOD_OPTIONS[method]}
