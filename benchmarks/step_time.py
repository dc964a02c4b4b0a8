"""Engine overhead: a training step through the Trainer (adapter, hooks, NaN check, scheduler)
versus a bare forward/backward/SGD step of the same detector on the same batch.

    python benchmarks/step_time.py [--preset demo|coco] [--device cpu|cuda] [--iters 20]

Prints both times and their ratio (target: close to 1.0; the engine adds bookkeeping only).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from _common import summary, time_it

import torch

from adapters.base import get_adapter
from adapters.engine.hooks import MetricsWriter
from adapters.engine.solver import build_optimizer, build_scheduler
from adapters.engine.trainer import Trainer
from core.config import load_config
from core.data.sources import prepare_data
from bench.tracking import Tracker
from bench.worker import batch_stream, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--home", default=None, help="BENCH_HOME for the demo data (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    device = torch.device(args.device)
    home = Path(args.home or tempfile.mkdtemp(prefix="bench-step-"))
    cfg = load_config(args.preset, args.overrides + [f"device={args.device}", "solver.max_iter=100000"])
    data = prepare_data(cfg.data, home)
    seed_everything(cfg.seed)
    adapter = get_adapter("supervised")(cfg, data.num_classes, device)
    batch = next(batch_stream(cfg, adapter, data, 0))
    images = [it["views"]["weak"].image.to(device) for it in batch["labeled"]]
    targets = [{"boxes": it["views"]["weak"].boxes.to(device), "labels": it["views"]["weak"].labels.to(device)}
               for it in batch["labeled"]]
    model = adapter.student
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    amp = cfg.solver.amp and device.type == "cuda"  # as the Trainer: fp16 autocast + loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def bare_step():
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            losses = model(images, targets)
        opt.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()

    optimizer = build_optimizer(model.parameters(), cfg.solver)
    trainer = Trainer(adapter, optimizer, build_scheduler(optimizer, cfg.solver), itertools.repeat(batch), 0,
                      cfg.solver.max_iter, device, amp=cfg.solver.amp)
    trainer.register_hooks([MetricsWriter(home / "metrics.jsonl", Tracker(home, enabled=False), period=1)])
    for h in trainer.hooks:
        h.before_train()

    def engine_step():
        for h in trainer.hooks:
            h.before_step()
        trainer.run_step()
        for h in trainer.hooks:
            h.after_step()
        trainer.iter += 1

    bare, engine = [], []
    for _ in range(3):  # interleave to share any drift in machine load
        bare += time_it(bare_step, device, warmup=2, repeats=args.iters // 3 + 1)
        engine += time_it(engine_step, device, warmup=2, repeats=args.iters // 3 + 1)
    print(f"preset {args.preset}, device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"amp {amp}, batch {len(images)} images of ~{tuple(images[0].shape[-2:])}")
    print(f"bare forward/backward/step: {summary(bare)}")
    print(f"engine step (adapter + hooks): {summary(engine)}")
    print(f"ratio engine / bare: {statistics.median(engine) / statistics.median(bare):.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
