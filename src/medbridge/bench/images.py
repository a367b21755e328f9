"""``bench images``: the 17 vision tests, each loading its images from local disk, the job's sshfs mount and the
native loader, with load and compute timed apart (the original's Fig 4).

The images (generated JPEG, PNG or DICOM, one folder per test so that no read is served
by a cache another test warmed) are ingested as a platform dataset.  The platform, a
gateway route with an emulated round trip and a job certificate come from
:mod:`medbridge.bench.network` (the three sites where namespaces can be made).  One worker
process, where a job's reader runs (``hpc``), then does for each test: build the model
(:mod:`medbridge.bench.vision`), one untimed warm-up pass, and for each path in turn:
load every image of the test (read, decode, stack: the timed *load*), then run the
model over them (the timed *compute*).  Paths rotate from test to test so none is
always first.  Ratios are against local disk in the same run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from medbridge import processes
from medbridge.bench import vision
from medbridge.bench.network import Network, choose, serve
from medbridge.compute.mount import SSHFS_OPTIONS, Mount
from medbridge.config import Home
from medbridge.control.store import Store
from medbridge.errors import InvalidInput, MedbridgeError
from medbridge.platform.keys import fingerprint, public_line
from medbridge.platform.storage import add_dataset, init_home

#: ``sshfs`` is the job's mount (``job run --mount``'s options); ``sshfs-default`` is sshfs with no options,
#: as the original system mounted it.
PATHS = ("local", "sshfs", "sshfs-default", "native")
FORMATS = ("jpeg", "png", "dicom")
DATASET = "vision"
WORKER_TIMEOUT = 3600.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    tests: tuple[int, ...] = tuple(t.number for t in vision.TESTS)
    paths: tuple[str, ...] = ("local", "sshfs", "native")
    quick: bool = False
    iterations: int = 4  # compute passes per path (batches)
    images: int | None = None  # images loaded per test and path (default: batch x iterations)
    fmt: str = "jpeg"
    rtt_ms: float = 2.0
    train: bool = False
    device: str = "auto"
    network: str = "auto"

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(quick=True, iterations=1, images=32)

    def check(self) -> None:
        bad = [p for p in self.paths if p not in PATHS]
        if bad or "local" not in self.paths:
            raise InvalidInput(f"--paths: local and any of {', '.join(PATHS[1:])} (got {', '.join(self.paths)})")
        if self.fmt not in FORMATS:
            raise InvalidInput(f"--format {self.fmt!r}: choose from {', '.join(FORMATS)}")

    def count(self, test: vision.Test) -> int:
        batch, _ = vision.scaled(test, self.quick)
        return self.images or batch * self.iterations


# -- the images -------------------------------------------------------------------------------------------------


def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A smooth scene with a few shapes and a little noise: compresses like a photograph, not like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fy, fx = rng.uniform(0.5, 3, 2).tolist()
        ph = rng.uniform(0, 6.3)
        img[..., c] = 127 + 80 * np.sin(fy * y / h * 6.3 + ph) * np.cos(fx * x / w * 6.3)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.25) * min(h, w)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, h: int, w: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A label map: blobs of classes on a background, what SPADE draws from."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), np.uint8)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
        out[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(1, vision.SPADE_LABELS)
    return out


def _encode(pixels: np.ndarray[Any, Any], fmt: str) -> bytes:
    if fmt == "dicom":
        return _dicom(pixels)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
    return buf.getvalue()


def _dicom(pixels: np.ndarray[Any, Any]) -> bytes:
    """A secondary-capture DICOM file with no patient data, cleaned by the ingest profile (the gate must pass it)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from medbridge.ingest.profile import clean, load_profile

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientIdentityRemoved = "OT", "YES"
    ds.Rows, ds.Columns = pixels.shape[:2]
    rgb = pixels.ndim == 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if rgb else (1, "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    clean(ds, load_profile()).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(folder: Path, plan: Plan, tests: Sequence[vision.Test]) -> dict[str, list[str]]:
    """Each test's images in a folder of its own (``t01``…); the file names per folder."""
    ext = {"jpeg": "jpg", "png": "png", "dicom": "dcm"}[plan.fmt]
    names: dict[str, list[str]] = {}
    for test in tests:
        _, (h, w) = vision.scaled(test, plan.quick)
        sub = f"t{test.number:02d}"
        (folder / sub).mkdir(parents=True)
        rng = np.random.default_rng(test.number)
        names[sub] = []
        for i in range(plan.count(test)):
            if test.labels:
                data = _encode(_labels(rng, h, w), "png" if plan.fmt == "jpeg" else plan.fmt)
                name = f"labels-{i:04d}.{'png' if plan.fmt == 'jpeg' else ext}"
            else:
                data, name = _encode(_picture(rng, h, w), plan.fmt), f"img-{i:04d}.{ext}"
            (folder / sub / name).write_bytes(data)
            names[sub].append(name)
    return names


# -- the benchmark's side ------------------------------------------------------------------------------------------


def run(plan: Plan, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Generate, ingest, serve, mount, and let the worker measure; the result as JSON-ready data."""
    plan.check()
    tests = [t for t in vision.TESTS if t.number in plan.tests]
    root = Path(tempfile.mkdtemp(prefix="medbridge-bench-images-"))
    try:
        net = choose(plan.network, root)
        try:
            return _run(root, net, plan, tests, progress)
        finally:
            net.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, net: Network, plan: Plan, tests: list[vision.Test],
         say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    import asyncssh

    src = root / "local" / DATASET  # the local copy the local path reads: the files the platform ingested
    say(f"generating {sum(plan.count(t) for t in tests)} {plan.fmt} images for {len(tests)} tests")
    names = generate(src, plan, tests)
    home = Home(root / "platform")
    init_home(home, "bench")
    store = Store(home.database_url(home.settings()))
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = datetime.now(UTC)
    try:
        store.add_user("bench", [(public_line(key), fingerprint(key))], [], now, "bench")
        add_dataset(home, store, DATASET, src, "bench", "bench")
        store.grant("bench", DATASET, None, now, "bench")
    finally:
        store.close()
    server, port, fp = serve(home.root, net, os.cpu_count() or 1, root / "platform.log")
    try:
        with contextlib.ExitStack() as stack:
            host, gw_port, _ = stack.enter_context(net.route(port, plan.rtt_ms, proxy=True))
            ep, cfg = stack.enter_context(net.job(key, fp, host, gw_port))
            roots = {"local": str(src), "native": f"/datasets/{DATASET}"}
            for path in plan.paths:
                if path.startswith("sshfs"):
                    point = Path(tempfile.mkdtemp(prefix=f"mnt-{path}-", dir=root))
                    m = Mount(point, cfg, "medbridge", remote="/", ssh_command=net.ssh_command,
                              options=SSHFS_OPTIONS if path == "sshfs" else ())  # fmt: skip
                    stack.callback(m.close)
                    roots[path] = str(point / "datasets" / DATASET)
            spec = {
                "tests": [t.number for t in tests], "paths": list(plan.paths), "roots": roots, "names": names,
                "quick": plan.quick, "iterations": plan.iterations, "train": plan.train, "device": plan.device,
                "endpoint": {"host": ep.host, "port": ep.port, "user": ep.user, "agent": ep.agent,
                             "host_key": ep.host_key.export_public_key().decode()},
            }  # fmt: skip
            result = _worker(spec, net.prefix("hpc"), say)
    finally:
        processes.stop(server, timeout=30)
        if server.stdout:
            server.stdout.close()
    rows = result["rows"]
    return {
        "machine": machine(), "network": net.name, "rtt_ms": plan.rtt_ms, "device": result["device"],
        "plan": {**asdict(plan), "tests": list(plan.tests), "paths": list(plan.paths)},
        "rows": rows, "ratios": ratios(rows), "summary": summary(rows),
    }  # fmt: skip


def _worker(spec: dict[str, Any], prefix: Sequence[str], say: Callable[[str], None]) -> dict[str, Any]:
    cmd = [*prefix, sys.executable, "-m", "medbridge.bench.images"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    last = ""
    try:
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stderr:  # its progress, until it ends
            if line.strip():
                last = line.strip()
                say(last)
        out = proc.stdout.read()
        proc.wait(timeout=WORKER_TIMEOUT)
    finally:
        processes.stop(proc, timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    if proc.returncode != 0 or not out.strip():
        raise MedbridgeError(f"the images worker failed (exit {proc.returncode}): {last or 'no output'}")
    result: dict[str, Any] = json.loads(out)
    return result


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per test and remote path: its load and compute time over local disk's in the same run."""
    local = {r["test"]: r for r in rows if r["path"] == "local"}
    out = []
    for r in rows:
        base = local.get(r["test"])
        if r["path"] == "local" or base is None:
            continue
        load = round(r["load_s"] / base["load_s"], 3) if base["load_s"] else None
        compute = round(r["compute_s"] / base["compute_s"], 3) if base["compute_s"] else None
        out.append({"test": r["test"], "model": r["model"], "path": r["path"], "load_ratio": load,
                    "compute_ratio": compute})  # fmt: skip
    return out


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per remote path: total load time over local's (all tests), and the median per-test load and compute ratio."""
    per = ratios(rows)
    total = {p: sum(r["load_s"] for r in rows if r["path"] == p) for p in {r["path"] for r in rows}}
    out = {}
    for path in sorted(total):
        if path == "local" or not total.get("local"):
            continue
        mine = [r for r in per if r["path"] == path]
        out[path] = {
            "load_ratio_total": round(total[path] / total["local"], 3),
            "load_ratio_median": round(statistics.median(r["load_ratio"] for r in mine if r["load_ratio"]), 3),
            "compute_ratio_median": round(statistics.median(r["compute_ratio"] for r in mine
                                                            if r["compute_ratio"]), 3),
        }  # fmt: skip
    return out


def machine() -> dict[str, Any]:
    return {"host": os.uname().nodename, "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def plot(result: dict[str, Any], path: Path) -> None:
    """Like the original figure: per model, load time by path (bars side by side), compute time beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tests = sorted({r["test"] for r in rows})
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    by = {(r["test"], r["path"]): r for r in rows}
    names = [next(r["model"] for r in rows if r["test"] == t) for t in tests]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.75 * len(tests) + 2), 7.2), sharex=True)
    width = 0.8 / len(paths)
    colours = {"local": "#4c72b0", "sshfs": "#dd8452", "sshfs-default": "#c44e52", "native": "#55a868"}
    for ax, key, label in ((axes[0], "load_s", "load (s)"), (axes[1], "compute_s", "compute (s)")):
        for i, p in enumerate(paths):
            xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(tests))]
            ax.bar(xs, [by[(t, p)][key] if (t, p) in by else 0 for t in tests], width, label=p, color=colours[p])
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8, ncols=len(paths))
    where = f"{result['network']}, RTT +{result['rtt_ms']:g} ms, {result['device']['name']}"
    axes[0].set_title(f"AI-benchmark vision tests: image load and compute by path ({where})", fontsize=10)
    axes[1].set_xticks(range(len(tests)), [f"{t} {n}" for t, n in zip(tests, names, strict=True)], rotation=55,
                       ha="right", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the worker (where a job's reader runs) ---------------------------------------------------------------------------


@dataclass
class _Row:
    test: int
    model: str
    source: str
    note: str
    batch: int
    size: list[int]
    path: str
    images: int
    bytes: int
    load_s: float
    compute_s: float


def _decode(data: bytes | bytearray, name: str, labels: bool) -> Any:
    import torch

    if name.endswith(".dcm"):
        import pydicom

        pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            pixels = np.array(im.convert("L" if labels else "RGB"))  # a writable copy: torch shares its memory
    if labels:
        hot = np.eye(vision.SPADE_LABELS, dtype=np.float32)[pixels.astype(np.int64) % vision.SPADE_LABELS]
        return torch.from_numpy(hot).permute(2, 0, 1).contiguous()
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div_(255)


def _load(path: str, root: str, sub: str, names: list[str], labels: bool, loader: Any) -> tuple[list[Any], int]:
    """Every image of one test through one path: read, decode (the timed load); the tensors and bytes read."""
    out, nbytes = [], 0
    if path == "native":
        for name, data in zip(names, loader.read_many([f"{root}/{sub}/{n}" for n in names]), strict=True):
            nbytes += len(data)
            out.append(_decode(data, name, labels))
        return out, nbytes
    for name in names:
        with open(f"{root}/{sub}/{name}", "rb") as f:
            data = f.read()
        nbytes += len(data)
        out.append(_decode(data, name, labels))
    return out, nbytes


def _compute(model: Any, images: list[Any], batch: int, iterations: int, train: bool, dev: Any,
             amp: bool) -> float:  # fmt: skip
    """``iterations`` passes over batches cycled from ``images``; seconds (the device synchronised)."""
    import torch

    from medbridge.bench import device

    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None
    batches = [torch.stack([images[(k * batch + i) % len(images)] for i in range(batch)]).to(dev)
               for k in range(iterations)]  # fmt: skip
    start = time.perf_counter()
    for x in batches:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            with device.autocast(dev, amp):
                out = model(x)
            loss = (out[0] if isinstance(out, tuple | list) else out).float().square().mean()
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), device.autocast(dev, amp):
                model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def worker(stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> None:
    import asyncssh

    from medbridge.bench import device
    from medbridge.compute.session import Endpoint
    from medbridge.loader import Loader

    spec = json.loads(stdin.read())
    dev = device.pick(spec["device"])
    amp = device.bf16(dev)
    e = spec["endpoint"]
    ep = Endpoint(e["host"], e["port"], e["user"], asyncssh.import_public_key(e["host_key"]), e["agent"])
    rows: list[_Row] = []
    with Loader(ep, connections=4, window=64) as loader:
        loader.files(DATASET)  # the manifest, once, before any timing (as a job's first epoch would)
        first = f"t{spec['tests'][0]:02d}"
        for path in spec["paths"]:  # every path's connections (and the mounts' first lookups) made, untimed
            _load(path, spec["roots"][path], first, spec["names"][first][:1], False, loader)
        for k, test in enumerate(t for t in vision.TESTS if t.number in spec["tests"]):
            batch, size = vision.scaled(test, spec["quick"])
            sub = f"t{test.number:02d}"
            names = spec["names"][sub]
            model = test.build(size).to(dev)
            model.train(spec["train"])
            warm, _ = _load("local", spec["roots"]["local"], sub, names[:batch], test.labels, loader)
            _compute(model, warm, batch, 1, spec["train"], dev, amp)
            paths = spec["paths"][k % len(spec["paths"]) :] + spec["paths"][: k % len(spec["paths"])]
            for path in paths:
                start = time.perf_counter()
                images, nbytes = _load(path, spec["roots"][path], sub, names, test.labels, loader)
                load_s = time.perf_counter() - start
                compute_s = _compute(model, images, batch, spec["iterations"], spec["train"], dev, amp)
                rows.append(_Row(test.number, test.name, test.source, test.note, batch, list(size), path,
                                 len(names), nbytes, round(load_s, 4), round(compute_s, 4)))  # fmt: skip
                stderr.write(f"{test.number:2d} {test.name}: {path} load {load_s:.3f} s, compute {compute_s:.3f} s\n")
                stderr.flush()
            del model
    stdout.write(json.dumps({"device": device.describe(dev),
                             "rows": [asdict(r) for r in rows]}))  # fmt: skip
    stdout.flush()


if __name__ == "__main__":
    try:
        worker(sys.stdin, sys.stdout, sys.stderr)
    except (MedbridgeError, OSError) as exc:
        sys.stderr.write(f"images worker: {exc}\n")
        sys.exit(1)
