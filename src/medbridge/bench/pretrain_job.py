"""One link of ``bench pretrain``'s chain: self-supervised pre-training of the Swin Transformer encoder of MONAI's
SwinUNETR by masked-volume reconstruction, resumed from the previous link's checkpoint on the platform.

Each step hides half of a CT volume in cubes (an eighth of the side each) and trains the
encoder, with a one-layer prediction head (SimMIM's recipe: the deepest features,
projected and shuffled back to voxels), to fill them in (L1 on the hidden voxels only),
as masked-image pre-training of CT foundation models does; the encoder is what a
foundation model keeps.  Which case and which cubes a step gets depend only on the
seed and the step's number, and validation uses fixed cubes, so a chain of jobs computes
what one long job would: the first thing a resumed job logs is the validation loss of
the weights it loaded, which equals the last one its predecessor logged.

Outputs (committed to the platform by ``job run --outputs``): ``checkpoint.pt`` (weights,
optimiser, step, training wall seconds so far) and ``pretrain-log.csv`` (job, step,
kind = train | val | resume, loss, wall_s over the whole chain).  SIGTERM (a time limit
coming) ends the job after the current step, with its checkpoint written.
"""

from __future__ import annotations

import argparse
import csv
import io
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from medbridge.bench import ctdata
from medbridge.errors import MedbridgeError

LOG = "pretrain-log.csv"
CHECKPOINT = "checkpoint.pt"
HEADER = ("job", "step", "kind", "loss", "wall_s")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medbridge.bench.pretrain_job", description=__doc__.splitlines()[0])
    ctdata.job_arguments(p)
    p.add_argument("--steps", type=int, required=True, help="steps this job trains")
    p.add_argument("--resume", default="", help="platform folder of the previous job's results (/results/USER/JOB)")
    p.add_argument("--feature-size", type=int, default=12)
    p.add_argument("--val-cases", type=int, default=2)
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps too (0: at the end only)")
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-4)
    return p.parse_args(argv)


def cubes(shape: Sequence[int], ratio: float, seed: Sequence[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A mask (1 = hidden) of cubes an eighth of each side, a ``ratio`` of them hidden, fixed by ``seed``."""
    rng = np.random.default_rng(list(seed))
    grid = (rng.random((8, 8, 8)) < ratio).astype(np.float32)
    reps = [max(1, s // 8) for s in shape]
    return np.kron(grid, np.ones(reps, np.float32))[: shape[0], : shape[1], : shape[2]]


class _Stop:
    def __init__(self) -> None:
        self.asked = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum: int, _frame: object) -> None:
        self.asked = True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    stop = _Stop()
    import torch

    from medbridge.bench import device

    device.threads(args.threads or None)
    dev = device.pick(args.device)
    amp = device.bf16(dev)
    torch.manual_seed(args.seed)
    source = ctdata.Source(args.data)
    rows: list[tuple[Any, ...]] = []
    try:
        train, val = ctdata.split(source.cases())
        val = val[: args.val_cases or None]
        if not train or not val:
            raise MedbridgeError(f"{args.data}: too few cases to split")
        model = masked_swin(args.feature_size).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        step, wall0 = 0, 0.0
        val_volumes = [torch.from_numpy(ctdata.volume(b)[None, None]).to(dev) for b in source.stream(val)]
        val_masks = [torch.from_numpy(cubes(v.shape[2:], args.mask_ratio, (args.seed, 1 << 20, i))[None, None]).to(dev)
                     for i, v in enumerate(val_volumes)]  # fmt: skip

        def validate() -> float:
            model.eval()
            with torch.inference_mode(), device.autocast(dev, amp):
                losses = [_masked_l1(model(v * (1 - m)).float(), v, m) for v, m in zip(val_volumes, val_masks,
                                                                                       strict=True)]  # fmt: skip
            model.train()
            return float(np.mean([float(x) for x in losses]))

        if args.resume:
            ckpt = torch.load(io.BytesIO(source.read_result(f"{args.resume.rstrip('/')}/{CHECKPOINT}")),
                              map_location=dev, weights_only=True)  # fmt: skip
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            step, wall0 = int(ckpt["step"]), float(ckpt["wall_s"])
        if args.resume:  # a check of the weights loaded, logged at the wall time they were saved (not counted)
            rows.append((args.name, step, "resume", round(validate(), 6), round(wall0, 3)))
        t0 = time.perf_counter()

        def wall() -> float:
            return round(wall0 + time.perf_counter() - t0, 3)

        model.train()
        plan = [_case(train, s, args.seed) for s in range(step + 1, step + args.steps + 1)]
        stream = source.stream(plan)
        for _ in plan:
            if stop.asked:
                break
            step += 1
            x = torch.from_numpy(ctdata.volume(next(stream))[None, None]).to(dev)
            m = torch.from_numpy(cubes(x.shape[2:], args.mask_ratio, (args.seed, step))[None, None]).to(dev)
            opt.zero_grad(set_to_none=True)
            with device.autocast(dev, amp):
                loss = _masked_l1(model(x * (1 - m)).float(), x, m)
            loss.backward()
            opt.step()
            rows.append((args.name, step, "train", round(float(loss.detach()), 6), wall()))
            if args.val_every and step % args.val_every == 0:
                rows.append((args.name, step, "val", round(validate(), 6), wall()))
        if not rows or rows[-1][2] != "val":
            rows.append((args.name, step, "val", round(validate(), 6), wall()))
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "wall_s": wall()},
                   args.out / CHECKPOINT)  # fmt: skip
    finally:
        source.close()
        if rows:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / LOG, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(HEADER)
                w.writerows(rows)
    print(f"{args.name}: steps to {step}, validation loss {rows[-1][3]}")
    return 0


def masked_swin(feature_size: int) -> Any:
    """SwinUNETR's encoder (MONAI) with SimMIM's head: a 1x1x1 convolution to 32³ voxels per deepest feature."""
    import torch
    from monai.networks.nets.swin_unetr import SwinUNETR

    class MaskedSwin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size, spatial_dims=3).swinViT
            self.head = torch.nn.Conv3d(16 * feature_size, 32**3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.head(self.encoder(x, normalize=True)[-1])
            n, _, d, h, w = y.shape
            y = y.view(n, 1, 32, 32, 32, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
            out: torch.Tensor = y.reshape(n, 1, 32 * d, 32 * h, 32 * w)
            return out

    return MaskedSwin()


def _case(train: Sequence[str], step: int, seed: int) -> str:
    """The case step ``step`` (from 1) trains on: a fresh permutation of the training cases every epoch."""
    epoch, k = divmod(step - 1, len(train))
    return train[int(np.random.default_rng([seed, epoch]).permutation(len(train))[k])]


def _masked_l1(recon: Any, target: Any, mask: Any) -> Any:
    return ((recon - target).abs() * mask).sum() / mask.sum().clamp(min=1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MedbridgeError as exc:
        sys.stderr.write(f"pretrain job: {exc}\n")
        sys.exit(exc.exit_code)
