"""medbridge: batch jobs at an HPC centre compute on an isolated medical-image platform."""

__version__ = "0.1.0"
