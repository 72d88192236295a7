"""SyncLpBatchNorm: Lp batch norm whose training statistics are those of the whole batch
spread over a ``torch.distributed`` process group (SPEC §6), like ``nn.SyncBatchNorm``.

The math stays in the stage operators (``torch.ops.lpnorm.batch_norm_collect`` ...: on CPU
csrc/ops/cpu/batch_norm_stages.cpp, the same passes and per-channel core as the fused
operator; on CUDA compositions of ATen operators with the same contract,
lpnorm/_composite_stages.py); this module only moves their per-channel results between
processes:

forward (training)
    1. ``all_gather`` of each process's row count: uneven batches, and each process's first
       global flat index ``rows_before * S`` (so extreme indices and ties are global);
    2. ``batch_norm_collect``: per-channel sum, and for ``linf``/``topk``/``range`` the
       ``per_end`` largest and smallest raw values with their global indices;
       ``all_reduce(SUM)`` of the sums, ``all_gather`` of the candidate lists;
    3. dense norms (``l2``, ``l1``, ``p``): ``batch_norm_deviations`` around the global mean,
       ``all_reduce(SUM)`` of the deviation and phi sums;
    4. ``batch_norm_finalize`` merges the gathered candidates (ties to the lowest global
       index, as one process would) and computes mean, sigma, invstd and the gradient
       coefficients; every process gets the same values and updates its running statistics
       identically; ``batch_norm_apply`` normalizes the local rows.

backward
    ``batch_norm_reduce_grad`` (sum g, sum g * d), ``all_reduce(SUM)`` of both, then
    ``batch_norm_apply_grad`` with the global sums and count; the saved sparse indices are
    global and each process applies those inside its own rows. As in torch's
    ``SyncBatchNorm``, ``weight``/``bias`` gradients are the local ones (sum(g * d) * invstd
    and sum(g) over this process's rows): DistributedDataParallel reduces them across
    processes like any other parameter gradient.

Evaluation (running statistics), a process group of one, or no initialized process group:
the plain, local :func:`lpnorm.functional.batch_norm`.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional
from .batchnorm import _LpBatchNorm, refuse_fx_symbolic_trace

_EXTREME_NORMS = ("linf", "topk", "range")
_DENSE_NORMS = ("l2", "l1", "p")


class _SyncLpBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size,
                norm, k, p, constant):
        ops = torch.ops.lpnorm
        rows = input.shape[0]
        per_row = 1  # S, the elements of a channel in one row
        for size in input.shape[2:]:
            per_row *= size
        rank = dist.get_rank(process_group)

        # 1. Row counts of every process: the total m and this process's first flat index.
        count_tensor = torch.tensor([rows], dtype=torch.int64, device=input.device)
        counts = [torch.empty_like(count_tensor) for _ in range(world_size)]
        dist.all_gather(counts, count_tensor, group=process_group)
        row_counts = [int(c.item()) for c in counts]
        count = sum(row_counts) * per_row
        index_offset = sum(row_counts[:rank]) * per_row

        # 2. Sums and extreme candidates.
        total, extreme_value, extreme_index = ops.batch_norm_collect(input, norm, k, index_offset)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        if norm in _EXTREME_NORMS:
            values = [torch.empty_like(extreme_value) for _ in range(world_size)]
            indices = [torch.empty_like(extreme_index) for _ in range(world_size)]
            dist.all_gather(values, extreme_value.contiguous(), group=process_group)
            dist.all_gather(indices, extreme_index.contiguous(), group=process_group)
            extreme_value = torch.cat(values, dim=2)
            extreme_index = torch.cat(indices, dim=2)

        # 3. Dense norms: deviations around the global mean.
        if norm in _DENSE_NORMS and count > 0:
            mean = total / count
            deviation_sum, phi_sum = ops.batch_norm_deviations(input, mean, norm, p)
            both = torch.stack([deviation_sum, phi_sum])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=process_group)
            deviation_sum, phi_sum = both[0].contiguous(), both[1].contiguous()
        else:
            deviation_sum = torch.zeros_like(total)
            phi_sum = torch.zeros_like(total)

        # 4. The global statistics, the same on every process.
        mean, invstd, save_coef, sparse_index, sparse_coef, unbiased_var = ops.batch_norm_finalize(
            count, total, deviation_sum, phi_sum, extreme_value, extreme_index, eps, norm, k, p, constant)
        if running_mean is not None and count > 0:
            # As update_running_stats (csrc/ops/batch_norm.cpp): blended in float64.
            running_mean.copy_(running_mean.to(torch.float64).mul(1.0 - momentum).add(mean, alpha=momentum))
            running_var.copy_(running_var.to(torch.float64).mul(1.0 - momentum).add(unbiased_var, alpha=momentum))
        output = ops.batch_norm_apply(input, mean, invstd, weight, bias)

        ctx.save_for_backward(input, weight, mean, invstd, save_coef, sparse_index, sparse_coef)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.process_group = process_group
        ctx.count = count
        ctx.index_offset = index_offset
        ctx.norm = norm
        ctx.p = p
        return output

    @staticmethod
    def backward(ctx, grad_output):
        ops = torch.ops.lpnorm
        input, weight, mean, invstd, save_coef, sparse_index, sparse_coef = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        sum_g, sum_gd = ops.batch_norm_reduce_grad(grad_output, input, mean)
        # Local parameter gradients, as torch's SyncBatchNorm (DDP reduces them).
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_gd * invstd).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_g.to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            both = torch.stack([sum_g, sum_gd])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.process_group)
            grad_input = ops.batch_norm_apply_grad(
                grad_output, input, weight, mean, invstd, save_coef, sparse_index, sparse_coef,
                both[0].contiguous(), both[1].contiguous(), ctx.count, ctx.norm, ctx.p, ctx.index_offset)
        return (grad_input, grad_weight, grad_bias) + (None,) * 10


class SyncLpBatchNorm(_LpBatchNorm):
    """Lp batch norm over inputs of any rank >= 2 whose training statistics (mean, scale
    estimate, extremes) are reduced over ``process_group`` (default: the whole world), as
    ``torch.nn.SyncBatchNorm``; processes may hold different batch sizes. Results (outputs,
    input gradients, running statistics) equal those of one process over the concatenated
    batch; ``weight``/``bias`` gradients are per process, as torch's (DDP sums them).

    Works on CPU tensors (gloo) and CUDA tensors (NCCL or gloo); on CUDA the stage operators
    are compositions of ATen operators (lpnorm/_composite_stages.py), not native kernels.
    Other devices are refused with a NotImplementedError. ``chunks`` (ghost batches) is not
    supported: only ``chunks=1``; nor is ``accumulate="half"``.
    In evaluation, or without an initialized process group of more than one process, it is
    a plain :class:`LpBatchNorm2d`-like layer on the local batch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        norm: str = "l1",
        k: int = 10,
        p: float = 2.0,
        chunks: int = 1,
        constant: str = "exact",
        accumulate: str = "float",
    ) -> None:
        if accumulate != "float":
            raise ValueError(f"SyncLpBatchNorm supports accumulate='float' only (its stage operators accumulate "
                             f"in float64); got accumulate={accumulate!r}")
        if chunks != 1:
            raise ValueError(
                f"SyncLpBatchNorm supports chunks=1 only (ghost batches are not split across processes); "
                f"got chunks={chunks!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         norm=norm, k=k, p=p, chunks=1, constant=constant)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        refuse_fx_symbolic_trace(self)
        self._check_input_dim(input)
        factor = self._running_factor()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None

        need_sync = use_batch_stats and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            process_group = self.process_group if self.process_group is not None else dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if need_sync and input.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(
                f"SyncLpBatchNorm: synchronized statistics need CPU or CUDA tensors (its stage operators have "
                f"kernels for those); got input on {input.device}. LpBatchNorm*d normalizes each process's batch "
                f"on any device")
        if need_sync:
            # The fused operator's argument checks (channels, dtypes, eps, the norm's options) on
            # an empty slice of the batch, before any collective: a refused call raises on every
            # process alike, with LpBatchNorm*d's message (an empty batch leaves the running
            # statistics alone; the stage operators check the global m themselves).
            with torch.no_grad():
                torch.ops.lpnorm.batch_norm_forward(input[:0], self.weight, self.bias, running_mean, running_var, True,
                                                    factor, self.eps, self.norm, self.k, self.p, 1, self.constant)
        if not need_sync:
            return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                                         factor, self.eps, self.norm, self.k, self.p, 1, self.constant)
        return _SyncLpBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                              factor, process_group, world_size, self.norm, self.k, self.p,
                                              self.constant)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replaces every ``LpBatchNorm1d/2d/3d`` (and ``LpBatchNormNd``) in ``module`` by a
        ``SyncLpBatchNorm`` with the same options, sharing parameters and buffers, as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for ``nn.BatchNorm*d``.

        ``torch.nn.BatchNorm*d`` layers are left alone (use torch's own
        ``convert_sync_batchnorm`` for them, or :func:`lpnorm.convert` first). A layer with
        ``chunks != 1`` is refused with a ValueError naming ``chunks``. An ``LpBatchNormNd``
        keeps its own ``process_group`` when none is given here.
        """
        module_output = module
        if isinstance(module, _LpBatchNorm) and not isinstance(module, SyncLpBatchNorm):
            if module.chunks != 1:
                raise ValueError(
                    f"convert_sync_batchnorm: SyncLpBatchNorm supports chunks=1 only; {type(module).__name__} "
                    f"has chunks={module.chunks}")
            if module.accumulate != "float":
                raise ValueError(
                    f"convert_sync_batchnorm: SyncLpBatchNorm supports accumulate='float' only; "
                    f"{type(module).__name__} has accumulate={module.accumulate!r}")
            group = process_group if process_group is not None else getattr(module, "process_group", None)
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, group, bias=not module.affine or module.bias is not None,
                                norm=module.norm, k=module.k, p=module.p, constant=module.constant)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output
