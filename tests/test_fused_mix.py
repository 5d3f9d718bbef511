"""The fused DynaMixer op (Triton kernels, `model.fused_mix`) computes the PyTorch op: values and gradients, in
fp32 and bf16, on both token axes, through a whole model, without keeping an `N x N` matrix for backward.

The kernels run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`, set by conftest.py before Triton is
imported). Speed is the GPU's to show (benchmarks/gpu_proof.py)."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the timm models)
from dynamixer.errors import ConfigError
from dynamixer.models import DynaMixerOp
from helpers import randomize_, rel_err


@pytest.fixture(scope="module")
def fused_mix() -> ModuleType:
    """The kernel module, its kernels defined for Triton's interpreter (CPU tensors; conftest.py chooses it)."""
    from dynamixer.models import fused_mix

    assert fused_mix.INTERPRETED and fused_mix.runs_on(torch.empty(0)), "TRITON_INTERPRET=1 was not set in time"
    return fused_mix


def op_pair(token_dim: int, tokens: int, dim: int, segments: int, reduced_dim: int) -> tuple[DynaMixerOp, DynaMixerOp]:
    """The PyTorch op and the fused one, the same weights."""
    torch.manual_seed(0)
    ours = randomize_(DynaMixerOp(dim, tokens, segments, reduced_dim, token_dim=token_dim), std=0.3)
    fused = DynaMixerOp(dim, tokens, segments, reduced_dim, token_dim=token_dim, fused=True)
    fused.load_state_dict(ours.state_dict())
    return ours, fused


def forward_backward(op: DynaMixerOp, x: torch.Tensor, dy: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    """Output, input gradient and each parameter's gradient of `op` (under autocast to `dtype` when given)."""
    op.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        y = op(x)
    y.float().backward(dy)
    return [y.detach().float(), x.grad, *(p.grad for p in op.parameters())]


# (tokens, channels, segments, reduced dim): one output block and padding of every dimension; 20 tokens: two
# output blocks, the second partly masked; 12 channels per segment (padded to 16); 12 x 8 = 96 compressed
# features: two chunks of the logits GEMM, the second partly masked; rows not a multiple of 16
SHAPES = [(8, 32, 2, 2), (20, 48, 4, 3), (16, 64, 1, 1), (12, 40, 2, 8)]


@pytest.mark.parametrize("token_dim", [1, 2], ids=["columns", "rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_c{}_s{}_d{}".format(*s))
def test_the_fused_op_computes_the_pytorch_op_and_its_gradients(fused_mix, token_dim, shape):
    tokens, dim = shape[:2]
    ours, fused = op_pair(token_dim, *shape)
    g = torch.Generator().manual_seed(1)
    lines = 5  # (B, L) = (2, 5): 10 rows, one partial block of 16
    x_shape = (2, lines, tokens, dim) if token_dim == 2 else (2, tokens, lines, dim)
    x, dy = torch.randn(x_shape, generator=g), torch.randn(x_shape, generator=g)
    expected, got = forward_backward(ours, x, dy), forward_backward(fused, x, dy)
    names = ["output", "input grad", *(f"{n} grad" for n, _ in ours.named_parameters())]
    errors = {name: rel_err(a, b) for name, a, b in zip(names, got, expected)}
    assert max(errors.values()) < 1e-5, errors


def test_under_bf16_autocast_the_fused_op_is_as_close_to_fp32_as_the_pytorch_op(fused_mix):
    ours, fused = op_pair(2, 20, 48, 4, 3)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(2, 5, 20, 48, generator=g), torch.randn(2, 5, 20, 48, generator=g)
    exact = forward_backward(ours, x, dy)
    ours_bf16 = [rel_err(a, b) for a, b in zip(forward_backward(ours, x, dy, torch.bfloat16), exact)]
    fused_bf16 = [rel_err(a, b) for a, b in zip(forward_backward(fused, x, dy, torch.bfloat16), exact)]
    # both carry bf16's rounding (about 1e-2 here); the fused one keeps its logits and softmax in fp32
    assert all(1e-4 < e < 5e-2 for e in ours_bf16), ours_bf16
    assert all(f < 1.5 * e for f, e in zip(fused_bf16, ours_bf16)), (fused_bf16, ours_bf16)


def saved_sizes(op: DynaMixerOp, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes of the activations (tensors other than `op`'s parameters) autograd keeps from `op`'s forward
    for its backward."""
    params = {p.data_ptr() for p in op.parameters()}
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x.clone().requires_grad_())
    return shapes


def test_the_fused_op_keeps_no_mixing_matrix_for_backward(fused_mix):
    ours, fused = op_pair(2, 20, 48, 4, 3)
    x = torch.randn(2, 5, 20, 48)
    matrices = lambda shapes: [s for s in shapes if s[-2:] == (20, 20) or s[-1] == 400]  # noqa: E731
    assert matrices(saved_sizes(ours, x))  # the PyTorch op keeps the softmax's output and its transpose
    assert matrices(saved_sizes(fused, x)) == []
    elements = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert elements(saved_sizes(fused, x)) < elements(saved_sizes(ours, x)) / 2


def test_a_model_built_with_fused_mix_trains_as_the_pytorch_model(fused_mix):
    torch.manual_seed(0)
    ours = randomize_(timm.create_model("dynamixer_tiny"), std=0.05)
    fused = timm.create_model("dynamixer_tiny", fused_mix=True)
    fused.load_state_dict(ours.state_dict())
    assert sum(m.fused for m in fused.modules() if isinstance(m, DynaMixerOp)) == 2 * 7  # both axes of 7 blocks
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    results = []
    for model in (ours, fused):
        logits = model(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits, grads), (fused_logits, fused_grads) = results
    assert rel_err(fused_logits, logits) < 1e-5
    worst = max(grads, key=lambda n: rel_err(fused_grads[n], grads[n]))
    assert rel_err(fused_grads[worst], grads[worst]) < 1e-4, worst


def test_traced_and_scripted_fused_ops_keep_the_pytorch_ops(fused_mix):
    ours, fused = op_pair(1, 8, 32, 2, 2)
    x = torch.randn(2, 8, 3, 32)
    expected = ours(x)
    for compiled in (torch.jit.script(fused), torch.fx.symbolic_trace(fused)):
        assert torch.allclose(compiled(x), expected, atol=1e-6)
    # the trace holds the op's own matmul and softmax, not a call into the kernels
    assert "softmax" in torch.fx.symbolic_trace(fused).code


def test_fused_mix_without_triton_is_a_config_error_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    with pytest.raises(ConfigError, match=r"fused_mix=true needs Triton.*model\.fused_mix=false"):
        timm.create_model("dynamixer_tiny", fused_mix=True)
