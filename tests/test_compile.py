"""torch.compile(fullgraph=True) of models with Lp batch norms (SPEC §6, fake kernels): one
graph, no break, the numbers of eager (outputs, gradients, running statistics), in training
and eval, with dynamic shapes. Compiling is slow on small machines, so few compiles are made:
inductor for one model, AOTAutograd with the eager backend (which traces the same graphs
through the fake kernels) for the norm sweep."""
import copy

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lpnorm
from conftest import batch


def net(norms, small=False):
    """Conv, Lp batch norms with the given options (one per module), ReLU, Linear."""
    if small:  # what inductor compiles: few kernels, as its C++ compiles are slow
        return nn.Sequential(lpnorm.nn.LpBatchNorm2d(3, **norms[0]), nn.ReLU(),
                             lpnorm.nn.LpBatchNorm2d(3, **norms[1]))
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), lpnorm.nn.LpBatchNorm2d(4, **norms[0]), nn.ReLU(),
        lpnorm.nn.LpBatchNorm2d(4, **norms[1]), nn.Flatten(), nn.Linear(4 * 16, 6),
        lpnorm.nn.LpBatchNorm1d(6, **norms[2]))


def step(model, x):
    """One forward and backward; returns the output, the input's gradient and the parameters'."""
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), x.grad, grads


def assert_same(compiled, eager, x, what):
    y_c, gx_c, g_c = step(compiled, x)
    y_e, gx_e, g_e = step(eager, x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} output: {m}")
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} input grad: {m}")
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} param grad: {m}")
    for a, b in zip(compiled.buffers(), eager.buffers()):  # running stats, num_batches_tracked
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} buffers: {m}")


def run_and_compare(backend, norms, batch_sizes, small=False):
    """Compiles a copy of a model with dynamic shapes, runs it in training then eval on every
    batch size against eager, and returns the graphs dynamo handed the backend."""
    torch._dynamo.reset()
    eager = net(norms, small)
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for mode in ("train", "eval"):
        eager.train(mode == "train")
        model.train(mode == "train")
        for i, n in enumerate(batch_sizes):
            assert_same(compiled, eager, batch((n, 3, 4, 4), torch.float32, step=i), f"{mode} N={n}")
            if i == 0:
                compiled_so_far = counter.frame_count
        assert counter.frame_count == compiled_so_far, f"{mode}: a new batch size recompiled"
    return [gm for gm in counter.graphs if len(gm.graph.nodes) > 2]  # (dynamo may hand over empty ones)


def lpnorm_ops(graph):
    return sum(str(node.target).startswith("lpnorm.batch_norm") for node in graph.graph.nodes)


def test_inductor_fullgraph_dynamic_train_and_eval():
    """Training then eval, three batch sizes each: one graph per mode (the train flag is a
    guard), no recompile for new sizes (dynamic), and fullgraph means no graph break anywhere.
    (Batch sizes differ from the other dims, which duck sizing would tie them to.)"""
    graphs = run_and_compare("inductor", [dict(norm="l1"), dict(norm="l1")], [6, 8, 10], small=True)
    assert [lpnorm_ops(g) for g in graphs] == [2, 2]  # train, eval: both modules in one graph


def test_aot_eager_every_kind_of_norm():
    """Sparse gradients (top-k with ghost batches, range) and a dense p, traced through the fake
    kernels by AOTAutograd. (momentum=None is left out: its factor 1 / num_batches_tracked is
    data-dependent, which fullgraph refuses for torch's own batch norm too.)"""
    norms = [dict(norm="topk", k=3, chunks=2), dict(norm="range"), dict(norm="p", p=3.0)]
    graphs = run_and_compare("aot_eager", norms, [6, 10])
    assert [lpnorm_ops(g) for g in graphs] == [3, 3]


def test_explain_reports_no_graph_break():
    model = net([dict(norm="linf"), dict(norm="l2"), dict(norm="topk", k=2)])
    explanation = torch._dynamo.explain(model)(batch((4, 3, 4, 4), torch.float32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
