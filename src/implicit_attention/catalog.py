"""What the library offers, by name, importable without torch.

The command line builds its parser from these names, so that ``implicit-attention --help`` starts
without importing torch or transformers. Each tuple is the one source of its names: the modules
that implement them import them from here (:data:`VARIANTS` is the union of what the registered
architectures offer; ``tests/test_catalog.py`` checks it against the registry).
"""

from __future__ import annotations

#: Methods built on the implicit attention matrices (they honour ``variant``).
MATRIX_METHODS: tuple[str, ...] = ("raw", "rollout", "attribution", "signed_attribution", "paper")
#: Methods that only use the model's gradients or outputs.
BASELINE_METHODS: tuple[str, ...] = ("random", "grad_x_input", "integrated_gradients", "occlusion", "smoothgrad",
                                     "lrp")
#: Every explanation method.
METHODS: tuple[str, ...] = MATRIX_METHODS + BASELINE_METHODS

#: The options of each method that the command line sets with ``--option NAME=VALUE`` (those with a
#: flag of their own, ``--variant``, ``--layers``, ``--aggregate``, ``--dtype``, ``--no-check``, aside);
#: ``tests/test_catalog.py`` checks them against the method classes.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "raw": (), "rollout": (), "attribution": ("signed",), "signed_attribution": (), "paper": ("start_layer",),
    "random": ("seed",), "grad_x_input": (), "integrated_gradients": ("steps", "baseline"),
    "occlusion": ("window", "replacement"), "smoothgrad": ("samples", "noise", "seed"), "lrp": (),
}


def check_method_options(method: str, options: dict) -> None:
    """Raise ``ValueError`` for options that ``method`` does not take (see :data:`METHOD_OPTIONS`)."""
    wrong = sorted(set(options) - set(METHOD_OPTIONS.get(method, ())))
    if wrong:
        takes = ", ".join(METHOD_OPTIONS.get(method, ())) or "no options of its own"
        raise ValueError(f"method {method!r} does not take {', '.join(wrong)}; it takes {takes}")


#: Channel aggregations of the per-channel matrices: signed mean, mean of ``|A|``, mean of ``relu(A)``.
AGGREGATES: tuple[str, ...] = ("mean", "abs", "pos")

#: Every formulation a registered architecture offers; ``unified`` (the exact one) first.
VARIANTS: tuple[str, ...] = ("unified", "recurrence", "rglru", "no_conv", "no_gate", "s6", "no_act", "ssd",
                             "no_shift", "wkv", "mlstm")

#: Scores of a target that the text tools explain: the label contrast, the logit, the log-probability.
SCORES: tuple[str, ...] = ("contrast", "logit", "log_prob")

#: Compute dtypes by name.
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")

__all__ = ["AGGREGATES", "BASELINE_METHODS", "COMPUTE_DTYPES", "MATRIX_METHODS", "METHODS", "METHOD_OPTIONS",
           "check_method_options", "SCORES", "VARIANTS"]
