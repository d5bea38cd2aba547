"""The method classes and the baselines' options, each against a value computed independently:
closed forms on a linear model, captum's own classes, autograd, and LRP's conservation."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from implicit_attention.explanations import methods
from implicit_attention.explanations.lrp import identity_silu, linear_scan, uniform_product
from test_explain_methods import LinearCausalLM

from conftest import assert_close, gradient_at, left_padded, tiny_mamba


def linear_contributions(model: LinearCausalLM, ids: torch.Tensor, target: int, reference=None) -> torch.Tensor:
    """``[L]`` ``(e_t - r) . w_target``: every exact attribution of the linear model from reference ``r``."""
    e = model.embed(ids)[0].detach()
    r = torch.zeros_like(e) if reference is None else model.embed(torch.tensor([reference])).detach()
    return (e - r) @ model.W[:, target].detach()


# ------------------------------------------------------------------------------ integrated gradients
def test_integrated_gradients_from_a_token_baseline_and_its_convergence_delta():
    model = LinearCausalLM()
    ids = torch.tensor([[1, 4, 2, 6]])
    expl = ia.run_explanation(model, ids, method="integrated_gradients", target=3, baseline=5)
    assert_close(expl.relevance[0], linear_contributions(model, ids, 3, reference=5), 1e-6, "IG from token 5")
    assert expl.diagnostics["convergence_delta"].shape == (1,)
    assert float(expl.diagnostics["convergence_delta"].abs().max()) < 1e-6       # exact on a linear model
    # on a Mamba the Riemann sum converges: more steps, smaller completeness gap
    mamba = tiny_mamba(dtype=torch.float64)
    ids = torch.randint(1, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    coarse, fine = (ia.run_explanation(mamba, ids, method="integrated_gradients", steps=steps)
                    .diagnostics["convergence_delta"].abs().item() for steps in (2, 64))
    assert fine < coarse / 10, (coarse, fine)


def test_baseline_options_are_checked():
    model = LinearCausalLM()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ia.explain(model, [[1, 2]], method="integrated_gradients", baseline=99)
    with pytest.raises(ValueError, match="'zeros' or a token id"):
        ia.explain(model, [[1, 2]], method="occlusion", replacement="pad")
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        ia.explain(model, [[1, 2]], method="occlusion", window=0)


# ------------------------------------------------------------------------------------- occlusion
def test_occlusion_with_a_window_and_a_replacement_token():
    """A token's relevance is the mean drop over the windows of 2 that cover it (stride 1)."""
    model = LinearCausalLM()
    ids = torch.tensor([[1, 4, 2, 6, 3]])
    c = linear_contributions(model, ids, 2, reference=0)           # the drop when token t is replaced by id 0
    windows = [c[s:s + 2].sum() for s in range(4)]                  # drops of windows [s, s+1]
    expected = torch.stack([windows[0], (windows[0] + windows[1]) / 2, (windows[1] + windows[2]) / 2,
                            (windows[2] + windows[3]) / 2, windows[3]])
    relevance = ia.explain(model, ids, method="occlusion", target=2, window=2, replacement=0)[0]
    assert_close(relevance, expected, 1e-6, "occlusion, window 2, replacement id 0")


def test_occlusion_drop_equals_an_independent_forward_on_a_mamba():
    model = tiny_mamba(dtype=torch.float64)
    ids = torch.randint(1, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    relevance = ia.explain(model, ids, method="occlusion", target=7, replacement=3)[0]
    with torch.no_grad():
        score = model(ids).logits[0, -1, 7]
        for t in (0, 4):
            embeds = model.get_input_embeddings()(ids).clone()
            embeds[0, t] = model.get_input_embeddings().weight[3]
            dropped = score - model(inputs_embeds=embeds).logits[0, -1, 7]
            assert_close(relevance[t], dropped, 1e-6, f"occlusion of token {t}")


# ------------------------------------------------------------------------------------ smoothgrad
def test_smoothgrad_without_noise_is_gradient_x_input():
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=6)
    plain = ia.explain(model, ids, mask, method="grad_x_input", target=5)
    assert_close(ia.explain(model, ids, mask, method="smoothgrad", noise=0.0, samples=3, target=5), plain, 1e-12,
                 "smoothgrad, noise 0")
    noisy = ia.explain(model, ids, mask, method="smoothgrad", noise=0.5, samples=3, target=5)
    assert not torch.allclose(noisy, plain) and torch.equal(
        noisy, ia.explain(model, ids, mask, method="smoothgrad", noise=0.5, samples=3, target=5))   # seeded


def test_smoothgrad_is_captums_noise_tunnel_with_the_same_draws():
    """For one example our per-example draws are the ones captum's NoiseTunnel makes from the same seed."""
    from captum.attr import InputXGradient, NoiseTunnel

    model = LinearCausalLM()
    ids = torch.tensor([[1, 4, 2, 6]])
    embeds = model.embed(ids).detach()
    std = 0.3 * float(embeds.std())

    def score(x):
        return model(inputs_embeds=x).logits[:, -1, 2]

    torch.manual_seed(11)
    expected = NoiseTunnel(InputXGradient(score)).attribute(embeds, nt_type="smoothgrad", nt_samples=5,
                                                            stdevs=std).sum(-1)[0]
    relevance = ia.explain(model, ids, method="smoothgrad", samples=5, noise=0.3, seed=11, target=2)[0]
    assert_close(relevance, expected.detach(), 1e-6, "smoothgrad vs NoiseTunnel")


# ---------------------------------------------------------------------------- signed attribution
def test_signed_attribution_is_the_rule_without_the_clamp():
    """One layer: relevance = cam[row] with cam = mean_c (g_i A_ij v_j), signs kept; its clamp is attribution."""
    model = tiny_mamba(dtype=torch.float64, num_hidden_layers=1)
    ids = torch.randint(1, 40, (1, 6), generator=torch.Generator().manual_seed(4))
    signed = ia.run_explanation(model, ids, method="signed_attribution")
    layer = signed.decomposition.layers[0]
    grad = gradient_at(model.backbone.layers[0].mixer.out_proj, layer.output, model, ids, signed.target.ids[0])
    per_channel = grad.transpose(1, 2)[..., None] * layer.matrix * layer.values.transpose(1, 2)[:, :, None, :]
    assert_close(signed.relevance[0], per_channel.mean(1)[0, -1], 1e-9, "signed attribution")
    assert (signed.relevance < 0).any()                                            # negative evidence shows
    clamped = ia.explain(model, ids, method="attribution")[0]
    assert_close(clamped, per_channel.clamp(min=0).mean(1)[0, -1], 1e-9, "attribution")


# ------------------------------------------------------------------------------------------- LRP
def test_lrp_rules_give_the_published_gradients():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(identity_silu(x).sum(), x)
    assert_close(g, torch.sigmoid(x).detach(), 1e-15, "identity rule: R_in = R_out")
    assert_close(identity_silu(x), torch.nn.functional.silu(x), 1e-15, "silu value")
    a, b = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64,
                                                                                requires_grad=True)
    ga, gb = torch.autograd.grad(uniform_product(a, b).sum(), (a, b))
    assert_close(a * ga + b * gb, a * b, 1e-15, "uniform rule conserves")
    assert_close(a * ga, 0.5 * a * b, 1e-15, "uniform rule halves")


def test_linear_scan_is_the_selective_scan_and_its_adjoint_is_exact():
    generator = torch.Generator().manual_seed(0)
    B, L, E, N = 2, 5, 3, 4
    u = torch.randn(B, L, E, dtype=torch.float64, generator=generator).requires_grad_(True)
    dt = torch.rand(B, L, E, dtype=torch.float64, generator=generator)
    A = -torch.rand(E, N, dtype=torch.float64, generator=generator)
    Bm, C = (torch.randn(B, L, N, dtype=torch.float64, generator=generator) for _ in range(2))
    # the scan as the recurrence, token by token
    state, expected = torch.zeros(B, E, N, dtype=torch.float64), []
    for t in range(L):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        expected.append((state * C[:, t, None, :]).sum(-1))
    assert_close(linear_scan(u, dt, A, Bm, C), torch.stack(expected, 1), 1e-12, "scan")
    assert torch.autograd.gradcheck(lambda v: linear_scan(v, dt, A, Bm, C), (u,))


def test_lrp_conserves_the_score_on_a_model_without_biases():
    """MambaLRP's rules conserve relevance: sum_t R_t equals the explained logit when no bias absorbs any."""
    model = tiny_mamba(dtype=torch.float64, use_conv_bias=False, num_hidden_layers=3)
    ids, mask = left_padded(batch=3, length=8)
    expl = ia.run_explanation(model, ids, mask, method="lrp")
    score = expl.target.score(expl.logits)
    # the module rounds A, D and the scan input through float32: conservation holds to that rounding
    assert_close(expl.relevance.sum(-1), score, 1e-6, "sum of LRP relevance")
    assert_close(expl.diagnostics["conservation_delta"], score - expl.relevance.sum(-1), 1e-12, "delta")
    # not gradient x input: the rules change the backward pass
    plain = ia.explain(model, ids, mask, method="grad_x_input", target=expl.target.ids)
    assert float((plain.sum(-1) - score).abs().max()) > 1e-3
    # a conv bias absorbs relevance: the gap shows
    biased = tiny_mamba(dtype=torch.float64, num_hidden_layers=3)
    gap = ia.run_explanation(biased, ids, mask, method="lrp").diagnostics["conservation_delta"]
    assert float(gap.abs().max()) > 1e-3
    # the hooks are gone: the model computes as before
    assert not any(m._forward_hooks for m in model.modules())


def test_lrp_without_the_gate_halved_would_double_count():
    """The uniform rule is what conserves: a product left to plain autograd gives each factor everything."""
    y, g = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                requires_grad=True)
    gy, gg = torch.autograd.grad((y * g).sum(), (y, g))
    assert_close(y * gy + g * gg, 2 * y * g, 1e-15, "plain product")


def test_lrp_refuses_models_without_rules():
    from test_mamba2 import tiny as tiny_mamba2

    with pytest.raises(NotImplementedError, match="'lrp' has rules for mamba, falcon_mamba, gpt2"):
        ia.explain(tiny_mamba2("Mamba2ForCausalLM"), [[1, 2, 3]], method="lrp")


# ------------------------------------------------------------------------------------- the classes
def test_method_objects_are_what_explain_runs():
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=6)
    ig = methods.IntegratedGradients(model, steps=8, baseline=1)
    assert_close(ig.attribute(ids, mask, target=3),
                 ia.explain(model, ids, mask, method="integrated_gradients", target=3, steps=8, baseline=1), 0,
                 "IntegratedGradients")
    assert methods.IntegratedGradients.option_names() == ("dtype", "steps", "baseline")
    with pytest.warns(UserWarning, match="does not take steps"):               # steps: another method's
        rollout = methods.make_method("rollout", model, aggregate="pos", steps=5)
    assert isinstance(rollout, methods.Rollout) and rollout.aggregate == "pos"
    with pytest.raises(TypeError, match="no method takes the option"):
        methods.make_method("rollout", model, step=5)
    with pytest.raises(ValueError, match="needs them non-negative"):
        methods.Rollout(model, aggregate="mean")
    with pytest.raises(ValueError, match="unknown method"):
        methods.make_method("saliency", model)


def attnlrp_by_hand(model, ids: torch.Tensor, target: int) -> torch.Tensor:
    """AttnLRP on a one-layer Llama, written out from the published rules: RMS scales detached, q k^T and
    P v and the MLP's gate product by the uniform rule (half to each factor), the softmax by its gradient,
    SiLU by the identity rule; relevance = embedding x gradient."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def rms(x, norm):
        return norm.weight * x * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    def halves(a, b):                                          # a @ b with the uniform rule
        return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)

    layer, attn = model.model.layers[0], model.model.layers[0].self_attn
    B, L = ids.shape
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    h = rms(emb, layer.input_layernorm)
    D = attn.head_dim
    q = attn.q_proj(h).view(B, L, -1, D).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, -1, D).transpose(1, 2)
    v = attn.v_proj(h).view(B, L, -1, D).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(L)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = halves(q, k.transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    out = halves(torch.softmax(scores, -1), v).transpose(1, 2).reshape(B, L, -1)
    x = emb + attn.o_proj(out)
    h = rms(x, layer.post_attention_layernorm)
    gate = layer.mlp.gate_proj(h)
    act = gate * (torch.nn.functional.silu(gate) / gate).detach()
    product = act * layer.mlp.up_proj(h)
    x = x + layer.mlp.down_proj(0.5 * product + 0.5 * product.detach())
    logits = model.lm_head(rms(x, model.model.norm))
    (grad,) = torch.autograd.grad(logits[0, -1, target], emb)
    return (grad * emb).sum(-1)[0].detach()


def test_lrp_on_attention_is_attnlrp_written_out():
    from test_attention import tiny

    model = tiny("LlamaForCausalLM", num_hidden_layers=1)
    ids = torch.randint(1, 40, (1, 6), generator=torch.Generator().manual_seed(5))
    expl = ia.run_explanation(model, ids, method="lrp", target=9)
    # LlamaRMSNorm rounds through float32 even in a float64 model: the forward values at which the rules'
    # gradients are taken differ from the float64 hand computation by ~1e-8
    assert_close(expl.relevance[0], attnlrp_by_hand(model, ids, 9), 1e-7, "AttnLRP, one Llama layer")
    assert model.config._attn_implementation == "sdpa"                        # the model's setting is back
    plain = ia.explain(model, ids, method="grad_x_input", target=9)[0]
    assert float((plain - expl.relevance[0]).abs().max()) > 1e-3 * float(plain.abs().max())


def test_option_values_are_checked_with_clear_messages():
    model = tiny_mamba()
    for method, options, message in [
            ("integrated_gradients", {"steps": "abc"}, "steps must be an integer >= 1"),
            ("integrated_gradients", {"steps": 2.5}, "steps must be an integer >= 1"),
            ("smoothgrad", {"noise": -1.0}, "noise must be a number >= 0"),
            ("random", {"seed": "x"}, "seed must be an integer >= 0"),
            ("attribution", {"signed": "no"}, "signed must be true or false"),
            ("occlusion", {"replacement": " film"}, "replacement must be 'zeros' or a token id")]:
        with pytest.raises(ValueError, match=message):
            ia.explain(model, [[1, 2, 3]], method=method, **options)
    with pytest.warns(UserWarning, match="'rollout' does not take steps"):
        ia.explain(model, [[1, 2, 3]], method="rollout", steps=3)
    assert ia.Contrast is __import__("implicit_attention.explanations.target", fromlist=["Contrast"]).Contrast
