"""Per-kernel GPU profile of one decoding step (``model.step``), and its time inside a CUDA graph.

For each shape and batch size: a random-init bf16 model of the published shape on the triton
backend, a zero state, three warm-up steps, then five eager steps under ``torch.profiler``; prints
the number of kernels per step, their summed GPU kernel time per step and the heaviest kernels, then
the time per step of one step captured in a CUDA graph and replayed 200 times. Needs CUDA.

    python scripts/prof_decode.py --shapes mamba-130m,mamba-2.8b --batches 1,64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPES  # noqa: E402

from mamba_eval.models.releases import release_config  # noqa: E402


@torch.inference_mode()
def profile_step(model, batch: int, top: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile

    state = model.allocate_state(batch)
    ids = torch.randint(0, 50000, (batch,), device="cuda")
    for _ in range(3):
        model.step(ids, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            model.step(ids, state)
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / 5
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / 5
    print(f"  batch {batch}: {kernels:.0f} kernels per step, GPU kernel time {total / 1e3:.3f} ms per step (eager)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        if e.self_device_time_total > 0:
            print(f"    {e.count / 5:6.0f}x {e.self_device_time_total / 5:9.1f} us  {e.key[:90]}")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model.step(ids, state)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        model.step(ids, state)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    print(f"    one step in a CUDA graph: {(time.perf_counter() - start) / 200 * 1e3:.3f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mamba-130m,mamba-2.8b,mamba2-130m,mamba2-2.7b")
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("prof_decode.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    from mamba_eval.models.model import LanguageModel

    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    for shape in shapes:
        torch.manual_seed(0)
        model = LanguageModel(release_config(shape), backend="triton", device="cuda", dtype=torch.bfloat16)
        print(shape)
        for batch in (int(b) for b in args.batches.split(",")):
            profile_step(model, batch)
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
