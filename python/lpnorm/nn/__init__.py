"""Modules: drop-in replacements for torch.nn.BatchNorm1d/2d/3d."""

from .batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d

__all__ = ["LpBatchNorm1d", "LpBatchNorm2d", "LpBatchNorm3d"]
