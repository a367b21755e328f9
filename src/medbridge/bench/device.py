"""Where the experiments compute: the GPU and bf16 when there is one, else the CPU in float32.

The experiments' payloads (:mod:`medbridge.bench.images`, ``vnet_job``, ``pretrain_job``)
all ask here, so one flag (``--device``) moves every one of them, and a report names the
device it measured on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


def missing() -> str | None:
    """Why the experiments cannot run here (torch, MONAI or einops missing), or None; imports nothing."""
    for name in ("torch", "monai", "einops"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install -e '.[experiments]', or scripts/setup)"
    return None


def pick(name: str = "auto") -> Any:
    """A ``torch.device``: ``auto`` takes the GPU when CUDA sees one."""
    import torch

    from medbridge.errors import InvalidInput

    if name not in DEVICES:
        raise InvalidInput(f"--device {name!r}: choose from {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no GPU visible to torch here")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def bf16(device: Any) -> bool:
    """bf16 autocast where the device supports it (a GPU of Ampere or later); the CPU stays in float32."""
    import torch

    return bool(device.type == "cuda" and torch.cuda.is_bf16_supported())


@contextlib.contextmanager
def autocast(device: Any, enabled: bool) -> Iterator[None]:
    import torch

    if enabled:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def threads(count: int | None) -> int:
    """Set torch's intra-op threads (jobs sharing a machine take a share each); the count in force."""
    import torch

    if count:
        torch.set_num_threads(count)
        os.environ["OMP_NUM_THREADS"] = str(count)
    return int(torch.get_num_threads())


def describe(device: Any) -> dict[str, Any]:
    """What a report says about the device: its name, whether bf16 was used, torch and MONAI versions."""
    import monai
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"device": device.type, "name": name, "bf16": bf16(device), "torch": torch.__version__,
            "monai": monai.__version__}  # fmt: skip
