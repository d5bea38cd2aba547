"""Vision Mamba (Zhu et al. 2024), the published ``models_mamba.VisionMamba`` with ``bimamba_type="v2"``,
middle class token, absolute positions, RMS norms, residual in float32 and ``if_devide_out=True``.

Glossary: ``B`` batch, ``P`` patches, ``L = P + 1`` tokens, ``D`` hidden size, ``E = expand * D`` inner
width, ``N`` state size, ``K`` conv width, ``R`` time-step rank.

Model::

    tokens = patch_embed(pixels)                            [B, P, D]  (Conv2d, flattened row by row)
    tokens = insert(tokens, cls_token, at=cls_position) + pos_embed      [B, L, D]
    r_0 = tokens (float32 or wider with residual_in_fp32)
    r_{l+1} = r_l + mixer_l(norm_l(r_l))                    (block l)
    features = norm_f(r_last)[:, cls_position],   logits = head(features)

The published ``Block`` returns ``(mixer output, residual)`` and adds them in the next block's fused
add-norm; our block returns the sum (``r + mixer(norm(r))``), the same numbers, so that the block's
input is the residual stream. Bidirectional mixer (the published ``Mamba`` with ``bimamba_type="v2"``)::

    [x; z] = in_proj(h)
    y_f = Mamba_f(x, z)                         conv1d,   x_proj,   dt_proj,   A_log,   D
    y_b = flip(Mamba_b(flip(x), flip(z)))       conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b
    out = out_proj((y_f + y_b) / 2)             (divide_out; without the 2 otherwise)

with each branch the Mamba selective scan on its own (flipped) sequence, gate inside::

    c = causal_conv(x) + b,  u = silu(c),  [dt~; B; C] = x_proj(u),  dt = softplus(dt_proj(dt~))
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = (C_t . h_t + D u_t) * silu(z_t),   A = -exp(A_log)

State-dict keys are the published checkpoints' (``layers.{i}.mixer.conv1d_b.weight``, ``norm_f.weight``,
``patch_embed.proj.weight``, ``pos_embed``, ``cls_token``, ``head.weight``, ...): both classes keep the
backbone's parts at the top level, so :meth:`VimForImageClassification.from_vim_checkpoint` loads a
published file as it is. The scans run in the compute dtype (at least float32), token by token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .._scaffold import RMSNorm, compute_dtype
from .configuration_vim import VimConfig


class VimRMSNorm(RMSNorm):
    """The RMS norm of the blocks and ``norm_f`` (weight only, as ``mamba_ssm``'s)."""


class VimPatchEmbed(nn.Module):
    """``Conv2d(C, D, patch, stride)`` then ``[B, D, h, w] -> [B, h w, D]`` (patches row by row)."""

    def __init__(self, config: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                              stride=config.stride)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, P, D]``."""
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, z: torch.Tensor, parallel: bool = False) -> torch.Tensor:
    """``[B, L, E]`` ``y_t = (C_t . h_t + D u_t) * silu(z_t)``, ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``.

    Args: u, dt, z ``[B, L, E]``; A ``[E, N]``; B, C ``[B, L, N]``; D ``[E]``; parallel: the states by
    ``mambapy``'s parallel scan (when installed) rather than one token at a time.
    """
    decay = torch.exp(dt[..., None] * A)                         # [B, L, E, N]
    inputs = (dt * u)[..., None] * B[:, :, None, :]              # [B, L, E, N]
    pscan = _mambapy_scan() if parallel else None
    states = pscan(decay, inputs) if pscan is not None else sequential_states(decay, inputs)
    y = torch.einsum("blen,bln->ble", states, C) + u * D
    return y * F.silu(z)


def sequential_states(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``[B, L, E, N]`` ``h_t = decay_t * h_{t-1} + inputs_t`` (``h_0 = inputs_0``), one token at a time."""
    state = torch.zeros_like(inputs[:, 0])
    states = []
    # unbind, not decay[:, t]: indexing would give the backward pass one full-size gradient per token
    for decay_t, input_t in zip(decay.unbind(1), inputs.unbind(1)):   # two elementwise ops a token
        state = decay_t * state + input_t
        states.append(state)
    return torch.stack(states, dim=1)


def _mambapy_scan():
    """``mambapy.pscan.pscan`` (``[B, L, E, N]`` decays and inputs to states), or None when not installed."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None
    return pscan


class VimMixer(nn.Module):
    """The bidirectional Mamba mixer (published ``Mamba(bimamba_type="v2", if_devide_out=True)``)."""

    #: every token reads every other (both scan directions): not a causal layer
    is_causal = False

    def __init__(self, config: VimConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        D, E, N, R, K = (config.hidden_size, config.intermediate_size, config.state_size, config.time_step_rank,
                         config.conv_kernel)
        self.hidden_size, self.intermediate_size, self.ssm_state_size, self.time_step_rank = D, E, N, R
        self.conv_kernel_size = K
        self.divide_out = config.divide_out
        self.use_mambapy = getattr(config, "use_mambapy", False)
        self.in_proj = nn.Linear(D, 2 * E, bias=config.use_bias)
        for suffix in ("", "_b"):  # the published order: forward branch, then the backward one
            setattr(self, f"conv1d{suffix}", nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=config.use_conv_bias))
            setattr(self, f"x_proj{suffix}", nn.Linear(E, R + 2 * N, bias=False))
            dt_proj = nn.Linear(R, E, bias=True)
            dt_proj.is_dt_proj = True  # the Mamba init (in VimPreTrainedModel._init_weights, with its mixer)
            setattr(self, f"dt_proj{suffix}", dt_proj)
            a_name, d_name = ("A_log", "D") if suffix == "" else ("A_b_log", "D_b")
            setattr(self, a_name, nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)))
            setattr(self, d_name, nn.Parameter(torch.ones(E)))
        self.out_proj = nn.Linear(E, D, bias=config.use_bias)

    def branch(self, suffix: str) -> dict[str, torch.Tensor | nn.Module]:
        """The parameters of one scan direction (``""`` forward, ``"_b"`` backward), by published name."""
        return {"conv1d": getattr(self, f"conv1d{suffix}"), "x_proj": getattr(self, f"x_proj{suffix}"),
                "dt_proj": getattr(self, f"dt_proj{suffix}"),
                "A_log": self.A_log if suffix == "" else self.A_b_log, "D": self.D if suffix == "" else self.D_b}

    def _scan(self, x: torch.Tensor, z: torch.Tensor, suffix: str) -> torch.Tensor:
        """``[B, L, E]`` one direction's gated scan output on ``x, z`` (already flipped for ``"_b"``)."""
        p = self.branch(suffix)
        dtype, length = x.dtype, x.shape[1]
        conv = p["conv1d"]
        c = F.conv1d(x.transpose(1, 2), conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype),
                     padding=self.conv_kernel_size - 1, groups=self.intermediate_size)[..., :length].transpose(1, 2)
        u = F.silu(c)
        dt, B, C = torch.split(F.linear(u, p["x_proj"].weight.to(dtype)),
                               [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        dt = F.softplus(F.linear(dt, p["dt_proj"].weight.to(dtype), p["dt_proj"].bias.to(dtype)))
        A = -torch.exp(p["A_log"].to(dtype))
        return selective_scan(u, dt, A, B, C, p["D"].to(dtype), z, parallel=self.use_mambapy)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; the scans run in the compute dtype."""
        dtype = hidden_states.dtype
        x, z = self.in_proj(hidden_states).to(compute_dtype(dtype)).chunk(2, dim=-1)
        y = self._scan(x, z, "") + self._scan(x.flip(1), z.flip(1), "_b").flip(1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.to(dtype))


class VimBlock(nn.Module):
    """``r + mixer(norm(r))`` on the residual stream ``r`` (kept in at least float32 with ``residual_in_fp32``)."""

    def __init__(self, config: VimConfig, layer_idx: int):
        super().__init__()
        self.mixer = VimMixer(config, layer_idx)
        self.norm = _norm(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` residual stream in, residual stream out."""
        normed = self.norm(hidden_states.to(self.norm.weight.dtype))
        return hidden_states + self.mixer(normed)


def _norm(config: VimConfig) -> nn.Module:
    if config.rms_norm:
        return VimRMSNorm(config.hidden_size, config.norm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)


class VimPreTrainedModel(PreTrainedModel):
    config_class = VimConfig
    main_input_name = "pixel_values"
    base_model_prefix = ""          # the backbone's parts sit at the top level (the published keys)
    _no_split_modules = ["VimBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, VimMixer):
            cfg = self.config
            for suffix in ("", "_b"):
                p = module.branch(suffix)
                rank = p["dt_proj"].weight.shape[1]
                init.uniform_(p["dt_proj"].weight, -cfg.dt_scale * rank ** -0.5, cfg.dt_scale * rank ** -0.5)
                dt = torch.exp(torch.rand(module.intermediate_size) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                               + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
                init.copy_(p["dt_proj"].bias, (dt + torch.log(-torch.expm1(-dt))).to(p["dt_proj"].bias.dtype))
                states = torch.arange(1, module.ssm_state_size + 1, dtype=torch.float32)
                init.copy_(p["A_log"], torch.log(states).repeat(module.intermediate_size, 1).to(p["A_log"].dtype))
                init.ones_(p["D"])
        elif isinstance(module, nn.Linear):
            if getattr(module, "is_dt_proj", False):
                return  # initialised with its mixer
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (VimRMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, _VimBackbone):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.pos_embed, std=std)


class _VimBackbone:
    """Mixin: the backbone's parts at the top level (``patch_embed``, ``cls_token``, ``pos_embed``,
    ``layers``, ``norm_f``) and :meth:`features`."""

    def _build_backbone(self, config: VimConfig) -> None:
        self.patch_embed = VimPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.layers = nn.ModuleList([VimBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = _norm(config)

    @property
    def cls_position(self) -> int:
        """Index of the class token among the ``P + 1`` tokens."""
        return self.config.class_token_index

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (``[B, C, H, W] -> [B, P, D]``)."""
        return self.patch_embed

    def features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """``(norm_f(r_last) [B, L, D], residual streams or None)``."""
        tokens = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        at = self.cls_position
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        hidden = torch.cat([tokens[:, :at], cls, tokens[:, at:]], dim=1) + self.pos_embed.to(tokens.dtype)
        if self.config.residual_in_fp32:
            hidden = hidden.to(compute_dtype(hidden.dtype))
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden)
            if states is not None:
                states.append(hidden)
        return self.norm_f(hidden.to(self.norm_f.weight.dtype)), None if states is None else tuple(states)


class VimModel(_VimBackbone, VimPreTrainedModel):
    """The Vision Mamba backbone: ``last_hidden_state`` after ``norm_f``, ``pooler_output`` the class token."""

    def __init__(self, config: VimConfig):
        super().__init__(config)
        self._build_backbone(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        """``pixel_values [B, C, H, W]`` -> ``last_hidden_state [B, L, D]``, ``pooler_output [B, D]``."""
        hidden, states = self.features(pixel_values, bool(output_hidden_states))
        output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden[:, self.cls_position],
                                            hidden_states=states)
        return output if return_dict is not False else output.to_tuple()


class VimForImageClassification(_VimBackbone, VimPreTrainedModel):
    """Vision Mamba with its linear ``head`` on the class token after ``norm_f``: ``logits [B, num_labels]``.

    Its state dict is the published one key for key (:meth:`from_vim_checkpoint` loads such a file).
    """

    def __init__(self, config: VimConfig):
        super().__init__(config)
        self._build_backbone(config)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        """``logits [B, num_labels]``; ``labels [B]`` gives the cross-entropy loss."""
        hidden, states = self.features(pixel_values, bool(output_hidden_states))
        logits = self.head(hidden[:, self.cls_position])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.to(compute_dtype(logits.dtype)), labels)
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=states)
        return output if return_dict is not False else output.to_tuple()

    @classmethod
    def from_vim_checkpoint(cls, checkpoint: str | Path | dict, config: VimConfig | None = None,
                            **config_kwargs) -> VimForImageClassification:
        """A model from a published Vim checkpoint (``hustvl/Vim-tiny`` / ``Vim-small``, middle class token).

        Args:
            checkpoint: the ``.pth`` file (its ``"model"`` entry, or the file itself, is the state dict)
                or the state dict.
            config: the architecture; ``None`` builds a :class:`VimConfig` from ``config_kwargs`` with the
                sizes read off the state dict (``hidden_size``, layers, patch size, state size, conv
                width, expand, time-step rank, labels, image size for a square grid).

        Keys load as they are (strict): every published parameter has our parameter of the same name.
        """
        state = checkpoint
        if not isinstance(state, dict):
            state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
        if "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if config is None:
            config = VimConfig(**{**config_from_state_dict(state, config_kwargs.get("stride")), **config_kwargs})
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model.eval()


def config_from_state_dict(state: dict[str, torch.Tensor], stride: int | None = None) -> dict:
    """The :class:`VimConfig` sizes of a published state dict (square images; ``stride`` the patch step,
    default the patch size, e.g. 8 for the published fine-tuned ``Vim-tiny+``)."""
    hidden, channels, patch, _ = state["patch_embed.proj.weight"].shape
    layers = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("layers."))
    inner, states = state["layers.0.mixer.A_log"].shape
    rank = state["layers.0.mixer.dt_proj.weight"].shape[1]
    side = math.isqrt(state["pos_embed"].shape[1] - 1)          # patches along a side
    stride = patch if stride is None else stride
    return dict(hidden_size=hidden, num_channels=channels, patch_size=patch, stride=stride,
                image_size=(side - 1) * stride + patch,
                num_hidden_layers=layers, state_size=states, expand=inner // hidden, time_step_rank=rank,
                conv_kernel=state["layers.0.mixer.conv1d.weight"].shape[-1],
                use_conv_bias="layers.0.mixer.conv1d.bias" in state,
                use_bias="layers.0.mixer.in_proj.bias" in state, rms_norm="norm_f.bias" not in state,
                num_labels=state["head.weight"].shape[0])


__all__ = ["VimBlock", "VimForImageClassification", "VimMixer", "VimModel", "VimPatchEmbed", "VimPreTrainedModel",
           "config_from_state_dict", "selective_scan"]
