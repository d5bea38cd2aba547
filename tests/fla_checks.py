"""Measurements of the flash-linear-attention adapters, run by tests/test_fla.py in a subprocess.

``fla`` runs its recurrences in Triton kernels: on a CUDA machine natively, elsewhere in Triton's
interpreter (``TRITON_INTERPRET=1``, which must be set before the kernels are defined, hence the
subprocess). The interpreter has no driver for Triton's autotuner to time configurations with, so
on a CPU a stand-in driver times every configuration as 0 s (the first one is used: the same numbers);
on CUDA the first configuration is used too (``--autotune`` times them all, which takes minutes).
The interpreter cannot run ``fla``'s chunked kernels (``chunk`` mode, which the layers pick for
gradients and for padded batches), so those checks run on CUDA only.

    python tests/fla_checks.py            # prints one JSON object of measurements
    python tests/fla_checks.py --jobs 8   # each group of checks in its own process (faster on CUDA)
"""

from __future__ import annotations

import json
import os
import sys

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreter_driver() -> None:
    """Give Triton's autotuner a driver under the interpreter (CPU): every configuration takes 0 s."""
    from triton.runtime import driver

    class InterpreterDriver:
        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kwargs):
                kernel_call()
                return [0.0] * len(quantiles) if quantiles else 0.0
            return bench

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (8, 0)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    driver.set_active(InterpreterDriver())


def _first_config_only() -> None:
    """Make every Triton kernel defined from now on use the first of its autotuning configurations, as
    under the interpreter: these checks measure exactness, not speed, and compiling and timing every
    configuration of fla's kernels takes minutes on CUDA (``--autotune`` keeps them all)."""
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner, "_first_config_only", False):
        return
    original = Autotuner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.configs = self.configs[:1]

    Autotuner.__init__ = init
    Autotuner._first_config_only = True


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter perturbed (convs, norms, decays and their biases too), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))
    return module.eval()


def tiny_gated_deltanet(seed: int = 0):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(seed)
    config = GatedDeltaNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, num_v_heads=4, head_dim=8,
                                 expand_v=1, vocab_size=50, use_short_conv=True, conv_size=4, fuse_norm=False,
                                 fuse_cross_entropy=False)
    return randomised(GatedDeltaNetForCausalLM(config), seed)


def tiny_deltanet(seed: int = 0):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    torch.manual_seed(seed)
    config = DeltaNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=50, use_short_conv=True,
                            conv_size=4, use_gate=True, fuse_norm=False, fuse_cross_entropy=False)
    return randomised(DeltaNetForCausalLM(config), seed)


def tiny_gla(seed: int = 0, **overrides):
    from fla.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1, vocab_size=50,
                    fuse_norm=False, fuse_cross_entropy=False)
    return randomised(GLAForCausalLM(GLAConfig(**{**settings, **overrides})), seed)


def tiny_retnet(seed: int = 0, **overrides):
    from fla.models import RetNetConfig, RetNetForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, expand_k=1, expand_v=1, vocab_size=50,
                    fuse_norm=False, fuse_cross_entropy=False)
    return randomised(RetNetForCausalLM(RetNetConfig(**{**settings, **overrides})), seed)


def tiny_hgrn(seed: int = 0, **overrides):
    from fla.models import HGRNConfig, HGRNForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=3, vocab_size=50, fuse_norm=False, fuse_cross_entropy=False)
    return randomised(HGRNForCausalLM(HGRNConfig(**{**settings, **overrides})), seed)


def tiny_hgrn2(seed: int = 0, **overrides):
    from fla.models import HGRN2Config, HGRN2ForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=3, expand_ratio=8, vocab_size=50, fuse_norm=False,
                    fuse_cross_entropy=False)
    return randomised(HGRN2ForCausalLM(HGRN2Config(**{**settings, **overrides})), seed)


def tiny_gsa(seed: int = 0, **overrides):
    from fla.models import GSAConfig, GSAForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=50, fuse_norm=False,
                    fuse_cross_entropy=False)
    return randomised(GSAForCausalLM(GSAConfig(**{**settings, **overrides})), seed)


def tiny_rwkv6(seed: int = 0, **overrides):
    from fla.models import RWKV6Config, RWKV6ForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, expand_k=0.5, expand_v=1, vocab_size=50,
                    proj_low_rank_dim=8, gate_low_rank_dim=16, fuse_norm=False, fuse_cross_entropy=False)
    return randomised(RWKV6ForCausalLM(RWKV6Config(**{**settings, **overrides})), seed)


def tiny_rwkv7(seed: int = 0, **overrides):
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=3, head_dim=8, vocab_size=50, decay_low_rank_dim=8,
                    gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, fuse_norm=False,
                    fuse_cross_entropy=False)
    return randomised(RWKV7ForCausalLM(RWKV7Config(**{**settings, **overrides})), seed)


def exact_variants(model) -> set[str]:
    """The exact variants every layer of ``model`` offers."""
    from implicit_attention.architectures import find_layers

    layers = find_layers(model)
    return set.intersection(*({v for v in arch.variants if arch.is_exact(v)} for _, _, arch in layers))


def decomposition_errors(model, ids, mask=None, variants=("unified", "no_conv")) -> dict:
    """Each exact variant's largest relative reconstruction error over the layers, against fla's forward."""
    import implicit_attention as ia

    return {variant: max(layer.error for layer in ia.decompose(model, ids, mask, variant=variant).layers)
            for variant in variants}


def attribution_against_blocks(model, ids) -> float:
    """The largest relative difference between each layer's attribution map from a gradient at the module's
    output (carried back through its fused projection inside) and the same rule on the channel blocks with
    that gradient carried back to the operator's output here (``grad @ W``, as ``y = o W^T``)."""
    import implicit_attention as ia

    worst = 0.0
    for layer in ia.decompose(model, ids).layers:
        grad = torch.randn(layer.output.shape, dtype=layer.dtype, generator=torch.Generator().manual_seed(layer.index))
        grad = grad.to(layer.projection.device)
        at_operator = (grad @ layer.projection).to(layer.values.device)
        expected = layer.attribution_by_blocks(layer.matrix_gradient(at_operator))
        worst = max(worst, float((layer.attribution(grad) - expected).abs().max() / expected.abs().max()))
    return worst


def same_maps_as_olmo_hybrid(seed: int = 0) -> dict:
    """One fla ``GatedDeltaNet`` layer and ``transformers``' ``OlmoHybridGatedDeltaNet`` (a port of it) with the
    same weights: the largest relative difference of their per-channel matrices, and of their outputs."""
    from fla.layers import GatedDeltaNet
    from transformers import OlmoHybridConfig
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridGatedDeltaNet

    from implicit_attention.architectures.fla.factors import fla_gated_deltanet_inputs
    from implicit_attention.architectures.gated_deltanet.factors import delta_factors
    from implicit_attention.architectures.gated_deltanet.operator import delta_block

    torch.manual_seed(seed)
    ours = randomised(GatedDeltaNet(hidden_size=32, num_heads=2, num_v_heads=4, head_dim=8, expand_v=1,
                                    use_short_conv=True, conv_size=4, layer_idx=0), seed)
    config = OlmoHybridConfig(hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                              linear_value_head_dim=8, linear_conv_kernel_dim=4, num_hidden_layers=2, linear_allow_neg_eigval=False,
                              layer_types=["linear_attention", "full_attention"], num_attention_heads=2,
                              rms_norm_eps=1e-5)
    theirs = OlmoHybridGatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"):
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
        theirs.conv1d.weight.copy_(torch.cat([ours.q_conv1d.weight, ours.k_conv1d.weight, ours.v_conv1d.weight]))
        theirs.A_log.copy_(ours.A_log)
        theirs.dt_bias.copy_(ours.dt_bias)
        theirs.o_norm.weight.copy_(ours.o_norm.weight)
    hidden = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(seed))
    maps = []
    for module, read in ((ours, fla_gated_deltanet_inputs), (theirs, None)):
        kwargs = {"read_inputs": read} if read is not None else {}
        factors = delta_factors(module, hidden, None, torch.float64, **kwargs)
        maps.append(delta_block(factors, slice(None), "unified")[0])
    result = {"maps": float((maps[0] - maps[1]).abs().max() / maps[1].abs().max())}
    if ON_CUDA:  # transformers runs OLMo-Hybrid with fla's chunked kernel when fla is installed
        # at 13 tokens fla's layer picks its recurrent kernel in eval mode, at 80 its chunked one
        for key, length in (("outputs", 13), ("outputs_long", 80)):
            hidden = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(seed)).cuda()
            with torch.no_grad():
                out_ours = ours.cuda()(hidden)[0]
                out_theirs = theirs.cuda()(hidden)
                out_theirs = out_theirs[0] if isinstance(out_theirs, tuple) else out_theirs
            result[key] = float((out_ours - out_theirs).abs().max() / out_theirs.abs().max())
    return result


def load_model_imports_fla(model, folder: str) -> str:
    """Save ``model`` (with the zoo's tokenizer) and load it with ``ia.load_model`` in a fresh process, where
    ``fla`` is not imported yet: the class it loaded."""
    import shutil
    import subprocess

    model.save_pretrained(folder)
    zoo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo")
    shutil.copy(os.path.join(zoo, "tokenizer.json"), folder)
    shutil.copy(os.path.join(zoo, "mamba", "tokenizer_config.json"), folder)
    script = ("import sys; sys.path.insert(0, %r); from implicit_attention.loading import load_model; "
              "print(type(load_model(%r).model).__name__)") % (sys.path[0], folder)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-500:]


def _padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """Row 1 left-padded by four tokens (fla unpads such batches and runs its chunked kernels)."""
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return mask


def _found(**models) -> dict:
    from implicit_attention.architectures import find_layers

    return {"found": {name: [type(m).__name__ for _, m, _ in find_layers(model)]
                      for name, model in models.items()}}


def delta_rule(ids: torch.Tensor) -> dict:
    """Gated DeltaNet and DeltaNet; the same maps as OLMo-Hybrid's port; loading an fla checkpoint."""
    import tempfile

    import implicit_attention as ia

    gdn, deltanet = tiny_gated_deltanet().to(ids.device), tiny_deltanet().to(ids.device)
    results = {"gated_deltanet": decomposition_errors(gdn, ids), "deltanet": decomposition_errors(deltanet, ids),
               "olmo_hybrid": same_maps_as_olmo_hybrid(), **_found(gated_deltanet=gdn, deltanet=deltanet)}
    with tempfile.TemporaryDirectory() as folder:
        results["load_model"] = load_model_imports_fla(tiny_gated_deltanet().cpu(), folder)
    if ON_CUDA:  # chunked kernels: padded batches (fla unpads them) and gradients
        mask = _padding_mask(ids)
        results["gated_deltanet_padded"] = decomposition_errors(gdn, ids, mask)
        results["deltanet_padded"] = decomposition_errors(deltanet, ids, mask)
        # the padded row explained as the same text alone (fla ran the batch unpadded: to_batch put it back);
        # the gradient runs fla's chunked backward kernels
        for name, model in (("", gdn), ("deltanet_", deltanet)):
            for method in ("attribution", "rollout"):
                try:
                    batch = ia.explain(model, ids, mask, method=method)[1, 4:]
                    alone = ia.explain(model, ids[1:, 4:], method=method)[0]
                except RuntimeError as error:
                    if "Triton" not in str(error):
                        raise
                    # fla refuses some backward kernels on some Triton/GPU pairs (its issue #640: the gated
                    # delta rule on Hopper with Triton < 3.7.1): recorded, not hidden
                    results[f"{name}{method}_padded_vs_alone"] = f"refused by fla: {str(error).splitlines()[0]}"
                    continue
                results[f"{name}{method}_padded_vs_alone"] = float((batch - alone).abs().max() / alone.abs().max())
    return results


def gla(ids: torch.Tensor) -> dict:
    """GLA with fla's defaults (fused RMS norm and swish gate), and with short convs, shared key heads, a
    clamped decay and the unfused norm with its own gate."""
    default = tiny_gla(fuse_norm=True).to(ids.device)
    variant = tiny_gla(seed=1, use_short_conv=True, num_kv_heads=1, clamp_min=-0.2, fuse_norm=False).to(ids.device)
    results = {"gla": decomposition_errors(default, ids, variants=("unified",)),
               "gla_conv_gqa": decomposition_errors(variant, ids, variants=("unified",)), **_found(gla=default)}
    if ON_CUDA:
        results["gla_padded"] = decomposition_errors(variant, ids, _padding_mask(ids), variants=("unified",))
    return results


def retnet(ids: torch.Tensor) -> dict:
    default, gqa = tiny_retnet().to(ids.device), tiny_retnet(seed=1, num_kv_heads=1, fuse_norm=True).to(ids.device)
    results = {"retnet": decomposition_errors(default, ids, variants=("unified",)),
               "retnet_gqa": decomposition_errors(gqa, ids, variants=("unified",)), **_found(retnet=default)}
    if ON_CUDA:
        results["retnet_padded"] = decomposition_errors(gqa, ids, _padding_mask(ids), variants=("unified",))
    return results


def hgrn(ids: torch.Tensor) -> dict:
    """HGRN: three layers (the lower bound applies from the second), and with short convolutions."""
    default, conv = tiny_hgrn().to(ids.device), tiny_hgrn(seed=1, use_short_conv=True).to(ids.device)
    results = {"hgrn": decomposition_errors(default, ids, variants=("unified",)),
               "hgrn_conv": decomposition_errors(conv, ids, variants=("unified",)), **_found(hgrn=default)}
    if ON_CUDA:
        results["hgrn_padded"] = decomposition_errors(conv, ids, _padding_mask(ids), variants=("unified",))
    return results


def hgrn2(ids: torch.Tensor) -> dict:
    """HGRN2: three layers (the lower bounds reach the second and third), and with short convolutions; norm
    and output projection fused in one call, decomposed through o_proj."""
    default, conv = tiny_hgrn2().to(ids.device), tiny_hgrn2(seed=1, use_short_conv=True).to(ids.device)
    results = {"hgrn2": decomposition_errors(default, ids, variants=("unified",)),
               "hgrn2_conv": decomposition_errors(conv, ids, variants=("unified",)),
               "hgrn2_attribution_vs_blocks": attribution_against_blocks(default, ids), **_found(hgrn2=default)}
    if ON_CUDA:
        results["hgrn2_padded"] = decomposition_errors(conv, ids, _padding_mask(ids), variants=("unified",))
    return results


def gsa(ids: torch.Tensor) -> dict:
    """GSA: fla's defaults (swish feature map, slots = key width), and one key head for two query heads with
    short convolutions and fewer slots."""
    default = tiny_gsa().to(ids.device)
    gqa = tiny_gsa(seed=1, num_kv_heads=1, use_short_conv=True, num_slots=6).to(ids.device)
    results = {"gsa": decomposition_errors(default, ids, variants=("unified",)),
               "gsa_gqa_conv": decomposition_errors(gqa, ids, variants=("unified",)), **_found(gsa=default)}
    if ON_CUDA:
        results["gsa_padded"] = decomposition_errors(gqa, ids, _padding_mask(ids), variants=("unified",))
    return results


def rwkv6(ids: torch.Tensor) -> dict:
    model = tiny_rwkv6().to(ids.device)
    results = {"rwkv6": decomposition_errors(model, ids, variants=sorted(exact_variants(model))),
               **_found(rwkv6=model)}
    if ON_CUDA:
        results["rwkv6_padded"] = decomposition_errors(model, ids, _padding_mask(ids), variants=("unified",))
    return results


def rwkv7(ids: torch.Tensor) -> dict:
    model = tiny_rwkv7().to(ids.device)  # three layers: the value residual reaches the second and third
    results = {"rwkv7": decomposition_errors(model, ids, variants=sorted(exact_variants(model))),
               **_found(rwkv7=model)}
    if ON_CUDA:
        results["rwkv7_padded"] = decomposition_errors(model, ids, _padding_mask(ids), variants=("unified",))
    return results


#: Independent groups of checks: each builds its own models, so groups can run in separate processes
#: (on CUDA most of the time goes to compiling and autotuning Triton kernels, one CPU core per process).
GROUPS = {"delta_rule": delta_rule, "gla": gla, "retnet": retnet, "hgrn": hgrn, "hgrn2": hgrn2, "gsa": gsa,
          "rwkv6": rwkv6, "rwkv7": rwkv7}


def measurements(groups=tuple(GROUPS), autotune: bool = False) -> dict:
    """Every group's measurements, merged into one dict (the ``found`` lists of all groups together)."""
    if not ON_CUDA:
        _interpreter_driver()
    elif not autotune:
        _first_config_only()
    ids = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(1))
    ids = ids.to("cuda" if ON_CUDA else "cpu")
    results: dict = {"device": str(ids.device.type), "found": {}}
    for name in groups:
        merge(results, GROUPS[name](ids))
    return results


def merge(results: dict, part: dict) -> None:
    """Add one group's measurements to ``results`` (``found`` and ``failed_groups`` are merged, not replaced)."""
    for key in ("found", "failed_groups"):
        if key in part:
            results.setdefault(key, {}).update(part.pop(key))
    results.update(part)


def measurements_in_parallel(jobs: int, autotune: bool = False, partial: str | None = None) -> dict:
    """``measurements()`` with the groups spread over ``jobs`` processes at once; each group's own JSON is
    also written to ``partial/<group>.json`` as it finishes (kept if the whole run is stopped)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> dict:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--groups", name,
                               *(["--autotune"] if autotune else [])], capture_output=True, text=True)
        if done.returncode:  # one group's failure does not hide the others' measurements
            part = {"failed_groups": {name: done.stderr[-3000:]}}
        else:
            part = json.loads(done.stdout.strip().splitlines()[-1])
        if partial:
            os.makedirs(partial, exist_ok=True)
            with open(os.path.join(partial, f"{name}.json"), "w") as file:
                json.dump(part, file)
        return part

    results: dict = {"found": {}}
    with ThreadPoolExecutor(jobs) as pool:
        for part in pool.map(run, GROUPS):
            merge(results, part)
    return results


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    parser = argparse.ArgumentParser(description="Measure the fla adapters; print one JSON object.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument("--jobs", type=int, default=1, help="groups run at once, each in its own process")
    parser.add_argument("--autotune", action="store_true",
                        help="on CUDA, let Triton time every configuration of fla's kernels (slow to compile)")
    parser.add_argument("--partial", default=None, help="with --jobs: also write each group's JSON here")
    args = parser.parse_args()
    chosen = [g.strip() for g in args.groups.split(",") if g.strip()]
    if unknown := [g for g in chosen if g not in GROUPS]:
        parser.error(f"unknown group(s) {', '.join(unknown)}")
    if args.jobs > 1:
        print(json.dumps(measurements_in_parallel(args.jobs, args.autotune, args.partial)))
    else:
        print(json.dumps(measurements(chosen, args.autotune)))
