"""DynaMixer: a vision MLP whose token-mixing matrices are generated from the tokens being mixed.

Wang et al., "DynaMixer: A Vision MLP Architecture with Dynamic Mixing", ICML 2022.
Layout inside the network is channels last: tokens are `(B, H, W, C)`.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, get_device_dtype, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from dynamixer.errors import ConfigError

__all__ = [
    "DynaMixer",
    "DynaMixerBlock",
    "DynaMixerOp",
    "DynaMixerTokenMixer",
    "checkpoint_filter_fn",
    "release_key_map",
    "stage_resolutions",
]

NUM_STAGES = 4


# Python-side checks and casts: leaves of an FX graph (`torch.fx.wrap`), skipped by TorchScript (the guard
# inside each: a scripted model and a scripted FX graph both compile these calls)


def _in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the autocast dtype when autocast is on: cast once, instead of once per consumer."""
    if not torch.jit.is_scripting():
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _check_input(x: torch.Tensor, img_size: tuple[int, int]) -> None:
    if not torch.jit.is_scripting():
        if x.ndim != 4 or tuple(x.shape[-2:]) != tuple(img_size):
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this model, built for images of "
                f"{img_size[0]}x{img_size[1]}: resize/crop the input to that size, or build the "
                f"model with img_size={tuple(x.shape[-2:])}"
            )


def _fused_runs_on(x: torch.Tensor) -> bool:
    """Whether the fused kernel runs on `x`: its device, in eager mode (FX, TorchScript-traced and compiled
    graphs keep the PyTorch ops)."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    from dynamixer.models import fused_mix

    return fused_mix.runs_on(x)


torch.fx.wrap("_in_autocast_dtype")
torch.fx.wrap("_check_input")


class DynaMixerOp(nn.Module):
    """Dynamic token mixing along one axis of length `seq_len` (docs/paper.md, section 1).

    Input `(B, L, N, C)`: `L` independent sequences of `N = seq_len` tokens with `C` channels (with
    `token_dim=1`: `(B, N, L, C)`, the tokens along dim 1, e.g. the columns of a `(B, H, W, C)` grid, read
    in place). Output: the input's shape. The `N x N` mixing matrix of each sequence and segment is
    generated from the content of all `N` tokens, compressed to `reduced_dim` channels per segment.

    `mixing="static"` is the control of the paper's claim: everything stays (segments, softmax over the
    source tokens, the output projection) but each segment's `N x N` logits are learned parameters
    (`static_logits`, `(S, N, N)`) instead of being generated from the tokens.

    `fused=True` runs generate -> softmax -> mix as one Triton kernel (`fused_mix`) where it can run (CUDA
    tensors, eager mode), without the `N x N` matrices in memory; elsewhere (the CPU, traced or compiled
    graphs), and for static mixing, the PyTorch ops below. Same weights, same function.
    """

    __constants__ = ["static", "token_dim", "fused"]  # constants for TorchScript: only one kind of matrices is compiled

    def __init__(
        self,
        dim: int,
        seq_len: int,
        segments: int,
        reduced_dim: int,
        mixing: Literal["dynamic", "static"] = "dynamic",
        token_dim: int = 2,
        fused: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if fused and mixing == "dynamic":
            _require_fused_mix()
        if token_dim not in (1, 2):
            raise ConfigError(f"token_dim={token_dim}: the tokens are along dim 2 (B, L, N, C) or 1 (B, N, L, C)")
        if dim % segments:
            raise ConfigError(
                f"dimension {dim} is not divisible by segments={segments}: choose a segment count "
                f"that divides {dim} (e.g. one of {_divisors(dim)})"
            )
        if mixing not in ("dynamic", "static"):
            raise ConfigError(f"mixing={mixing!r} is not known: use 'dynamic' (the paper) or 'static' (the control)")
        self.seq_len, self.segments, self.reduced_dim = seq_len, segments, reduced_dim
        self.static, self.token_dim, self.fused = mixing == "static", token_dim, bool(fused)
        if self.static:
            self.static_logits = nn.Parameter(torch.zeros(segments, seq_len, seq_len, **dd))
        else:
            self.compress = nn.Linear(dim, segments * reduced_dim, **dd)
            self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len, **dd)
        self.out = nn.Linear(dim, dim, **dd)

    def _matrices(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing matrices `(B, L, S, N, N)` generated from the tokens `x`, or the static `(S, N, N)`
        (they broadcast over `(B, L)`)."""
        if self.static:
            return self.static_logits.softmax(dim=-2).to(x.dtype)
        z = self.compress(x)  # (B, L, N, S*d), or (B, N, L, S*d): transposed below, a copy of few channels
        if self.token_dim == 1:
            z = z.transpose(1, 2)
        B, L, N = z.shape[0], z.shape[1], self.seq_len  # indexed, not unpacked: FX traces it
        # token-major flattening per segment: token 0's d values, then token 1's, ...
        z = z.unflatten(-1, (self.segments, self.reduced_dim)).transpose(2, 3).reshape(B, L, self.segments, -1)
        logits = self.generate(z).unflatten(-1, (N, N))
        # softmax in the logits' dtype: the bf16/fp16 kernels accumulate in fp32 and round once, so
        # the weights equal an fp32 softmax rounded for the mix, without an fp32 copy kept for backward
        # (CUDA autocast still runs softmax in fp32; `.to` rounds that for the mix)
        return logits.softmax(dim=-2).to(z.dtype)

    def mixing_matrices(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing matrices `(B, L, S, N, N)` the forward of tokens `x` uses (static ones expanded).

        Entry `[..., s, i, j]` is the weight output token `j` gives to source token `i` in segment
        `s`; each column sums to 1 (softmax over `i`).
        """
        p = self._matrices(x)
        if self.static:
            lines = x.shape[1] if self.token_dim == 2 else x.shape[2]
            p = p.expand(x.shape[0], lines, -1, -1, -1)
        return p

    def mix(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`Y_s[j] = sum_i P_s[i, j] X_s[i]` for matrices `p` `(B, L, S, N, N)` (or `(S, N, N)`) and tokens `x`
        `(B, L, N, C)` (any strides): `(B, L, N, S, C/S)`, a view of one batched matmul's result."""
        xs = x.unflatten(-1, (self.segments, -1)).transpose(2, 3)  # (B, L, S, N, C/S)
        return (p.mT @ xs).transpose(2, 3)

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        from dynamixer.models import fused_mix

        z = self.compress(x)
        x = x.to(z.dtype)  # what autocast gives the mix's matmul in the unfused path
        if self.token_dim == 1:
            z, x = z.transpose(1, 2), x.transpose(1, 2)
        z = z.unflatten(-1, (self.segments, self.reduced_dim))
        weight, bias = self.generate.weight.to(z.dtype), self.generate.bias.to(z.dtype)
        y = fused_mix.dynamic_mix(z, x, weight, bias)
        return self.out(y.transpose(1, 2) if self.token_dim == 1 else y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.fused and not self.static and _fused_runs_on(x):
                return self._fused_forward(x)
        if self.token_dim == 1:  # (B, N, L, C) read as (B, L, N, C) views: no copy of x
            y = self.mix(self._matrices(x), x.transpose(1, 2)).transpose(1, 2)
        else:
            y = self.mix(self._matrices(x), x)
        return self.out(y.flatten(-2))

    def extra_repr(self) -> str:
        mixing = "static" if self.static else "dynamic"
        return (
            f"seq_len={self.seq_len}, segments={self.segments}, reduced_dim={self.reduced_dim}, mixing={mixing}, "
            f"token_dim={self.token_dim}" + (", fused=True" if self.fused else "")
        )


class DynaMixerTokenMixer(nn.Module):
    """Token mixing of a `(B, H, W, C)` grid: a DynaMixer op along H, one along W, a channel Linear
    (bias: `channel_bias`), fused by the re-weighting of Vision Permutator (or summed), then projected.
    Shape preserved (docs/paper.md, section 2).

    Under autocast the input is cast once to the autocast dtype, instead of once per consumer.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        segments: int,
        reduced_dim: int,
        fusion: Literal["reweight", "sum"] = "reweight",
        channel_bias: bool = False,
        proj_drop: float = 0.0,
        mixing: Literal["dynamic", "static"] = "dynamic",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if fusion not in ("reweight", "sum"):
            raise ConfigError(f"fusion={fusion!r} is not known: use 'reweight' (the release) or 'sum'")
        height, width = resolution
        self.mix_h = DynaMixerOp(dim, height, segments, reduced_dim, mixing, token_dim=1, **dd)
        self.mix_w = DynaMixerOp(dim, width, segments, reduced_dim, mixing, **dd)
        self.mlp_c = nn.Linear(dim, dim, bias=channel_bias, **dd)
        self.reweight = Mlp(dim, dim // 4, dim * 3, **dd) if fusion == "reweight" else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three branch outputs `h, w, c`, each `(B, H, W, C)`."""
        x = _in_autocast_dtype(x)
        return self.mix_h(x), self.mix_w(x), self.mlp_c(x)

    def branch_weights(self, h: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Re-weighting of the branches: `(B, C, 3)`, softmax over the last axis."""
        B, C = h.shape[0], h.shape[-1]
        # mean(h + w + c) as a sum of means: three reads instead of two sums and a read
        a = h.mean(dim=(1, 2)) + w.mean(dim=(1, 2)) + c.mean(dim=(1, 2))
        return self.reweight(a).view(B, C, 3).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = self.branches(x)
        if self.reweight is None:
            y = h + w + c
        else:
            a = self.branch_weights(h, w, c)[:, None, None]  # (B, 1, 1, C, 3)
            y = torch.addcmul(torch.addcmul(h * a[..., 0], w, a[..., 1]), c, a[..., 2])
        return self.proj_drop(self.proj(y))

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the block generated for input `(B, H, W, C)`.

        `mix_h`: `(B, W, S, H, H)` column mixing matrices; `mix_w`: `(B, H, S, W, W)` row mixing
        matrices; `branch_weights`: `(B, C, 3)` weights of the h/w/c branches (re-weighting only).
        """
        out = {
            "mix_h": self.mix_h.mixing_matrices(x),
            "mix_w": self.mix_w.mixing_matrices(x),
        }
        if self.reweight is not None:
            out["branch_weights"] = self.branch_weights(*self.branches(x))
        return out


class DynaMixerBlock(nn.Module):
    """Pre-norm residual block: token mixing then channel MLP, `(B, H, W, C)` in and out."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        segments: int,
        reduced_dim: int,
        mlp_ratio: float = 3.0,
        fusion: Literal["reweight", "sum"] = "reweight",
        mixing: Literal["dynamic", "static"] = "dynamic",
        channel_bias: bool = False,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.token_mixer = DynaMixerTokenMixer(
            dim,
            resolution,
            segments,
            reduced_dim,
            fusion=fusion,
            channel_bias=channel_bias,
            proj_drop=proj_drop,
            mixing=mixing,
            **dd,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.token_mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DynaMixerStage(nn.Module):
    """Optional downsample (2x2 stride-2 conv at a transition, 1x1 conv for a width change) then
    `depth` layers. `(B, H, W, C_in)` in, `(B, H', W', C)` out."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        transition: bool,
        depth: int,
        drop_path: Sequence[float],
        device=None,
        dtype=None,
        **layer_kw,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if transition:
            self.downsample = nn.Conv2d(in_dim, dim, kernel_size=2, stride=2, **dd)
        elif in_dim != dim:
            self.downsample = nn.Conv2d(in_dim, dim, kernel_size=1, **dd)
        else:
            self.downsample = None
        self.blocks = nn.Sequential(*[DynaMixerBlock(dim, drop_path=dp, **layer_kw, **dd) for dp in drop_path[:depth]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.blocks(x)


MAX_SIZE = 2**20  # any width, depth or size beyond it is no model of this family (and would overflow its tensors)


def _per_stage(name: str, value, n: int = NUM_STAGES) -> list:
    """One value for all stages, or a per-stage list of length `n`."""
    if isinstance(value, (int, float, bool)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(
            f"{name} has {len(value)} entries {value}, but the model has {n} stages: give one value or {n}"
        )
    return value


def _require_fused_mix() -> None:
    try:
        from dynamixer.models import fused_mix  # noqa: F401  (imports Triton)
    except ImportError:
        raise ConfigError(
            "fused_mix=true needs Triton, which is not installed: install PyTorch's CUDA build (it brings Triton), "
            "or set model.fused_mix=false"
        ) from None


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ConfigError(f"global_pool={global_pool!r} is not supported: use 'avg' or ''")
    return global_pool


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def stage_resolutions(
    img_size: int | Sequence[int], patch_size: int, transitions: Sequence[bool]
) -> list[tuple[int, int]]:
    """Token grid `(H, W)` of every stage, derived from the image size, patch size and transitions."""
    size = to_2tuple(img_size)
    if size[0] % patch_size or size[1] % patch_size:
        raise ConfigError(
            f"img_size={tuple(size)} is not divisible by patch_size={patch_size}: use an image size that is "
            f"a multiple of {patch_size} (e.g. {patch_size * max(1, round(size[0] / patch_size))})"
        )
    res = (size[0] // patch_size, size[1] // patch_size)
    out = [res]
    for i, transition in enumerate(transitions[:-1]):
        if transition:
            if res[0] % 2 or res[1] % 2:
                step = patch_size * 2 ** sum(transitions[: i + 1])
                raise ConfigError(
                    f"img_size={tuple(size)} gives a {res[0]}x{res[1]} token grid after stage {i}, which the "
                    f"stride-2 transition cannot halve: use an image size that is a multiple of {step}"
                )
            res = (res[0] // 2, res[1] // 2)
        out.append(res)
    return out


class DynaMixer(nn.Module):
    """DynaMixer network: patch embedding, four stages of DynaMixer layers, LayerNorm, mean pool, head.

    Images `(B, in_chans, H, W)` with `(H, W) == img_size` in; logits `(B, num_classes)` out.
    `segments`, `reduced_dim` and `mlp_ratio` take one value for all stages or a per-stage list.
    `mixing="static"` learns each segment's mixing matrices as parameters instead of generating them from
    the tokens (the control of the paper's claim); `fusion="sum"` sums the branches instead of re-weighting.
    `grad_checkpointing` recomputes each stage's activations in the backward pass instead of keeping
    them (less training memory for about one more forward pass of time; `set_grad_checkpointing`).
    `fused_mix` runs each dynamic op's generate -> softmax -> mix as one Triton kernel on CUDA (`set_fused_mix`).
    `device` and `dtype` are where and in which dtype the parameters are created (timm's factory arguments).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        layers: Sequence[int] = (4, 3, 8, 3),
        embed_dims: Sequence[int] = (192, 384, 384, 384),
        transitions: Sequence[bool] = (True, False, False, False),
        segments: int | Sequence[int] = (8, 16, 16, 16),
        reduced_dim: int | Sequence[int] = 2,
        mlp_ratio: float | Sequence[float] = 3.0,
        fusion: Literal["reweight", "sum"] = "reweight",
        mixing: Literal["dynamic", "static"] = "dynamic",
        channel_bias: bool = False,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        norm_layer: type[nn.Module] = nn.LayerNorm,
        grad_checkpointing: bool = False,
        fused_mix: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        layers = _per_stage("layers", layers)
        embed_dims = _per_stage("embed_dims", embed_dims)
        transitions = [bool(t) for t in _per_stage("transitions", transitions)]
        segments = _per_stage("segments", segments)
        reduced_dim = _per_stage("reduced_dim", reduced_dim)
        mlp_ratio = _per_stage("mlp_ratio", mlp_ratio)
        sizes = (("layers", layers), ("embed_dims", embed_dims), ("segments", segments), ("reduced_dim", reduced_dim))
        for name, values in sizes:
            if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE for v in values):
                raise ConfigError(f"{name}={values}: each stage needs a positive integer {name} (at most {MAX_SIZE})")
        if any(not isinstance(v, (int, float)) or not 0 < v <= MAX_SIZE for v in mlp_ratio):
            raise ConfigError(f"mlp_ratio={mlp_ratio}: each stage needs a positive ratio")
        for name, value, least in (
            ("patch_size", patch_size, 1),
            ("in_chans", in_chans, 1),
            ("num_classes", num_classes, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_SIZE:
                raise ConfigError(f"{name}={value}: give an integer from {least} to {MAX_SIZE}")
        if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIZE for v in to_2tuple(img_size)):
            raise ConfigError(f"img_size={img_size}: give a positive image size (at most {MAX_SIZE})")
        for i, (dim, s) in enumerate(zip(embed_dims, segments)):
            if dim % s:
                raise ConfigError(
                    f"stage {i}: dimension {dim} is not divisible by segments={s}: choose segments that divide "
                    f"each stage's dimension {embed_dims} (for stage {i}: one of {_divisors(dim)})"
                )
        _check_pool(global_pool)
        self.img_size = to_2tuple(img_size)
        self.resolutions = stage_resolutions(self.img_size, patch_size, transitions)
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = bool(grad_checkpointing)

        self.stem = nn.Conv2d(in_chans, embed_dims[0], kernel_size=patch_size, stride=patch_size, **dd)
        # timm's feature metadata: forward_features is channels last, and each stage's channels and stride
        self.feature_dim = -1
        reductions = [patch_size * 2 ** sum(transitions[:i]) for i in range(NUM_STAGES)]
        self.feature_info = [
            {"num_chs": embed_dims[i], "reduction": reductions[i], "module": f"stages.{i}"} for i in range(NUM_STAGES)
        ]
        # stochastic depth grows linearly with the global layer index
        # (on the CPU: a model built under a `torch.device("meta")` context still needs the values)
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        stages, in_dim, first = [], embed_dims[0], 0
        for i in range(NUM_STAGES):
            stages.append(
                DynaMixerStage(
                    in_dim,
                    embed_dims[i],
                    transition=i > 0 and transitions[i - 1],
                    depth=layers[i],
                    drop_path=dpr[first:],
                    resolution=self.resolutions[i],
                    segments=segments[i],
                    reduced_dim=reduced_dim[i],
                    mlp_ratio=mlp_ratio[i],
                    fusion=fusion,
                    mixing=mixing,
                    channel_bias=channel_bias,
                    proj_drop=proj_drop_rate,
                    norm_layer=norm_layer,
                    **dd,
                )
            )
            in_dim, first = embed_dims[i], first + layers[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_fused_mix(fused_mix)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, timm's convention (layer-wise lr decay): the stem, then each stage
        (`coarse`) or each block, a stage's downsample with its first block; the final norm last."""
        fine = [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))]
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else fine}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_mix(self, enable: bool = True) -> None:
        """Run each dynamic op's generate -> softmax -> mix as one Triton kernel where it can (`DynaMixerOp`)."""
        ops = [m for m in self.modules() if isinstance(m, DynaMixerOp)]
        if enable and not all(op.static for op in ops):
            _require_fused_mix()
        for op in ops:
            op.fused = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: none), on the model's device and dtype and in its train/eval mode."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` -> normalised tokens `(B, H', W', C)` of the last stage."""
        _check_input(x, self.img_size)
        x = self.stem(x).permute(0, 2, 3, 1)
        for stage in self.stages:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.norm(x)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the outputs of the stages `indices` (default all; an int: the last n),
        `(B, C, H', W')` (`output_fmt="NHWC"`: channels last), and the final normalised tokens
        `(B, H', W', C)` unless `intermediates_only`. `norm` applies the final norm to the last stage's."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt={output_fmt!r} is not supported: use 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        _check_input(x, self.img_size)
        x = self.stem(x).permute(0, 2, 3, 1)
        intermediates = []
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == len(self.stages) - 1 else x
                # NCHW contiguous, as timm's models give it (detection necks may `.view` the maps)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of `indices` (and the norm and head when asked); timm's feature API.

        Pruned before the last stage, the final norm and head go too: they are sized for the last stage's
        channels, and the features now end at the stage `max(indices)`."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per layer (in order), the mixing matrices and branch weights generated for images `x`
        (see `DynaMixerTokenMixer.explain`)."""
        found: list[dict[str, torch.Tensor]] = []
        hooks = [
            m.register_forward_pre_hook(lambda mod, args: found.append(mod.explain(args[0])))
            for m in self.modules()
            if isinstance(m, DynaMixerTokenMixer)
        ]
        try:
            self.forward(x)
        finally:
            for h in hooks:
                h.remove()
        return found


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,  # the generate layers are sized by the token grid
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dynamixer_tiny.untrained": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
        "dynamixer_s.untrained": _cfg(),
        "dynamixer_m.untrained": _cfg(),
        "dynamixer_l.untrained": _cfg(crop_pct=0.875),
    }
)


def release_key_map(model: DynaMixer) -> dict[str, str]:
    """Our state-dict key -> the authors' release's key, for every tensor of `model`.

    The release keeps stages and downsampling convs in one flat list (`network.<k>...`), names the token
    mixer `attn` and the stem `patch_embed.proj`; we use `stages.<i>.blocks.<j>.token_mixer`,
    `stages.<i>.downsample` and `stem`. The tensors themselves are identical.
    """
    prefixes = {"stem.": "patch_embed.proj.", "norm.": "norm.", "head.": "head."}
    k = 0
    for i, stage in enumerate(model.stages):
        if stage.downsample is not None:
            prefixes[f"stages.{i}.downsample."] = f"network.{k}.proj."
            k += 1
        for j in range(len(stage.blocks)):
            ours = f"stages.{i}.blocks.{j}."
            prefixes[ours + "token_mixer."] = f"network.{k}.{j}.attn."
            for part in ("norm1.", "norm2.", "mlp."):
                prefixes[ours + part] = f"network.{k}.{j}.{part}"
        k += 1
    mapping = {}
    for key in model.state_dict():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len)
        mapping[key] = prefixes[prefix] + key[len(prefix) :]
    return mapping


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The bare state dict of a release or timm training checkpoint (`model`, `state_dict_ema`, ...)."""
    for name in ("state_dict_ema", "model_ema", "model", "state_dict"):
        if name in checkpoint and isinstance(checkpoint[name], Mapping):
            checkpoint = checkpoint[name]
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: DynaMixer) -> dict[str, torch.Tensor]:
    """A release (or our own) state dict renamed to `model`'s keys; used by timm's `pretrained` loading."""
    state_dict = _unwrap(state_dict)
    if "patch_embed.proj.weight" not in state_dict:
        return state_dict  # already in our names
    ours_of = {release: ours for ours, release in release_key_map(model).items()}
    return {ours_of.get(k, k): v for k, v in state_dict.items()}


def _create(variant: str, pretrained: bool = False, **kwargs) -> DynaMixer:
    """A registered variant; with `features_only=True`, timm's wrapper of `forward_intermediates` giving the
    NCHW outputs of the stages `out_indices` (default all four), the stages after the last one pruned."""
    return build_model_with_cfg(
        DynaMixer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(NUM_STAGES)), feature_cls="getter"),
        **kwargs,
    )


# The paper's variants (docs/paper.md, section 3). `segments`/`reduced_dim` may be overridden for ablations.
@register_model
def dynamixer_s(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-S: 26.3M parameters, 7.3 GMACs at 224 (paper: 82.7% ImageNet top-1)."""
    arch = dict(
        layers=(4, 3, 8, 3),
        embed_dims=(192, 384, 384, 384),
        transitions=(True, False, False, False),
        segments=(8, 16, 16, 16),
        reduced_dim=2,
        patch_size=7,
    )
    return _create("dynamixer_s", pretrained, **{**arch, **kwargs})


@register_model
def dynamixer_m(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-M: 57.1M parameters, 17.0 GMACs at 224 (paper: 83.7% ImageNet top-1)."""
    arch = dict(
        layers=(4, 3, 14, 3),
        embed_dims=(256, 256, 512, 512),
        transitions=(False, True, False, False),
        segments=(8, 8, 16, 16),
        reduced_dim=2,
        patch_size=7,
    )
    return _create("dynamixer_m", pretrained, **{**arch, **kwargs})


@register_model
def dynamixer_l(pretrained: bool = False, **kwargs) -> DynaMixer:
    """DynaMixer-L: 97.8M parameters, 27.3 GMACs at 224 (paper: 84.3% ImageNet top-1)."""
    arch = dict(
        layers=(8, 8, 16, 4),
        embed_dims=(256, 512, 512, 512),
        transitions=(True, False, False, False),
        segments=(8, 16, 16, 16),
        reduced_dim=8,
        patch_size=7,
    )
    return _create("dynamixer_l", pretrained, **{**arch, **kwargs})


@register_model
def dynamixer_tiny(pretrained: bool = False, **kwargs) -> DynaMixer:
    """Our small DynaMixer for CPU work on 32x32 images (patch 4: 8x8 then 4x4 tokens, <1M parameters)."""
    arch = dict(
        img_size=32,
        num_classes=10,
        layers=(2, 2, 2, 1),
        embed_dims=(64, 112, 112, 112),
        transitions=(True, False, False, False),
        segments=(4, 8, 8, 8),
        reduced_dim=2,
        patch_size=4,
    )
    return _create("dynamixer_tiny", pretrained, **{**arch, **kwargs})
