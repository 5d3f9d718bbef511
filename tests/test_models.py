"""Behaviour of the DynaMixer backbone: sizes, release compatibility, dynamic mixing, the reference
oracle, gradients, compilation and the errors raised for bad configurations or inputs."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the timm models)
from dynamixer import load_release_checkpoint
from dynamixer.models import DynaMixer, DynaMixerOp, DynaMixerTokenMixer, model_kwargs_from_release
from helpers import REFERENCE_DIR as REFERENCE
from helpers import fetch_timm_model_tests, randomize_, rel_err
from reference_model import ReferenceDynaMixer, reference_from, reference_key_map

EXPECTED_PARAMS = {"dynamixer_s": 26_265_960, "dynamixer_m": 57_128_264, "dynamixer_l": 97_818_088}


# ----------------------------------------------------------------------------------------- helpers
@functools.cache
def release_shapes() -> dict:
    return json.loads((REFERENCE / "dynamixer_state_dict_shapes.json").read_text())


@functools.cache
def variant(name: str) -> DynaMixer:
    """The 1000-class model of a paper variant (built once per test session)."""
    return timm.create_model(name)


def random_release_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(tuple(shape), generator=g) for k, shape in release_shapes()[name]["state_dict"].items()}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kwargs) -> DynaMixer:
    return timm.create_model("dynamixer_tiny", **kwargs)


# ------------------------------------------------------------------ sizes and release compatibility
@pytest.mark.parametrize("name", ["dynamixer_s", "dynamixer_m", "dynamixer_l"])
def test_param_counts_match_paper_and_release(name):
    model = variant(name)
    assert model.num_classes == 1000
    assert n_params(model) == EXPECTED_PARAMS[name] == release_shapes()[name]["num_params"]


# release key -> our attribute path, checked by hand (not through release_key_map)
HAND_MAPPED = {
    "dynamixer_s": {
        "patch_embed.proj.weight": "stem.weight",
        "network.1.proj.weight": "stages.1.downsample.weight",  # transition after stage 0
        "network.2.0.attn.mix_h.generate.weight": "stages.1.blocks.0.token_mixer.mix_h.generate.weight",
        "network.3.7.attn.mix_w.compress.weight": "stages.2.blocks.7.token_mixer.mix_w.compress.weight",
        "network.4.2.mlp.fc2.bias": "stages.3.blocks.2.mlp.fc2.bias",
        "head.weight": "head.weight",
    },
    "dynamixer_m": {
        "network.1.2.attn.reweight.fc1.weight": "stages.1.blocks.2.token_mixer.reweight.fc1.weight",
        "network.2.proj.weight": "stages.2.downsample.weight",  # transition after stage 1
        "network.3.13.attn.mlp_c.weight": "stages.2.blocks.13.token_mixer.mlp_c.weight",
        "norm.weight": "norm.weight",
    },
    "dynamixer_l": {
        "network.1.proj.bias": "stages.1.downsample.bias",
        "network.4.3.attn.proj.weight": "stages.3.blocks.3.token_mixer.proj.weight",
        "network.0.7.attn.mix_h.compress.weight": "stages.0.blocks.7.token_mixer.mix_h.compress.weight",
    },
}


@pytest.mark.parametrize("name", ["dynamixer_s", "dynamixer_m", "dynamixer_l"])
def test_release_state_dict_loads_strictly(name):
    model = variant(name)
    sd = random_release_state_dict(name)
    load_release_checkpoint(model, sd)  # strict: raises on any missing/unexpected/mis-shaped key
    ours = model.state_dict()
    assert len(ours) == len(sd)
    for release_key, our_key in HAND_MAPPED[name].items():
        assert torch.equal(ours[our_key], sd[release_key]), (release_key, our_key)
    # every release tensor landed somewhere, once: the loaded values are a permutation of the keys
    assert sorted(float(v.sum()) for v in ours.values()) == sorted(float(v.sum()) for v in sd.values())


def test_checkpoint_of_another_variant_is_rejected_with_key_names():
    s = variant("dynamixer_s")
    with pytest.raises(ValueError) as info:
        load_release_checkpoint(s, random_release_state_dict("dynamixer_m"))
    msg = str(info.value)
    assert "patch_embed.proj.weight: checkpoint (256, 3, 7, 7) vs model (192, 3, 7, 7)" in msg
    # S has its transition conv at network.1, M has stage 1's blocks there
    assert "missing" in msg and "network.1.proj.weight" in msg
    assert "unexpected" in msg and "network.1.0.norm1.weight" in msg
    assert "variant" in msg


def test_checkpoint_with_another_class_count_is_rejected_with_key_names():
    model = timm.create_model("dynamixer_s", num_classes=10)
    with pytest.raises(ValueError) as info:
        load_release_checkpoint(model, random_release_state_dict("dynamixer_s"))
    msg = str(info.value)
    assert "head.weight: checkpoint (1000, 384) vs model (10, 384)" in msg
    assert "head.bias" in msg and "num_classes" in msg


def test_tiny_parity_with_release_logits():
    ref = torch.load(REFERENCE / "tiny_parity.pt", weights_only=True)
    model = DynaMixer(**model_kwargs_from_release(ref["config"]))
    load_release_checkpoint(model, ref["state_dict"])
    model.eval()
    with torch.no_grad():
        logits = model(ref["input"])
    assert logits.shape == ref["logits"].shape
    assert rel_err(logits, ref["logits"]) < 1e-5


# ------------------------------------------------------------------------- variants, sizes, kwargs
def test_tiny_variant_is_small_and_runs_on_32px():
    model = tiny().eval()
    assert n_params(model) < 1_000_000
    assert model.img_size == (32, 32) and model.num_classes == 10
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_create_model_kwargs_and_drop_path_schedule():
    # S's patch is 7, so img_size=64 (not a multiple of 7) is rejected (see test_img_size_not_divisible_by_patch);
    # 112 = 16 * 7 is the nearest small valid size.
    model = timm.create_model("dynamixer_s", num_classes=10, img_size=112, drop_path_rate=0.1)
    assert model.head.out_features == 10
    assert model.resolutions == [(16, 16), (8, 8), (8, 8), (8, 8)]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for st in model.stages for b in st.blocks]
    assert len(rates) == 18
    assert rates == pytest.approx([0.1 * k / 17 for k in range(18)])
    model.train()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 10)
    # with a smaller patch, S accepts 64x64 too
    s64 = timm.create_model("dynamixer_s", num_classes=10, img_size=64, patch_size=4, drop_path_rate=0.1)
    assert s64.resolutions == [(16, 16), (8, 8), (8, 8), (8, 8)]
    assert s64(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(
    "name, kwargs, size, resolutions",
    [
        ("dynamixer_s", {}, (224, 224), [32, 16, 16, 16]),
        ("dynamixer_s", {"img_size": 112}, (112, 112), [16, 8, 8, 8]),
        ("dynamixer_tiny", {}, (32, 32), [8, 4, 4, 4]),
        ("dynamixer_tiny", {"img_size": 64}, (64, 64), [16, 8, 8, 8]),
        ("dynamixer_tiny", {"img_size": (32, 64)}, (32, 64), [(8, 16), (4, 8), (4, 8), (4, 8)]),
    ],
)
def test_image_sizes_build_and_run(name, kwargs, size, resolutions):
    model = timm.create_model(name, **kwargs).eval()
    expected = [r if isinstance(r, tuple) else (r, r) for r in resolutions]
    assert model.resolutions == expected
    # each stage's ops are built for its sequence lengths
    for stage, (h, w) in zip(model.stages, expected):
        mixer = stage.blocks[0].token_mixer
        assert (mixer.mix_h.seq_len, mixer.mix_w.seq_len) == (h, w)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


def test_m_resolutions_at_224():
    assert variant("dynamixer_m").resolutions == [(32, 32), (32, 32), (16, 16), (16, 16)]
    assert variant("dynamixer_s").resolutions == [(32, 32), (16, 16), (16, 16), (16, 16)]


def test_segments_and_reduced_dim_set_op_shapes():
    # one int for all stages
    model = tiny(segments=8, reduced_dim=3)
    for stage, (h, w) in zip(model.stages, model.resolutions):
        for op, n in ((stage.blocks[0].token_mixer.mix_h, h), (stage.blocks[0].token_mixer.mix_w, w)):
            assert (op.segments, op.reduced_dim) == (8, 3)
            assert op.compress.weight.shape == (8 * 3, op.out.in_features)
            assert op.generate.weight.shape == (n * n, n * 3)
    # per-stage lists, non-square grid: H and W ops differ
    model = tiny(img_size=(32, 64), segments=[2, 4, 8, 16], reduced_dim=[1, 2, 3, 4])
    dims = [64, 112, 112, 112]
    for i, stage in enumerate(model.stages):
        s, d = [2, 4, 8, 16][i], [1, 2, 3, 4][i]
        h, w = model.resolutions[i]
        mixer = stage.blocks[0].token_mixer
        assert mixer.mix_h.compress.weight.shape == (s * d, dims[i])
        assert mixer.mix_w.compress.weight.shape == (s * d, dims[i])
        assert mixer.mix_h.generate.weight.shape == (h * h, h * d)
        assert mixer.mix_w.generate.weight.shape == (w * w, w * d)


# --------------------------------------------------------------------------------- dynamic mixing
def make_op(seed: int = 0, **kw) -> DynaMixerOp:
    torch.manual_seed(seed)
    args = {"dim": 16, "seq_len": 6, "segments": 2, "reduced_dim": 3, **kw}
    return randomize_(DynaMixerOp(**args), seed=seed, std=0.5)


def test_op_mixing_matrices_shape_and_normalisation():
    op = make_op()
    x = torch.randn(3, 5, 6, 16)
    p = op.mixing_matrices(x)
    assert p.shape == (3, 5, 2, 6, 6)
    assert torch.allclose(p.sum(dim=-2), torch.ones(3, 5, 2, 6), atol=1e-6)
    assert (p >= 0).all()
    # two different inputs give different matrices
    assert not torch.allclose(p, op.mixing_matrices(torch.randn(3, 5, 6, 16)), atol=1e-3)


def test_op_forward_is_mixing_by_its_matrices_then_out():
    op = make_op()
    x = torch.randn(2, 3, 6, 16)
    p = op.mixing_matrices(x)
    S, g = 2, 8
    groups = []
    for s in range(S):
        xs = x[..., s * g : (s + 1) * g]  # (B, L, N, g)
        groups.append(torch.einsum("blij,blic->bljc", p[:, :, s], xs))  # Y_s[j] = sum_i P_s[i, j] X_s[i]
    by_hand = op.out(torch.cat(groups, dim=-1))
    assert torch.allclose(op(x), by_hand, atol=1e-5)


def _response_to_delta(op: DynaMixerOp, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return op(x + delta) - op(x)


def test_mixing_is_dynamic_not_a_static_matrix():
    op = make_op()
    x1, x2 = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    delta = torch.zeros(1, 1, 6, 16)
    delta[:, :, 0] = torch.randn(16)  # change only token 0

    # For a static (input-independent) matrix, op is affine, so f(x + δ) - f(x) does not depend on x.
    static = make_op()
    with torch.no_grad():
        static.generate.weight.zero_()  # matrix = softmax(bias): the same for every input
    s1, s2 = _response_to_delta(static, x1, delta), _response_to_delta(static, x2, delta)
    assert torch.allclose(s1, s2, atol=1e-5)  # control: the check below would fail for a static mixer

    d1, d2 = _response_to_delta(op, x1, delta), _response_to_delta(op, x2, delta)
    assert rel_err(d1, d2) > 0.05
    # ...also at the tokens that were not changed, through the groups' mixing (out mixes channels only)
    assert rel_err(d1[:, :, 1:], d2[:, :, 1:]) > 0.05

    # changing token 0 changes the weights every other output token j gives to every source token i
    p, q = op.mixing_matrices(x1), op.mixing_matrices(x1 + delta)
    changed = (p - q).abs()[..., 1:]  # columns j = 1..N-1
    assert (changed.amax(dim=-2) > 1e-4).all()


def test_block_explain_shapes_and_consistency():
    torch.manual_seed(0)
    block = randomize_(DynaMixerTokenMixer(dim=16, resolution=(4, 6), segments=4, reduced_dim=2), std=0.3).eval()
    x = torch.randn(2, 4, 6, 16)
    info = block.explain(x)
    assert info["mix_h"].shape == (2, 6, 4, 4, 4)  # (B, W columns, S, H, H)
    assert info["mix_w"].shape == (2, 4, 4, 6, 6)  # (B, H rows, S, W, W)
    assert info["branch_weights"].shape == (2, 16, 3)
    for key in ("mix_h", "mix_w"):
        assert torch.allclose(info[key].sum(dim=-2), torch.ones(()), atol=1e-6)
    assert torch.allclose(info["branch_weights"].sum(-1), torch.ones(()), atol=1e-6)
    assert torch.allclose(info["mix_h"], block.mix_h.mixing_matrices(x))
    other = block.explain(torch.randn(2, 4, 6, 16))
    assert not torch.allclose(info["mix_w"], other["mix_w"], atol=1e-3)
    assert "branch_weights" not in DynaMixerTokenMixer(16, (4, 6), 4, 2, fusion="sum").explain(x)


def test_model_explain_per_layer():
    model = randomize_(tiny(), std=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    found = model.explain(x)
    assert len(found) == 7  # layers (2, 2, 2, 1)
    segs = [4, 4, 8, 8, 8, 8, 8]
    res = [8, 8, 4, 4, 4, 4, 4]
    for info, s, n in zip(found, segs, res):
        assert info["mix_h"].shape == (2, n, s, n, n)
        assert info["mix_w"].shape == (2, n, s, n, n)
        assert torch.allclose(info["mix_w"].sum(dim=-2), torch.ones(()), atol=1e-5)
    # the first layer's matrices are those of its actual (normalised) input
    with torch.no_grad():
        tokens = model.stages[0].blocks[0].norm1(model.stem(x).permute(0, 2, 3, 1))
        expected = model.stages[0].blocks[0].token_mixer.mix_w.mixing_matrices(tokens)
    assert torch.allclose(found[0]["mix_w"], expected, atol=1e-6)
    other = model.explain(torch.randn(2, 3, 32, 32))
    assert all(not torch.allclose(a["mix_h"], b["mix_h"], atol=1e-4) for a, b in zip(found, other))


# ------------------------------------------------------------------------------- reference oracle
ORACLE_CASES = {
    "tiny": ("dynamixer_tiny", {}),
    "tiny-64": ("dynamixer_tiny", {"img_size": 64}),
    "tiny-nonsquare": ("dynamixer_tiny", {"img_size": (32, 64)}),
    "tiny-sum": ("dynamixer_tiny", {"fusion": "sum"}),
    "tiny-per-stage": (
        "dynamixer_tiny",
        {"segments": [2, 4, 8, 16], "reduced_dim": [1, 2, 3, 4], "mlp_ratio": [2, 3, 4, 1.5], "channel_bias": True},
    ),
    "s-56": ("dynamixer_s", {"img_size": 56, "num_classes": 7}),
    "m-56": ("dynamixer_m", {"img_size": 56, "num_classes": 7}),
}


def _oracle_pair(case: str, **extra):
    name, kwargs = ORACLE_CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, **{**kwargs, **extra})
    randomize_(model, std=0.05 if name != "dynamixer_tiny" else 0.1)
    return model, reference_from(model)


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_matches_reference_forward_eval(case):
    model, ref = _oracle_pair(case)
    model.eval(), ref.eval()
    assert isinstance(ref, ReferenceDynaMixer)
    x = torch.randn(3, 3, *model.img_size)
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-5


def _compare_grads(model, ref, x, seed=None):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    ya = model(xa)
    if seed is not None:
        torch.manual_seed(seed)
    yb = ref(xb)
    assert rel_err(ya, yb) < 1e-5
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert rel_err(xa.grad, xb.grad) < 1e-5
    ref_params = dict(ref.named_parameters())
    mapping = reference_key_map(model)
    named = list(model.named_parameters())
    assert len(named) == len(ref_params)
    for name, p in named:
        q = ref_params[mapping[name]]
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm() + 1e-8, name


@pytest.mark.parametrize("case", ["tiny", "tiny-nonsquare", "tiny-sum", "tiny-per-stage", "s-56"])
def test_matches_reference_gradients_train(case):
    model, ref = _oracle_pair(case)
    model.train(), ref.train()
    _compare_grads(model, ref, torch.randn(2, 3, *model.img_size))


def test_matches_reference_with_stochastic_depth_and_dropout_same_seed():
    model, ref = _oracle_pair("tiny", drop_path_rate=0.3, proj_drop_rate=0.1, drop_rate=0.2)
    model.train(), ref.train()
    ref_rates = [layer.drop_path.rate for st in ref.stages for layer in st.layers]
    our_rates = [getattr(b.drop_path, "drop_prob", 0.0) for st in model.stages for b in st.blocks]
    assert our_rates == pytest.approx(ref_rates)
    _compare_grads(model, ref, torch.randn(4, 3, 32, 32), seed=123)
    # eval: drop path and dropout are the identity
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-5
        assert torch.equal(model(x), model(x))


def test_reference_from_release_parity_config():
    ref_data = torch.load(REFERENCE / "tiny_parity.pt", weights_only=True)
    model = DynaMixer(**model_kwargs_from_release(ref_data["config"]))
    load_release_checkpoint(model, ref_data["state_dict"])
    model.eval()
    oracle = reference_from(model).eval()
    with torch.no_grad():
        assert rel_err(oracle(ref_data["input"]), ref_data["logits"]) < 1e-5


# ------------------------------------------------------------------------- training and compiling
def test_gradients_reach_every_parameter_of_tiny():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.1).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_(tiny(), std=0.1).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager, comp = model(x), compiled(x)
    torch._dynamo.reset()
    assert torch.allclose(comp, eager, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- bad input
def test_segments_not_dividing_stage_dim():
    with pytest.raises(ValueError) as info:
        tiny(segments=5)
    msg = str(info.value)
    assert "segments=5" in msg and "dimension 64" in msg and "divide" in msg


def test_img_size_not_divisible_by_patch():
    with pytest.raises(ValueError) as info:
        timm.create_model("dynamixer_s", img_size=100)
    msg = str(info.value)
    assert "img_size=(100, 100)" in msg and "patch_size=7" in msg and "multiple of 7" in msg


def test_img_size_whose_token_grid_a_transition_cannot_halve():
    with pytest.raises(ValueError) as info:
        tiny(img_size=36)  # 36 / 4 = 9x9 tokens
    msg = str(info.value)
    assert "img_size=(36, 36)" in msg and "9x9" in msg and "multiple of 8" in msg


def test_input_of_another_size_than_built_for():
    model = tiny()
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 3, 64, 64))
    msg = str(info.value)
    assert "(2, 3, 64, 64)" in msg and "32x32" in msg and "img_size=(64, 64)" in msg


def test_per_stage_list_of_wrong_length():
    with pytest.raises(ValueError) as info:
        tiny(segments=[4, 8])
    msg = str(info.value)
    assert "segments" in msg and "[4, 8]" in msg and "4 stages" in msg


# ------------------------------------------------------------------- fast path: options and precision
def test_grad_checkpointing_option_gives_the_same_gradients():
    model, _ = _oracle_pair("tiny")
    checkpointed = tiny(grad_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    assert checkpointed.grad_checkpointing and not model.grad_checkpointing
    model.train(), checkpointed.train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for m in (model, checkpointed):
        m(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 1e-6, name


def test_bf16_autocast_stays_close_to_fp32_and_keeps_normalised_matrices():
    model, ref = _oracle_pair("tiny")
    model.eval(), ref.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        exact = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
            block = model.stages[0].blocks[0].token_mixer
            tokens = torch.randn(2, 8, 8, 64)
            p = block.mix_w.mixing_matrices(tokens)
    assert low.dtype == torch.bfloat16  # the head is a Linear
    assert rel_err(low.float(), exact) < 5e-2
    assert torch.allclose(p.float().sum(dim=-2), torch.ones(()), atol=2e-2)


def test_block_branches_match_reference_block():
    torch.manual_seed(0)
    block = randomize_(DynaMixerTokenMixer(dim=16, resolution=(4, 6), segments=4, reduced_dim=2), std=0.3).eval()
    x = torch.randn(2, 4, 6, 16)
    h, w, c = block.branches(x)
    # the column op (tokens along dim 1, read in place) is a row op of its weights on the transposed grid
    row = DynaMixerOp(dim=16, seq_len=4, segments=4, reduced_dim=2)
    row.load_state_dict(block.mix_h.state_dict())
    assert rel_err(h, row(x.transpose(1, 2)).transpose(1, 2)) < 1e-6
    assert rel_err(w, block.mix_w(x)) < 1e-6
    a = block.branch_weights(h, w, c)[:, None, None]
    expected = block.proj(h * a[..., 0] + w * a[..., 1] + c * a[..., 2])
    assert rel_err(block(x), expected) < 1e-6


# ------------------------------------------------------ what timm expects of a registered model
@pytest.mark.slow
def test_timm_own_model_tests_pass_on_every_registered_variant(tmp_path):
    """tests/test_models.py of pytorch-image-models (the installed version's release) on our variants: forward,
    backward, default cfgs, factory device/dtype, TorchScript, FX tracing, features, intermediates."""
    timm_tests = fetch_timm_model_tests(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "dynamixer.models", "test_models.py", "-k", "dynamixer", "-rA"]
        + ["-p", "no:cacheprovider", "-W", "ignore"],
        cwd=timm_tests,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    line = r"^(PASSED|FAILED|SKIPPED|ERROR) test_models.py::(\w+)\[\w+-(dynamixer_\w+?)(?:\.\w+)?\]"
    outcomes = re.findall(line, proc.stdout, re.M)
    assert {outcome for outcome, _, _ in outcomes} == {"PASSED"}, proc.stdout[-6000:]
    passed = {name: {test for _, test, n in outcomes if n == name} for name in timm.list_models("dynamixer_*")}
    # every variant went through every one of timm's generic model tests that selects it
    assert len(passed) == 4 and all(tests == passed["dynamixer_tiny"] for tests in passed.values()), passed
    generic = {"test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std"}
    assert (
        generic | {"test_model_forward_torchscript", "test_model_forward_fx", "test_model_backward_fx"}
        <= passed["dynamixer_s"]
    )


def test_scripted_and_traced_model_give_the_eager_logits_at_the_cfg_input_size():
    """TorchScript and FX give the eager logits; the cfg says the input size is fixed, and another is refused."""
    model = timm.create_model("dynamixer_tiny").eval()
    cfg = model.pretrained_cfg
    assert cfg["fixed_input_size"] is True and cfg["first_conv"] == "stem" and cfg["classifier"] == "head"
    assert cfg["num_classes"] == model.num_classes and tuple(cfg["input_size"][1:]) == model.img_size
    x = torch.randn(2, *cfg["input_size"])
    with torch.no_grad():
        eager = model(x)
        assert torch.allclose(torch.jit.script(model)(x), eager, atol=1e-5)
        assert torch.allclose(torch.fx.symbolic_trace(model)(x), eager, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit this model"):
        model(torch.randn(1, 3, 128, 128))


def test_factory_device_and_dtype_reach_every_parameter_and_a_new_head():
    model = timm.create_model("dynamixer_tiny", device="meta", dtype=torch.bfloat16).eval()
    assert {(t.device.type, t.dtype) for t in [*model.parameters(), *model.buffers()]} == {("meta", torch.bfloat16)}
    model.reset_classifier(3)
    head = model.head
    assert (head.weight.device.type, head.weight.dtype, head.training) == ("meta", torch.bfloat16, False)


def test_forward_intermediates_give_every_stage_and_the_final_features():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(s.shape) for s in stages] == [(2, 64, 8, 8), (2, 112, 4, 4), (2, 112, 4, 4), (2, 112, 4, 4)]
        assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(64, 4), (112, 8), (112, 8), (112, 8)]
        (last,) = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(last, stages[-1].permute(0, 2, 3, 1))
    assert model.prune_intermediate_layers([1]) == [1] and len(model.stages) == 2


# ------------------------------------------------------------ dense prediction: timm's features_only
FEATURE_IMG = 56  # the smallest size every variant builds at (patch 7, one halving: 8x8 then 4x4 tokens)


@pytest.mark.parametrize("name", timm.list_models("dynamixer_*"))
def test_features_only_gives_nchw_maps_that_match_feature_info(name):
    """`features_only=True` builds every variant: one NCHW map per stage, channels and stride as `feature_info`
    says, equal to the classifier's `forward_intermediates` with the same weights."""
    model = timm.create_model(name, features_only=True, img_size=FEATURE_IMG).eval()
    info = model.feature_info
    assert info.out_indices == (0, 1, 2, 3) and len(info.channels()) == 4
    x = torch.randn(2, 3, FEATURE_IMG, FEATURE_IMG)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, c, FEATURE_IMG // r, FEATURE_IMG // r) for c, r in zip(info.channels(), info.reduction())
    ]
    assert all(m.is_contiguous() for m in maps)
    full = timm.create_model(name, img_size=FEATURE_IMG).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)  # the wrapper has no head or final norm
    with torch.no_grad():
        expected = full.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))


def test_features_only_out_indices_select_stages_and_prune_the_rest():
    """`out_indices` (absolute, negative, or an int for the last n) pick the maps and their `feature_info`;
    the stages after the last picked one, the final norm and the head are dropped."""
    for out_indices, picked in (((1, 3), [1, 3]), ((0, -3), [0, 1]), (2, [2, 3]), ((0,), [0])):
        model = timm.create_model("dynamixer_m", features_only=True, img_size=FEATURE_IMG, out_indices=out_indices)
        assert list(model.feature_info.out_indices) == picked, out_indices
        assert len(model.model.stages) == picked[-1] + 1
        assert isinstance(model.model.norm, torch.nn.Identity) and isinstance(model.model.head, torch.nn.Identity)
        with torch.no_grad():
            maps = model(torch.randn(1, 3, FEATURE_IMG, FEATURE_IMG))
        info = model.feature_info
        assert [(m.shape[1], FEATURE_IMG // m.shape[-1]) for m in maps] == list(zip(info.channels(), info.reduction()))
        if out_indices == (1, 3):  # dynamixer_m halves the grid after its second stage, not its first
            assert list(zip(info.channels(), info.reduction())) == [(256, 7), (512, 14)]


def test_features_only_of_the_issue_builds_at_the_default_size():
    """The call of detection libraries, as is: `dynamixer_s` at 224, strides 7 and 14."""
    model = timm.create_model("dynamixer_s", features_only=True).eval()
    assert model.feature_info.channels() == [192, 384, 384, 384]
    assert model.feature_info.reduction() == [7, 14, 14, 14]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 32, 32)] + [(1, 384, 16, 16)] * 3


class TinyFPN(torch.nn.Module):
    """FPN-style per-pixel classifier on NCHW maps (finest first): a 1x1 lateral conv per map to `dim` channels,
    top-down nearest-upsample-add from the coarsest, a 1x1 classifier on the finest, bilinearly upsampled to
    the image: logits `(B, classes, H, W)`."""

    def __init__(self, channels: list[int], dim: int = 32, classes: int = 2):
        super().__init__()
        self.lateral = torch.nn.ModuleList(torch.nn.Conv2d(c, dim, 1) for c in channels)
        self.classify = torch.nn.Conv2d(dim, classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        F = torch.nn.functional
        y = self.lateral[-1](maps[-1])
        for lateral, m in zip(self.lateral[-2::-1], maps[-2::-1]):
            y = lateral(m) + F.interpolate(y, size=m.shape[-2:], mode="nearest")
        return F.interpolate(self.classify(y), size=size, mode="bilinear", align_corners=False)


def test_fpn_head_trains_on_features_only_outputs_to_segment_digits():
    """A real dense task on `dynamixer_tiny`'s features: segment the bright pixels of scikit-learn's digits
    (8x8, bilinearly upsampled to 32x32). 40 steps of backbone + head lower the per-pixel loss well below the
    start and segment held-out digits far better than the majority class."""
    from sklearn.datasets import load_digits

    F = torch.nn.functional
    torch.manual_seed(0)
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16  # (1797, 1, 8, 8) in [0, 1]
    images = F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False)
    masks = (images[:, 0] > 0.5).long()  # (N, 32, 32): about 30% bright
    x = (images.expand(-1, 3, -1, -1) - 0.5) / 0.5
    backbone = timm.create_model("dynamixer_tiny", features_only=True)
    head = TinyFPN(backbone.feature_info.channels())
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        idx = torch.randint(0, 1500, (32,), generator=g)
        loss = F.cross_entropy(head(backbone(x[idx]), (32, 32)), masks[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # measured: 0.63 at the start, 0.026 after 40 steps
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses
    backbone.eval(), head.eval()
    with torch.no_grad():
        pred = head(backbone(x[1500:]), (32, 32)).argmax(1)
    truth = masks[1500:]
    iou = ((pred == 1) & (truth == 1)).sum() / ((pred == 1) | (truth == 1)).sum()
    assert iou > 0.8, iou  # measured: 0.97 (predicting all dark: 0)


def test_static_mixing_learns_matrices_that_do_not_depend_on_the_input():
    """The control of the paper's claim: the same operation, with learned instead of generated matrices."""
    static, dynamic = tiny(mixing="static"), tiny()
    ops = [m for m in static.modules() if isinstance(m, DynaMixerOp)]
    assert all(op.static and not hasattr(op, "generate") for op in ops)
    assert n_params(static) < n_params(dynamic)
    randomize_(static), randomize_(dynamic)
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    for model, same in ((static, True), (dynamic, False)):
        first, second = model.explain(a), model.explain(b)
        for layer_a, layer_b in zip(first, second):
            for key in ("mix_h", "mix_w"):
                assert torch.allclose(layer_a[key].sum(-2), torch.ones(())), key  # softmax over source tokens
                assert torch.equal(layer_a[key], layer_b[key]) == same, key
    # it trains: the matrices get gradients and a few steps lower the loss on a fixed batch
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.AdamW(static.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(static(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert all(op.static_logits.grad.abs().sum() > 0 for op in ops)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
