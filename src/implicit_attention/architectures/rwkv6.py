"""RWKV-6 time mixing (our :class:`~implicit_attention.models.rwkv6.Rwkv6TimeMix`) as implicit attention.

Glossary: ``B`` batch, ``L`` tokens, ``H`` heads, ``N`` head size (key dim = value dim), ``C = H N``
the operator's channels (value channels of all heads), ``c`` a block of channels.

The factors are recomputed from the module's parameters and its captured input, mirroring
``Rwkv6TimeMix.forward``: ddlerp token shift, ``r, k, v``, gate ``g = silu(W_g xg)``, log-decays
``lw_t = log w_t = -exp(d_0 + tanh(xw D1) D2)`` and the bonus ``u``. Per head ``h`` the wkv
``o_i = r_i (S_{i-1} + diag(u) k_i^T v_i)``, ``S_i = diag(w_i) S_{i-1} + k_i^T v_i`` unrolls to one
matrix shared by the ``N`` value channels of the head::

    A_h[i, j] = sum_n r_i[n] exp(sum_{s=j+1..i-1} lw_s[n]) k_j[n]      (j < i)
    A_h[i, i] = sum_n r_i[n] u[n] k_i[n]
    o_i[c]    = sum_j A_h[i, j] v_j[c]

(the decay runs over the tokens strictly between ``j`` and ``i``: ``S_{i-1}`` holds ``k_j^T v_j``
decayed by ``w_{j+1} .. w_{i-1}``, the current token enters through the bonus only).

The group norm per head, ``GN(o)_c = gamma_c (o_c - mean_h o) / sigma_i + beta_c`` with
``sigma_i = sqrt(var_h(o_i) + eps)`` a data-controlled constant, commutes with ``A_h`` for the
mean: ``o_c - mean_h o = sum_j A_h[i, j] (v_j[c] - mean_h v_j)``. Hence, exactly,

    unified:  matrix[c, i, j] = g_i[c] gamma_c / sigma_i[h] A_h[i, j],   values = v - mean_head(v),
              offset[i, c] = g_i[c] beta_c;   out = (GN(o) * g), the input of ``output``.
    wkv:      matrix = A_h, values = v (the recurrence alone, the predecessor's form; exact=False).

The fast path loops over the head size ``N`` with ``[B, H, L, L]`` temporaries (never
``[B, H, L, L, N]``); the decay exponent is a directly summed segment of log-decays, so it is
always ``<= 0`` and accurate. :mod:`.rwkv6_naive` is the slow reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AGGREGATES, LayerDecomposition, _reduce
from .registry import Architecture, CapturedLayer, register

#: Formulations offered; ``unified`` is exact, ``wkv`` is the recurrence alone.
VARIANTS: tuple[str, ...] = ("unified", "wkv")
EXACT_VARIANTS: frozenset[str] = frozenset({"unified"})


@dataclass
class Rwkv6Factors:
    """Every data-controlled quantity of one RWKV-6 time mixing for one input, in the compute dtype.

    Attributes:
        r, k, v: receptance, key, value ``[B, L, H, N]``.
        log_w: ``[B, L, H, N]`` log-decays ``log w_t <= 0``.
        u: ``[H, N]`` bonus.
        gate: ``[B, L, C]`` ``silu(W_g xg)``.
        gn_weight, gn_bias: ``[C]`` group norm affine; gn_eps its eps.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
    """

    r: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_w: torch.Tensor
    u: torch.Tensor
    gate: torch.Tensor
    gn_weight: torch.Tensor
    gn_bias: torch.Tensor
    gn_eps: float
    mask: torch.Tensor


def _input_and_mask(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype):
    """The masked input ``[B, L, C]`` and the mask ``[B, L]`` in ``dtype``, as the module sees them."""
    x = hidden_states.detach().to(dtype)
    batch, length, _ = x.shape
    mask = torch.ones(batch, length, dtype=dtype, device=x.device) if attention_mask is None \
        else attention_mask.detach().to(device=x.device, dtype=dtype)
    return x * mask[..., None], mask


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, C]``: ``x_{t-1}``, zero at ``t = 0``."""
    return F.pad(x, (0, 0, 1, -1))


def rwkv6_factors(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> Rwkv6Factors:
    """Recompute every factor of ``module`` (an ``Rwkv6TimeMix``) for its input ``[B, L, C]``."""
    p = lambda t: t.detach().to(dtype)  # noqa: E731
    x, mask = _input_and_mask(hidden_states, attention_mask, dtype)
    batch, length, C = x.shape
    dx = token_shift(x) - x
    lora = torch.tanh((x + dx * p(module.time_maa_x)) @ p(module.time_maa_w1)).view(batch, length, 5, -1)
    mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", lora, p(module.time_maa_w2)).unbind(0)
    xw = x + dx * (p(module.time_maa_w) + mw)
    xk = x + dx * (p(module.time_maa_k) + mk)
    xv = x + dx * (p(module.time_maa_v) + mv)
    xr = x + dx * (p(module.time_maa_r) + mr)
    xg = x + dx * (p(module.time_maa_g) + mg)
    heads = (batch, length, module.num_heads, module.head_size)
    r = F.linear(xr, p(module.receptance.weight)).view(heads)
    k = F.linear(xk, p(module.key.weight)).view(heads)
    v = F.linear(xv, p(module.value.weight)).view(heads)
    gate = F.silu(F.linear(xg, p(module.gate.weight)))
    log_w = -torch.exp(p(module.time_decay) + torch.tanh(xw @ p(module.time_decay_w1)) @ p(module.time_decay_w2))
    return Rwkv6Factors(r=r, k=k, v=v, log_w=log_w.view(heads), u=p(module.time_faaaa), gate=gate,
                        gn_weight=p(module.ln_x.weight), gn_bias=p(module.ln_x.bias), gn_eps=module.ln_x.eps,
                        mask=mask)


def decay_matrices(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., L] -> ([..., L, L], [..., L, L])`` the pairwise decays of one key channel.

    ``inclusive[i, j] = exp(sum_{s=j+1..i} lw_s)`` for ``j <= i`` and
    ``strict[i, j] = exp(sum_{s=j+1..i-1} lw_s)`` for ``j < i``; zero elsewhere. The segments are
    summed directly (masked cumulative sums), never as differences of one cumulative sum.
    """
    length = log_w.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=log_w.device).tril(-1)
    segments = log_w.unsqueeze(-1).expand(*log_w.shape, length).masked_fill(~below, 0).cumsum(dim=-2)
    inclusive = torch.exp(segments).masked_fill_(~torch.ones_like(below).tril(), 0)
    strict = F.pad(inclusive[..., :-1, :], (0, 0, 1, 0))
    return inclusive, strict


def rwkv6_attention(r: torch.Tensor, k: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, L]`` the per-head wkv attention ``A_h`` (bonus on the diagonal).

    Args:
        r, k, log_w: ``[B, L, H, N]``; u: ``[H, N]``.
    """
    batch, length, heads, size = r.shape
    r_t, k_t, lw_t = (t.permute(0, 2, 3, 1) for t in (r, k, log_w))           # [B, H, N, L]
    A = r.new_zeros(batch, heads, length, length)
    for n in range(size):
        _, strict = decay_matrices(lw_t[:, :, n])
        A += r_t[:, :, n, :, None] * strict * k_t[:, :, n, None, :]
    return A + torch.diag_embed((r * u * k).sum(-1).transpose(1, 2))


class RwkvHeadsDecomposition(LayerDecomposition):
    """A multi-head RWKV time mixing as per-channel implicit attention (RWKV-6 and RWKV-7).

    Every value channel ``c`` of head ``h`` shares the head's matrix ``A_h``; the unified operator
    scales its rows by ``g_i[c] gamma_c / sigma_i[h]`` and adds ``g_i[c] bonus_i[h]`` on the
    diagonal (RWKV-7's ``r_k`` term, ``None`` for RWKV-6), with values ``v - mean_head(v)``.
    The part of the bonus on the head mean of ``v_i``, which the group norm removes from the wkv
    path but the bonus keeps, involves no other token: it goes to the offset with ``g beta``.

    Args:
        attention: ``[B, H, L, L]`` the per-head matrices ``A_h``.
        v: ``[B, L, H, N]`` the value stream of the recurrence.
        gate: ``[B, L, C]`` output gate; gn_weight, gn_bias: ``[C]``; gn_eps: group norm eps.
        bonus: ``[B, L, H]`` or ``None``.
    """

    def __init__(self, *, attention: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, gn_weight: torch.Tensor,
                 gn_bias: torch.Tensor, gn_eps: float, bonus: torch.Tensor | None, variant: str,
                 mask: torch.Tensor, **kwargs):
        batch, length, heads, size = v.shape
        self.attention = attention
        self.head_size = size
        self.gate, self.gn_weight = gate, gn_weight
        wkv = torch.einsum("bhij,bjhn->bihn", attention, v)                    # the recurrence's output o
        self.inv_sigma = torch.rsqrt(wkv.var(-1, unbiased=False) + gn_eps)    # [B, L, H]
        per_channel = lambda t: t.repeat_interleave(size, dim=-1)  # noqa: E731  [.., H] -> [.., C]
        self.row = self.diag = offset = None
        if variant == "unified":
            values = (v - v.mean(-1, keepdim=True)).flatten(2)
            self.row = gate * gn_weight * per_channel(self.inv_sigma)         # [B, L, C]
            shift = gn_bias.expand_as(gate)
            if bonus is not None:
                self.diag = gate * per_channel(bonus)
                shift = shift + per_channel(bonus * v.mean(-1))
            offset = gate * shift
        else:
            values = v.flatten(2)
        super().__init__(variant=variant, exact=variant in EXACT_VARIANTS, values=values, offset=offset,
                         mask=mask, **kwargs)

    def _block(self, channels: slice):
        heads = torch.arange(self.channels, device=self.device)[channels] // self.head_size
        block = self.attention[:, heads]                                       # [B, c, L, L] (a copy)
        if self.row is not None:
            block.mul_(self.row[..., channels].transpose(1, 2)[..., None])
        if self.diag is not None:
            block.diagonal(dim1=-2, dim2=-1).add_(self.diag[..., channels].transpose(1, 2))
        return block, None if self._offset is None else self._offset[..., channels]

    def aggregate(self, how: str = "mean", channel: int | None = None) -> torch.Tensor:
        """``[B, L, L]``, factorised per head: ``O(B H L^2)`` instead of ``O(B C L^2)``.

        Off the diagonal ``matrix[c, i, j] = row_i[c] A_h[i, j]``, so ``mean_c |.|`` is
        ``sum_h |A_h[i, j]| sum_{c in h} |row_i[c]| / C`` and ``mean_c relu(.)`` splits by sign
        (``relu(A) relu(row) + relu(-A) relu(-row)``); the diagonal, where RWKV-7 adds its bonus,
        is computed per channel.
        """
        if channel is not None or how not in AGGREGATES or how in self._aggregates:
            return super().aggregate(how, channel)
        batch, length, _ = self.values.shape
        heads = self.attention.shape[1]
        row = self.row if self.row is not None else torch.ones_like(self.values)
        row_h = row.view(batch, length, heads, self.head_size)                     # [B, L, H, N]
        A = self.attention
        if how == "mean":
            total = torch.einsum("bhij,bih->bij", A, row_h.sum(-1))
        elif how == "abs":
            total = torch.einsum("bhij,bih->bij", A.abs(), row_h.abs().sum(-1))
        else:
            total = (torch.einsum("bhij,bih->bij", A.clamp(min=0), row_h.clamp(min=0).sum(-1))
                     + torch.einsum("bhij,bih->bij", (-A).clamp(min=0), (-row_h).clamp(min=0).sum(-1)))
        if self.diag is not None:
            diagonal = row * A.diagonal(dim1=-2, dim2=-1).transpose(1, 2).repeat_interleave(self.head_size, -1)
            total.diagonal(dim1=-2, dim2=-1).copy_(_reduce(diagonal + self.diag, how).sum(-1))
        self._aggregates[how] = total / self.channels
        return self._aggregates[how]

    def aggregate_rows(self, rows, how: str = "mean") -> torch.Tensor:
        if how not in AGGREGATES:
            raise ValueError(f"how must be one of {AGGREGATES}, got {how!r}")
        return self.aggregate(how)[:, self._row_index(rows)]

    def matrix_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        # wkv: out = g (gamma (o - mean_h o) / sigma + ...); with sigma held fixed (a
        # data-controlled constant) d score / d o_c = (s_c - mean_h s) / sigma, s = grad g gamma.
        if self.variant != "wkv":
            return grad
        batch, length, _ = grad.shape
        s = (grad * self.gate * self.gn_weight).view(batch, length, -1, self.head_size)
        return ((s - s.mean(-1, keepdim=True)) * self.inv_sigma[..., None]).flatten(2)


class Rwkv6LayerDecomposition(RwkvHeadsDecomposition):
    """An RWKV-6 time mixing as per-channel implicit attention over its ``C = H N`` value channels."""

    def __init__(self, factors: Rwkv6Factors, *, variant: str, **kwargs):
        self.factors = factors
        f = factors
        super().__init__(attention=rwkv6_attention(f.r, f.k, f.log_w, f.u), v=f.v, gate=f.gate,
                         gn_weight=f.gn_weight, gn_bias=f.gn_bias, gn_eps=f.gn_eps, bonus=None,
                         variant=variant, mask=f.mask, **kwargs)


def record_wkv(module: nn.Module, record: CapturedLayer):
    """Hook recording the recurrence's output (the input of the group norm ``ln_x``) as ``extra["wkv"]``."""
    def hook(_, args):
        record.extra["wkv"] = args[0].detach()
    return [module.ln_x.register_forward_pre_hook(hook)]


def _build(captured: CapturedLayer, *, variant: str, dtype: torch.dtype, index: int) -> Rwkv6LayerDecomposition:
    factors = rwkv6_factors(captured.module, captured.inputs, captured.attention_mask, dtype)
    return Rwkv6LayerDecomposition(factors, variant=variant, index=index, name=captured.name,
                                   output=captured.output.detach().to(dtype))


register(Architecture(
    name="rwkv6",
    module_classes=("implicit_attention.models.rwkv6.modeling_rwkv6.Rwkv6TimeMix",),
    model_classes=("Rwkv6ForCausalLM", "Rwkv6Model"),
    variants=VARIANTS,
    output_module="output",
    build=_build,
    channels=lambda module: module.hidden_size,
    extra_hooks=record_wkv,
))
