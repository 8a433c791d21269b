"""Training speed and memory: seconds per step of each recipe on the default LiteMedSAM configuration.

    python benchmarks/bench_train.py [--steps 5] [--slab-depth 8] [--num-queries 16] [--device cpu|cuda]

Builds a small synthetic dataset, then times ``python -m masksam_core.train`` steps for: the CPU recipe's
prompt-generator stage and decoder stage (cached features), and the GPU recipe (full network with encoder
adapters). One JSON line each: seconds per step (median of the logged steps' wall-clock spacing), slices per
second and peak RSS (or CUDA memory).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))


def run(args, label, extra, work):
    from synthetic_data import make_nnunet_dataset

    data = work / "data"
    if not data.exists():
        make_nnunet_dataset(data, n_cases=2, size=(160, 140, 24), spacing=(2.0, 2.0, 3.0))
    out = work / label
    cmd = [sys.executable, "-m", "masksam_core.train", "--data", str(data), "--out", str(out), "--classes",
           "liver,spleen,aorta", "--slab-depth", str(args.slab_depth), "--num-queries", str(args.num_queries),
           "--spacing", "2,2,3", "--device", args.device, "--progress", "json", "--feature-copies", "1",
           "--steps-per-epoch", "1000", "--cache-dir", str(work / "cache"),
           # steps only, comparable with earlier runs: no validation, dense auxiliary steps (train's defaults
           # would add a held-out case and point-sampled prompt steps)
           "--val-fraction", "0", "--point-aux-steps", "0"] + extra
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps = []
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("stage") == "train":
            stamps.append(time.perf_counter())
    proc.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode:
        print(json.dumps({"recipe": label, "error": proc.stderr.read().strip().splitlines()[-1:]}))
        return
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    sec = gaps[len(gaps) // 2] if gaps else float("nan")
    print(json.dumps({"bench": "train", "recipe": label, "slab_depth": args.slab_depth,
                      "num_queries": args.num_queries, "seconds_per_step": round(sec, 2),
                      "slices_per_second": round(args.slab_depth / sec, 3), "steps": len(stamps),
                      "total_wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb_so_far": round(peak)}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--slab-depth", type=int, default=8)
    ap.add_argument("--num-queries", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="masksam-bench-train-"))
    n = args.steps
    # prompt_fraction 0.99 -> every step but the last is the prompt-generator stage (train refuses 1.0: the decoder
    # needs a step); 0.0 -> every step decodes. The median step time is printed.
    for label, frac in (("cpu-prompt-stage", 0.99), ("cpu-decoder-stage", 0.0)):
        cfg = work / f"{label}.json"
        cfg.write_text(json.dumps({"prompt_fraction": frac}))
        run(args, label, ["--recipe", "cpu", "--max-steps", str(n), "--config", str(cfg)], work)
    run(args, "gpu-recipe", ["--recipe", "gpu", "--max-steps", str(n)], work)


if __name__ == "__main__":
    main()
