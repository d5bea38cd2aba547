"""Fused (Triton) Mamba signed mean against the float64 direct mean, and the fused per-channel reductions
(|A|, relu(A), attribution) against the float64 eager tiles.

On a CPU machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which must be set
before the kernels are defined, hence a subprocess); on a CUDA machine they also run natively.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

HERE = Path(__file__).parent

# (variant, conv width, length, splits): lengths cross the 128-tile, 16-tile and band edges
CASES = [("unified", 4, 150, 1), ("unified", 4, 140, 3), ("s6", 4, 81, 1), ("no_gate", 2, 66, 2),
         ("no_act", 5, 40, 1), ("no_conv", 4, 17, 1)]

_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import left_padded, tiny_mamba
from test_mamba_fast import factors_of
from implicit_attention.architectures.mamba import triton as triton_mean
from implicit_attention.architectures.mamba.fast import exact_channel_mean, signed_mean
errors = []
for variant, width, length, splits in {cases!r}:
    triton_mean._split_count = lambda programs, work, block, s=splits: s
    model = tiny_mamba(dtype=torch.float64, conv_kernel=width, hidden_size=20, state_size=3, seed=width)
    ids, mask = left_padded(batch=2, length=length, seed=length)
    f64 = factors_of(model, ids, mask)
    f32 = factors_of(model, ids, mask, dtype=torch.float32)
    fused = signed_mean(f32, variant, fused=True)
    reference = exact_channel_mean(f64, variant)
    errors.append(float((fused.double() - reference).abs().max() / reference.abs().max()))
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def interpreter_errors():
    """Both interpreter scripts (the signed mean's and the reductions'), started together on first use: each
    runs Triton's interpreter (set before the kernels are defined: a subprocess) on one thread, so two cores
    run them side by side. ``interpreter_errors(name)``: that script's last printed line, a JSON list of
    relative errors."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    scripts = {"mean": _SCRIPT.format(tests=str(HERE), cases=CASES),
               "reduce": _REDUCE_SCRIPT.format(tests=str(HERE), cases=REDUCE_CASES)}
    started = {name: subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, script in scripts.items()}

    def errors(name: str) -> list[float]:
        out, err = started[name].communicate(timeout=600)
        assert started[name].returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    yield errors
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels run natively (tests below)")
def test_fused_mean_equals_direct_mean_in_the_interpreter(interpreter_errors):
    errors = interpreter_errors("mean")
    assert len(errors) == len(CASES)
    for case, error in zip(CASES, errors):
        assert error < 2e-6, (case, error)


# (variant, conv width, length, splits, state): 64-tiles, 16-tiles and the band; a state of 16 fills tl.dot
REDUCE_CASES = [("unified", 4, 140, 1, 3), ("no_gate", 2, 90, 3, 16)]

_REDUCE_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
from conftest import left_padded, tiny_mamba
from test_mamba_fast import factors_of
from implicit_attention.architectures.mamba import triton as triton_mean
from implicit_attention.architectures.mamba.fast import ChannelReduction, channel_reduced
errors = []
for variant, width, length, splits, state in {cases!r}:
    triton_mean._split_count = lambda programs, work, block, s=splits: s
    model = tiny_mamba(dtype=torch.float64, conv_kernel=width, hidden_size=20, state_size=state, seed=width)
    ids, mask = left_padded(batch=2, length=length, seed=length)
    f64, f32 = factors_of(model, ids, mask), factors_of(model, ids, mask, dtype=torch.float32)
    grad = torch.randn(f64.x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    for how, signed in (("abs", False), ("pos", False), (None, False), (None, True)):
        if how is None:   # the attribution (values: any [B, L, E] tensor)
            exact = ChannelReduction(grad=grad, values=f64.x, signed=signed)
            fast = ChannelReduction(grad=grad.float(), values=f32.x, signed=signed)
        else:
            exact = fast = ChannelReduction(how)
        reference = channel_reduced(f64, variant, exact, fused=False)
        fused = channel_reduced(f32, variant, fast, fused=True)
        errors.append(float((fused.double() - reference).abs().max() / reference.abs().max()))
print(json.dumps(errors))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels run natively (tests below)")
def test_fused_channel_reductions_equal_the_eager_tiles_in_the_interpreter(interpreter_errors):
    errors = interpreter_errors("reduce")
    assert len(errors) == 4 * len(REDUCE_CASES)
    assert max(errors) < 2e-6, errors


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cpu_and_cuda_factors(length: int):
    """A tiny Mamba's last-layer factors on a padded batch: float64 on the CPU, float32 on CUDA."""
    sys.path.insert(0, str(HERE))
    from test_mamba_fast import factors_of

    from conftest import left_padded, tiny_mamba

    model = tiny_mamba(dtype=torch.float64, hidden_size=48, state_size=16, seed=length)
    ids, mask = left_padded(batch=2, length=length, seed=length)
    return (factors_of(model, ids, mask),
            factors_of(model.float().cuda(), ids.cuda(), mask.cuda(), dtype=torch.float32))


@cuda
@pytest.mark.parametrize("variant", ["unified", "s6", "no_conv"])
@pytest.mark.parametrize("length", [17, 200, 1000])
def test_fused_channel_reductions_on_cuda_equal_the_eager_tiles(variant, length):
    from implicit_attention.architectures.mamba.fast import ChannelReduction, channel_reduced

    f64, f32 = cpu_and_cuda_factors(length)
    grad = torch.randn(f64.x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    for exact, fast in ((ChannelReduction("abs"), ChannelReduction("abs")),
                        (ChannelReduction(grad=grad, values=f64.x), ChannelReduction(grad=grad.float().cuda(),
                                                                                     values=f32.x))):
        reference = channel_reduced(f64, variant, exact, fused=False)
        fused = channel_reduced(f32, variant, fast, fused=True)       # the kernel itself, no fallback
        error = float((fused.double().cpu() - reference).abs().max() / reference.abs().max())
        assert error < 2e-6, (exact.how, error)


@cuda
@pytest.mark.parametrize("variant", ["unified", "s6", "no_gate", "no_act", "no_conv"])
@pytest.mark.parametrize("length", [17, 64, 200, 1000])
def test_fused_mean_on_cuda_equals_direct_mean(variant, length):
    from implicit_attention.architectures.mamba.fast import exact_channel_mean, signed_mean

    f64, f32 = cpu_and_cuda_factors(length)
    fused = signed_mean(f32, variant)                              # picks the fused kernels on CUDA
    reference = exact_channel_mean(f64, variant)
    error = float((fused.double().cpu() - reference).abs().max() / reference.abs().max())
    assert error < 2e-6, error


@cuda
def test_fused_mean_is_stable_at_16k_tokens_on_cuda():
    sys.path.insert(0, str(HERE))
    from implicit_attention.architectures.mamba.fast import matrix_rows, signed_mean
    from test_mamba_fast import factors_of

    from conftest import tiny_mamba

    model = tiny_mamba(dtype=torch.float64, hidden_size=16, state_size=16, num_hidden_layers=1)
    with torch.no_grad():
        model.backbone.layers[0].mixer.dt_proj.bias.add_(2.0)      # steps ~2: cumulative sums ~30k
    ids = torch.randint(1, 40, (1, 16384), generator=torch.Generator().manual_seed(1))
    f64 = factors_of(model, ids, None)
    f32 = factors_of(model.float().cuda(), ids.cuda(), None, dtype=torch.float32)
    assert float(f64.dt.sum(1).max()) > 10000
    fused = signed_mean(f32, "unified")
    rows = torch.tensor([5, 100, 4095, 9000, 16383])
    reference = matrix_rows(f64, "unified", rows).mean(dim=2)       # [B, R, L], float64
    assert torch.isfinite(fused).all()
    error = float((fused[:, rows.cuda()].double().cpu() - reference).abs().max() / reference.abs().max())
    assert error < 1e-5, error
