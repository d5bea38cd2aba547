"""Configuration of our Vision Mamba (Zhu et al. 2024, "Vision Mamba: Efficient Visual Representation
Learning with Bidirectional State Space Model"), ``model_type = "vim"``."""

from __future__ import annotations

import math

from transformers import PretrainedConfig


class VimConfig(PretrainedConfig):
    """Vision Mamba: patch embedding, a class token among the patches, bidirectional Mamba blocks
    (``bimamba_type="v2"`` of the published code), a final norm and a linear classifier.

    The defaults are the published ``vim_tiny_patch16_224_bimambav2_..._with_midclstok_div2``
    (``hustvl/Vim-tiny``); ``hidden_size=384`` gives ``Vim-small``.

    Args:
        image_size: height and width of the input (an int or ``(height, width)``).
        patch_size: patch side; stride: step between patches (the published ``stride``, = ``patch_size``).
        num_channels: image channels.
        hidden_size: ``D`` (the published ``embed_dim``).
        num_hidden_layers: blocks (the published ``depth``).
        state_size: ``N`` (``d_state``); conv_kernel: ``K`` (``d_conv``); expand: ``E = expand * D``.
        time_step_rank: ``R`` (``dt_rank``); ``None`` is the published ``"auto"``, ``ceil(D / 16)``.
        use_bias: biases of ``in_proj`` / ``out_proj`` (published: no); use_conv_bias: conv biases (yes).
        rms_norm: RMS norms (published) or LayerNorms in the blocks and ``norm_f``; norm_epsilon: their eps.
        residual_in_fp32: the residual stream in (at least) float32.
        divide_out: ``out_proj((y_f + flip(y_b)) / 2)`` (published ``if_devide_out=True``) or without the 2.
        cls_position: index of the class token among the ``P + 1`` tokens; ``None`` is the middle,
            ``P // 2`` (published ``use_middle_cls_token``); 0 puts it first.
        dt_min, dt_max, dt_init_floor, dt_scale: the Mamba init of ``dt_proj``.
        initializer_range: std of the normal init of linear layers, the class token and positions.
        use_mambapy: run the scans with ``mambapy``'s parallel scan (PyPI ``mambapy``, as ``transformers``'
            Mamba does) instead of token by token: the same values, much faster to train; ignored
            (the token loop) when ``mambapy`` is not installed.
    """

    model_type = "vim"

    def __init__(self, image_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int | None = None,
                 num_channels: int = 3, hidden_size: int = 192, num_hidden_layers: int = 24, state_size: int = 16,
                 conv_kernel: int = 4, expand: int = 2, time_step_rank: int | None = None, use_bias: bool = False,
                 use_conv_bias: bool = True, rms_norm: bool = True, norm_epsilon: float = 1e-5,
                 residual_in_fp32: bool = True, divide_out: bool = True, cls_position: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 initializer_range: float = 0.02, use_mambapy: bool = False, **kwargs):
        self.image_size = list(image_size) if isinstance(image_size, (tuple, list)) else image_size
        self.patch_size = patch_size
        self.stride = patch_size if stride is None else stride
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.state_size = state_size
        self.conv_kernel = conv_kernel
        self.expand = expand
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank is None else time_step_rank
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.rms_norm = rms_norm
        self.norm_epsilon = norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.divide_out = divide_out
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.initializer_range = initializer_range
        self.use_mambapy = use_mambapy
        if cls_position is not None and not 0 <= cls_position <= self.num_patches:
            raise ValueError(f"cls_position {cls_position} must lie in [0, {self.num_patches}] "
                             f"({self.num_patches} patches)")
        self.cls_position = cls_position
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width: ``(side - patch) // stride + 1`` (the published ``PatchEmbed``)."""
        height, width = self.image_size if isinstance(self.image_size, list) else (self.image_size,) * 2
        return (height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        """``P``."""
        rows, cols = self.grid_size
        return rows * cols

    @property
    def class_token_index(self) -> int:
        """Where the class token sits among the ``P + 1`` tokens (``P // 2`` unless ``cls_position`` says)."""
        return self.num_patches // 2 if self.cls_position is None else self.cls_position

    @property
    def intermediate_size(self) -> int:
        """``E = expand * D``."""
        return self.expand * self.hidden_size


__all__ = ["VimConfig"]
