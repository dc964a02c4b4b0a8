"""What faster CPU kernels would give, and what they would change: the options this suite does not
take while its published tables stand, because each one changes floating-point results.

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py [--method ubteacher] [--pairs 8] [--home DIR]

1. The demo's frozen trunk (MobileNetV2 features of this suite's detector: BatchNorm folded into
   its convolutions, channels-last, 1x1 convolutions as matrix products) on 8 images of 144 x 176,
   against the same weights frozen into TorchScript with `optimize_for_inference` (oneDNN
   convolutions with bias and ReLU6 fused) and against bfloat16 autocast (AMX or AVX-512 BF16
   where the CPU has them). Prints each one's time, its ratio to this suite's trunk and its
   features' largest difference, relative to the largest feature value.
2. One training step of `--method` at the demo's sizes (from a short burn-in trained into --home)
   in float32 and under bfloat16 autocast, alternating, by process CPU time: the median of the
   pair ratios.

A change of the last bits grows over a cell's 1400 iterations into a different AP (docs/benchmarks.md
measured up to ~2 AP for one seed between two machines), so none of these is a drop-in speed-up:
adopting one means new cell keys and every table computed again.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import build

import torch


def cpu_ms(fn, repeats: int) -> float:
    """Median process CPU time of `fn()` in ms, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def trunk_kernels(repeats: int) -> None:
    from adapters.models.faster_rcnn import build_backbone

    from torchvision.models import mobilenet_v2
    from torchvision.models._utils import IntermediateLayerGetter

    trunk = build_backbone("mobilenet_v2_fpn", "none", 0, 32).eval().body.body  # the frozen MobileNetV2 stages
    # the same weights in torchvision's plain modules, which TorchScript can freeze (it folds the BN itself)
    plain = IntermediateLayerGetter(mobilenet_v2().features, dict(trunk.return_layers)).eval()
    plain.load_state_dict(trunk.state_dict(), strict=False)  # BatchNorm2d's num_batches_tracked is not in it
    x = torch.randn(8, 3, 144, 176).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = trunk(x)
        fused = torch.jit.optimize_for_inference(torch.jit.script(plain.to(memory_format=torch.channels_last)))

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return trunk(x)

        variants = {"this suite's trunk (float32)": lambda: trunk(x), "TorchScript, oneDNN fused": lambda: fused(x),
                    "bfloat16 autocast": bf16}
        base = None
        print("trunk, 8 images of 144 x 176:")
        for name, fn in variants.items():
            ms = cpu_ms(fn, repeats)
            base = base or ms
            out = fn()
            rel = max(((out[k].float() - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
            print(f"  {name:32s} {ms:7.1f} ms  {ms / base:5.3f}x  largest difference {rel:.1e} of the largest value")


def step_bf16(method: str, pairs: int, home: Path) -> None:
    overrides = [] if method == "supervised" else ["semi.burn_in=20"]
    cfg, adapter, batch, start = build(method, "demo", False, "cpu", home, overrides + ["solver.max_iter=60"])
    opt = torch.optim.SGD(adapter.student.parameters(), lr=1e-5)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = adapter.training_step(start, batch)
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()

    for bf16 in (False, True, False, True):
        step(bf16)
    f32, b16 = [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate who goes first
        for bf16 in order:
            t0 = time.process_time()
            step(bf16)
            (b16 if bf16 else f32).append(time.process_time() - t0)
    ratio = statistics.median(b / f for b, f in zip(b16, f32))
    print(f"{method} step: float32 {statistics.median(f32) * 1e3:.0f} ms, bfloat16 autocast "
          f"{statistics.median(b16) * 1e3:.0f} ms, median pair ratio {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ubteacher")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=8, help="timed calls per trunk variant")
    ap.add_argument("--home", default=None, help="BENCH_HOME for the data and the burn-in (default: a temp dir)")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, process CPU time")
    trunk_kernels(args.repeats)
    step_bf16(args.method, args.pairs, Path(args.home or tempfile.mkdtemp(prefix="bench-kernels-")))


if __name__ == "__main__":
    main()
