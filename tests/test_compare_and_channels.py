"""``explain --compare`` (other methods of the same target, printed and in the report) and ``--channels``
(one layer's own channel matrices in the report): values, names and clear errors."""

from __future__ import annotations

import json
import re

import pytest

import implicit_attention as ia
from implicit_attention.cli import main


def test_compare_prints_and_saves_each_method(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["explain", "a dull mess", "--compare", "rollout:s6,random", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    loaded = ia.load_model()
    expected = ia.explain_texts(loaded, ["a dull mess"], method="rollout", variant="s6")[0]
    line = next(line for line in printed.splitlines() if line.strip().startswith("rollout:s6: "))
    shown = [float(v) for v in re.findall(r"[\[(]([+-]\d\.\d\d)[\])]", line)]
    normalized = expected.normalized().tolist()
    assert shown == pytest.approx([round(v, 2) for v in normalized], abs=0.011)
    assert any(line.strip().startswith("random: ") for line in printed.splitlines())
    saved = json.loads((out / "explanation.json").read_text())["examples"][0]["alternatives"]
    assert list(saved) == ["rollout:s6", "random"]
    assert saved["rollout:s6"]["relevance"] == pytest.approx(expected.relevance.tolist(), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--compare", "grad_x_input:s6"], "the grad_x_input baseline has no variant"),
    (["--compare", "nope"], "unknown method 'nope' in --compare"),
    (["--channels", "3"], "--channels draws channels in the report: add --out DIR"),
    (["--channels", "256", "--out", "{tmp}"], "--channels 256 is out of range: layer 3 (backbone.layers.3.mixer) has "
                                             "256 channels"),
    (["--channels", "1", "--channel-layer", "4", "--out", "{tmp}"], "--channel-layer 4 is out of range: 4 layer(s)"),
])
def test_bad_compare_and_channels_are_one_clear_line(args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path / "r")) for a in args]
    assert main(["explain", "a dull mess", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()                              # nothing half-written


def test_channels_of_a_chosen_layer_are_its_channel_matrices(tmp_path):
    out = tmp_path / "r"
    assert main(["explain", "a dull mess", "--channels", "0,7", "--channel-layer", "1", "--out", str(out)]) == 0
    info = json.loads((out / "explanation.json").read_text())
    drawn = sorted(img["aggregate"] for img in info["examples"][0]["images"] if img["layer"] == 1)
    assert drawn == ["abs", "channel 0", "channel 7", "mean"]
    assert (out / "matrix_ex0_layer1_channel-7.png").is_file()
    assert all(not img["aggregate"].startswith("channel") for img in info["examples"][0]["images"] if img["layer"] != 1)


def test_a_baseline_prints_no_variant(tmp_path, capsys):
    assert main(["explain", "a dull mess", "--method", "grad_x_input"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("method: "))
    assert line == "method: grad_x_input"
    assert main(["explain", "a dull mess", "--method", "grad_x_input", "--variant", "s6", "--out",
                 str(tmp_path / "r")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("method: "))
    assert line == "method: grad_x_input   variant of the report's matrices: s6"
    assert main(["explain", "a dull mess", "--method", "rollout", "--variant", "s6"]) == 0
    assert "method: rollout   variant: s6" in capsys.readouterr().out
