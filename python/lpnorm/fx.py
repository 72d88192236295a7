"""torch.fx symbolic tracing of models with lpnorm layers.

torch's own ``BatchNorm*d`` are leaves of ``torch.fx.symbolic_trace``: a trace records a call of
the module, which updates its running statistics and ``num_batches_tracked`` when the graph
runs. lpnorm's layers are leaves here too; a plain ``torch.fx.symbolic_trace`` would trace
through them and record the counter's increment at trace time instead, so their forward
refuses it with a message pointing here.

    graph_module = lpnorm.fx.symbolic_trace(model)
    # or, where a tool builds its own tracer (e.g. torchvision's create_feature_extractor):
    create_feature_extractor(model, nodes, tracer_kwargs={"leaf_modules": list(lpnorm.fx.LEAF_MODULES)})
"""

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.fx

from .nn.batchnorm import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, LpBatchNormNd
from .nn.sync_batchnorm import SyncLpBatchNorm

LEAF_MODULES: Tuple[type, ...] = (LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, LpBatchNormNd, SyncLpBatchNorm)


class Tracer(torch.fx.Tracer):
    """torch.fx.Tracer whose leaves also include lpnorm's layers."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(root: Union[torch.nn.Module, Any],
                   concrete_args: Optional[Dict[str, Any]] = None) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace with lpnorm's layers as leaves (called, not traced through)."""
    tracer = Tracer()
    graph = tracer.trace(root, concrete_args)
    name = root.__class__.__name__ if isinstance(root, torch.nn.Module) else root.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
