"""A small, complete exercise of the CUDA kernels for compute-sanitizer (tools/gpu_session.sh):
forward + backward of every norm, float16 / float32 (and a few bfloat16 / float64), NCHW / NHWC /
2-D, training and eval, small shapes plus the geometry edge cases (several blocks per channel,
odd sizes without vector loads, a misaligned input, several channel tiles, empty batches,
no channels, an all-NaN channel). Every kernel of the backend is launched at least once.

    compute-sanitizer --tool memcheck python tools/cuda_smoke.py [--quick]

Prints one line per case and a count; exits 1 when a result is not finite where it must be.
Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under the sanitizer: torch's caching allocator
otherwise hands out pieces of larger blocks, and an overrun into a neighbour goes unseen.
"""
import argparse
import sys

import torch

import lpnorm

NORMS = [dict(norm="l2"), dict(norm="l1"), dict(norm="linf"), dict(norm="topk", k=10),
         dict(norm="topk", k=32), dict(norm="topk", k=3, chunks=2), dict(norm="range", chunks=2),
         dict(norm="p", p=1.5), dict(norm="linf", constant="paper")]

SHAPES = {  # name: (shape, memory format)
    "nchw": ((4, 6, 5, 7), torch.contiguous_format),
    "nhwc": ((4, 6, 5, 7), torch.channels_last),
    "nc": ((24, 5), torch.contiguous_format),
}
EDGE_SHAPES = {
    "nchw-splits-odd": ((16, 2, 33, 33), torch.contiguous_format),  # 2 blocks per channel, no vectors
    "nchw-splits-vec": ((32, 2, 24, 24), torch.contiguous_format),
    "nhwc-C40": ((8, 40, 6, 6), torch.channels_last),
    "nhwc-C264": ((4, 264, 3, 3), torch.channels_last),  # two channel tiles
    "nc-rows": ((20000, 3), torch.contiguous_format),
}


def run(x, norm_kwargs, training, param_dtype):
    C = x.shape[1]
    device = x.device
    weight = (torch.rand(C, device=device) + 0.5).to(param_dtype).requires_grad_()
    bias = torch.randn(C, device=device).to(param_dtype).requires_grad_()
    running_mean = torch.zeros(C, device=device, dtype=param_dtype)
    running_var = torch.ones(C, device=device, dtype=param_dtype)
    x = x.detach().requires_grad_()
    y = lpnorm.functional.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                                     **norm_kwargs)
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()  # a fault shows at this case
    return y, x.grad, weight.grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="float16 and float32 NCHW/NHWC only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device")
        return 0
    torch.manual_seed(0)
    cases = bad = 0

    def case(label, x, norm_kwargs, training=True, param_dtype=torch.float32, finite=True):
        nonlocal cases, bad
        y, grad_x, grad_w = run(x, norm_kwargs, training, param_dtype)
        cases += 1
        ok = not finite or all(t.isfinite().all() for t in (y, grad_x, grad_w))
        bad += not ok
        print(("ok  " if ok else "BAD ") + label, flush=True)

    dtypes = [torch.float16, torch.float32] + ([] if args.quick else [torch.bfloat16, torch.float64])
    for dtype in dtypes:
        param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        shapes = dict(SHAPES) if args.quick else dict(SHAPES, **EDGE_SHAPES)
        if dtype in (torch.bfloat16, torch.float64):
            shapes = SHAPES
        for name, (shape, memory_format) in shapes.items():
            x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
            for norm_kwargs in NORMS:
                m = x.numel() // shape[1]
                if norm_kwargs.get("k", 1) > m // norm_kwargs.get("chunks", 1):
                    continue
                for training in (True, False):
                    case(f"{dtype} {name} {norm_kwargs} {'train' if training else 'eval'}", x, norm_kwargs,
                         training, param_dtype)
    if args.quick:
        print(f"cuda_smoke: {cases} cases, {bad} bad")
        return 1 if bad else 0
    # an input one element into its storage: no vector loads
    storage = torch.randn(4 * 6 * 8 * 8 + 1, device="cuda", dtype=torch.float16)
    x = storage[1:].view(4, 6, 8, 8)
    for norm_kwargs in NORMS[:4]:
        case(f"misaligned float16 {norm_kwargs}", x, norm_kwargs)
    # empty batch, no channels, an all-NaN channel
    for norm_kwargs in NORMS:
        case(f"N=0 {norm_kwargs}", torch.randn(0, 3, 4, 4, device="cuda"), norm_kwargs)
        case(f"C=0 {norm_kwargs}", torch.randn(4, 0, 4, 4, device="cuda"), norm_kwargs)
        x = torch.randn(4, 3, 4, 4, device="cuda")
        x[:, 1] = float("nan")
        case(f"NaN channel {norm_kwargs}", x, norm_kwargs, finite=False)
    print(f"cuda_smoke: {cases} cases, {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
