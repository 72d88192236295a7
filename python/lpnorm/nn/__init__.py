"""Modules: drop-in replacements for torch.nn.BatchNorm1d/2d/3d, and the paper's bounded
weight normalization (lpnorm.nn.utils)."""

from . import utils
from .batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d
from .sync_batchnorm import SyncLpBatchNorm

__all__ = ["LpBatchNorm1d", "LpBatchNorm2d", "LpBatchNorm3d", "SyncLpBatchNorm", "utils"]
