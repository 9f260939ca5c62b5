"""Tests for passes/lower_stripe_convs.py and swpfx/runtime_model.py (no timing here)."""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import fx, nn

from swpfx.passes.graph_utils import PassError
from swpfx.passes.lower_stripe_convs import (
    FORMS,
    ConvGeometry,
    box_groups,
    lower_conv,
    lower_stripe_convs,
    mark_stripe_conv,
    supported_forms,
    takes_any_order,
)
from swpfx.masks import random_stripe_mask, structured_stripe_mask
from swpfx.passes.form_work import form_work
from swpfx.passes.stripe_geometry import box_covers, stripe_boxes
from swpfx.runtime_model import RuntimeModel, candidate_work, default_runtime_model, fit_coefficients

REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().abs().max() / expected.detach().abs().max().clamp_min(1e-30))


def one_stripe_mask(out_channels: int, kh: int, kw: int, generator: torch.Generator) -> torch.Tensor:
    """Every filter keeps exactly one stripe, anywhere (all stripes dead but one)."""
    mask = torch.zeros(out_channels, kh * kw, dtype=torch.bool)
    mask[torch.arange(out_channels), torch.randint(kh * kw, (out_channels,), generator=generator)] = True
    return mask.view(out_channels, kh, kw)


def make_mask(kind: str, out_channels: int, kh: int, kw: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return random_stripe_mask(out_channels, kh, kw, dead=0.0, generator=generator)
    if kind == "structured":
        return structured_stripe_mask(out_channels, kh, kw, dead=0.0, generator=generator)
    return one_stripe_mask(out_channels, kh, kw, generator)


def stripe_conv_graph(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor) -> fx.GraphModule:
    """A one-conv GraphModule matching the pass's input contract (zeroed stripes, mask meta, shapes)."""
    gm = fx.symbolic_trace(nn.Sequential(conv))
    mark_stripe_conv(gm, "0", mask, x)
    return gm


def conv_with_options(kernel, stride, padding, dilation, groups, bias, dtype, generator, c_in=8, c_out=12):
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=generator))
    return conv.to(dtype)


def _option_cases() -> list[tuple]:
    """Every value of every conv option appears; the rest drawn at random (seeded)."""
    kernels = [(2, 2), (1, 3), (3, 1), (3, 3), (5, 5), (7, 7), (2, 3)]
    strides, paddings, dilations = [1, 2, (2, 1)], [0, 1, (1, 2), "same", "valid"], [1, 2]
    groups, biases = [1, 2, 4], [True, False]
    rng = random.Random(0)
    cases = []
    for i in range(28):
        kernel = kernels[i % len(kernels)]
        stride = strides[i % len(strides)]
        padding = paddings[i % len(paddings)]
        if padding == "same":
            stride = 1  # torch only supports 'same' with stride 1
        cases.append((kernel, stride, padding, dilations[i % 2], groups[rng.randrange(3)], biases[(i // 2) % 2],
                      ["random", "structured", "one_stripe"][i % 3]))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,bias,mask_kind", _option_cases())
def test_every_form_matches_the_masked_dense_conv(kernel, stride, padding, dilation, groups, bias, mask_kind, dtype,
                                                  generator):
    conv = conv_with_options(kernel, stride, padding, dilation, groups, bias, dtype, generator)
    x = torch.randn(2, 8, 15, 14, generator=generator, dtype=dtype)
    mask = make_mask(mask_kind, 12, *kernel, generator)
    gm = stripe_conv_graph(conv, mask, x)
    expected = gm(x)
    forms = supported_forms(ConvGeometry.of(conv))
    assert forms == (FORMS if groups == 1 else ("boxes",))
    for form in forms:
        for options in ([{"min_group": 1}, {"min_group": 8}, {"min_group": 1, "align": 4}] if form == "boxes"
                        else [{}]):
            lowered = copy.deepcopy(gm)
            node = next(n for n in lowered.graph.nodes if n.op == "call_module")
            lower_conv(lowered, node, form, **options)
            lowered.graph.lint()
            lowered.recompile()
            out = lowered(x)
            assert out.dtype == dtype and out.shape == expected.shape
            assert relative_error(out, expected) <= REL_TOL[dtype], (form, options)


def test_depthwise_conv_lowered_with_boxes(generator):
    conv = conv_with_options((3, 3), 1, 1, 1, 8, True, torch.float32, generator, c_in=8, c_out=16)
    x = torch.randn(1, 8, 12, 12, generator=generator)
    gm = stripe_conv_graph(conv, structured_stripe_mask(16, 3, 3, dead=0.0, generator=generator), x)
    expected = gm(x)
    lower_stripe_convs(gm, lowering="always")
    assert relative_error(gm(x), expected) <= 1e-4
    assert any(n.meta.get("swpfx", {}).get("lowering") == "boxes" for n in gm.graph.nodes)


def test_always_lowers_with_readable_names_and_meta(generator):
    conv = conv_with_options((3, 3), 1, 1, 1, 1, True, torch.float32, generator, c_in=16, c_out=32)
    x = torch.randn(1, 16, 14, 14, generator=generator)
    model = nn.Sequential()
    model.add_module("layer1", nn.Sequential(conv, nn.ReLU()))
    gm = fx.symbolic_trace(model)
    mask = structured_stripe_mask(32, 3, 3, dead=0.0, generator=generator)
    mark_stripe_conv(gm, "layer1.0", mask, x)
    expected = gm(x)
    lower_stripe_convs(gm, lowering="always")
    created = [n for n in gm.graph.nodes if n.meta.get("swpfx", {}).get("role") == "lowered_conv"]
    assert created and all(n.name.startswith("layer1_0_") for n in created)
    assert {n.meta["swpfx"]["conv"] for n in created} == {"layer1.0"}
    assert {n.meta["swpfx"]["kept_stripes"] for n in created} == {int(mask.sum())}
    assert not any(n.op == "call_module" and n.target == "layer1.0" for n in gm.graph.nodes)
    assert "layer1_0_" in gm.code
    gm.graph.lint()
    assert relative_error(gm(x), expected) <= 1e-4


def test_one_by_one_and_full_masks_are_never_lowered(generator):
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1))
    gm = fx.symbolic_trace(model)
    x = torch.randn(1, 8, 10, 10, generator=generator)
    mask_1x1 = torch.ones(8, 1, 1, dtype=torch.bool)
    mark_stripe_conv(gm, "0", mask_1x1)
    mark_stripe_conv(gm, "1", torch.ones(8, 3, 3, dtype=torch.bool), x)
    lower_stripe_convs(gm, lowering="always")
    convs = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in convs] == ["0", "1"]
    assert all(n.meta["swpfx"]["lowering"] == "dense" for n in convs)


def test_never_keeps_the_dense_conv(generator):
    conv = conv_with_options((3, 3), 1, 1, 1, 1, False, torch.float32, generator)
    x = torch.randn(1, 8, 10, 10, generator=generator)
    gm = stripe_conv_graph(conv, random_stripe_mask(12, 3, 3, dead=0.0, generator=generator), x)
    code = gm.code
    lower_stripe_convs(gm, lowering="never")
    assert gm.code == code
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert node.meta["swpfx"]["lowering"] == "dense"


def test_auto_follows_the_runtime_model(generator):
    conv = conv_with_options((3, 3), 1, 1, 1, 1, False, torch.float32, generator, c_in=64, c_out=64)
    x = torch.randn(1, 64, 14, 14, generator=generator)
    centre_only = torch.zeros(64, 3, 3, dtype=torch.bool)
    centre_only[:, 1, 1] = True
    gm = stripe_conv_graph(conv, centre_only, x)
    never_pays = RuntimeModel(margin=0.0)
    lower_stripe_convs(gm, lowering="auto", choose_form=never_pays.choose_form)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0"]
    expected = gm(x)
    lower_stripe_convs(gm, lowering="auto", choose_form=RuntimeModel().choose_form)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0_boxes.box1x1_at11"]  # a centre-only conv is a 1×1 conv
    assert gm.get_submodule(targets[0]).kernel_size == (1, 1)
    assert relative_error(gm(x), expected) <= 1e-4


def test_lowered_graph_is_independent_of_batch_and_spatial_size(generator):
    conv = conv_with_options((3, 3), 2, 1, 1, 1, True, torch.float32, generator)
    x = torch.randn(1, 8, 12, 12, generator=generator)
    gm = stripe_conv_graph(conv, random_stripe_mask(12, 3, 3, dead=0.0, generator=generator), x)
    dense = copy.deepcopy(gm)
    for form in FORMS:
        lowered = copy.deepcopy(gm)
        lower_conv(lowered, next(n for n in lowered.graph.nodes if n.op == "call_module"), form)
        lowered.recompile()
        bigger = torch.randn(3, 8, 17, 21, generator=generator)
        assert relative_error(lowered(bigger), dense(bigger)) <= 1e-4, form


@pytest.mark.parametrize("form", FORMS)
def test_onnx_round_trip(form, generator):
    ort = pytest.importorskip("onnxruntime")
    conv = conv_with_options((3, 3), 1, "same", 2, 1, True, torch.float32, generator, c_in=8, c_out=16)
    x = torch.randn(2, 8, 13, 13, generator=generator)
    gm = stripe_conv_graph(conv, structured_stripe_mask(16, 3, 3, dead=0.0, generator=generator), x)
    lower_conv(gm, next(n for n in gm.graph.nodes if n.op == "call_module"), form, min_group=1)
    gm.recompile()
    buffer = io.BytesIO()
    torch.onnx.export(gm, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (x, torch.randn(3, 8, 13, 13, generator=generator)):
        out = torch.from_numpy(session.run(None, {"x": batch.numpy()})[0])
        assert relative_error(out, gm(batch)) <= 1e-4


def test_strided_onnx_round_trip_with_the_dynamo_exporter(generator):
    ort = pytest.importorskip("onnxruntime")
    conv = conv_with_options((3, 3), 2, 1, 1, 1, False, torch.float32, generator, c_in=8, c_out=16)
    x = torch.randn(1, 8, 16, 16, generator=generator)
    gm = stripe_conv_graph(conv, random_stripe_mask(16, 3, 3, dead=0.0, generator=generator), x)
    lower_conv(gm, next(n for n in gm.graph.nodes if n.op == "call_module"), "shift")
    gm.recompile()
    program = torch.onnx.export(gm, (x,), None, dynamo=True, opset_version=18)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert relative_error(out, gm(x)) <= 1e-4


def test_bad_input_is_reported_with_the_pass_name(generator):
    conv = conv_with_options((3, 3), 1, 1, 1, 1, False, torch.float32, generator)
    gm = fx.symbolic_trace(nn.Sequential(conv))
    mask = random_stripe_mask(12, 3, 3, dead=0.0, generator=generator)
    mark_stripe_conv(gm, "0", mask)  # no shapes
    with pytest.raises(PassError, match="lower_stripe_convs.*ShapeProp"):
        lower_stripe_convs(gm, lowering="always")
    dead = mask.clone()
    dead[0] = False
    mark_stripe_conv(gm, "0", dead, torch.randn(1, 8, 9, 9))
    with pytest.raises(PassError, match="no kept stripe"):
        lower_stripe_convs(gm, lowering="always")
    with pytest.raises(PassError, match="lowering must be one of"):
        lower_stripe_convs(gm, lowering="sometimes")


def test_box_groups_merge_small_groups_into_covering_boxes():
    mask = torch.zeros(20, 3, 3, dtype=torch.bool)
    mask[:, 1, 1] = True
    mask[10:16, 1, :] = True  # 6 centre-row filters: too few for min_group=8
    mask[16:] = True
    groups = dict(box_groups(mask, min_group=8))
    assert groups[(1, 1, 1, 1)] == list(range(10))
    assert groups[(0, 2, 0, 2)] == list(range(10, 20))
    assert sorted(sum(box_groups(mask, min_group=1), ())[1::2][0]) == list(range(10))


@pytest.mark.parametrize("align", [4, 8])
def test_aligned_box_groups_keep_block_multiples_and_only_move_filters_up(generator, align):
    for kind in ("random", "structured"):
        mask = make_mask(kind, 40, 3, 3, generator)
        groups = box_groups(mask, min_group=1, align=align)
        full = (0, 2, 0, 2)
        assert sorted(o for _, fs in groups for o in fs) == list(range(40))
        assert all(len(fs) % align == 0 for box, fs in groups if box != full), groups
        own = stripe_boxes(mask).tolist()
        for box, filters in groups:  # every filter computed in a box that covers its kept stripes
            assert all(box_covers(box, tuple(own[o])) for o in filters)


def test_a_conv_whose_consumers_take_any_order_is_priced_and_built_without_a_gather(generator):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1, generator=generator)
        model[1].running_var.uniform_(0.5, 2, generator=generator)
    gm = fx.symbolic_trace(model.eval())
    mask = torch.zeros(16, 3, 3, dtype=torch.bool)
    mask[::2, 1, 1] = True
    mask[1::2] = True  # centre and full filters interleaved: the parts' concat is out of filter order
    x = torch.randn(2, 8, 10, 10, generator=generator)
    mark_stripe_conv(gm, "0", mask, x)
    expected = gm(x)
    node = next(n for n in gm.graph.nodes if n.target == "0")
    assert takes_any_order(gm, node)
    lower_conv(gm, node, "boxes", min_group=1)
    gm.graph.lint()
    gm.recompile()
    assert relative_error(gm(x), expected) <= REL_TOL[torch.float32]
    assert not any(n.target is torch.index_select for n in gm.graph.nodes)  # the last conv took the permutation
    lowered = [n.meta["swpfx"] for n in gm.graph.nodes if n.meta.get("swpfx", {}).get("role") == "lowered_conv"]
    work = lowered[0]["work"]
    assert work["output"][0] == (8, 8)  # priced as built: no gather, and parts of a block multiple stay blocked
    assert "reorder_elems" not in RuntimeModel(block=8).priced(work)
    geometry = ConvGeometry.of(model[0], x.shape)
    assert form_work(geometry, mask, "boxes", min_group=1)["output"][0] is None  # a gather when the order is fixed


def test_aligned_boxes_stay_blocked_where_unaligned_ones_pay_two_reorders():
    geometry = ConvGeometry.of(nn.Conv2d(64, 40, 3, padding=1), (1, 64, 14, 14))
    mask = torch.zeros(40, 3, 3, dtype=torch.bool)
    mask[:, 1, 1] = True
    mask[30:] = True  # 30 centre filters, 10 full: parts of 30 and 10 are not multiples of 8
    model = RuntimeModel(block=8)
    loose = model.priced(form_work(geometry, mask, "boxes", min_group=1))
    aligned = model.priced(form_work(geometry, mask, "boxes", min_group=1, align=8))
    assert loose["reorder_elems"] == 2 * 40 * 14 * 14 and "reorder_elems" not in aligned
    assert aligned["conv_macs"] > loose["conv_macs"]  # the 6 centre filters moved to the full box cost MACs
    keys = model.predict_all(geometry, mask, ("boxes",))
    assert ("boxes", (("align", 8), ("min_group", 8))) in keys


def test_runtime_model_fit_recovers_coefficients_and_round_trips(tmp_path):
    truth = {"conv_macs": 1e-11, "onehot_macs": 5e-11, "onehot_groups": 2e-7, "copy_elems": 3e-10, "ops": 1e-5}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(40):
        work = {k: float(torch.randint(1, 10, (1,), generator=gen)) * s
                for k, s in zip(truth, (1e8, 1e6, 100, 1e6, 5))}
        rows.append((work, sum(truth[k] * v for k, v in work.items())))
    fitted = fit_coefficients(rows)
    for kind, value in truth.items():
        assert fitted[kind] == pytest.approx(value, rel=1e-6)
    model = RuntimeModel(coefficients=fitted, margin=0.8)
    model.save(tmp_path / "rm.json")
    loaded = default_runtime_model(tmp_path / "rm.json")
    assert loaded.coefficients == pytest.approx(fitted) and loaded.margin == 0.8
    assert default_runtime_model(tmp_path / "missing.json").source == "shipped default"


def test_runtime_model_fit_is_the_nonnegative_least_squares_optimum():
    """Noisy rows where dropping the most negative coefficient for good (the old loop) misses the optimum."""
    import itertools

    import numpy as np

    from swpfx.runtime_model import WORK_KINDS

    rng = np.random.default_rng(13)
    scales = np.array([1e8, 1e6, 100, 1e6, 5, 1e8, 1e6, 1e6, 5, 1e6, 1])
    assert len(scales) == len(WORK_KINDS)
    rows = [({k: float(v) for k, v in zip(WORK_KINDS, rng.integers(1, 10, len(scales)) * scales)},
             float(rng.uniform(1e-3, 5e-3))) for _ in WORK_KINDS]
    a = np.array([[work[k] / t for k in WORK_KINDS] for work, t in rows])

    def residual(coef):
        return float(((a @ coef - 1) ** 2).sum())

    best = float("inf")  # brute force: the best non-negative least-squares fit on every subset of kinds
    for n in range(1, len(WORK_KINDS) + 1):
        for subset in itertools.combinations(range(len(WORK_KINDS)), n):
            sol, *_ = np.linalg.lstsq(a[:, subset], np.ones(len(rows)), rcond=None)
            if (sol >= 0).all():
                coef = np.zeros(len(WORK_KINDS))
                coef[list(subset)] = sol
                best = min(best, residual(coef))
    fitted = fit_coefficients(rows)
    coef = np.array([fitted[k] for k in WORK_KINDS])
    assert (coef >= 0).all()
    assert residual(coef) <= best * (1 + 1e-9)


def test_default_chooser_needs_no_runtime_model(generator):
    from swpfx.passes.lower_stripe_convs import choose_by_macs

    geometry = ConvGeometry.of(nn.Conv2d(8, 16, 3, padding=1), (1, 8, 10, 10))
    centre = torch.zeros(16, 3, 3, dtype=torch.bool)
    centre[:, 1, 1] = True
    full = torch.ones(16, 3, 3, dtype=torch.bool)
    assert choose_by_macs(geometry, centre, FORMS, 1, True) == ("boxes", {"min_group": 8})
    assert choose_by_macs(geometry, full, FORMS, 1, True) == ("dense", {})
    assert choose_by_macs(geometry, full, FORMS, 1, False) == ("boxes", {"min_group": 8})
    conv = conv_with_options((3, 3), 1, 1, 1, 1, False, torch.float32, generator, c_in=8, c_out=16)
    x = torch.randn(1, 8, 10, 10, generator=generator)
    gm = stripe_conv_graph(conv, centre, x)
    expected = gm(x)
    lower_stripe_convs(gm, lowering="auto")  # the pass's own MAC rule
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0_boxes.box1x1_at11"]
    assert relative_error(gm(x), expected) <= 1e-4


def test_candidate_work_counts_fewer_macs_for_smaller_boxes():
    geometry = ConvGeometry.of(nn.Conv2d(64, 64, 3, padding=1), (1, 64, 28, 28))
    mask = structured_stripe_mask(64, 3, 3, dead=0.0, generator=torch.Generator().manual_seed(0))
    work = candidate_work(geometry, mask, FORMS)
    boxes = [w for key, w in work.items() if key[0] == "boxes"]
    assert all(w["conv_macs"] <= work[("dense", ())]["conv_macs"] for w in boxes)
    assert work[("boxes", (("min_group", 8),))]["conv_macs"] < 0.6 * work[("dense", ())]["conv_macs"]
    assert work[("dense", ())]["conv_macs"] == 64 * 64 * 9 * 28 * 28


def _conv_bn_relu_conv(generator) -> tuple[fx.GraphModule, torch.Tensor]:
    model = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1))
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.randn(24, generator=generator))
        bn.running_var.copy_(torch.rand(24, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(24, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(24, generator=generator))
    gm = fx.symbolic_trace(model.eval())
    x = torch.randn(2, 8, 12, 12, generator=generator)
    mark_stripe_conv(gm, "0", structured_stripe_mask(24, 3, 3, dead=0.0, generator=generator), x)
    return gm, x


@pytest.mark.parametrize("form", ["boxes", "onehot"])
def test_batchnorm_relu_move_into_the_parts_and_the_consumer_takes_the_permutation(form, generator):
    gm, x = _conv_bn_relu_conv(generator)
    expected = gm(x)
    lower_conv(gm, next(n for n in gm.graph.nodes if n.target == "0"), form, min_group=1)
    gm.graph.lint()
    gm.recompile()
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert not {"0", "1", "2"} & modules  # conv, BN and ReLU replaced
    assert any(isinstance(gm.get_submodule(t), nn.BatchNorm2d) for t in modules)
    assert not any(n.target is torch.index_select for n in gm.graph.nodes)  # "3" reads the channels in part order
    assert gm.get_submodule("3").weight.shape == (16, 24, 3, 3)
    assert relative_error(gm(x), expected) <= 1e-5


def test_no_follower_fusion_keeps_the_gather(generator):
    gm, x = _conv_bn_relu_conv(generator)
    expected = gm(x)
    lower_conv(gm, next(n for n in gm.graph.nodes if n.target == "0"), "boxes", min_group=1, fuse_followers=False)
    gm.recompile()
    assert {"1", "2"} <= {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert any(n.target is torch.index_select for n in gm.graph.nodes)
    assert relative_error(gm(x), expected) <= 1e-5
