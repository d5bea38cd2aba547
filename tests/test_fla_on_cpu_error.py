"""fla's Triton kernels on a CPU: Triton's "0 active drivers" becomes an error that says what to do."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from implicit_attention.inputs import call_model

TRITON_MESSAGE = "0 active drivers ([]). There should only be one."


class KernelOnCpu(nn.Module):
    """Stands for a model whose layer calls a Triton kernel: raises what Triton raises without a GPU."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))

    def forward(self, input_ids, attention_mask=None):
        raise RuntimeError(TRITON_MESSAGE)


def test_triton_without_a_driver_names_fla_and_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    with pytest.raises(RuntimeError, match="flash-linear-attention's Triton kernels on cpu") as caught:
        call_model(KernelOnCpu(), torch.zeros(1, 3, dtype=torch.long), None)
    message = str(caught.value)
    assert "CUDA device" in message and "pip uninstall flash-linear-attention" in message
    assert isinstance(caught.value.__cause__, RuntimeError) and str(caught.value.__cause__) == TRITON_MESSAGE


def test_other_errors_and_no_fla_pass_through(monkeypatch):
    monkeypatch.delitem(sys.modules, "fla", raising=False)
    with pytest.raises(RuntimeError) as caught:
        call_model(KernelOnCpu(), torch.zeros(1, 3, dtype=torch.long), None)
    assert str(caught.value) == TRITON_MESSAGE
