"""Vision Mamba: our ``VimForImageClassification`` / ``VimModel`` and its decomposition ``s (A_f + J A_b J)``.

Tiny random models (every parameter randomised: ``A_log`` and ``A_b_log``, ``D`` and ``D_b``, conv biases,
norms, class token, positions): the module against Hugging Face's Mamba scan, exactness of ``decompose``
against the module's own forward with the class token in the middle and elsewhere, every variant against
``naive.py``, the fast signed mean and rows against the channel blocks, the published checkpoint layout,
save / load and the Auto classes, and ``explain`` on pixels.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer

import implicit_attention as ia
from implicit_attention.architectures.vim import VARIANTS, VimLayerDecomposition, vim_factors
from implicit_attention.architectures.vim.naive import naive_vim
from implicit_attention.inputs import prepare_model_inputs
from implicit_attention.models.vim import VimConfig, VimForImageClassification, VimModel, config_from_state_dict

from conftest import assert_close, check_explanation

TOL = {torch.float32: 1e-5, torch.float64: 1e-6}
#: 8 x 12 pixels in 4 x 4 patches: P = 6 patches, L = 7 tokens, the class token at P // 2 = 3
SETTINGS = dict(image_size=(8, 12), patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2, state_size=3,
                conv_kernel=3, time_step_rank=2, num_labels=3)


def tiny_vim(class_name: str = "VimForImageClassification", *, dtype=torch.float64, seed: int = 0, **overrides):
    """A tiny Vim with every parameter randomised (positive or negative ``A_log``, ``D``, biases, norms)."""
    model_cls = {"VimForImageClassification": VimForImageClassification, "VimModel": VimModel}[class_name]
    torch.manual_seed(seed)
    model = model_cls(VimConfig(**{**SETTINGS, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log") or name.endswith("A_b_log"):
                param.copy_(torch.rand_like(param) * 2 - 1)
            else:
                param.copy_(torch.randn_like(param) * 0.5)
    return model.to(dtype).eval()


def pixels(batch: int = 2, seed: int = 0, dtype=torch.float64, size=(8, 12)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------- the model
def test_mixer_is_two_mamba_scans_averaged():
    """Each scan is Hugging Face's Mamba slow path: ``out = (Mamba_f(h) + J Mamba_b(J h)) / 2``."""
    model = tiny_vim(use_bias=False)
    mixer = model.layers[0].mixer
    with torch.no_grad():  # Hugging Face rounds A_log, D through float32: parameters it rounds to themselves
        for param in mixer.parameters():
            param.copy_(param.float().double())
    h = torch.randn(2, 7, 8, dtype=torch.float64)
    config = MambaConfig(hidden_size=8, state_size=3, expand=2, conv_kernel=3, time_step_rank=2, use_bias=False,
                         use_conv_bias=True)
    outputs = []
    for suffix in ("", "_b"):
        reference = MambaMixer(config, layer_idx=0).double()
        branch = mixer.branch(suffix)
        with torch.no_grad():
            for name in ("conv1d", "x_proj", "dt_proj"):
                getattr(reference, name).load_state_dict(branch[name].state_dict())
            reference.A_log.copy_(branch["A_log"])
            reference.D.copy_(branch["D"])
            reference.in_proj.load_state_dict(mixer.in_proj.state_dict())
            reference.out_proj.load_state_dict(mixer.out_proj.state_dict())
            outputs.append(reference(h if suffix == "" else h.flip(1)))
    with torch.no_grad():
        # the reference (mamba_ssm's selective_scan_ref) runs its scan in float32: agreement to float32 rounding
        assert_close(mixer(h), (outputs[0] + outputs[1].flip(1)) / 2, 1e-6, "bidirectional mixer")


def test_class_token_sits_where_the_config_says_and_logits_read_it():
    model = tiny_vim("VimModel", cls_position=None)
    assert model.config.class_token_index == 3 and model.config.num_patches == 6
    x = pixels()
    out = model(pixel_values=x)
    assert out.last_hidden_state.shape == (2, 7, 8)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 3])
    classifier = tiny_vim(cls_position=5)
    logits = classifier(pixel_values=x).logits
    hidden, _ = classifier.features(x)
    assert logits.shape == (2, 3)
    assert_close(logits, classifier.head(hidden[:, 5]), 1e-14, "logits from the class token after norm_f")
    with pytest.raises(ValueError, match="cls_position"):
        VimConfig(**{**SETTINGS, "cls_position": 7})


def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    model = tiny_vim(dtype=torch.float32, cls_position=1)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is VimConfig and config.model_type == "vim" and config.cls_position == 1
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is VimForImageClassification
    x = pixels(dtype=torch.float32)
    assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    backbone = AutoModel.from_pretrained(tmp_path).eval()                   # the same file, without the head
    assert type(backbone) is VimModel
    assert torch.equal(backbone(pixel_values=x).pooler_output, model.features(x)[0][:, 1])
    assert type(AutoModelForImageClassification.from_config(VimConfig(**SETTINGS))) is VimForImageClassification


def published_state_dict(depth=2, dim=8, inner=16, state=3, rank=2, conv=3, patch=4, patches=6, labels=3):
    """Random tensors under the names and shapes of the published Vim checkpoints (``hustvl/Vim-tiny``,
    ``models_mamba.VisionMamba`` with ``bimamba_type="v2"``, RMS norms, absolute positions, middle class token),
    written out here without our model."""
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, patches + 1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm_f.weight": (dim,), "head.weight": (labels, dim), "head.bias": (labels,)}
    for i in range(depth):
        p = f"layers.{i}."
        shapes.update({p + "norm.weight": (dim,), p + "mixer.in_proj.weight": (2 * inner, dim),
                       p + "mixer.out_proj.weight": (dim, inner)})
        for s, a, d in (("", "A_log", "D"), ("_b", "A_b_log", "D_b")):
            shapes.update({p + f"mixer.{a}": (inner, state), p + f"mixer.{d}": (inner,),
                           p + f"mixer.conv1d{s}.weight": (inner, 1, conv), p + f"mixer.conv1d{s}.bias": (inner,),
                           p + f"mixer.x_proj{s}.weight": (rank + 2 * state, inner),
                           p + f"mixer.dt_proj{s}.weight": (inner, rank), p + f"mixer.dt_proj{s}.bias": (inner,)})
    return {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}


def test_published_checkpoint_loads_with_one_call(tmp_path):
    state = published_state_dict()
    config = VimConfig(**SETTINGS)
    model = VimForImageClassification.from_vim_checkpoint(state, config)
    assert set(model.state_dict()) == set(state)                            # the published keys, one for one
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the .pth file as published: {"model": state_dict, ...}; sizes read off the file
    path = tmp_path / "vim_t_midclstok.pth"
    torch.save({"model": state, "epoch": 300}, path)
    from_file = VimForImageClassification.from_vim_checkpoint(path, image_size=(8, 12))
    cfg = from_file.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.state_size, cfg.conv_kernel, cfg.time_step_rank,
            cfg.expand, cfg.num_labels, cfg.class_token_index) == (8, 2, 3, 3, 2, 2, 3, 3)
    x = pixels(dtype=torch.float32)
    assert torch.equal(from_file(pixel_values=x).logits, model(pixel_values=x).logits)
    # square grids: the image side follows from the positions (stride 8 as in the published Vim-tiny+)
    square = published_state_dict(patches=9)
    assert config_from_state_dict(square)["image_size"] == 12
    assert config_from_state_dict(square, stride=2)["image_size"] == 8
    assert VimForImageClassification.from_vim_checkpoint(square, stride=2).config.num_patches == 9
    # and the published file decomposes exactly
    result = ia.decompose(from_file, x)
    assert max(result.errors) <= TOL[torch.float32]


# -------------------------------------------------------------------------- the decomposition
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("overrides", [
    dict(),                                                   # class token in the middle (index 3)
    dict(cls_position=0, conv_kernel=4, use_bias=True),       # first, in/out projection biases
    dict(cls_position=5, use_conv_bias=False, divide_out=False, rms_norm=False, conv_kernel=2),
])
@pytest.mark.parametrize("variant", ["unified", "no_conv"])
def test_exact_variants_reconstruct_the_module(dtype, overrides, variant):
    model = tiny_vim(dtype=dtype, **overrides)
    x = pixels(dtype=dtype)
    captured = {}
    hooks = [layer.mixer.out_proj.register_forward_pre_hook(
        lambda module, args, i=i: captured.__setitem__(i, args[0].detach())) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(pixel_values=x)
    for hook in hooks:
        hook.remove()
    result = ia.decompose(model, x, variant=variant)
    assert len(result.layers) == 2 and all(layer.exact for layer in result.layers)
    for i, layer in enumerate(result.layers):
        assert layer.length == 7
        assert_close(layer.reconstruct(), captured[i], TOL[dtype], f"layer {i} {variant}")
        assert layer.error <= TOL[dtype]


def test_float32_model_in_float64_and_bfloat16_model_in_float32():
    result = ia.decompose(tiny_vim(dtype=torch.float32), pixels(dtype=torch.float32), dtype=torch.float64)
    assert result.layers[0].dtype == torch.float64 and max(result.errors) <= 1e-5
    # bfloat16: the module rounds its in-projection and scan output to bfloat16, as Mamba's test allows
    result = ia.decompose(tiny_vim(dtype=torch.bfloat16), pixels(dtype=torch.float32))
    assert result.layers[0].dtype == torch.float32 and max(result.errors) <= 5e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("overrides", [dict(), dict(cls_position=0, use_conv_bias=False, divide_out=False)])
def test_every_variant_matches_the_naive_reference(variant, overrides):
    model = tiny_vim(**overrides)
    x = pixels(batch=1)
    layer = ia.decompose(model, x, variant=variant, check=False).layers[1]
    factors = vim_factors(model.layers[1].mixer, layer_input(model, x, 1), None, torch.float64)
    matrices, offset = naive_vim(factors, variant)
    assert_close(layer.full_matrix(), matrices, 1e-12, f"{variant} matrices")
    assert_close(layer.offset + 1e-300, offset + 1e-300, 1e-12, f"{variant} offset")
    rebuilt = torch.einsum("bcij,bjc->bic", matrices, layer.values) + offset
    if layer.fold is not None:
        rebuilt = rebuilt.new_zeros(layer.output.shape).index_add_(-1, layer.fold, rebuilt)
    assert_close(layer.reconstruct(), rebuilt, 1e-12, f"{variant} reconstruction")
    if variant in ("unified", "no_conv"):
        assert_close(rebuilt, layer.output, 1e-12, f"{variant} naive is exact")


def layer_input(model, x, index):
    """The input of mixer ``index`` during the model's forward."""
    seen = {}
    hook = model.layers[index].mixer.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(pixel_values=x)
    hook.remove()
    return seen["h"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_mean_and_rows_match_the_channel_blocks(variant):
    model = tiny_vim(cls_position=2, conv_kernel=4, image_size=(20, 28))
    x = pixels(size=(20, 28))                    # 35 patches, L = 36: Mamba's tiles of 32 and 4 and the band
    layer = ia.decompose(model, x, variant=variant, check=False).layers[0]
    assert isinstance(layer, VimLayerDecomposition) and layer.length == 36
    assert_close(layer.aggregate("mean"), layer.aggregate_by_blocks("mean"), 1e-12, f"{variant} signed mean")
    rows = torch.tensor([0, 2, 17, 35])
    for how in ("mean", "abs", "pos"):
        assert_close(layer._fast_rows(rows, how), layer.rows_by_blocks(rows, how), 1e-12, f"{variant} rows {how}")


def test_matrix_is_the_average_of_the_two_directions():
    """Per channel ``(A_f + J A_b J) / 2``: the forward scan's part is lower triangular, the backward's upper."""
    model = tiny_vim()
    layer = ia.decompose(model, pixels(batch=1)).layers[0]
    f = layer.factors
    from implicit_attention.architectures.mamba import mamba_block
    A_f, _ = mamba_block(f.forward, slice(0, 16), "unified")
    A_b, _ = mamba_block(f.backward, slice(0, 16), "unified")
    assert_close(layer.full_matrix(), (A_f + A_b.flip(-1, -2)) / 2, 1e-14, "average of the directions")
    assert torch.equal(A_f.triu(1), torch.zeros_like(A_f)) and torch.equal(A_b.triu(1), torch.zeros_like(A_b))


# --------------------------------------------------------------------------------- explain
@pytest.mark.parametrize("position", [None, 0, 4])
def test_class_token_and_patches_are_read_off_the_model(position):
    model = tiny_vim(cls_position=position)
    inputs = prepare_model_inputs(model, pixels())
    cls = 3 if position is None else position
    assert (inputs.name, inputs.length, inputs.class_token, inputs.causal) == ("pixel_values", 7, cls, False)
    assert inputs.patch_positions.tolist() == [i for i in range(7) if i != cls]   # the grid skips the class token
    assert inputs.classifier_row() == cls
    maps = ia.decompose(model, pixels()).aggregate("abs")
    expl = ia.run_explanation(model, pixels(), method="raw")
    assert expl.target.row == cls
    assert_close(expl.relevance, maps[:, :, cls, :].mean(0), 1e-12, "raw: the class token's row")


def test_grad_x_input_acts_on_the_patch_embeddings():
    model = tiny_vim()
    x = pixels()
    relevance = ia.explain(model, x, method="grad_x_input", target=1)
    patches = model.get_input_embeddings()(x).detach().requires_grad_(True)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: patches)
    try:
        logits = model(pixel_values=x).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), patches)
    assert relevance.shape == (2, 7) and torch.all(relevance[:, 3] == 0)   # the class token is no input
    assert_close(relevance[:, [0, 1, 2, 4, 5, 6]], (grad * patches).sum(-1), 1e-12, "grad x input on patches")


@pytest.mark.parametrize("method", ["raw", "rollout", "attribution", "signed_attribution", "paper", "grad_x_input",
                                    "integrated_gradients", "occlusion", "lrp"])
def test_explain_methods_on_pixels(method):
    model = tiny_vim(dtype=torch.float32, cls_position=2)
    expl = check_explanation(model, pixels(dtype=torch.float32), method=method, causal=False, steps=4)
    if expl is not None:                                                     # None: lrp refused, as it must be
        assert expl.relevance.shape == (2, 7)


def test_mambapy_scan_gives_the_token_loop_values_and_gradients():
    """``use_mambapy=True`` (the training path) only changes how the states are computed: logits and every
    parameter's gradient agree with the token loop."""
    pytest.importorskip("mambapy")
    results = []
    for parallel in (False, True):
        model = tiny_vim(use_mambapy=parallel)
        assert all(layer.mixer.use_mambapy is parallel for layer in model.layers)
        logits = model(pixel_values=pixels()).logits
        (logits * torch.arange(1.0, 4.0, dtype=torch.float64)).sum().backward()
        results.append((logits.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}))
    (loop_logits, loop_grads), (scan_logits, scan_grads) = results
    assert_close(scan_logits, loop_logits, 1e-10)
    for name, grad in loop_grads.items():
        assert grad.abs().max() > 0, name
        assert_close(scan_grads[name], grad, 1e-9)
