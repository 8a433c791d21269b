"""Forward time per slab and peak memory of MaskSAM on LiteMedSAM (default: D=8, 256 px, N=16).

    python benchmarks/bench_model.py [--device cpu|cuda] [--slab-depth 8] [--num-queries 16] [--repeats 3]

Prints one JSON line per setting: recipe, precision, pruning, seconds per slab (median), slices per second,
achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) and its fraction of the measured 2-core limit
(132 GFLOP/s fp32, 376 bf16 on CPU), and peak memory (RSS on CPU, allocated on CUDA).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from masksam_core.inference.engine import cpu_supports_bf16, physical_cores
from masksam_core.model.backbones import load_litemedsam_backbone
from masksam_core.model.masksam import MaskSAM
from masksam_core.model.recipes import architecture_for_recipe

CPU_LIMIT_GFLOPS = {"fp32": 132.0, "bf16": 376.0}


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slab-depth", type=int, default=8)
    ap.add_argument("--num-queries", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipes", default="cpu,gpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(physical_cores())
    backbone = load_litemedsam_backbone()
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" or cpu_supports_bf16() else [])
    torch.manual_seed(0)
    slab = torch.rand(1, 1, args.slab_depth, 256, 256, device=device)
    for recipe in args.recipes.split(","):
        model = MaskSAM(backbone, architecture_for_recipe(recipe, 16, args.slab_depth, args.num_queries)).to(device).eval()
        for precision in precisions:
            for decode in (None, "nonempty"):
                amp = torch.bfloat16 if precision == "bf16" else None

                def run():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                                enabled=amp is not None):
                        out = model(slab, decode=decode)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return out

                out = run()  # warm-up
                flops = count_flops(run)
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
                sec = statistics.median(times)
                gflops = flops / sec / 1e9
                row = {
                    "bench": "model_forward", "device": device.type, "threads": torch.get_num_threads(),
                    "recipe": recipe, "precision": precision, "pruning": decode or "off",
                    "slab_depth": args.slab_depth, "num_queries": args.num_queries,
                    "decoded_queries": int(out["decoded"].sum()) // args.slab_depth,
                    "seconds_per_slab": round(sec, 3), "slices_per_second": round(args.slab_depth / sec, 3),
                    "gflop_per_slab": round(flops / 1e9, 1), "achieved_gflops": round(gflops, 1),
                    "peak_memory_mb": round(peak_memory_mb(device), 1),
                }
                if device.type == "cpu":
                    row["fraction_of_2core_limit"] = round(gflops / CPU_LIMIT_GFLOPS[precision], 3)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
