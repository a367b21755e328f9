"""One ``bench ct-train`` job's payload: MONAI's V-Net trained to segment the lungs, every number written as CSV.

Run inside ``medbridge job run --outputs outputs`` (the benchmark does), so the CSVs are
committed to the platform with the job's results:

- ``steps.csv``: epoch, step, training loss, load and compute seconds, wall seconds so far;
- ``epochs.csv``: epoch, seconds, mean training loss, validation loss and Dice, load and compute seconds;
- ``job.csv``: one row: the job's data path, wall seconds, load and compute seconds, steps, device.

Every epoch reads its volumes again (no cache), as the original jobs read from their
mount; the wait for the next volume is the *load* time.  ``--max-steps`` and
``--val-cases`` shorten an epoch for the quick profile.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medbridge.bench import ctdata
from medbridge.errors import MedbridgeError


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medbridge.bench.vnet_job", description=__doc__.splitlines()[0])
    ctdata.job_arguments(p)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="steps per epoch at most (0: every training case)")
    p.add_argument("--val-cases", type=int, default=0, help="validation cases (0: all of them)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def _write(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    import torch
    from monai.losses.dice import DiceCELoss
    from monai.networks.nets.vnet import VNet

    from medbridge.bench import device

    threads = device.threads(args.threads or None)
    dev = device.pick(args.device)
    amp = device.bf16(dev)
    torch.manual_seed(args.seed)
    source = ctdata.Source(args.data)
    try:
        train, val = ctdata.split(source.cases())
        if not train or not val:
            raise MedbridgeError(f"{args.data}: too few cases to split ({len(train) + len(val)})")
        val = val[: args.val_cases or None]
        model = VNet(spatial_dims=3, in_channels=1, out_channels=2).to(dev)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        rng = np.random.default_rng(args.seed)
        steps, epochs = [], []
        load_total = compute_total = 0.0
        t0 = time.perf_counter()
        step = 0
        for epoch in range(1, args.epochs + 1):
            e0 = time.perf_counter()
            order = [train[i] for i in rng.permutation(len(train))]
            if args.max_steps:
                order = order[: args.max_steps * args.batch]
            files = [f for case in order for f in (case, ctdata.label_of(case))]
            stream = source.stream(files)
            model.train()
            e_load = e_compute = 0.0
            losses = []
            for first in range(0, len(order), args.batch):
                count = min(args.batch, len(order) - first)
                a = time.perf_counter()
                pairs = [(ctdata.volume(next(stream)), ctdata.mask(next(stream))) for _ in range(count)]
                x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).to(dev)
                y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).to(dev)
                b = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with device.autocast(dev, amp):
                    loss = loss_fn(model(x).float(), y)
                loss.backward()
                opt.step()
                value = float(loss.detach())
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                c = time.perf_counter()
                step += 1
                e_load, e_compute = e_load + b - a, e_compute + c - b
                losses.append(value)
                steps.append((epoch, step, round(value, 6), round(b - a, 4), round(c - b, 4), round(c - t0, 3)))
            val_loss, dice, v_load, v_compute = _validate(model, source, val, loss_fn, dev, amp)
            e_load, e_compute = e_load + v_load, e_compute + v_compute
            load_total, compute_total = load_total + e_load, compute_total + e_compute
            epochs.append((epoch, round(time.perf_counter() - e0, 3), round(float(np.mean(losses)), 6),
                           round(val_loss, 6), round(dice, 4), round(e_load, 3), round(e_compute, 3)))  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        source.close()
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "steps.csv", ["epoch", "step", "loss", "load_s", "compute_s", "wall_s"], steps)
    _write(args.out / "epochs.csv", ["epoch", "seconds", "train_loss", "val_loss", "val_dice", "load_s", "compute_s"],
           epochs)  # fmt: skip
    _write(args.out / "job.csv",
           ["name", "data", "wall_s", "load_s", "compute_s", "steps", "epochs", "train_cases", "val_cases", "device",
            "bf16", "threads", "startup_s"],
           [(args.name, source.kind, round(wall, 3), round(load_total, 3), round(compute_total, 3), step, args.epochs,
             len(train), len(val), dev.type, amp, threads, round(t0 - started, 3))])  # fmt: skip
    print(f"{args.name}: {step} steps in {wall:.1f} s (load {load_total:.1f} s), val Dice {epochs[-1][4]}")
    return 0


def _validate(model: Any, source: ctdata.Source, val: Sequence[str], loss_fn: Any, dev: Any,
              amp: bool) -> tuple[float, float, float, float]:  # fmt: skip
    """Mean validation loss and lung Dice; load and compute seconds."""
    import torch

    from medbridge.bench import device

    model.eval()
    losses, dices = [], []
    load = compute = 0.0
    stream = source.stream([f for case in val for f in (case, ctdata.label_of(case))])
    with torch.inference_mode():
        for _ in val:
            a = time.perf_counter()
            x = torch.from_numpy(ctdata.volume(next(stream))[None, None]).to(dev)
            y = torch.from_numpy(ctdata.mask(next(stream))[None, None]).to(dev)
            b = time.perf_counter()
            with device.autocast(dev, amp):
                logits = model(x).float()
            losses.append(float(loss_fn(logits, y)))
            pred, truth = logits.argmax(1) == 1, y[:, 0] == 1
            dices.append(float(2 * (pred & truth).sum() / max(1, int(pred.sum() + truth.sum()))))
            load, compute = load + b - a, compute + time.perf_counter() - b
    return float(np.mean(losses)), float(np.mean(dices)), load, compute


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MedbridgeError as exc:
        sys.stderr.write(f"vnet job: {exc}\n")
        sys.exit(exc.exit_code)
