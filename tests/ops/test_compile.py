"""The fused ops under torch.compile: traced whole (fullgraph), sync-free, same numbers as eager mode."""

import pytest
import torch

import ptkernels as ptk
from tests.helpers import assert_close_to_truth, labels_with_mask, rand


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_compiles_without_graph_breaks(reduction):
    hidden, weight = rand(37, 19, dtype=torch.float32), rand(251, 19, dtype=torch.float32)
    labels = labels_with_mask((37,), 251)

    def step(h, w, y):
        return ptk.linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=8, backend="torch").sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(hidden, weight, labels)
    g = torch.autograd.grad(out, (hidden, weight))
    ref = step(hidden, weight, labels)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    assert_close_to_truth(out, ref, 1e-6, "loss")
    for a, b in zip(g, g_ref):
        assert_close_to_truth(a, b, 1e-6, "grad")


def test_token_logprobs_compile():
    hidden, weight = rand(21, 8, dtype=torch.float32), rand(97, 8, dtype=torch.float32)
    targets = labels_with_mask((21,), 97)

    def f(h, w, y):
        logp, ent = ptk.linear_token_logprobs(h, w, y, return_entropy=True, chunk_size=4, backend="torch")
        return logp.sum() + 0.1 * ent.sum()

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(hidden, weight, targets)
    assert_close_to_truth(out, f(hidden, weight, targets), 1e-6, "logp")
