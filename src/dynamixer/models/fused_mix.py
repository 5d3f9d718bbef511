"""The DynaMixer op's generate -> softmax -> mix as Triton kernels: the `N x N` matrices stay on chip.

For each sequence (a row or column of the grid) and segment, the forward kernel computes the logits
`z @ W^T + b` from the compressed tokens `z` `(N*d,)`, their softmax over the source tokens and the mix
`Y[j] = sum_i P[i, j] X[i]`, a block of output tokens at a time, and writes only `Y`. The backward kernel
recomputes `P` (as flash attention does) and writes `dX` and the logits' gradient, from which two GEMMs
give the gradients of `z` and of the generate layer. Nothing `N x N` is kept between forward and backward; the
backward writes the logits' gradient once (the size of the PyTorch op's `P`) and frees it.

Kernels run on CUDA tensors; with `TRITON_INTERPRET=1` set before Triton is imported, on CPU tensors in
Triton's interpreter (how the tests check them on a machine without a GPU). The block sizes are chosen for
registers and shared memory on paper, not tuned on a GPU yet. Relies on Triton >= 3.0 for 3-d `tl.dot`
(pinned through torch in requirements.lock).
"""

import contextlib

import torch
import triton
import triton.language as tl
from triton import knobs

__all__ = ["INTERPRETED", "dynamic_mix", "runs_on"]

# the kernels were defined for Triton's interpreter: they run on CPU tensors (slowly), not on CUDA ones
INTERPRETED = bool(knobs.runtime.interpret)
BLOCK_ROWS = 8  # sequences per program: the M of the logits GEMM
BLOCK_OUT = 16  # output tokens per inner step: a (rows, N, BLOCK_OUT) logits tile at a time; a K of the backward
# compressed features per chunk of the logits GEMM (N * d: 64 for S, 256 for L at 224): a (chunk, N * BLOCK_OUT)
# tile of W, 64 KiB at N = 32 in either dtype
BLOCK_FEATURES = {2: 64, 4: 32}  # by element size
NUM_WARPS = 8  # the (rows, N, channels) tiles of x and dx: 32 registers a thread each at N = 32, 32 channels


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device."""
    return x.device.type == ("cpu" if INTERPRETED else "cuda")


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """`a @ b` (2-d or batched 3-d), accumulated in fp32."""
    if WIDEN:  # the interpreter's bf16 tl.dot is wrong (Triton 3.8): the same values, widened to fp32
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _probabilities(z_ptr, z_rows, rmask, s, szn, szs, sze, w_ptr, w_row_stride, b_ptr, j0,
                   N: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr,
                   KP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):  # fmt: skip
    """`P[:, :, j0:j0+BJ]` of segment `s` of the sequences at `z_rows`: the softmax over the source tokens `i` of
    the logits `z W^T + b`, `(BM, NP, BJ)` fp32; the compressed features `k` in chunks of `BK`."""
    q = tl.arange(0, NP * BJ)
    qi = q // BJ
    qj = j0 + q % BJ
    row = qi * N + qj  # the generate layer's output feature of entry (i, j)
    qmask = (qi < N) & (qj < N)
    logits = tl.zeros((BM, NP * BJ), dtype=tl.float32)
    for k0 in tl.static_range(0, KP, BK):
        k = k0 + tl.arange(0, BK)  # compressed feature k = t*D + e: token t's e-th value (token-major)
        kmask = k < N * D
        z_offsets = z_rows[:, None] + (k // D * szn + s * szs + k % D * sze)[None, :]
        z = tl.load(z_ptr + z_offsets, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w_offsets = row[None, :] * w_row_stride + k[:, None]
        w = tl.load(w_ptr + w_offsets, mask=kmask[:, None] & qmask[None, :], other=0.0)
        logits += _dot(z, w, PRECISION, WIDEN)
    logits += tl.load(b_ptr + row, mask=qmask, other=0.0).to(tl.float32)[None, :]
    logits = tl.reshape(logits, (BM, NP, BJ))
    i = tl.arange(0, NP)
    logits = tl.where((i < N)[None, :, None], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None, :])
    return e / tl.sum(e, axis=1)[:, None, :]


@triton.jit
def _tokens(r, L, s, t, c, sb, sl, sn, sc, CS: tl.constexpr):
    """Offsets `(rows, tokens, channels)` of tokens `t` and channels `c` of segment `s` of sequences `r` of a
    `(B, L, N, C)` tensor with strides `sb, sl, sn, sc`."""
    rows = (r // L) * sb + (r % L) * sl
    return rows[:, None, None] + t[None, :, None] * sn + (s * CS + c)[None, None, :] * sc


@triton.jit
def _program(x_ptr, R, L, szb, szl, sxb, sxl, sxn, sxc,
             N: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, NP: tl.constexpr, CP: tl.constexpr):  # fmt: skip
    """This program's `BM` sequences `r` (int64: offsets past 2**31 elements stay right), which of them exist,
    its segment, the offsets of their rows in `z`, and their tokens `(BM, NP, CP)` with the mask of those."""
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = r < R
    s = tl.program_id(1)
    i, c = tl.arange(0, NP), tl.arange(0, CP)
    xmask = rmask[:, None, None] & (i < N)[None, :, None] & (c < CS)[None, None, :]
    x = tl.load(x_ptr + _tokens(r, L, s, i, c, sxb, sxl, sxn, sxc, CS), mask=xmask, other=0.0)
    return r, rmask, s, (r // L) * szb + (r % L) * szl, x, xmask


@triton.jit
def _mix_forward(
    z_ptr, x_ptr, w_ptr, b_ptr, y_ptr, R, L,
    szb, szl, szn, szs, sze,
    sxb, sxl, sxn, sxc,
    syb, syl, syn, syc,
    w_row_stride,
    N: tl.constexpr, D: tl.constexpr, CS: tl.constexpr,
    BM: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, CP: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    """`Y` of `BM` sequences and one segment (program ids: row block, segment), `BJ` output tokens at a time."""
    r, rmask, s, z_rows, x, xmask = _program(x_ptr, R, L, szb, szl, sxb, sxl, sxn, sxc, N, CS, BM, NP, CP)
    c = tl.arange(0, CP)
    for j0 in tl.static_range(0, N, BJ):
        p = _probabilities(z_ptr, z_rows, rmask, s, szn, szs, sze, w_ptr, w_row_stride, b_ptr, j0,
                           N, D, BM, BJ, NP, KP, BK, PRECISION, WIDEN)  # fmt: skip
        y = _dot(tl.trans(p.to(x.dtype), (0, 2, 1)), x, PRECISION, WIDEN)  # (BM, BJ, CP)
        j = j0 + tl.arange(0, BJ)
        ymask = rmask[:, None, None] & (j < N)[None, :, None] & (c < CS)[None, None, :]
        tl.store(y_ptr + _tokens(r, L, s, j, c, syb, syl, syn, syc, CS), y.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _mix_backward(
    z_ptr, x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dl_ptr, R, L, S,
    szb, szl, szn, szs, sze,
    sxb, sxl, sxn, sxc,
    syb, syl, syn, syc,
    sgb, sgl, sgn, sgc,
    w_row_stride,
    N: tl.constexpr, D: tl.constexpr, CS: tl.constexpr,
    BM: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, CP: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    """`dX` (strides `sg*`) and the logits' gradient `(R, S, N, N)` of the programs of `_mix_forward`, from
    `dY` (strides `sy*`), `P` recomputed."""
    r, rmask, s, z_rows, x, xmask = _program(x_ptr, R, L, szb, szl, sxb, sxl, sxn, sxc, N, CS, BM, NP, CP)
    i, c = tl.arange(0, NP), tl.arange(0, CP)
    dx = tl.zeros((BM, NP, CP), dtype=tl.float32)
    dl_rows = (r * S + s)[:, None, None] * (N * N) + i[None, :, None] * N
    for j0 in tl.static_range(0, N, BJ):
        p = _probabilities(z_ptr, z_rows, rmask, s, szn, szs, sze, w_ptr, w_row_stride, b_ptr, j0,
                           N, D, BM, BJ, NP, KP, BK, PRECISION, WIDEN)  # fmt: skip
        j = j0 + tl.arange(0, BJ)
        dymask = rmask[:, None, None] & (j < N)[None, :, None] & (c < CS)[None, None, :]
        dy = tl.load(dy_ptr + _tokens(r, L, s, j, c, syb, syl, syn, syc, CS), mask=dymask, other=0.0).to(x.dtype)
        dx += _dot(p.to(x.dtype), dy, PRECISION, WIDEN)  # dX[i] = sum_j P[i, j] dY[j]
        dp = _dot(x, tl.trans(dy, (0, 2, 1)), PRECISION, WIDEN)  # dP[i, j] = <X[i], dY[j]>
        dl = p * (dp - tl.sum(p * dp, axis=1)[:, None, :])  # the softmax's backward, over i
        dlmask = rmask[:, None, None] & (i < N)[None, :, None] & (j < N)[None, None, :]
        tl.store(dl_ptr + dl_rows + j[None, None, :], dl.to(dl_ptr.dtype.element_ty), mask=dlmask)
    tl.store(dx_ptr + _tokens(r, L, s, i, c, sgb, sgl, sgn, sgc, CS), dx.to(dx_ptr.dtype.element_ty), mask=xmask)


def _meta(z: torch.Tensor, x: torch.Tensor) -> dict:
    """The kernels' compile-time sizes for `z` `(B, L, N, S, d)` and `x` `(B, L, N, C)`: padded to powers of 2."""
    B, L, N, S, D = z.shape
    C = x.shape[-1]
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return {
        "N": N,
        "D": D,
        "CS": C // S,
        "BM": BLOCK_ROWS,
        "BJ": BLOCK_OUT,
        "NP": max(16, triton.next_power_of_2(N)),
        "KP": max(16, triton.next_power_of_2(N * D)),
        "BK": min(BLOCK_FEATURES[x.element_size()], max(16, triton.next_power_of_2(N * D))),
        "CP": max(16, triton.next_power_of_2(C // S)),
        "PRECISION": "tf32" if tf32 else "ieee",  # fp32 as torch.matmul computes it; other dtypes ignore it
        "WIDEN": INTERPRETED and x.dtype == torch.bfloat16,
        "num_warps": NUM_WARPS,
    }


def _grid(z: torch.Tensor) -> tuple[int, int]:
    """One program per block of `BLOCK_ROWS` sequences and segment."""
    B, L, _, S, _ = z.shape
    return triton.cdiv(B * L, BLOCK_ROWS), S


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it `x`'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class _DynamicMix(torch.autograd.Function):
    """`dynamic_mix` with its backward; saves only its inputs."""

    @staticmethod
    def forward(ctx, z, x, weight, bias):
        B, L = x.shape[:2]
        y = torch.empty_like(x)  # x's memory layout: a column op's output stays (B, H, W, C)
        with _on_device(x):
            _mix_forward[_grid(z)](z, x, weight, bias, y, B * L, L, *z.stride(), *x.stride(), *y.stride(),
                                   weight.stride(0), **_meta(z, x))  # fmt: skip
        ctx.save_for_backward(z, x, weight, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # dx and the logits' gradient come from a kernel, not a graph
    def backward(ctx, dy):
        z, x, weight, bias = ctx.saved_tensors
        B, L, N, S, D = z.shape
        dx = torch.empty_like(x)
        dl = torch.empty(B * L, S, N, N, device=x.device, dtype=x.dtype)
        with _on_device(x):
            _mix_backward[_grid(z)](z, x, weight, bias, dy, dx, dl, B * L, L, S, *z.stride(), *x.stride(),
                                    *dy.stride(), *dx.stride(), weight.stride(0), **_meta(z, x))  # fmt: skip
        dl = dl.view(B * L * S, N * N)
        dz = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dz = (dl @ weight).view(B, L, S, N, D).transpose(2, 3)
        if ctx.needs_input_grad[2]:
            dweight = dl.mT @ z.transpose(2, 3).reshape(B * L * S, N * D)
        if ctx.needs_input_grad[3]:
            dbias = dl.sum(0).to(bias.dtype)
        return dz, dx, dweight, dbias


def dynamic_mix(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`Y_s[j] = sum_i softmax_i(W z_s + b)[i, j] X_s[i]` for every sequence and segment, fused.

    `z` `(B, L, N, S, d)`: the compressed tokens of each segment; `x` `(B, L, N, C)` (any strides); `weight`
    `(N*N, N*d)` and `bias` `(N*N,)`: the generate layer, whose output `i*N + j` is logit `(i, j)`. Returns
    `(B, L, N, C)` in `x`'s memory layout. The mix runs in `x`'s dtype, the logits and softmax in fp32.
    """
    B, L, N, S, D = z.shape
    C = x.shape[-1]
    if x.shape[:3] != z.shape[:3] or C % S or weight.shape != (N * N, N * D) or bias.shape != (N * N,):
        raise ValueError(
            f"shapes do not fit: z {tuple(z.shape)} (B, L, N, S, d), x {tuple(x.shape)} (B, L, N, C with C % S == 0), "
            f"weight {tuple(weight.shape)} (N*N, N*d), bias {tuple(bias.shape)} (N*N,)"
        )
    kinds = [(t.dtype, t.device) for t in (z, x, weight, bias)]
    if len(set(kinds)) > 1:
        raise TypeError(f"z, x, weight and bias differ in dtype or device: {kinds}")
    return _DynamicMix.apply(z, x, weight.contiguous(), bias.contiguous())
