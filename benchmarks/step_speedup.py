"""Step time of this checkout against an older one (a git worktree), paired on the same batches.

    git worktree add /tmp/speed_base <commit>
    OMP_NUM_THREADS=1 python benchmarks/step_speedup.py --base /tmp/speed_base
        [--methods supervised,ubteacher,ubteacher+lsm] [--preset demo] [--iters 15] [--clock wall|cpu]

For each method two worker processes run the same setup code (benchmarks/_common.py of this
checkout) against their own tree's `adapters` and `bench`: the old one and this one. This checkout's
worker builds the starting point once (a trained burn-in or teacher, in --home) and hands its
weights and batch to the old one, so both run the same step on the same inputs with the same
random state. A step is the method's losses, backward, an SGD step and the teacher's EMA update.
The workers step alternately (old first in odd pairs, new first in even ones), so a slow spell
of a shared machine hits both alike; the result is the median of the per-pair ratios new / old.
This checkout's worker also times the forward passes of the student's frozen parts (the demo's
ImageNet trunk) and of the teacher's modules of the same names; "without it / old" is the new step
less that time over the old step: the ratio a trunk that cost nothing would give, the most any
faster trunk kernel can reach. The first step's loss terms of the two trees are compared as a
check that both compute the same thing (they agree to float rounding where the new code only
reorganises the arithmetic). The old tree drops settings it does not know: where the preset uses
one it lacks, give this tree the old behaviour, or the two steps do different work (against
4a1edde, the demo's focal RoI loss and aligned RoIAlign: `model.cls_loss=ce
model.pooler_aligned=false`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- worker side
def frozen_names(model) -> list[str]:
    """Names of the largest submodules whose parameters are all frozen (the demo's trunk)."""
    names = []

    def visit(prefix: str, module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            names.append(prefix)
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return names


def time_forwards(models: list, names: list[str], clock) -> list[float]:
    """A one-element total that grows by the time of every forward of those modules of `models`."""
    total = [0.0]
    for model in models:
        for name in names:
            module = model.get_submodule(name)
            module.register_forward_pre_hook(lambda m, i: total.__setitem__(0, total[0] - clock()))
            module.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + clock()))
    return total


def worker(args) -> None:
    """Build (or load) the starting point against the tree in BENCH_CODE_ROOT, then answer
    "step" lines with the step's time in seconds (and the losses of the first step)."""
    sys.path.insert(0, str(HERE.parent))
    from _common import build, make_step

    import torch

    import adapters

    root = Path(os.environ["BENCH_CODE_ROOT"]).resolve()
    if not Path(adapters.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"worker for {root} imported adapters from {adapters.__file__}")
    method, lsm = args.method.split("+")[0], args.method.endswith("+lsm")
    state_file = Path(args.state)
    device = torch.device(args.device)
    if args.role == "new":
        cfg, adapter, batch, start = build(method, args.preset, lsm, args.device, Path(args.home), args.overrides)
        torch.save({"config": cfg.model_dump(mode="json"), "adapter": adapter.state_dict(), "batch": batch,
                    "start": start, "num_classes": adapter.num_classes}, state_file)
    else:  # the old tree: the new tree's settings, weights and batch (its own presets and data may differ)
        from adapters.base import get_adapter
        from core.config import RunConfig, load_config

        saved = torch.load(state_file, map_location="cpu", weights_only=False)
        own = load_config(args.preset, [f"device={args.device}"], method=method).model_dump(mode="json")
        cfg = RunConfig.model_validate(_overlay(own, saved["config"]))
        adapter = get_adapter(method)(cfg, saved["num_classes"], device)
        adapter.load_state_dict(saved["adapter"])
        batch, start = saved["batch"], saved["start"]
    step = make_step(cfg, adapter, batch, start, device, ema=True)
    from bench.worker import seed_everything

    seed_everything(cfg.seed)  # the same draws in both trees
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    frozen = [0.0]
    if args.role == "new":  # the old tree may name its modules otherwise
        teacher = getattr(adapter, "teacher", None)
        frozen = time_forwards([adapter.student] + ([teacher] if teacher is not None else []),
                               frozen_names(adapter.student), clock)
    print(json.dumps({"ready": True}), flush=True)
    first = True
    for line in sys.stdin:
        if line.strip() != "step":
            break
        frozen[0] = 0.0
        t0 = clock()
        out = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = clock() - t0
        reply = {"time": dt, "frozen": frozen[0]}
        if first:
            reply["losses"] = {k: float(v.detach()) for k, v in out.losses.items()}
            first = False
        print(json.dumps(reply), flush=True)


def _overlay(own: dict, other: dict) -> dict:
    """`own` with every value `other` also has (settings the old tree does not know are dropped)."""
    out = dict(own)
    for k, v in other.items():
        if k in own:
            out[k] = _overlay(own[k], v) if isinstance(v, dict) and isinstance(own[k], dict) else v
    return out


# ----------------------------------------------------------------------------- driver side
def start_worker(root: Path, role: str, method: str, state: Path, args) -> subprocess.Popen:
    env = {**os.environ, "BENCH_CODE_ROOT": str(root), "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(HERE), "--worker", "--role", role, "--method", method, "--state", str(state),
           "--preset", args.preset, "--device", args.device, "--home", args.home, "--clock", args.clock,
           *args.overrides]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))


def ask(proc: subprocess.Popen, what: str | None = None) -> dict:
    if what is not None:
        proc.stdin.write(what + "\n")
        proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {proc.wait()}")
        if line.startswith("{"):
            return json.loads(line)


def compare(method: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="speedup-") as tmp:
        state = Path(tmp) / "state.pt"
        procs = {}
        try:
            # one after the other: the new one trains the shared starting cells and writes the state
            for role, root in (("new", HERE.parents[1]), ("old", Path(args.base).resolve())):
                procs[role] = start_worker(root, role, method, state, args)
                ask(procs[role])  # ready
            losses = {}
            for _ in range(args.warmup):
                for role, p in procs.items():
                    reply = ask(p, "step")
                    losses.setdefault(role, reply.get("losses"))
            times = {"old": [], "new": []}
            frozen = []
            for i in range(args.iters):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for role in order:
                    reply = ask(procs[role], "step")
                    times[role].append(reply["time"])
                    if role == "new":
                        frozen.append(reply["frozen"])
                    if reply.get("losses"):
                        losses.setdefault(role, reply["losses"])
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.stdin.close()
                    p.wait(timeout=60)
    ratios = [n / o for o, n in zip(times["old"], times["new"])]
    bound = statistics.median((n - f) / o for o, n, f in zip(times["old"], times["new"], frozen))
    return {"times": times, "ratio": statistics.median(ratios), "ratios": ratios, "losses": losses,
            "frozen": frozen, "ratio_without_frozen": bound}


def loss_agreement(losses: dict) -> str:
    if not losses.get("old") or not losses.get("new"):
        return "losses of the first timed step not available"
    old, new = losses["old"], losses["new"]
    common = sorted(set(old) & set(new))
    worst = max((abs(new[k] - old[k]) / max(abs(old[k]), 1e-12) for k in common), default=0.0)
    extra = sorted(set(old) ^ set(new))
    return f"first-step losses: max relative difference {worst:.2e} over {len(common)} terms" + (
        f" (terms in one tree only: {extra})" if extra else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a checkout (git worktree) of the commit to compare against")
    ap.add_argument("--methods", default="supervised,ubteacher,ubteacher+lsm",
                    help="comma-separated methods, +lsm for the LSM variant")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=15, help="step pairs per method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--home", default=None, help="BENCH_HOME for the data and the start cells (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["old", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    args.home = args.home or tempfile.mkdtemp(prefix="bench-speedup-")
    if args.worker:
        worker(args)
        return
    if not args.base:
        ap.error("--base is required (git worktree add /tmp/speed_base <commit>)")
    base_rev = subprocess.run(["git", "-C", args.base, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    new_rev = subprocess.run(["git", "-C", str(HERE.parents[1]), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    print(f"preset {args.preset}, device {args.device}, {args.iters} step pairs per method, {args.clock} clock; "
          f"old {base_rev} ({args.base}) vs new {new_rev} (+ uncommitted changes, if any)", flush=True)
    results = {}
    for method in args.methods.split(","):
        r = compare(method, args)
        results[method] = r
        med = {k: statistics.median(v) * 1000 for k, v in r["times"].items()}
        print(f"{method:16s} old {med['old']:.1f} ms, new {med['new']:.1f} ms (medians); "
              f"new / old per pair: median {r['ratio']:.3f} (min {min(r['ratios']):.3f}, max {max(r['ratios']):.3f}); "
              f"frozen trunk {statistics.median(r['frozen']) * 1000:.1f} ms of new, without it / old: "
              f"{r['ratio_without_frozen']:.3f}; {loss_agreement(r['losses'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
