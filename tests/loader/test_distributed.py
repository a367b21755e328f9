"""``torchrun --nproc-per-node 2`` (gloo, CPU) inside ``medbridge job run``: both ranks read through the loader."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from medbridge.testing import RunningPlatform
from tests.compute.test_job_run import job_run
from tests.loader.conftest import alice_reads

FILES = {f"img/{i:03d}.bin": os.urandom(500 + 11 * i) for i in range(40)}

TRAIN = """
import json, os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from medbridge.loader.stream import ShardStream

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
decode = lambda b: torch.tensor([len(b) / 1000.0, b[0] / 255.0])
collate = lambda items: {"x": torch.stack([i["image"] for i in items]), **{k: [i[k] for i in items]
                         for k in ("path", "__stream__", "__index__")}}
stream = ShardStream.from_platform("ds", shuffle_buffer=8, seed=1, decode=decode)
model = DistributedDataParallel(torch.nn.Linear(2, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
seen = []
for batch in DataLoader(stream, batch_size=4, num_workers=1, collate_fn=collate):
    loss = model(batch["x"]).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    stream.seen(batch)
    seen += batch["path"]
everyone = [None] * world
dist.all_gather_object(everyone, seen)
if rank == 0:
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/samples.json", "w") as f:
        json.dump({"ranks": everyone, "state": stream.state_dict()}, f)
    torch.save(model.module.state_dict(), "outputs/model.pt")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    p = alice_reads(tmp_path_factory.mktemp("ddp"), "ds", FILES, 8 << 10, enforcement_interval=0.25)
    with p:
        yield p


def test_torchrun_two_ranks_read_disjoint_halves_and_rank_0_commits(platform: RunningPlatform, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2 {script}"
    r = job_run(platform, torchrun, "--job-id", "j-ddp", "--outputs", "outputs", env={"GLOO_SOCKET_IFNAME": "lo"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = platform.home.results / "alice" / "j-ddp"
    committed = sorted(line.split("  ")[1] for line in (results / "MANIFEST.sha256").read_text().splitlines())
    assert committed == ["model.pt", "samples.json"], "rank 0's outputs, committed"
    ranks = json.loads((results / "samples.json").read_text())["ranks"]
    assert len(ranks) == 2 and len(ranks[0]) == len(ranks[1]) == len(FILES) // 2
    assert not set(ranks[0]) & set(ranks[1]), "each rank reads its own half"
    assert sorted(ranks[0] + ranks[1]) == sorted(f"/datasets/ds/{n}" for n in FILES)
    assert "residue scan clean" in r.stderr
