"""The CPU kernels at every instruction-set build this machine runs (baseline, avx2, avx512), and
under both schedules of the CPU glue (fused: every pass of a channel while it is in cache;
split: passes over tiles whose partial statistics are combined), against the float64 reference.

Covers what vector kernels get wrong: lengths that leave vector tails, channels-last and other
strides, inputs at odd storage offsets, few channels with many elements (a channel split across
tiles), extremes tied across tiles, sums over ~1e7 float elements. No timings are asserted.
"""
import math

import pytest
import torch

import lpnorm
import reference
from conftest import assert_close, batch, channels_last, channels_last_3d, contiguous, sliced

ISAS = list(lpnorm._C.supported_cpu_isas())
SCHEDULES = ["auto", "fused", "split"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the named kernel build, then restores the one in use before."""
    before = lpnorm._C.cpu_isa()
    assert lpnorm._C.set_cpu_isa(request.param) == request.param
    assert lpnorm._C.cpu_isa() == request.param
    yield request.param
    lpnorm._C.set_cpu_isa(before)


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    if request.param == "auto":
        monkeypatch.delenv("LPNORM_CPU_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("LPNORM_CPU_SCHEDULE", request.param)
    return request.param


NORMS = [
    dict(norm="l2"),
    dict(norm="l1"),
    dict(norm="linf"),
    dict(norm="topk", k=3),
    dict(norm="range", chunks=2),
    dict(norm="topk", k=2, chunks=2),
    dict(norm="p", p=3.0),
]
NORM_IDS = ["-".join(str(v) for v in n.values()) for n in NORMS]


def misaligned(x):
    """x's values in a tensor whose data starts one element past an aligned address."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    assert view.storage_offset() == 1
    return view


def misaligned_channels_last(x):
    flat = torch.empty(x.numel() + 3, dtype=x.dtype)
    perm = (0, 2, 3, 1)
    view = flat[3:].view(tuple(x.shape[i] for i in perm)).permute(0, 3, 1, 2)
    view.copy_(x)
    assert view.is_contiguous(memory_format=torch.channels_last)
    return view


# (shape, layout): odd spatial sizes leave a vector tail in every plane; 37 and 19 channels
# leave one in every channels-last row; 83 channels take several vectors of channels at a time
# plus a short last chunk, over more rows than one fold; (1030, 3) puts the whole channel in one
# strided run.
CASES = [
    ((6, 5, 7, 9), contiguous),
    ((6, 5, 7, 9), channels_last),
    ((4, 19, 3, 5), channels_last),
    ((4, 83, 5, 7), channels_last),
    ((4, 6, 3, 4, 5), channels_last_3d),
    ((34, 37), contiguous),
    ((1030, 3), lambda x: x.t().contiguous().t()),  # (N, C) with the batch dim contiguous
    ((6, 5, 7, 9), sliced),
    ((6, 5, 7, 9), misaligned),
    ((6, 19, 5, 3), misaligned_channels_last),
    ((6, 4, 21), contiguous),
]
CASE_IDS = ["nchw-tails", "nhwc", "nhwc-19", "nhwc-83", "ndhwc", "2d-37", "2d-batch-contiguous", "sliced",
            "misaligned", "misaligned-nhwc", "3d"]


def check(x, norm_kwargs, param_dtype=None, steps=2):
    """Training forward and backward of lpnorm against the reference (output, grads, running
    stats), then an eval-mode forward."""
    param_dtype = param_dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    C = x.shape[1]
    weight = (torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype)
    bias = torch.randn(C, dtype=torch.float64).to(param_dtype)
    running_mean = torch.zeros(C, dtype=param_dtype)
    running_var = torch.ones(C, dtype=param_dtype)
    ref_mean, ref_var = running_mean.clone(), running_var.clone()
    for _ in range(steps):
        xi = x.detach().requires_grad_()  # same storage, offset and strides as x
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y = lpnorm.functional.batch_norm(xi, running_mean, running_var, w, b, training=True, **norm_kwargs)
        grad = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
        y.backward(grad)
        ry, gx, gw, gb = reference.forward_backward(xi, ref_mean, ref_var, weight, bias, grad, training=True,
                                                    momentum=0.1, eps=1e-5, **norm_kwargs)
        assert_close(y, ry, what="output")
        assert_close(xi.grad, gx, what="grad of input")
        assert_close(w.grad, gw, dtype=x.dtype, what="grad of weight")
        assert_close(b.grad, gb, dtype=x.dtype, what="grad of bias")
        assert_close(running_mean, ref_mean, dtype=x.dtype, what="running_mean")
        assert_close(running_var, ref_var, dtype=x.dtype, what="running_var")
    with torch.no_grad():
        y = lpnorm.functional.batch_norm(x, running_mean, running_var, weight, bias, training=False, **norm_kwargs)
    assert_close(y, reference.batch_norm(x, running_mean, running_var, weight, bias, norm="l2"), what="eval")


@pytest.mark.parametrize("norm_kwargs", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_layouts_every_isa_and_schedule(isa, schedule, shape, layout, norm_kwargs):
    x = layout(batch(shape, torch.float32))
    check(x, norm_kwargs)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="linf")], ids=["l2", "l1", "linf"])
@pytest.mark.parametrize("shape", [(17, 83, 28, 28), (34, 40, 28, 28)], ids=["83-channels", "40-channels"])
def test_channels_last_beyond_caches(isa, shape, norm_kwargs):
    """Channels-last tensors of 4 MiB or more read their whole rows in memory order, fetching
    ahead where a vector is a cache line: rows of more than four vectors one by one
    (parameters, accumulators and means loaded for every vector), rows of up to four in blocks
    of rows. 83 and 40 channels leave a short last vector in every row."""
    x = channels_last(batch(shape, torch.float32))
    assert x.numel() * x.element_size() >= 4 << 20
    check(x, norm_kwargs, steps=1)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="linf")], ids=["l2", "l1", "linf"])
def test_channel_major_beyond_caches(isa, norm_kwargs):
    """NCHW tensors of 4 MiB or more fetch their long planes ahead, and near a plane's end the
    channel's next plane: sums and element passes over 26 KB planes, 20 channels."""
    x = batch((8, 20, 80, 82), torch.float32)
    assert x.numel() * x.element_size() >= 4 << 20
    check(x, norm_kwargs, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="topk", k=3)], ids=["l2", "l1", "topk"])
@pytest.mark.parametrize("shape,layout", [((5, 7, 13, 3), contiguous), ((5, 7, 13, 3), misaligned), ((3, 9, 4, 4), contiguous),
                                          ((3, 9, 4, 4), misaligned), ((4, 6, 17, 1), misaligned),
                                          ((2, 512, 14, 14), contiguous)],
                         ids=["39", "39-misaligned", "16", "16-misaligned", "17-misaligned", "2-samples-512-channels"])
def test_short_planes_walked_as_one_run(isa, schedule, shape, layout, norm_kwargs, stream, dtype, monkeypatch):
    """Short contiguous planes of several channels are walked as one run: vectors straddle two
    channels' planes (lanes of each take their channel's parameters), whole lines are streamed
    from the first aligned one; a plane of whole lines (16 float32) is streamed on its own. Plane
    sizes around a vector (16, 17, 39 elements), x aligned and not; (2, 512, 14, 14) has fewer
    samples than the evaluation's blocks, which then hold one sample's channels each."""
    monkeypatch.setenv("LPNORM_CPU_STREAM", stream)
    check(layout(batch(shape, dtype)), norm_kwargs, steps=1)


@pytest.mark.parametrize("shape,dtype", [((1, 1100, 13, 13), torch.float32), ((1, 14578, 18), torch.bfloat16)],
                         ids=["float32", "bfloat16-across-planes"])
def test_short_planes_head_before_the_first_whole_line(isa, shape, dtype, monkeypatch):
    """The evaluation's second tile (channels 550 and 7289 on, of one sample) starts mid-line:
    ordinary stores up to the first whole line (10 float32 elements in one plane; 30 bfloat16
    elements, across a plane's end), streamed lines, then a partial last line."""
    monkeypatch.setenv("LPNORM_CPU_STREAM", "1")
    check(batch(shape, dtype), dict(norm="l1"), steps=1)


def test_short_planes_beyond_caches(isa):
    """(48, 128, 14, 14) float32, 4.8 MB: fused tiles of 4 channels, whose 784-byte planes
    are whole lines together, streamed."""
    x = batch((48, 128, 14, 14), torch.float32)
    assert x.numel() * x.element_size() >= 4 << 20
    check(x, dict(norm="l1"), steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="topk", k=3)], ids=["l2", "topk"])
@pytest.mark.parametrize("shape,layout", CASES + [((2, 3, 64, 70), contiguous), ((2, 3, 64, 70), misaligned),
                                                  ((3, 64, 5, 7), channels_last), ((16, 64), contiguous)],
                         ids=CASE_IDS + ["long-runs", "long-runs-misaligned", "nhwc-64", "2d-64"])
def test_non_temporal_stores(isa, shape, layout, dtype, norm_kwargs, monkeypatch):
    """Large outputs are written with non-temporal stores, whole aligned cache lines of long
    runs or channels-last rows only: forced here on small inputs, with runs long enough to
    stream (at every alignment) and too short to."""
    monkeypatch.setenv("LPNORM_CPU_STREAM", "1")
    check(layout(batch(shape, dtype)), norm_kwargs, steps=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_kwargs", NORMS, ids=NORM_IDS)
@pytest.mark.parametrize("shape,layout", [CASES[0], CASES[2], CASES[5]], ids=["nchw", "nhwc", "2d"])
def test_dtypes_every_isa(isa, shape, layout, dtype, norm_kwargs):
    check(layout(batch(shape, dtype)), norm_kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_storage_rounds_like_torch(isa, dtype):
    """Eval mode with mean 0, var 1, eps 0 and weight 2 makes y = 2x + bias exactly in float;
    rounding it to the half type must match torch's conversion bit for bit (nearest-even,
    subnormals, overflow to inf, NaN), in the vector bodies and the tails."""
    x = (torch.randn(8, 3, 11, 17) * 300).to(dtype)
    special = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 3e-5, 6e-5, 65504.0, 7e4, 1e38, math.inf, -math.inf,
                            math.nan, 2.0 ** -130, 1.00048828125, 1.00146484375])
    for c in range(3):
        x[0, c, 0, :special.numel()] = special.to(dtype)
        x[7, c, 10, -special.numel():] = special.to(dtype)
    weight, bias = torch.full((3,), 2.0), torch.tensor([0.0, 0.5, -0.25])
    y = lpnorm.functional.batch_norm(x, torch.zeros(3), torch.ones(3), weight, bias, training=False, eps=0.0)
    expected = (x.float() * 2.0 + bias.view(1, 3, 1, 1)).to(dtype)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


def test_few_channels_many_elements_are_split(isa, schedule):
    """C = 2 and m = 2^17: the auto schedule cuts each channel into row parts; extremes and
    sums of the parts must combine to the whole channel's."""
    x = batch((8, 2, 128, 128), torch.float32)
    for norm_kwargs in (dict(norm="l1"), dict(norm="topk", k=5), dict(norm="range", chunks=4)):
        check(x, norm_kwargs, steps=1)


@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("norm_kwargs", [dict(norm="linf"), dict(norm="topk", k=4), dict(norm="range", chunks=2),
                                         dict(norm="topk", k=3, chunks=4)], ids=["linf", "topk", "range", "topk-c4"])
def test_ties_go_to_the_lowest_index_across_tiles(isa, schedule, layout, norm_kwargs):
    """Integer-valued data: the max, min and top-k values repeat many times, in many tiles. The
    gradient lands on the lowest indices, as the reference's stable sort puts it."""
    x = layout(torch.randint(-4, 5, (32, 3, 40, 40)).float())
    check(x, norm_kwargs, steps=1)


@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["nchw", "nhwc"])
def test_range_of_a_constant_chunk(isa, layout):
    """A constant chunk's max and min are one element (its lowest index): range's two sparse
    gradient terms land on it and must add up, where one written over the other is off by
    the chunk's whole coefficient."""
    x = batch((8, 3, 4, 5), torch.float32)
    x[:4, 1] = 0.5  # channel 1: the first of its two chunks
    check(layout(x), dict(norm="range", chunks=2), steps=1)


# Channels-innermost extremes go through per-lane lists (a vector of channels inserted at
# once) in tiles of 64 channels: 150 channels leave a partial tile and a partial vector; k close
# to m fills the lists from the first rows; chunks restart them mid-tile.
LANE_NORMS = [dict(norm="linf"), dict(norm="topk", k=10), dict(norm="topk", k=23), dict(norm="topk", k=5, chunks=4),
              dict(norm="range", chunks=2), dict(norm="linf", chunks=8)]
LANE_IDS = ["linf", "topk10", "topk-k23-of-24", "topk-k5-chunks4", "range-chunks2", "linf-chunks8"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_kwargs", LANE_NORMS, ids=LANE_IDS)
def test_channels_innermost_extremes_in_lanes(isa, schedule, norm_kwargs, dtype):
    """Few rows, many channels ((N, C) and channels-last), integer data so the extremes tie
    many times: the lists keep the lowest indices, as the reference's stable sort."""
    x = torch.randint(-3, 4, (24, 150)).to(dtype)
    check(x, norm_kwargs, steps=1)
    check(channels_last(torch.randint(-3, 4, (8, 70, 3, 1)).to(dtype)), norm_kwargs, steps=1)
    check(batch((24, 150), dtype), norm_kwargs, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 2.7, 3.0, 4.5, 10.0])
def test_general_p_every_exponent_class(isa, p, dtype):
    """The general-p norm takes |d|^(p - 1) by multiplications where p - 1 is whole, times a
    square root where it is a whole and a half, and by std::pow otherwise (2.7): forward,
    backward and running statistics against the reference, channels-innermost and
    channel-major, in every build."""
    for x in (batch((16, 20), dtype), channels_last(batch((4, 20, 5, 3), dtype)), batch((3, 5, 33), dtype)):
        check(x, dict(norm="p", p=p), steps=1)
    if dtype == torch.float64:  # past the multiplications' limit (p - 1 = 64): std::pow
        check(batch((16, 20), dtype) * 0.5, dict(norm="p", p=66.0), steps=1)


def sawtooth_rows(rows, channels, period, dtype):
    """(rows, channels): channel c climbs (even c) or falls (odd c) by one every 3 rows, from 0
    again every `period` rows (ties in threes); the last 4 channels are Gaussian."""
    r = torch.arange(rows, dtype=torch.float64)
    ramp = torch.div(r % period, 3, rounding_mode="floor")
    sign = torch.tensor([1.0 if c % 2 == 0 else -1.0 for c in range(channels)], dtype=torch.float64)
    x = ramp[:, None] * sign[None, :]
    x[:, -4:] = torch.randn(rows, 4, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_kwargs", [dict(norm="topk", k=10), dict(norm="topk", k=10, chunks=2),
                                         dict(norm="linf"), dict(norm="topk", k=23)],
                         ids=["topk10", "topk10-chunks2", "linf", "topk23"])
def test_lane_lists_flushed_mid_chunk(isa, schedule, norm_kwargs, dtype):
    """Channels-innermost lists of long channels flush when their copies fill up (every row
    beats the bounds of a climbing or falling channel: one flush per 2048 rows here) and keep
    their network's bounds for the rest of the chunk; a new chunk starts from nothing (the
    sawtooth starts again at 0 there, below the first chunk's bounds)."""
    x = sawtooth_rows(6000, 20, 3000, dtype)
    check(x, norm_kwargs, steps=1)
    check(x.view(1500, 2, 2, 20).permute(0, 3, 1, 2), norm_kwargs, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_kwargs", NORMS, ids=NORM_IDS)
def test_wide_fused_spans(isa, norm_kwargs, dtype):
    """(N, C) with few rows and many channels runs fused in spans of up to 1 KiB of each row
    (256 float32 channels), the last span short (1040 channels)."""
    check(batch((20, 1040), dtype), norm_kwargs, steps=1)
    check(torch.randint(-3, 4, (12, 1040)).to(dtype), norm_kwargs, steps=1)


@pytest.mark.parametrize("norm_kwargs", NORMS, ids=NORM_IDS)
def test_wide_channels_last_spans(isa, schedule, norm_kwargs):
    """Channels-last rows of 200 channels: the split schedule's tiles take whole rows (one
    span, the row blocks combined), the fused one spans of 64 channels, the last one short."""
    check(channels_last(batch((40, 200, 8, 8), torch.float32)), norm_kwargs, steps=1)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=3)], ids=["l1", "topk-3"])
@pytest.mark.parametrize("layout", [contiguous, sliced], ids=["nchw", "sliced"])
def test_element_wise_pass_in_memory_order(isa, schedule, layout, norm_kwargs):
    """Evaluation and the split schedule's element-wise pass walk NCHW planes in memory order,
    all channels at once, in row blocks of about 256 KiB: here two blocks, the cut inside a plane
    (5 x 1763 elements per channel)."""
    check(layout(batch((5, 16, 41, 43), torch.float32)), norm_kwargs, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["nchw", "nhwc"])
def test_l1_sign_of_zero_deviation(isa, layout, dtype):
    """Channels of -1, 0, 1 in turn: the mean is exactly 0 and a third of the elements sit on it,
    where phi = sign(d) is 0 (each build's vector sign; AVX-512 maps input classes in one
    instruction). A sign of +1 or -1 there moves sum(phi) by m / 3 and the gradient with it."""
    values = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).repeat(6 * 5 * 7 * 9 // 3)
    x = values.view(6, 7, 9, 5).permute(0, 3, 1, 2).contiguous() * torch.linspace(0.5, 2.0, 5).view(1, 5, 1, 1)
    check(layout(x.to(dtype)), dict(norm="l1"), steps=1)


def lane_list_data(kind, rows, channels, dtype):
    """(rows, channels) data that makes per-lane lists hard: ties, signed zeros, infinities, NaN,
    rows sorted so every row enters the lists."""
    gen = torch.Generator().manual_seed(rows * channels)
    if kind == "ties":
        return torch.randint(-3, 4, (rows, channels), generator=gen).to(dtype)
    if kind == "signed-zeros":  # -0 and +0 tie (compare equal) but keep their own bits in the lists
        x = torch.randint(-1, 2, (rows, channels), generator=gen).to(dtype)
        return torch.where(torch.rand(rows, channels, generator=gen) < 0.5, x, -x)
    if kind == "special":
        x = torch.randn(rows, channels, generator=gen, dtype=torch.float64).to(dtype)
        x[torch.rand(rows, channels, generator=gen) < 0.05] = math.inf
        x[torch.rand(rows, channels, generator=gen) < 0.05] = -math.inf
        x[torch.rand(rows, channels, generator=gen) < 0.05] = math.nan
        x[:, 1] = -math.inf  # a channel whose lists stay empty at the top end
        x[:, 2] = math.nan
        return x
    if kind == "ascending":  # every row beats the lists' k-th values (both ends for the negated half)
        x = torch.arange(rows, dtype=torch.float64).view(rows, 1) + torch.arange(channels) / channels
        x[:, ::2] *= -1
        return x.to(dtype)
    return torch.randn(rows, channels, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "ties", "signed-zeros", "special", "ascending"])
@pytest.mark.parametrize("k", [1, 2, 7, 10, 16, 17, 39, 40])
def test_channels_innermost_lists_equal_channel_major(isa, kind, k, dtype):
    """The per-lane lists of a channels-innermost walk hold the same values (bit for bit: -0 is
    not +0), indices and order as the channel-major walk's: largest first, ties by the lowest
    index, NaN and -inf never, empty slots last; k = 1, even, odd, the most kept in registers
    and more, k close to and equal to m; 37 channels leave a partial vector; 2600 rows exceed
    what the walk keeps before an early flush."""
    for rows, channels in [(40, 37), (2600, 21)]:
        if k > rows:
            continue
        x = lane_list_data(kind, rows, channels, dtype)
        column_major = x.t().contiguous().t()
        lists = [torch.ops.lpnorm.batch_norm_collect(v, "topk", k, 0) for v in (x, column_major)]
        (_, lane_value, lane_index), (_, value, index) = lists
        assert torch.equal(lane_index, index), (kind, rows, k)
        assert torch.equal(lane_value.view(torch.int64), value.view(torch.int64)), (kind, rows, k)
    nhwc = channels_last(x.view(rows // 20, 20, channels, 1).permute(0, 2, 1, 3))
    lists = [torch.ops.lpnorm.batch_norm_collect(v, "topk", k, 0) for v in (nhwc, nhwc.contiguous())]
    assert torch.equal(lists[0][2], lists[1][2]) and torch.equal(lists[0][1].view(torch.int64),
                                                                 lists[1][1].view(torch.int64))


@pytest.mark.parametrize("norm_kwargs", LANE_NORMS, ids=LANE_IDS)
def test_channels_innermost_nan_stays_in_its_channel(isa, norm_kwargs):
    """A NaN never enters a lane's list; its channel's output is NaN, the others are exact."""
    x = batch((24, 150), torch.float32)
    x[5, 7] = math.nan
    x[23, 140] = math.nan
    good = [c for c in range(150) if c not in (7, 140)]
    xi = x.clone().requires_grad_()
    y = lpnorm.functional.batch_norm(xi, None, None, training=True, **norm_kwargs)
    grad = torch.randn(y.shape)
    y.backward(grad)
    assert y[:, 7].isnan().all() and y[:, 140].isnan().all()
    ry, gx, _, _ = reference.forward_backward(x[:, good], None, None, torch.ones(len(good), dtype=torch.float64),
                                              torch.zeros(len(good), dtype=torch.float64), grad[:, good],
                                              training=True, momentum=0.1, eps=1e-5, **norm_kwargs)
    assert_close(y[:, good], ry, what="output of the other channels")
    assert_close(xi.grad[:, good], gx, what="grad of input, other channels")


@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_sums_stay_accurate_for_ten_million_floats(isa, layout, norm):
    """m = 10^7 float32 values with mean 1000 and spread 1: a float accumulator would lose
    about 3 digits of the mean and more of sigma; the kernels must stay near float64."""
    x = layout((torch.randn(40, 2, 500, 500, dtype=torch.float64) + 1000.0).float())
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    lpnorm.functional.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, norm=norm)
    rows = x.double().transpose(0, 1).reshape(2, -1)
    mu = rows.mean(1)
    d = rows - mu[:, None]
    sigma = d.pow(2).mean(1).sqrt() if norm == "l2" else math.sqrt(math.pi / 2) * d.abs().mean(1)
    m = rows.shape[1]
    # running stats are float32: allow their rounding (6e-8) and a little more
    assert ((running_mean.double() - mu).abs() <= 2e-7 * mu.abs()).all(), (running_mean, mu)
    assert ((running_var.double() - sigma ** 2 * m / (m - 1)).abs() <= 2e-6 * sigma ** 2).all(), (running_var, sigma)


@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["nchw", "nhwc"])
def test_l2_one_pass_keeps_the_variance_accurate(isa, schedule, layout):
    """l2 sums x - p and (x - p)^2 in one pass, p the mean of a channel's first 8 elements. A
    channel whose p is far from its mean (sorted values, an outlier first) goes to the deviation
    pass instead; either way mean and variance stay near float64 (mean 1000, spread 1)."""
    x = torch.randn(64, 4, 30, 30, dtype=torch.float64) + 1000.0
    x[:, 1] = x[:, 1].flatten().sort().values.view(64, 30, 30)  # first elements far below the mean
    x[0, 2, 0, 0] = 2000.0  # an outlier first
    x[:, 3] = 7.0  # constant: zero spread
    x = layout(x.float())
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    y = lpnorm.functional.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, norm="l2")
    rows = x.double().transpose(0, 1).reshape(4, -1)
    mu, var = rows.mean(1), rows.var(1)
    assert ((running_mean.double() - mu).abs() <= 2e-7 * mu.abs()).all(), (running_mean, mu)
    assert ((running_var.double() - var).abs() <= 2e-6 * var + 1e-30).all(), (running_var, var)
    assert_close(y, reference.batch_norm(x, None, None, None, None, training=True, norm="l2"), what="output")


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="topk", k=10),
                                         dict(norm="linf", chunks=2)], ids=["l2", "l1", "topk", "linf-chunks2"])
@pytest.mark.parametrize("shape,layout", [((24, 150), contiguous), ((256, 1024), contiguous),
                                          ((8, 64, 32, 32), channels_last), ((8, 2, 128, 128), contiguous),
                                          ((16, 24, 10, 10), contiguous)],
                         ids=["2d-spans", "2d-wide", "nhwc-row-blocks", "nchw-row-parts", "nchw-fused"])
def test_bit_identical_at_one_and_two_threads(isa, shape, layout, norm_kwargs):
    """The schedule comes from the shape alone: output, gradients and running statistics are
    the same bits whatever the thread count."""
    x = layout(batch(shape, torch.float32))
    grad = layout(torch.randn(shape))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        y = lpnorm.functional.batch_norm(xi, rm, rv, w, b, training=True, **norm_kwargs)
        y.backward(grad)
        results.append([y, xi.grad, w.grad, b.grad, rm, rv])
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="topk", k=10), dict(norm="linf")], ids=["topk", "linf"])
@pytest.mark.parametrize("shape,layout", [((256, 1024), contiguous), ((8, 256, 14, 14), channels_last)],
                         ids=["2d-wide", "nhwc-1k-rows"])
def test_element_pass_apart_from_fused_spans(isa, shape, layout, norm_kwargs):
    """Fused spans whose x and y overflow the L2 sets they reach leave the extreme norms'
    element pass to a pass over whole rows (plan.h, Plan::apply_apart): output, gradient and
    running statistics are still the reference's."""
    x = layout(batch(shape, torch.float32))
    grad = layout(torch.randn(shape))
    xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    y = lpnorm.functional.batch_norm(xi, rm, rv, None, None, training=True, **norm_kwargs)
    y.backward(grad)
    xr = x.double().requires_grad_()
    ref_mean, ref_var = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    yr = reference.batch_norm(xr, ref_mean, ref_var, training=True, **norm_kwargs)
    yr.backward(grad.double())
    assert_close(y, yr, what="output")
    assert_close(xi.grad, xr.grad, what="grad_input")
    assert_close(rm, ref_mean, what="running_mean")
    assert_close(rv, ref_var, what="running_var")


def allocated_bytes(fn):
    """Bytes allocated while fn runs (CPU allocator, every op), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=10)], ids=["l1", "topk"])
@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["nchw", "nhwc"])
def test_no_full_size_temporaries(layout, norm_kwargs):
    """Forward allocates its output and per-channel data only; backward its grad_input (and
    nothing for the saved x). No hidden copy of a channels-last input."""
    x = layout(batch((16, 8, 32, 32), torch.float32)).requires_grad_()
    grad = layout(torch.randn(x.shape))
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    rm, rv = torch.zeros(8), torch.ones(8)
    out = {}

    def forward():
        out["y"] = lpnorm.functional.batch_norm(x, rm, rv, weight, bias, training=True, **norm_kwargs)

    forward_bytes = allocated_bytes(forward)
    backward_bytes = allocated_bytes(lambda: out["y"].backward(grad))
    small = 64 * 1024
    assert out["y"].is_contiguous(memory_format=torch.channels_last) == (layout is channels_last)
    # at least the output / grad_input (the measurement works), nothing else full-size
    assert x.nbytes <= forward_bytes <= x.nbytes + small, forward_bytes / x.nbytes
    assert x.nbytes <= backward_bytes <= x.nbytes + small, backward_bytes / x.nbytes


def test_isa_choice_is_checked():
    with pytest.raises(Exception, match="not a build this CPU runs"):
        lpnorm._C.set_cpu_isa("sse9")
    assert ISAS[0] == "baseline"


def training_forward(x, norm, k, chunks=1):
    """The forward operator's outputs (y, mean, invstd, coef, sparse index, sparse coef) for a
    training call without affine parameters or running statistics."""
    return torch.ops.lpnorm.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, norm, k, 2.0, chunks,
                                               "exact", "float")


def reference_top_indices(x, k, chunks):
    """Per channel and chunk, the flat indices n * S + s of the k largest |x - mean| (mean of the
    whole channel), largest first, ties to the lowest index (a stable sort)."""
    C = x.shape[1]
    v = x.double().transpose(0, 1).reshape(C, -1)
    d = (v - v.mean(1, keepdim=True)).abs()
    per = v.shape[1] // chunks
    return torch.cat([torch.sort(d[:, j * per:(j + 1) * per], dim=1, descending=True, stable=True).indices[:, :k]
                      + j * per for j in range(chunks)], 1)


TOP_NORMS = [dict(norm="linf"), dict(norm="topk", k=4), dict(norm="topk", k=10, chunks=2),
             dict(norm="topk", k=12, chunks=2)]
TOP_IDS = ["linf", "topk4", "topk10-chunks2", "topk-k-equals-chunk"]


@pytest.mark.parametrize("data", ["integers", "gaussian"])
@pytest.mark.parametrize("norm_kwargs", TOP_NORMS, ids=TOP_IDS)
@pytest.mark.parametrize("shape,layout", [((24, 150), contiguous), ((24, 5, 7, 9), contiguous),
                                          ((8, 70, 3, 1), channels_last)], ids=["2d", "nchw", "nhwc"])
def test_top_deviations_are_picked_in_order(isa, schedule, shape, layout, norm_kwargs, data):
    """The saved sparse indices are the k largest |x - mean| of each chunk in order, ties to the
    lowest index: picked from the largest and the smallest values (integer data centred near 0
    takes them from both ends and ties them many times; k equal to the chunk takes every element,
    the lists then reach across the mean)."""
    gen = torch.Generator().manual_seed(3)
    raw = torch.randint(-3, 4, shape, generator=gen).float() if data == "integers" else torch.randn(shape, generator=gen)
    x = layout(raw)
    k, chunks = norm_kwargs.get("k", 1), norm_kwargs.get("chunks", 1)
    _, _, _, _, index, coef = training_forward(x, norm_kwargs["norm"], k, chunks)
    expected = reference_top_indices(x, k, chunks)
    assert torch.equal(index, expected)
    # the coefficient's sign is the deviation's (zero deviations: any sign, no effect)
    C = x.shape[1]
    d = (x.double().transpose(0, 1).reshape(C, -1) - x.double().transpose(0, 1).reshape(C, -1).mean(1, keepdim=True))
    picked = d.gather(1, expected)
    assert torch.all((coef.double() * picked.sign() >= 0) & (coef != 0) | (picked == 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("shape", [(6, 5, 9, 7), (40, 5, 3)], ids=["planes-of-63", "planes-of-3"])
def test_top_deviations_of_channel_major_lists(isa, dtype, k, shape):
    """Channel-major walks keep a channel's lists in registers: linf's one entry lane by lane
    (k = 1 here), top-k lists of up to one vector's lanes (4, 8 or 16 floats, 2, 4 or 8 doubles
    by level) in a vector, longer ones in memory. With k on both sides of those counts and
    integer data that ties many times, the saved indices are the reference's."""
    x = torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(k)).to(dtype)
    index = training_forward(x, "linf" if k == 1 else "topk", k)[4]
    assert torch.equal(index, reference_top_indices(x, k, 1))


@pytest.mark.parametrize("data", ["integers", "gaussian"])
@pytest.mark.parametrize("k", [17, 20, 24, 25, 32, 33, 48, 49, 64, 65, 100, 128])
@pytest.mark.parametrize("shape,layout", [((256, 40), contiguous), ((3000, 20), contiguous),
                                          ((64, 20, 4, 4), channels_last)], ids=["256-rows", "3000-rows", "nhwc"])
def test_top_deviations_past_sixteen_levels(isa, schedule, shape, layout, k, data):
    """Channels-innermost top-k networks of 24, 32, 48 and 64 levels (k = 17-64: block maxima
    and the bound's candidates ranked in slots) and past them (k = 65: every copy, exact; k = 100
    and 128 of 256 or 1024 rows: the copies sorted, LaneLists::sort_picks): the saved indices
    are the reference's, on spans that copy every vector (256 rows, nhwc) and that test each
    (3000 rows)."""
    gen = torch.Generator().manual_seed(k)
    raw = torch.randint(-5, 6, shape, generator=gen).float() if data == "integers" else torch.randn(shape, generator=gen)
    x = layout(raw)
    index = training_forward(x, "topk", k)[4]
    assert torch.equal(index, reference_top_indices(x, k, 1))
    if data == "gaussian" and k in (20, 32, 48, 64):
        check(x, dict(norm="topk", k=k), steps=1)


@pytest.mark.parametrize("data", ["integers", "gaussian"])
@pytest.mark.parametrize("k,chunks", [(10, 4), (5, 8), (20, 2), (16, 16)])
@pytest.mark.parametrize("shape,layout", [((256, 40), contiguous), ((16, 40, 4, 4), channels_last)], ids=["2d", "nhwc"])
def test_chunk_picks_of_whole_channels(isa, schedule, shape, layout, k, chunks, data):
    """Channels-innermost channels of at most 2048 rows copy every row; with chunks (ghost
    batches) each chunk's k largest |x - mean| (the whole channel's mean) are picked from its
    own copies once the walk is done: the saved indices are the reference's, chunk by chunk."""
    gen = torch.Generator().manual_seed(k * chunks)
    raw = torch.randint(-4, 5, shape, generator=gen).float() if data == "integers" else torch.randn(shape, generator=gen)
    x = layout(raw)
    index = training_forward(x, "topk", k, chunks)[4]
    assert torch.equal(index, reference_top_indices(x, k, chunks))
    if data == "gaussian":
        check(x, dict(norm="topk", k=k, chunks=chunks), steps=1)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="linf", chunks=4), dict(norm="linf", chunks=8),
                                         dict(norm="topk", k=3, chunks=4), dict(norm="topk", k=10, chunks=2)],
                         ids=["linf-chunks4", "linf-chunks8", "topk3-chunks4", "topk10-chunks2"])
@pytest.mark.parametrize("shape,layout", [((256, 40), contiguous), ((64, 40, 2, 2), channels_last)], ids=["2d", "nhwc"])
def test_chunked_channels_with_odd_chunks(isa, schedule, shape, layout, norm_kwargs):
    """The extreme norms' per-channel step runs over many channels side by side, chunk by chunk,
    and leaves to core a channel where one chunk does not fit that (a constant chunk: linf's
    ends on one side of the mean; top-k's ties past what the lanes rank). Channels 3, 17 and 39
    (the last vector's tail) have one constant chunk each, channel 20 is constant, the rest
    Gaussian: the indices are the reference's, and so are the outputs and gradients. Channel 30
    has a chunk of NaN: NaN statistics, and still valid indices."""
    gen = torch.Generator().manual_seed(shape[1] + norm_kwargs["chunks"])
    raw = torch.randn(shape, generator=gen)
    rows = shape[0] // norm_kwargs["chunks"]
    for channel, chunk in [(3, 1), (17, norm_kwargs["chunks"] - 1), (39, 0)]:
        raw[chunk * rows:(chunk + 1) * rows, channel] = 0.75
    raw[:, 20] = -1.25
    k = norm_kwargs.get("k", 1)
    good = [c for c in range(shape[1]) if c != 30]
    check(layout(raw), norm_kwargs, steps=1)
    raw[rows:2 * rows, 30] = math.nan  # a chunk without candidates
    x = layout(raw)
    _, _, _, _, index, coef = training_forward(x, norm_kwargs["norm"], k, norm_kwargs["chunks"])
    assert torch.equal(index[good], reference_top_indices(x[:, good], k, norm_kwargs["chunks"]))
    m = x.numel() // shape[1]
    assert ((index[30] >= 0) & (index[30] < m)).all() and coef[30].isnan().all()


def symmetric_offset_data(rows, channels, offset, scale):
    """offset + small integers * scale with each channel's rows paired as r, -r: the mean is the
    offset exactly, so |x - mean| ties across the two ends many times, and the sums are exact in
    float (the float mean and the double mean agree)."""
    gen = torch.Generator().manual_seed(rows + channels)
    half = torch.randint(-3, 4, (rows // 2, channels), generator=gen, dtype=torch.float64)
    order = torch.stack([torch.randperm(rows, generator=gen) for _ in range(channels)], 1)
    return (offset + torch.cat([half, -half]) * scale).gather(0, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "ties", "signed-zeros", "ascending", "offset"])
@pytest.mark.parametrize("k", [2, 7, 10, 16])
def test_top_deviations_of_lane_lists(isa, kind, k, dtype):
    """(N, C) inputs whose rows fit the caches take the forward with per-lane lists that keep
    only what can be among the k largest |x - mean| (a bound on the k-th from one network, then
    the values beyond mean +- that bound): the saved indices are still exactly the reference's,
    with ties across the ends, signed zeros, every row entering the lists, and a mean of 100
    where |x - mean| in float rounds coarsely. (Data whose sums are exact, so the kernel's mean
    is the reference's and ties of |x - mean| are ties for both.)"""
    for rows, channels in [(40, 37), (256, 70)]:
        if kind == "offset":
            if dtype in (torch.bfloat16, torch.float16):
                continue  # 100 + j / 256 is not a 16-bit float
            x = symmetric_offset_data(rows, channels, 100.0, 2.0 ** -8).to(dtype)
        elif kind == "ascending":  # whole numbers (exact sums), sorted up or down: every row enters
            x = (torch.arange(rows).view(rows, 1) * (1 - 2 * (torch.arange(channels) % 2)) + torch.arange(channels) % 5)
            x = x.to(dtype)
        else:
            x = lane_list_data(kind, rows, channels, dtype)
        _, _, _, _, index, _ = training_forward(x, "topk", k)
        assert torch.equal(index, reference_top_indices(x, k, 1)), (kind, rows, k)


@pytest.mark.parametrize("k", [2, 3, 10, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("values", [(3e-30, 2e-30, 1e-30), (0.0, 1e-30, 0.0)])
def test_top_deviations_where_x_minus_mean_rounds_together(isa, monkeypatch, k, dtype, values):
    """Three values whose x - mean rounds to one double (3e-30, 2e-30, 1e-30 around a mean near
    1, the largest in the earliest row) are ordered by value in core's lists, not by row (k = 2:
    the smallest values' list keeps rows 5 and 3, not row 1; with 0, 1e-30, 0 it keeps rows 1
    and 5). The fused forward, which can rank |x - mean| itself, picks what the split schedule's
    lists give core."""
    rows, channels = 256, 40
    x = torch.where(torch.arange(rows).view(rows, 1) % 2 == 0, 0.5, 1.5).repeat(1, channels).to(dtype)
    x[1, 5:], x[3, 5:], x[5, 5:] = values
    picks = {}
    for schedule in ("fused", "split"):
        monkeypatch.setenv("LPNORM_CPU_SCHEDULE", schedule)
        picks[schedule] = training_forward(x, "topk", k)[4]
    assert torch.equal(picks["fused"], picks["split"])
    assert set(picks["fused"][5, :2].tolist()) <= {1, 3, 5}


def test_lane_lists_kept_between_calls(isa):
    """A thread keeps its channels-innermost lists' buffers from call to call (growing them, or
    giving them back past 1 MiB). Calls that alternate between shapes that need short and long
    buffers, few and many list levels, one and two lists per lane, and NaN in a channel, each
    still pick the reference's indices, and a call repeated after the others gives the same
    bits."""
    gen = torch.Generator().manual_seed(5)
    calls = [((256, 70), "topk", 10), ((3000, 40), "topk", 40), ((24, 150), "topk", 3), ((256, 70), "linf", 1),
             ((2100, 33), "topk", 17), ((64, 2048), "topk", 30), ((256, 70), "topk", 100), ((256, 70), "topk", 10)]
    data = {shape: torch.randn(shape, generator=gen) for shape, _, _ in calls}
    data[(2100, 33)][7, 4] = math.nan
    outputs = []
    for shape, norm, k in calls:
        x = data[shape]
        out = training_forward(x, norm, k)
        good = [c for c in range(shape[1]) if not x[:, c].isnan().any()]
        assert torch.equal(out[4][good], reference_top_indices(x[:, good], k, 1)), (shape, norm, k)
        outputs.append(out)
    assert all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[-1]))


@pytest.mark.parametrize("rows,k", [(24, 10), (256, 100)])
def test_top_deviations_with_nan(isa, rows, k):
    """A NaN channel gives NaN statistics (and still valid indices); the other channels' picks
    stay exact (k = 100 of 256 rows: the sorted copies)."""
    x = torch.randn(rows, 150, generator=torch.Generator().manual_seed(4))
    x[3, 9] = math.nan
    _, _, _, _, index, coef = training_forward(x, "topk", k)
    good = [c for c in range(150) if c != 9]
    assert torch.equal(index[good], reference_top_indices(x[:, good], k, 1))
    assert ((index[9] >= 0) & (index[9] < rows)).all() and coef[9].isnan().all()


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("stats", ["float64", "float32", "float32-strided", "bfloat16"])
def test_running_stats_blend(momentum, stats):
    """SPEC §2 on the CPU: running * (1 - f) + f * batch in float64, as ATen's mul and
    add(alpha) compute it (float64: to the bit), then rounded to the statistics' dtype;
    float32/float64 statistics are blended in place on their data, any stride; others by ATen
    ops."""
    gen = torch.Generator().manual_seed(5)
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(stats, torch.float32)
    x = (torch.randn(16, 37, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    params = torch.float32 if dtype == torch.bfloat16 else dtype
    rm0 = torch.randn(37, generator=gen, dtype=torch.float64).to(params)
    rv0 = (torch.rand(37, generator=gen, dtype=torch.float64) + 0.5).to(params)
    for norm in ["l2", "l1", "topk"]:
        if stats == "float32-strided":
            rm_store, rv_store = torch.full((74,), 7.0), torch.full((74,), 7.0)
            rm, rv = rm_store[::2], rv_store[::2]
            rm.copy_(rm0), rv.copy_(rv0)
        else:
            rm, rv = rm0.clone(), rv0.clone()
        if stats == "bfloat16":
            rm, rv = rm.bfloat16(), rv.bfloat16()
        start_mean, start_var = rm.clone(), rv.clone()
        _, mean, _, coef, _, _ = torch.ops.lpnorm.batch_norm_forward(
            x, None, None, rm, rv, True, momentum, 1e-5, norm, 10, 2.0, 1, "exact", "float")
        m = x.shape[0]
        unbiased = coef[:, 0].double() * coef[:, 0].double() * m / (m - 1)
        if dtype == torch.float64:  # the saved statistics are the float64 ones blended: exact
            assert torch.equal(rm, start_mean.mul(1 - momentum).add(mean, alpha=momentum))
            assert torch.equal(rv, start_var.mul(1 - momentum).add(unbiased, alpha=momentum))
        ref_mean, ref_var = start_mean.clone(), start_var.clone()
        reference.batch_norm(x, ref_mean, ref_var, training=True, momentum=momentum, norm=norm, k=10)
        assert_close(rm, ref_mean, dtype=dtype, what=f"{norm} running_mean")
        assert_close(rv, ref_var, dtype=dtype, what=f"{norm} running_var")
        if momentum == 0.0:
            assert torch.equal(rm, start_mean) and torch.equal(rv, start_var)
        if stats == "float32-strided":  # the elements between were not touched
            assert (rm_store[1::2] == 7.0).all() and (rv_store[1::2] == 7.0).all()
