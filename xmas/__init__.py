"""XMAS: data selection for VLM fine-tuning through cross-modal attention trajectories."""

__version__ = "0.1.0"
