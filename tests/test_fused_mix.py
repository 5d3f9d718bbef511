"""The fused DynaMixer op (Triton kernels, `model.fused_mix`) computes the PyTorch op: values and gradients, in
fp32 and bf16, on both token axes, through a whole model, without keeping an `N x N` matrix for backward; traced
and compiled graphs keep the PyTorch ops.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`, set by conftest.py
before Triton is imported); on a machine with an NVIDIA GPU, compiled on it. Speed is the GPU's to show
(benchmarks/gpu_proof.py)."""

from __future__ import annotations

import sys

import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the timm models)
from dynamixer.errors import ConfigError
from dynamixer.models import DynaMixerOp
from helpers import randomize_, rel_err


@pytest.fixture(scope="module")
def device() -> torch.device:
    """Where the kernels run: the GPU, or the CPU through Triton's interpreter."""
    from dynamixer.models import fused_mix

    device = torch.device("cpu" if fused_mix.INTERPRETED else "cuda")
    assert fused_mix.runs_on(torch.empty(0, device=device)), "no GPU, and TRITON_INTERPRET=1 was not set in time"
    return device


@pytest.fixture
def kernels_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call into the kernels fails the test."""
    from dynamixer.models import fused_mix

    def called(*args):
        raise AssertionError("the fused kernel was called")

    monkeypatch.setattr(fused_mix, "dynamic_mix", called)


def op_pair(token_dim: int, tokens: int, dim: int, segments: int, reduced_dim: int, device: torch.device):
    """The PyTorch op and the fused one, the same weights, on `device`."""
    torch.manual_seed(0)
    ours = randomize_(DynaMixerOp(dim, tokens, segments, reduced_dim, token_dim=token_dim), std=0.3).to(device)
    fused = DynaMixerOp(dim, tokens, segments, reduced_dim, token_dim=token_dim, fused=True).to(device)
    fused.load_state_dict(ours.state_dict())
    return ours, fused


def inputs(token_dim: int, tokens: int, dim: int, device: torch.device, lines: int = 11):
    """Tokens and an output gradient, `(B, L, N, C)` (`token_dim=1`: `(B, N, L, C)`); 2 x 11 = 22 sequences:
    three blocks of 8, the last one partial."""
    g = torch.Generator().manual_seed(1)
    shape = (2, lines, tokens, dim) if token_dim == 2 else (2, tokens, lines, dim)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def forward_backward(op: DynaMixerOp, x: torch.Tensor, dy: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    """Output, input gradient and each parameter's gradient of `op` (under autocast to `dtype` when given)."""
    op.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        y = op(x)
    y.float().backward(dy)
    return [y.detach().float(), x.grad, *(p.grad for p in op.parameters())]


# (tokens, channels, segments, reduced dim): one output block and padding of every dimension; 20 tokens: two
# output blocks, the second partly masked; 12 channels per segment (padded to 16); 12 x 8 = 96 compressed
# features: two chunks of the logits GEMM, the second partly masked
SHAPES = [(8, 32, 2, 2), (20, 48, 4, 3), (16, 64, 1, 1), (12, 40, 2, 8)]


@pytest.mark.parametrize("token_dim", [1, 2], ids=["columns", "rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_c{}_s{}_d{}".format(*s))
def test_the_fused_op_computes_the_pytorch_op_and_its_gradients(device, token_dim, shape):
    ours, fused = op_pair(token_dim, *shape, device)
    x, dy = inputs(token_dim, *shape[:2], device)
    expected, got = forward_backward(ours, x, dy), forward_backward(fused, x, dy)
    names = ["output", "input grad", *(f"{n} grad" for n, _ in ours.named_parameters())]
    errors = {name: rel_err(a, b) for name, a, b in zip(names, got, expected)}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_under_autocast_the_fused_op_is_as_close_to_fp32_as_the_pytorch_op(device, dtype):
    ours, fused = op_pair(2, 20, 48, 4, 3, device)
    x, dy = inputs(2, 20, 48, device)
    exact = forward_backward(ours, x, dy)
    ours_half = [rel_err(a, b) for a, b in zip(forward_backward(ours, x, dy, dtype), exact)]
    fused_half = [rel_err(a, b) for a, b in zip(forward_backward(fused, x, dy, dtype), exact)]
    # both carry the 16-bit rounding (bf16 about 1e-2, fp16 1e-3 here); the fused one keeps its logits and
    # softmax in fp32
    assert all(1e-5 < e < 5e-2 for e in ours_half), ours_half
    assert all(f < 1.5 * e for f, e in zip(fused_half, ours_half)), (fused_half, ours_half)


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


def test_the_fused_op_keeps_no_mixing_matrix_for_backward(device):
    ours, fused = op_pair(2, 20, 48, 4, 3, device)
    x, _ = inputs(2, 20, 48, device)
    matrices = lambda shapes: [s for s in shapes if s[-2:] == (20, 20) or s[-1] == 400]  # noqa: E731
    assert matrices(saved_sizes(ours, x))  # the PyTorch op keeps the softmax's output and its transpose
    assert matrices(saved_sizes(fused, x)) == []
    elements = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert elements(saved_sizes(fused, x)) < elements(saved_sizes(ours, x)) / 2


def test_a_second_derivative_through_the_fused_op_is_refused_not_wrong(device):
    _, fused = op_pair(2, 8, 32, 2, 2, device)
    x, _ = inputs(2, 8, 32, device)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_inputs_that_do_not_fit_are_refused_before_a_kernel_reads_past_them(device):
    from dynamixer.models import fused_mix

    z, x = torch.randn(2, 3, 8, 2, 2, device=device), torch.randn(2, 3, 8, 32, device=device)
    weight, bias = torch.randn(64, 16, device=device), torch.randn(64, device=device)
    assert fused_mix.dynamic_mix(z, x, weight, bias).shape == x.shape
    with pytest.raises(ValueError, match=r"weight \(64, 15\) \(N\*N, N\*d\)"):
        fused_mix.dynamic_mix(z, x, weight[:, :15], bias)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_mix.dynamic_mix(z, x[:, :, :7], weight, bias)
    with pytest.raises(TypeError, match="differ in dtype or device"):
        fused_mix.dynamic_mix(z, x.double(), weight, bias)


def test_a_model_built_with_fused_mix_trains_as_the_pytorch_model(device):
    torch.manual_seed(0)
    ours = randomize_(timm.create_model("dynamixer_tiny"), std=0.05).to(device)
    fused = timm.create_model("dynamixer_tiny", fused_mix=True).to(device)
    fused.load_state_dict(ours.state_dict())
    assert sum(m.fused for m in fused.modules() if isinstance(m, DynaMixerOp)) == 2 * 7  # both axes of 7 blocks
    images, labels = torch.randn(3, 3, 32, 32).to(device), torch.tensor([3, 7, 1]).to(device)
    results = []
    for model in (ours, fused):
        logits = model(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits, grads), (fused_logits, fused_grads) = results
    assert rel_err(fused_logits, logits) < 1e-5
    worst = max(grads, key=lambda n: rel_err(fused_grads[n], grads[n]))
    assert rel_err(fused_grads[worst], grads[worst]) < 1e-4, worst


def test_traced_scripted_and_compiled_fused_ops_run_the_pytorch_ops(device, kernels_unused):
    ours, fused = op_pair(1, 8, 32, 2, 2, device)
    x, _ = inputs(1, 8, 32, device, lines=3)
    expected = ours(x)
    with pytest.raises(AssertionError, match="the fused kernel was called"):
        fused(x)  # eager: the kernel
    graphs = {
        "fx": torch.fx.symbolic_trace(fused),
        "torchscript": torch.jit.script(fused),
        "traced": torch.jit.trace(fused, x, check_trace=False),  # the check reruns the eager op
        "compiled": torch.compile(fused, backend="eager", fullgraph=True),
    }
    for name, graph in graphs.items():
        assert torch.allclose(graph(x), expected, atol=1e-6), name


def test_fused_mix_without_triton_is_a_config_error_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "dynamixer.models.fused_mix", raising=False)
    monkeypatch.delattr(dynamixer.models, "fused_mix", raising=False)
    with pytest.raises(ConfigError, match=r"fused_mix=true needs Triton.*model\.fused_mix=false"):
        timm.create_model("dynamixer_tiny", fused_mix=True)
    # static mixing has no generated matrices: nothing to fuse, nothing needed
    assert timm.create_model("dynamixer_tiny", fused_mix=True, mixing="static")
