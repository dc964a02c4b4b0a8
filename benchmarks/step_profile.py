"""Where a training step's time goes, per method, with and without LSM, and how far it is from the
machine's limit.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py [--methods supervised,ubteacher,softteacher,pseco,stac]
        [--preset demo] [--device cpu|cuda] [--iters 8] [--no-lsm] [--sites] [overrides ...]

For each method (from the start of its semi-supervised phase, as benchmarks/lsm_overhead.py) and
variant (without LSM, with `lsm.enabled=true`; Supervised has no LSM variant) it prints:
- the step time (median of --iters steps: losses, backward, SGD step, the teacher's EMA update);
- the time by phase, each phase's own time (nested phases are not counted twice): teacher
  inference, pseudo-labels (filtering and their statistics), student forward, losses, LSM (PIM/SD
  heads), backward, optimizer, EMA, and the rest of the method's step;
- host-synchronising ops per step: calls that make the host wait for the device (`nonzero`,
  `item`/`_local_scalar_dense`, boolean-mask indexing, `masked_select`, `unique`, `.cpu()`,
  `.tolist()`, `.numpy()`), counted by a dispatch mode over one step; on a CPU they cost nothing
  but they are the ones that stall a GPU. NMS kernel calls are counted apart (on a GPU each one
  syncs; the detector makes one per batch there, one per image on a CPU, where the kernel's
  cost grows with the candidates of a call). `--sites` lists where the syncs are called;
- achieved FLOP/s (matmul and convolution FLOPs of one step, counted by torch's FlopCounterMode,
  over the step time) against the peak of a large matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from _common import build, make_step, sync

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

METHODS = ("supervised", "ubteacher", "softteacher", "pseco", "stac")
PHASES = ("teacher inference", "pseudo-labels", "student forward", "losses", "lsm", "backward", "optimizer", "ema",
          "rest")
REPO = str(Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------------------- phases
class PhaseTimer:
    """Exclusive wall time per phase: a phase nested in another is subtracted from its parent."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = collections.Counter()
        self.stack: list[list] = []
        self.enabled = False

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        sync(self.device)
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            sync(self.device)
            _, start, children = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[name] += elapsed - children
            if self.stack:
                self.stack[-1][2] += elapsed

    def wrap(self, obj, attr: str, name: str) -> None:
        """Time `obj.attr(...)` calls as phase `name` (an instance attribute shadows the method)."""
        fn = getattr(obj, attr, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)


def instrument(adapter, timer: PhaseTimer) -> None:
    """Phases of a method's step, found by name: what every Faster R-CNN adapter calls."""
    module = sys.modules[type(adapter).__module__]
    for attr in ("filter_pseudo_labels", "pseudo_label_stats", "split_pseudo_labels"):
        if callable(getattr(module, attr, None)):
            fn = getattr(module, attr)

            def timed(*args, _fn=fn, **kwargs):
                with timer("pseudo-labels"):
                    return _fn(*args, **kwargs)

            setattr(module, attr, timed)
    timer.wrap(adapter, "pseudo_label", "teacher inference")
    if getattr(adapter, "teacher", None) is not None:
        timer.wrap(adapter.teacher, "detect", "teacher inference")
    student = adapter.student
    timer.wrap(student, "train_forward", "student forward")
    timer.wrap(student, "extract", "student forward")
    for obj, attr in ((getattr(student, "rpn", None), "compute_loss"), (getattr(student, "roi_heads", None), "losses"),
                      (getattr(student, "roi_heads", None), "classification_loss"),
                      (getattr(student, "roi_heads", None), "box_regression_loss")):
        if obj is not None:
            timer.wrap(obj, attr, "losses")
    if getattr(adapter, "pim", None) is not None:
        timer.wrap(adapter.pim, "weighted_terms", "lsm")


# ----------------------------------------------------------------------------- host syncs
SYNC_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "is_nonzero"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops whose result the host must wait for (data-dependent shapes or values)."""

    def __init__(self, sites: bool):
        super().__init__()
        self.counts = collections.Counter()
        self.nms = 0  # NMS kernel calls: a sync on a GPU (their output size), host work on a CPU
        self.sites = collections.Counter() if sites else None

    def note(self, name: str) -> None:
        self.counts[name] += 1
        if self.sites is not None:
            frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(REPO)
                      and not f.filename.startswith((f"{REPO}/benchmarks", f"{REPO}/.venv"))]
            where = f"{frames[-1].filename[len(REPO) + 1:]}:{frames[-1].lineno}" if frames else "?"
            self.sites[(name, where)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "nms":
            self.nms += 1
        elif name in SYNC_OPS:
            self.note(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.note(f"{name}[bool mask]")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) and \
                isinstance(args[0], torch.Tensor) and len(args) < 3:
            self.note("repeat_interleave (no output_size)")
        elif name in ("_to_copy", "copy_") and any(isinstance(a, torch.Tensor) and a.device.type != "cpu"
                                                    for a in args[:2]) and \
                (kwargs.get("device") == torch.device("cpu") or (name == "copy_" and args[0].device.type == "cpu")):
            self.note("device-to-host copy")
        return func(*args, **kwargs)


@contextmanager
def count_host_calls(counter: SyncCounter):
    """`.tolist()`, `.cpu()`, `.numpy()`: host reads that a CPU tensor answers without dispatching."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def make(name, fn):
        def counted(self, *args, **kwargs):
            counter.note(f".{name}()")
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, make(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


# ----------------------------------------------------------------------------- peak FLOP/s
def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul with this process's threads (the best of `repeats`)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- one variant
def profile(method: str, lsm: bool, args) -> dict:
    device = torch.device(args.device)
    cfg, adapter, batch, start = build(method, args.preset, lsm, args.device, Path(args.home), args.overrides)
    timer = PhaseTimer(device)
    instrument(adapter, timer)
    step = make_step(cfg, adapter, batch, start, device, ema=True, phases=timer)
    for _ in range(args.warmup):
        step()
    times, phase_times = [], []
    timer.enabled = True
    for _ in range(args.iters):
        timer.totals.clear()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        timed = dict(timer.totals)
        timed["rest"] = times[-1] - sum(timed.values())
        phase_times.append(timed)
    timer.enabled = False
    counter = SyncCounter(args.sites)
    with count_host_calls(counter), counter:
        step()
    flops = FlopCounterMode(display=False)
    with flops:
        step()
    step_time = statistics.median(times)
    return {
        "step": step_time,
        "phases": {p: statistics.median(t.get(p, 0.0) for t in phase_times) for p in PHASES},
        "syncs": dict(counter.counts),
        "nms": counter.nms,
        "sites": counter.sites,
        "flops": flops.get_total_flops(),
        "images": sum(len(v) for v in batch.values() if isinstance(v, list)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-lsm", action="store_true", help="only the variants without LSM")
    ap.add_argument("--sites", action="store_true", help="list where the host-synchronising calls are made")
    ap.add_argument("--home", default=None, help="BENCH_HOME for the data and the start cells (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    args.home = args.home or tempfile.mkdtemp(prefix="bench-profile-")
    device = torch.device(args.device)
    peak = matmul_peak(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"preset {args.preset}, device {device} ({name}); peak of a 2048^3 float32 matmul: "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for method in args.methods.split(","):
        for lsm in (False,) if args.no_lsm or method == "supervised" else (False, True):
            label = f"{method}{'+LSM' if lsm else ''}"
            try:
                r = profile(method, lsm, args)
            except Exception as exc:  # noqa: BLE001  (one method failing does not hide the others)
                print(f"{label}: failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            rows.append((label, r))
            ph = ", ".join(f"{p} {r['phases'][p] * 1000:.1f}" for p in PHASES if r["phases"][p] > 5e-5)
            syncs = ", ".join(f"{k} {v}" for k, v in sorted(r["syncs"].items(), key=lambda kv: -kv[1]))
            achieved = r["flops"] / r["step"]
            print(f"\n{label}: step {r['step'] * 1000:.1f} ms ({r['images']} images)\n"
                  f"  phases (ms): {ph}\n"
                  f"  host syncs per step: {sum(r['syncs'].values())} ({syncs or 'none'}); NMS kernel calls {r['nms']}\n"
                  f"  FLOPs per step {r['flops'] / 1e9:.2f} G: {achieved / 1e9:.2f} GFLOP/s achieved, "
                  f"{100 * achieved / peak:.1f}% of the matmul peak", flush=True)
            if args.sites and r["sites"]:
                for (op, where), n in r["sites"].most_common(25):
                    print(f"    {n:5d}  {op:28s} {where}")
    print("\nmethod             step ms   host syncs   NMS calls   GFLOP/s   % of peak")
    for label, r in rows:
        achieved = r["flops"] / r["step"]
        print(f"{label:18s} {r['step'] * 1000:8.1f}   {sum(r['syncs'].values()):10d}   {r['nms']:9d}   "
              f"{achieved / 1e9:7.2f}   {100 * achieved / peak:8.1f}")


if __name__ == "__main__":
    main()
