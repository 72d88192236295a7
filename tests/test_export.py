"""torch.export of models with lpnorm's modules (SPEC §6; docs/deployment.md): one graph, our
operator in it, the same numbers as eager, running statistics as declared buffer mutations.
The AOTInductor package built from such a graph is run from C++ in test_deploy_cpp.py."""
import pytest
import torch

import lpnorm



def small_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        lpnorm.nn.LpBatchNorm2d(4, norm="l1"),
        torch.nn.ReLU(),
        lpnorm.nn.LpBatchNorm2d(4, norm="topk", k=3, chunks=2),
    )


def lpnorm_ops_in(program):
    """The lpnorm operators the graph calls, directly or through auto_functionalized."""
    names = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        for target in (node.target, *node.args[:1]):
            if isinstance(target, torch._ops.OpOverload) and target.namespace == "lpnorm":
                names.append(target.name())
    return names


def test_export_eval_keeps_our_operator_and_matches_eager():
    net = small_net().eval()
    x = torch.randn(4, 3, 6, 6)
    program = torch.export.export(net, (x,))
    assert lpnorm_ops_in(program) == ["lpnorm::batch_norm"] * 2
    # Not replaced by torch's batch norm, nor traced through.
    assert not any("aten" in str(node.target) and "batch_norm" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), net(x), rtol=0, atol=0)


def test_export_training_declares_running_stat_updates():
    net = small_net().train()
    x = torch.randn(4, 3, 6, 6)
    program = torch.export.export(net, (x,))
    assert lpnorm_ops_in(program) == ["lpnorm::batch_norm"] * 2  # training IR: updates in place
    # The functional IR (what AOTInductor and other backends consume): the running statistics
    # become outputs written back to the buffers, because the schema marks them mutated (a!).
    functional = program.run_decompositions()
    assert len(lpnorm_ops_in(functional)) == 2, functional.graph
    mutated = set(functional.graph_signature.buffers_to_mutate.values())
    for layer in ("1", "3"):
        assert {f"{layer}.running_mean", f"{layer}.running_var", f"{layer}.num_batches_tracked"} <= mutated

    start = {name: value.clone() for name, value in net.state_dict().items()}
    for exported in (program.module(), functional.module()):
        eager = small_net().train()
        eager.load_state_dict(start)
        exported.load_state_dict(start)
        torch.testing.assert_close(exported(x), eager(x), rtol=0, atol=0)
        for name, buffer in eager.named_buffers():
            torch.testing.assert_close(exported.get_buffer(name), buffer, rtol=0, atol=0, msg=name)


def test_dynamo_sees_no_graph_break():
    net = small_net().eval()
    explanation = torch._dynamo.explain(net)(torch.randn(4, 3, 6, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("batch", [2, 8])
def test_export_with_dynamic_batch(batch):
    net = small_net().eval()
    dim = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(net, (torch.randn(4, 3, 6, 6),), dynamic_shapes=({0: dim},))
    x = torch.randn(batch, 3, 6, 6)
    torch.testing.assert_close(program.module()(x), net(x), rtol=0, atol=0)
