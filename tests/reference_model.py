"""Reference DynaMixer: literal transcription used as oracle/baseline; not for training.

A second, independent implementation of docs/paper.md (sections 1-3), written straight from its words: explicit
reshapes and permutes, one loop over the segments, its own module classes and its own parameter
names. It exists to check `dynamixer.models.dynamixer.DynaMixer` (tests compare outputs and
gradients) and as the "plain" baseline of the benchmarks. It is deliberately unoptimised.

Layout: tokens are channels last, `(B, H, W, D)`, as in docs/paper.md, section 2.

Public API:
- `ReferenceDynaMixerOp`, `ReferenceTokenMixer`, `ReferenceBlock`, `ReferenceStage`,
  `ReferenceMLP`, `ReferenceDropPath`, `ReferenceDynaMixer`: the modules.
- `reference_key_map(model)`: our `DynaMixer` state-dict key -> the reference's key.
- `reference_from(model)`: a `ReferenceDynaMixer` with `model`'s hyper-parameters and weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from dynamixer.models import DynaMixer

__all__ = [
    "ReferenceDropPath",
    "ReferenceDynaMixer",
    "ReferenceTokenMixer",
    "ReferenceDynaMixerOp",
    "ReferenceBlock",
    "ReferenceMLP",
    "ReferenceStage",
    "reference_from",
    "reference_key_map",
]


class ReferenceDynaMixerOp(nn.Module):
    """docs/paper.md section 1, literal transcription used as oracle/baseline; not for training.

    Input `(B, L, N, D)`: `L` sequences of `N` tokens with `D` channels; output the same shape.
    """

    def __init__(self, dim: int, seq_len: int, segments: int, reduced_dim: int):
        super().__init__()
        assert dim % segments == 0, "D must split into S equal groups"
        self.dim = dim
        self.seq_len = seq_len
        self.segments = segments
        self.reduced_dim = reduced_dim
        self.compress = nn.Linear(dim, segments * reduced_dim)  # Wc, bc
        self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)  # Wg, bg (shared by segments)
        self.out = nn.Linear(dim, dim)  # Wo, bo

    def mixing_matrices(self, x: torch.Tensor) -> torch.Tensor:
        """`P` of shape `(B, L, S, N, N)`, `P[..., s, i, j]`: weight of source `i` for output `j`."""
        B, L, N, D = x.shape
        S, d = self.segments, self.reduced_dim
        # 1. Compress: Z = X Wc + bc, output channel s*d + k belongs to segment s.
        z = self.compress(x)  # (B, L, N, S*d)
        z = z.reshape(B, L, N, S, d)  # view as (N, S, d)
        z = z.permute(0, 1, 3, 2, 4)  # move S first: (B, L, S, N, d)
        z = z.reshape(B, L, S, N * d)  # token-major: token 0's d values, then token 1's, ...
        # 2. Generate: M_s = reshape(Z_s Wg + bg, N x N); softmax over the first index i.
        m = self.generate(z)  # (B, L, S, N*N)
        m = m.reshape(B, L, S, N, N)  # [..., i, j]
        p = torch.softmax(m, dim=3)  # over i
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, N, D = x.shape
        S = self.segments
        group = D // S
        p = self.mixing_matrices(x)
        # 3. Mix: channels split into S contiguous groups; Y_s[j] = sum_i P_s[i, j] * X_s[i].
        ys = []
        for s in range(S):
            x_s = x[:, :, :, s * group : (s + 1) * group]  # (B, L, N_i, D/S)
            p_s = p[:, :, s]  # (B, L, N_i, N_j)
            y_s = torch.matmul(p_s.transpose(2, 3), x_s)  # (B, L, N_j, D/S)
            ys.append(y_s)
        # 4. Out: Y = concat_s(Y_s) Wo + bo.
        y = torch.cat(ys, dim=3)
        return self.out(y)


class ReferenceTokenMixer(nn.Module):
    """docs/paper.md section 2, literal transcription used as oracle/baseline; not for training.

    Input and output `(B, H, W, D)`.
    """

    def __init__(
        self,
        dim: int,
        height: int,
        width: int,
        segments: int,
        reduced_dim: int,
        fusion: str = "reweight",
        channel_bias: bool = False,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        assert fusion in ("reweight", "sum")
        self.dim = dim
        self.fusion = fusion
        self.op_h = ReferenceDynaMixerOp(dim, height, segments, reduced_dim)  # along H, every column
        self.op_w = ReferenceDynaMixerOp(dim, width, segments, reduced_dim)  # along W, every row
        self.channel = nn.Linear(dim, dim, bias=channel_bias)  # c = X Wc'
        if fusion == "reweight":
            self.reweight_down = nn.Linear(dim, dim // 4)
            self.reweight_act = nn.GELU()
            self.reweight_up = nn.Linear(dim // 4, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, D = x.shape
        # h: columns are the sequences -> (B, W, H, D), mix along H, back to (B, H, W, D)
        h = self.op_h(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        # w: rows are the sequences, (B, H, W, D) as is
        w = self.op_w(x)
        c = self.channel(x)
        if self.fusion == "sum":
            y = h + w + c
        else:
            a = (h + w + c).reshape(B, H * W, D).mean(dim=1)  # (B, D)
            a = self.reweight_up(self.reweight_act(self.reweight_down(a)))  # (B, 3D)
            a = a.reshape(B, D, 3)
            a = torch.softmax(a, dim=2)
            a0 = a[:, :, 0].reshape(B, 1, 1, D)
            a1 = a[:, :, 1].reshape(B, 1, 1, D)
            a2 = a[:, :, 2].reshape(B, 1, 1, D)
            y = h * a0 + w * a1 + c * a2
        y = self.proj(y)
        return self.dropout(y)


class ReferenceMLP(nn.Module):
    """`Linear(D -> hidden), GELU, Linear(hidden -> D)`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class ReferenceDropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability `rate`
    and scale the kept ones by `1 / (1 - rate)`; identity in eval or when `rate == 0`."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask = mask / keep
        return x * mask


class ReferenceBlock(nn.Module):
    """Pre-norm residual block: `x + DropPath(Mixer(LN(x)))`, then `x + DropPath(MLP(LN(x)))`."""

    def __init__(
        self,
        dim: int,
        height: int,
        width: int,
        segments: int,
        reduced_dim: int,
        mlp_hidden: int,
        fusion: str,
        channel_bias: bool,
        proj_drop: float,
        drop_path: float,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_mix = nn.LayerNorm(dim, eps=eps)
        self.mixer = ReferenceTokenMixer(dim, height, width, segments, reduced_dim, fusion, channel_bias, proj_drop)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = ReferenceMLP(dim, mlp_hidden)
        self.drop_path = ReferenceDropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm_mix(x)))
        x = x + self.drop_path(self.mlp(self.norm_mlp(x)))
        return x


class ReferenceStage(nn.Module):
    """`change` (a 2x2 stride-2 conv at a transition, a 1x1 conv for a width change, or nothing),
    then the stage's layers. `(B, H, W, D_in)` in, `(B, H', W', D)` out."""

    def __init__(self, change: nn.Module | None, layers: Sequence[nn.Module]):
        super().__init__()
        self.change = change
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.change is not None:
            x = x.permute(0, 3, 1, 2)  # (B, D, H, W) for the conv
            x = self.change(x)
            x = x.permute(0, 2, 3, 1)  # back to channels last
        for layer in self.layers:
            x = layer(x)
        return x


class ReferenceDynaMixer(nn.Module):
    """docs/paper.md section 3, literal transcription used as oracle/baseline; not for training.

    All per-stage arguments are lists of four values; `resolutions` is the `(H, W)` token grid of
    each stage. No weight initialisation is done: the weights are meant to be copied from a
    `DynaMixer` (see `reference_from`).
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        patch_size: tuple[int, int],
        in_chans: int,
        num_classes: int,
        layers: Sequence[int],
        embed_dims: Sequence[int],
        transitions: Sequence[bool],
        segments: Sequence[int],
        reduced_dims: Sequence[int],
        mlp_hiddens: Sequence[int],
        resolutions: Sequence[tuple[int, int]],
        fusion: str = "reweight",
        channel_bias: bool = False,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.img_size = tuple(img_size)
        self.global_pool = global_pool
        self.patch_embed = nn.Conv2d(in_chans, embed_dims[0], kernel_size=patch_size, stride=patch_size)
        blocks = sum(layers)
        k = 0  # global block index
        stages = []
        for i in range(len(layers)):
            change = None
            if i > 0:
                if transitions[i - 1]:
                    change = nn.Conv2d(embed_dims[i - 1], embed_dims[i], kernel_size=2, stride=2)
                elif embed_dims[i - 1] != embed_dims[i]:
                    change = nn.Conv2d(embed_dims[i - 1], embed_dims[i], kernel_size=1, stride=1)
            height, width = resolutions[i]
            stage_layers = []
            for _ in range(layers[i]):
                rate = drop_path_rate * k / (blocks - 1) if blocks > 1 else 0.0
                stage_layers.append(
                    ReferenceBlock(
                        embed_dims[i],
                        height,
                        width,
                        segments[i],
                        reduced_dims[i],
                        mlp_hiddens[i],
                        fusion,
                        channel_bias,
                        proj_drop_rate,
                        rate,
                        eps,
                    )
                )
                k += 1
            stages.append(ReferenceStage(change, stage_layers))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=eps)
        self.head_dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[2:]) == self.img_size, "the reference is built for one image size"
        x = self.patch_embed(x)  # (B, D0, H, W)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, D0)
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)
        if self.global_pool == "avg":
            B, H, W, D = x.shape
            x = x.reshape(B, H * W, D).mean(dim=1)  # mean over tokens
        x = self.head_dropout(x)
        if self.head is not None:
            x = self.head(x)
        return x


# ours -> reference, applied in order to every key of a `DynaMixer` state dict
_RENAMES = [
    (r"^stem\.", "patch_embed."),
    (r"^stages\.(\d+)\.downsample\.", r"stages.\1.change."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.layers.\2."),
    (r"\.norm1\.", ".norm_mix."),
    (r"\.norm2\.", ".norm_mlp."),
    (r"\.token_mixer\.", ".mixer."),
    (r"\.mixer\.mix_h\.", ".mixer.op_h."),
    (r"\.mixer\.mix_w\.", ".mixer.op_w."),
    (r"\.mixer\.mlp_c\.", ".mixer.channel."),
    (r"\.mixer\.reweight\.fc1\.", ".mixer.reweight_down."),
    (r"\.mixer\.reweight\.fc2\.", ".mixer.reweight_up."),
    (r"\.mlp\.fc1\.", ".mlp.fc_in."),
    (r"\.mlp\.fc2\.", ".mlp.fc_out."),
]


def reference_key_map(model: DynaMixer) -> dict[str, str]:
    """Our `DynaMixer` state-dict key -> the `ReferenceDynaMixer` key of the same tensor."""
    mapping = {}
    for key in model.state_dict():
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        mapping[key] = new
    return mapping


def _drop_prob(module: nn.Module) -> float:
    return float(getattr(module, "drop_prob", 0.0) or 0.0)


def reference_from(model: DynaMixer) -> ReferenceDynaMixer:
    """A `ReferenceDynaMixer` with the hyper-parameters and a copy of the weights of `model`.

    The hyper-parameters are read from the model's attributes and modules; the drop-path rate is
    the last block's (the paper's linear rule ends at the full rate), and the reference recomputes the
    per-block rates itself. The result is in the same train/eval mode as `model`.
    """
    if not isinstance(model, DynaMixer):
        raise TypeError(f"reference_from expects a DynaMixer, got {type(model).__name__}")
    if not isinstance(model.norm, nn.LayerNorm):
        raise ValueError("the reference only transcribes LayerNorm models")
    patch = tuple(model.stem.kernel_size)
    layers, dims, transitions, segments, reduced, hiddens = [], [], [], [], [], []
    fusion, channel_bias, proj_drop, last_rate = "reweight", False, 0.0, 0.0
    dim = model.stem.out_channels
    for i, stage in enumerate(model.stages):
        ds = stage.downsample
        if i > 0:
            transitions.append(ds is not None and tuple(ds.stride) == (2, 2))
        if ds is not None:
            dim = ds.out_channels
        dims.append(dim)
        layers.append(len(stage.blocks))
        if len(stage.blocks):
            first = stage.blocks[0]
            mixer = first.token_mixer
            segments.append(mixer.mix_h.segments)
            reduced.append(mixer.mix_h.reduced_dim)
            hiddens.append(first.mlp.fc1.out_features)
            fusion = "sum" if mixer.reweight is None else "reweight"
            channel_bias = mixer.mlp_c.bias is not None
            proj_drop = mixer.proj_drop.p
            last_rate = _drop_prob(stage.blocks[-1].drop_path)
        else:
            segments.append(1)
            reduced.append(1)
            hiddens.append(dim)
    transitions.append(False)  # after the last stage: nothing
    head = model.head
    ref = ReferenceDynaMixer(
        img_size=model.img_size,
        patch_size=patch,
        in_chans=model.stem.in_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        layers=layers,
        embed_dims=dims,
        transitions=transitions,
        segments=segments,
        reduced_dims=reduced,
        mlp_hiddens=hiddens,
        resolutions=[tuple(r) for r in model.resolutions],
        fusion=fusion,
        channel_bias=channel_bias,
        drop_rate=model.head_drop.p,
        proj_drop_rate=proj_drop,
        drop_path_rate=last_rate,
        global_pool=model.global_pool,
        eps=model.norm.eps,
    )
    first_param = next(model.parameters())
    ref.to(device=first_param.device, dtype=first_param.dtype)
    mapping = reference_key_map(model)
    ours = model.state_dict()
    ref.load_state_dict({mapping[k]: v.detach().clone() for k, v in ours.items()}, strict=True)
    ref.train(model.training)
    return ref
