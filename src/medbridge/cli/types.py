"""Option types the CLI checks before any work starts: a bad value is a usage error (exit 2), never a late failure."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

#: The longest span of seconds an option takes (30 days): past it a number is a typo, or an attack on the arithmetic.
MAX_SECONDS = 30 * 86400.0


class Seconds(click.FloatRange):
    """A finite number of seconds within a range: ``nan`` and ``inf`` pass click's own range checks, not this one."""

    name = "seconds"

    def __init__(self, min: float = 0.0, max: float = MAX_SECONDS, *, min_open: bool = False):
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)  # the float, before the range check
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return super().convert(number, param, ctx)


class PlotFile(click.Path):
    """A chart to write when a long run ends: its folder must exist and be writable when the run starts."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        folder = path.parent
        if not folder.is_dir():
            self.fail(f"{str(folder)!r} is not a folder: the chart could not be written there", param, ctx)
        if not os.access(folder, os.W_OK | os.X_OK):
            self.fail(f"{str(folder)!r} is not writable: the chart could not be written there", param, ctx)
        return path


PLOT = PlotFile()


class NewFolder(click.Path):
    """A folder a run will create when it ends (to keep what it made): it must not exist yet, its parent must.

    Never an existing path: a run keeps its files in a folder of its own and overwrites nothing.
    """

    def __init__(self) -> None:
        super().__init__(path_type=Path, file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        if path.exists() or path.is_symlink():
            self.fail(f"{str(path)!r} already exists: name a folder that does not, it will be created", param, ctx)
        parent = path.absolute().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            self.fail(f"{str(parent)!r} is not a writable folder: {path.name!r} could not be made there", param, ctx)
        return path.absolute()


NEW_FOLDER = NewFolder()
