"""Profile the fast signed-mean map of one Mamba-130M-shaped layer (top kernels by device time).

    python benchmarks/profile_mamba_maps.py [--length 2048]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_mamba, wherever this is run from
from bench_mamba import build_model, layer_inputs  # noqa: E402

from implicit_attention.architectures.mamba import MambaLayerDecomposition, mamba_factors  # noqa: E402


def main(length: int = 2048) -> None:
    class Args:
        vocab, hidden, inner, state, layers = 1024, 768, 1536, 16, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(Args, device, torch.float32)
    mixer = model.backbone.layers[0].mixer
    hidden = layer_inputs(model, length, device, torch.float32)
    zeros = torch.zeros(1, length, Args.inner, device=device)

    def run():
        f = mamba_factors(mixer, hidden, None, torch.float32)
        return MambaLayerDecomposition(f, variant="unified", index=0, name="l0", output=zeros).aggregate("mean")

    with torch.no_grad():
        run()
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        run()
        torch.cuda.synchronize() if device.type == "cuda" else None
        print(f"one layer, L={length}: {1000 * (time.perf_counter() - start):.1f} ms")
        f = mamba_factors(mixer, hidden, None, torch.float32)
        print("dt range", float(f.dt.min()), float(f.dt.max()), "max|A|", float(f.A.abs().max()))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            run()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048, help="tokens L (default: %(default)s)")
    main(parser.parse_args().length)
