"""The model's own scans, run in parallel while the library runs the model.

Without the CUDA kernels (``mamba_ssm``), ``transformers``' Mamba mixers run their selective scan
token by token in Python, and its backward runs through the loop (on this project's 2-core CPU, the
bundled model at 512 tokens: forward and backward 3.0 s token by token, 0.15 s with the parallel scan;
``benchmarks/bench_scans.py``). The mixers already offer ``mambapy``'s parallel scan
(``use_mambapy``, PyPI ``mambapy``, a dependency of this package), which computes the same states
(to float32 rounding; every decomposition's reconstruction check still compares against what the
model computed). :func:`parallel_scans` switches it on, for float32 mixers (``transformers``' mambapy path
mixes float32 states with the model's dtype, which fails in bfloat16 and float16, and a float64 model
is run as configured), for the duration of a call and restores each
module's own setting afterwards: the user's model is left as it was, nothing is patched globally.
Where the CUDA kernels are installed, the mixers use them whatever the flag says.

Set :data:`ENABLED` to ``False`` to run the modules exactly as configured.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: Whether :func:`parallel_scans` switches the parallel scan on (``False``: the modules as configured).
ENABLED = True


def mambapy_available() -> bool:
    return importlib.util.find_spec("mambapy") is not None


def _float32(module: nn.Module) -> bool:
    # transformers' mambapy path multiplies float32 states by the model-dtype C: only float32 models agree
    parameter = next(module.parameters(), None)
    return parameter is not None and parameter.dtype == torch.float32


@contextmanager
def parallel_scans(model: nn.Module) -> Iterator[list[str]]:
    """Run ``model``'s Mamba mixers with ``mambapy``'s parallel scan inside the ``with`` block.

    Yields the names of the modules switched (none when :data:`ENABLED` is off or ``mambapy`` is not
    installed); each module's ``use_mambapy`` is restored on exit, also on error.
    """
    switched: list[tuple[str, nn.Module, bool]] = []
    if ENABLED and mambapy_available():
        for name, module in model.named_modules():
            if isinstance(getattr(module, "use_mambapy", None), bool) and not module.use_mambapy \
                    and _float32(module):
                switched.append((name, module, module.use_mambapy))
                module.use_mambapy = True
    try:
        yield [name for name, _, _ in switched]
    finally:
        for _, module, before in switched:
            module.use_mambapy = before
