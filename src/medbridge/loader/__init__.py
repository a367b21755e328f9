"""The native loader: many requests in flight over a pool of SFTP connections, verified, resumable.

    from medbridge.loader import Loader
    with Loader() as data:                       # credentials from the job environment
        raw = data.read("/datasets/chest-ct/ct-001.nii")
        for blob in data.read_many(paths):       # ordered, a bounded window in flight
            ...

``medbridge.loader.torch`` has the PyTorch datasets (torch is an optional extra).
"""

from medbridge.loader.cache import ReadAheadCache
from medbridge.loader.client import Loader, Sample

__all__ = ["Loader", "ReadAheadCache", "Sample"]
