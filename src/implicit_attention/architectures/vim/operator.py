"""Vision Mamba (bidirectional Mamba) implicit attention: the operator's math on a block of channels.

Glossary: ``B`` batch, ``L`` tokens (patches and the class token), ``E`` inner channels, ``N`` state size,
``K`` conv width, ``c`` a block of channels, ``J`` the token reversal (``(J A J)[i, j] = A[L-1-i, L-1-j]``).

The mixer (published ``bimamba_type="v2"``) runs two Mamba scans on the same ``[x; z] = in_proj(h)``: the
forward one with ``conv1d, x_proj, dt_proj, A_log, D``, the backward one with the ``*_b`` parameters on the
reversed sequence, and adds them, ``out = out_proj(s (y_f + J y_b))`` with ``s = 1/2`` (``divide_out``).
Each scan is Mamba's unified operator (:mod:`..mamba.operator`): ``y_f = A_f x + o_f`` and, in the
backward scan's own (reversed) token order, ``y_b' = A_b (J x) + o_b``. So per channel ``d``::

    out_d = s (A_f,d + J A_b,d J) x_d + s (o_f,d + J o_b,d)

the formulation page's ``(A_f + J A_b J) / 2``: one ``[L, L]`` matrix per channel on the shared values
``x``, exact (conv, its SiLU, the scan, the ``D`` skip and the gate ``silu(z)`` inside; the conv biases
in the offset). The gate is the same for both scans at a token (``z`` is reversed with ``x``).

Variants are Mamba's, applied to each scan and combined the same way:

- ``unified`` (exact), ``no_gate``, ``no_act``: values ``x``, ``E`` channels of ``s (A_f + J A_b J)``.
- ``no_conv`` (exact) and ``s6``: the values differ between the scans (the conv outputs ``c_f`` and
  ``J c_b``; the scan inputs ``u_f`` and ``J u_b``), so each scan keeps its own value stream: ``2E``
  operator channels, ``2 s A_f`` on ``c_f / 2`` and ``2 s J A_b J`` on ``J c_b / 2``, folded (``fold``) into
  the ``E`` outputs. Writing the matrices ``2 s A`` and the values halved keeps every aggregate on the
  scale of ``unified``'s: the mean over the ``2E`` channels is ``s (mean A_f + J mean A_b J)``.
"""

from __future__ import annotations

import torch

from ..mamba.operator import EXACT_VARIANTS, VARIANTS, mamba_block
from .factors import VimFactors

__all__ = ["EXACT_VARIANTS", "FOLDED_VARIANTS", "VARIANTS", "flip_matrix", "vim_block", "vim_fold", "vim_values"]

#: the variants whose two scans multiply different value streams (``2E`` operator channels)
FOLDED_VARIANTS: frozenset[str] = frozenset({"s6", "no_conv"})


def flip_matrix(A: torch.Tensor) -> torch.Tensor:
    """``J A J`` on the last two axes."""
    return A.flip(-1, -2)


def vim_values(f: VimFactors, variant: str) -> torch.Tensor:
    """``[B, L, E]`` (``2E`` for :data:`FOLDED_VARIANTS`: forward stream, then the backward one halved)."""
    if variant in FOLDED_VARIANTS:
        return torch.cat([f.forward.values(variant), f.backward.values(variant).flip(1)], dim=-1) / 2
    return f.forward.values(variant)


def vim_fold(f: VimFactors, variant: str) -> torch.Tensor | None:
    """``[2E]`` the output channel of each operator channel of a folded variant, else ``None``."""
    if variant not in FOLDED_VARIANTS:
        return None
    return torch.arange(f.x.shape[-1], device=f.x.device).repeat(2)


def _combine(M_f: torch.Tensor | None, o_f, M_b: torch.Tensor | None, o_b, scale: float):
    """``(s (M_f + J M_b J), s (o_f + J o_b))`` with either part possibly absent (``None``)."""
    matrix = None
    if M_f is not None:
        matrix = M_f.mul_(scale)
    if M_b is not None:
        back = flip_matrix(M_b).mul_(scale)
        matrix = back if matrix is None else matrix.add_(back)
    offsets = [o * scale for o in (o_f, None if o_b is None else o_b.flip(1)) if o is not None]
    return matrix, (None if not offsets else offsets[0] if len(offsets) == 1 else offsets[0] + offsets[1])


def vim_block(f: VimFactors, channels: slice, variant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Matrices ``[B, c, L, L]`` and offset ``[B, L, c]`` (or ``None``) of ``variant`` for a block of operator
    channels (``[0, 2E)`` for :data:`FOLDED_VARIANTS`, forward scan first)."""
    if variant not in FOLDED_VARIANTS:
        M_f, o_f = mamba_block(f.forward, channels, variant)
        M_b, o_b = mamba_block(f.backward, channels, variant)
        return _combine(M_f, o_f, M_b, o_b, f.scale)
    width = f.x.shape[-1]
    matrices, offsets = [], []
    parts = ((f.forward, slice(channels.start, min(channels.stop, width))),
             (f.backward, slice(max(channels.start, width) - width, channels.stop - width)))
    for k, (scan, sl) in enumerate(parts):
        if sl.start >= sl.stop:
            continue
        M, o = mamba_block(scan, sl, variant)
        # 2 s A on half the values; the offset (no value) keeps its own s
        M = M.mul_(2 * f.scale)
        matrices.append(flip_matrix(M) if k else M)
        offsets.append(None if o is None else (o.flip(1) if k else o) * f.scale)
    if all(o is None for o in offsets):
        return torch.cat(matrices, dim=1), None
    offsets = [o if o is not None else torch.zeros_like(m[:, :, 0]).transpose(1, 2)
               for o, m in zip(offsets, matrices)]
    return torch.cat(matrices, dim=1), torch.cat(offsets, dim=-1)
