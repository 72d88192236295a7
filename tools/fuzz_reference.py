"""Random cases of lpnorm.functional.batch_norm against the float64 reference of tests/reference.py.

Each case draws a shape (2-d to 5-d, channel counts around the vector widths), a layout
(contiguous, sliced, transposed, channels-last), a dtype, a norm with its k / p / chunks /
constant, and data (Gaussian, ties from rounding to halves, or an offset of 1000 in float64),
then runs tests/test_batch_norm.py's check: two training steps (output, the three gradients,
running statistics) and one evaluation step. A failure prints the case and the command that
replays it alone.

    python tools/fuzz_reference.py --seconds 120                 # this machine's best ISA
    LPNORM_CPU_ISA=avx2 LPNORM_CPU_SCHEDULE=split python tools/fuzz_reference.py --seconds 60
    python tools/fuzz_reference.py --device cuda --seconds 120   # the GPU against the reference
    python tools/fuzz_reference.py --case 229866284              # one case again
    python tools/fuzz_reference.py --path stages --seconds 60    # SyncLpBatchNorm's stage operators

`--path stages` runs each training step through SyncLpBatchNorm's autograd function (the stage
operators batch_norm_collect ... batch_norm_apply_grad) in a gloo process group of one, which
is what each process of a synchronized batch norm runs; no chunks there (SyncLpBatchNorm has
none).

Cases the check cannot judge are not drawn: fewer than 4 values per channel, or 3 per chunk
(the gradient is then a cancellation near 0, and the check's tolerance is relative to it), and
channels whose values are all equal (the reference's sqrt(0) gives NaN gradients). Offsets
only in float64 (float32 with an offset of 1000 loses digits in torch's batch norm as much).
What may still show, rarely: an element of l1 (or p = 1) within the float mean's rounding of
the mean gets another sign(d) than float64 gives it (docs/DESIGN.md, "Where the kink of
sign(d) lies"); and with one channel, a float32 weight gradient whose sum of g * y cancels to
1e-3 of its terms is judged against that small value (torch's own float32 batch norm is off
by as much there).
"""
import argparse
import os
import random
import sys
import time

import torch

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)

import conftest  # noqa: E402
import test_batch_norm  # noqa: E402

CHANNELS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 64, 65, 100, 130, 255, 257, 1024]
ROWS = [2, 3, 5, 16, 17, 64, 100, 256, 300, 1000, 2050, 4100]
SIDES = [1, 2, 3, 5, 7, 8, 14, 16, 17]
MAX_ELEMENTS = 600_000


def draw(seed, max_elements=MAX_ELEMENTS, chunks=True):
    """The case of `seed`, or None where the check cannot judge it (or it is too big)."""
    r = random.Random(seed)
    rank = r.choice([2, 2, 3, 4, 4, 5])
    C = r.choice(CHANNELS)
    if rank == 2:
        shape = (r.choice(ROWS), C)
    else:
        shape = (r.choice([1, 2, 3, 4, 8]), C) + tuple(r.choice(SIDES) for _ in range(rank - 2))
    numel = 1
    for size in shape:
        numel *= size
    m = numel // C
    norm = r.choice(["l2", "l1", "linf", "topk", "topk", "topk", "range", "p"])
    kwargs = dict(norm=norm)
    if norm == "topk":
        kwargs["k"] = r.choice([1, 2, 3, 5, 10, 16, 17, 24, 33, 48, 64, 65, 100])
    if norm == "p":
        kwargs["p"] = r.choice([1.5, 2.5, 3.0, 4.0])
    extreme = norm in ("linf", "topk", "range")
    if extreme and r.random() < 0.35 and chunks:
        divisors = [g for g in (2, 3, 4, 8) if shape[0] % g == 0]
        if divisors:
            kwargs["chunks"] = r.choice(divisors)
    if extreme and r.random() < 0.2:
        kwargs["constant"] = "paper"
    chunk_m = m // kwargs.get("chunks", 1)
    if numel > max_elements or m < 4 or chunk_m < 3:
        return None
    if norm == "topk":
        kwargs["k"] = min(kwargs["k"], chunk_m)
    dtype_name = r.choice(["float32", "float32", "float64", "bfloat16", "float16", "bfloat16-mixed"])
    layouts = ["contiguous", "sliced", "transposed"] + {4: ["channels_last"], 5: ["channels_last_3d"]}.get(rank, [])
    layout = r.choice(layouts)
    data = r.choice(["gauss", "gauss", "ties", "offset"])
    if data == "offset" and dtype_name != "float64":
        data = "gauss"
    affine, track = r.random() < 0.8, r.random() < 0.8
    return dict(seed=seed, shape=shape, kwargs=kwargs, dtype=dtype_name, layout=layout, data=data,
                affine=affine, track=track)


def batches(case, device):
    dtype = conftest.DTYPES[case["dtype"]][0]
    torch.manual_seed(case["seed"])
    out = []
    for step in range(2):
        x = conftest.batch(case["shape"], torch.float64, step)
        if case["data"] == "ties":
            x = torch.round(x * 2) / 2
        elif case["data"] == "offset":
            x = x + 1000.0
        x = x.to(dtype)
        rows = x.transpose(0, 1).reshape(x.shape[1], -1)
        if bool((rows.amax(dim=1) == rows.amin(dim=1)).any()):
            return None  # a constant channel: see the module's docstring
        x = x.to(device)  # then the layout: .to() would not keep a non-dense view's strides
        try:
            x = getattr(conftest, case["layout"])(x)
        except AssertionError:  # the layout is contiguous for this shape
            pass
        out.append(x)
    return out


def run(case, device):
    """None where the case passes, "" where its data has a constant channel (not judged), else
    the failure's first lines."""
    xs = batches(case, device)
    if xs is None:
        return ""
    param_dtype = conftest.DTYPES[case["dtype"]][1]
    try:
        test_batch_norm.check_against_reference(xs, case["kwargs"], param_dtype, affine=case["affine"],
                                                track=case["track"])
    except (AssertionError, RuntimeError, ValueError) as error:
        return " | ".join(str(error).splitlines()[:4])[:400]
    return None


def use_stage_operators():
    """lpnorm.functional.batch_norm's training steps through SyncLpBatchNorm's stage operators,
    in a gloo process group of one (evaluation stays the fused operator, as in SyncLpBatchNorm)."""
    import tempfile

    import torch.distributed as dist

    import lpnorm
    from lpnorm.nn import sync_batchnorm

    store = tempfile.NamedTemporaryFile(prefix="lpnorm-fuzz-", delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    fused = lpnorm.functional.batch_norm

    def staged(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               norm="l1", k=10, p=2.0, chunks=1, constant="exact"):
        if not training:
            return fused(input, running_mean, running_var, weight, bias, training, momentum, eps, norm, k, p, chunks,
                         constant)
        assert chunks == 1, "SyncLpBatchNorm has no chunks"
        return sync_batchnorm._SyncLpBatchNormFunction.apply(input, weight, bias, running_mean, running_var, eps,
                                                             momentum, dist.group.WORLD, 1, norm, k, p, constant)

    lpnorm.functional.batch_norm = staged


def describe(case):
    return (f"shape={case['shape']} {case['kwargs']} {case['dtype']} {case['layout']} {case['data']} "
            f"affine={case['affine']} track={case['track']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to draw cases")
    parser.add_argument("--cases", type=int, default=0, help="stop after this many cases (0: no limit)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the seeds")
    parser.add_argument("--case", type=int, help="run the case of this seed alone")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch's threads (0: its default)")
    parser.add_argument("--max-elements", type=int, default=MAX_ELEMENTS, help="the largest input drawn")
    parser.add_argument("--path", choices=["fused", "stages"], default="fused",
                        help="the fused operator, or SyncLpBatchNorm's stage operators")
    args = parser.parse_args()
    if args.path == "stages":
        use_stage_operators()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seeds = random.Random(args.seed)
    start, ran, failed = time.time(), 0, 0
    while True:
        if args.case is not None:
            seed = args.case
        else:
            if time.time() - start > args.seconds or (args.cases and ran >= args.cases):
                break
            seed = seeds.randrange(1 << 30)
        case = draw(seed, args.max_elements, chunks=args.path == "fused")
        error = run(case, args.device) if case is not None else ""
        if error != "":
            ran += 1
            if error is not None:
                failed += 1
                print(f"FAIL {describe(case)}\n  {error}\n  replay: python tools/fuzz_reference.py --case {seed}"
                      f" --device {args.device} --max-elements {args.max_elements} --path {args.path}", flush=True)
        if args.case is not None:
            if error == "":
                print(f"case {seed} is not judged (see the docstring)")
            break
    settings = ", ".join(f"{name}={os.environ[name]}" for name in ("LPNORM_CPU_ISA", "LPNORM_CPU_SCHEDULE")
                         if name in os.environ)
    print(f"{ran} cases, {failed} failed ({args.device}, {args.path}{', ' + settings if settings else ''})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
