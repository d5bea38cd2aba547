"""docs/examples/quantus_faithfulness.py runs: our method objects serve as Quantus' explain_func for
its FaithfulnessCorrelation metric on the bundled Vision Mamba (a few images: the scores of so small a
sample are noise, so only their form is checked; the docs record a larger run)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "examples" / "quantus_faithfulness.py"


def test_quantus_scores_our_explanations(capsys):
    pytest.importorskip("quantus", reason="quantus is not installed (make install installs it)")
    spec = importlib.util.spec_from_file_location("quantus_faithfulness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scores = module.main(["--images", "2", "--runs", "3", "--subset-size", "256"])
    assert list(scores) == ["attribution:unified", "attribution:s6", "random"]
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in scores.values())
    # a Pearson correlation over 3 subsets is exactly +-1 only by accident: the metric really compared
    assert len(set(scores.values())) == 3
    assert "faithfulness correlation" in capsys.readouterr().out
