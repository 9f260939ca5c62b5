"""Tests for the cost model: passes/count_costs.py and swpfx/cost.py."""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

import swpfx
from helpers import randomize_batchnorm_
from swpfx.convert import convert
from swpfx import synthetic
from swpfx.synthetic import synthetic_skeletons_
from swpfx.passes.count_costs import count_costs
from swpfx.cost import CostReport, compare, conv_decisions, cost, human, ratio
from swpfx.tracing import trace

FLOAT = 4  # bytes per float32 element




def flop_counter_total(model: nn.Module, inputs: tuple) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


class ConvZoo(nn.Module):
    """Convs with every option, a transposed conv, Linear and matmul/bmm."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 12, (3, 2), groups=4, padding="same", bias=False)
        self.depthwise = nn.Conv2d(12, 12, 5, groups=12, padding=2, padding_mode="reflect")
        self.dilated = nn.Conv2d(12, 10, (2, 4), dilation=(2, 1), padding=(1, 2), padding_mode="circular")
        self.valid = nn.Conv2d(10, 10, 4, padding="valid", stride=(1, 2))
        self.up = nn.ConvTranspose2d(10, 4, 3, stride=2, groups=2)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.fc = nn.Linear(6, 7)
        self.proj = nn.Parameter(torch.randn(5, 7))

    def forward(self, x):
        x = self.valid(self.dilated(self.depthwise(self.grouped(self.strided(x)))))
        x = self.up(x)
        seq = x.flatten(2)  # (N, 4, L)
        seq = self.conv1d(seq)  # (N, 6, L')
        tokens = self.fc(seq.transpose(1, 2))  # (N, L', 7)
        gram = torch.bmm(tokens, tokens.transpose(1, 2))
        mixed = torch.matmul(gram, tokens)  # (N, L', 7)
        return F.linear(mixed, self.proj) + torch.addmm(self.fc.bias[:5], mixed[0], self.proj.t()).sum()


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
        (lambda: torchvision.models.mobilenet_v2(num_classes=10), (1, 3, 64, 64)),
        (ConvZoo, (2, 6, 21, 19)),
    ],
    ids=["resnet18", "mobilenet_v2", "conv_zoo"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_flops_match_flop_counter_mode_exactly(make, shape):
    torch.manual_seed(0)
    model = randomize_batchnorm_(make(), torch.Generator().manual_seed(0)).eval()
    inputs = (torch.randn(shape),)
    report = cost(model, inputs)
    assert report.flops == flop_counter_total(model, inputs)
    assert report.flops == 2 * report.macs
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.param_bytes == FLOAT * report.params
    assert report.unknown_ops == []


def test_conv_and_linear_macs_by_hand():
    conv = nn.Conv2d(8, 12, (3, 2), stride=(2, 1), groups=4, dilation=2, padding=3)
    fc = nn.Linear(12, 5)
    x = torch.randn(3, 8, 15, 11)
    out = conv(x)
    report = cost(nn.Sequential(conv), (x,))
    (row,) = report.per_layer
    assert row.macs == out.numel() * (8 // 4) * 3 * 2
    assert row.other_flops == out.numel()  # bias
    assert row.shape == tuple(out.shape)
    assert row.bytes_read == FLOAT * (x.numel() + conv.weight.numel() + conv.bias.numel())
    assert row.bytes_written == FLOAT * out.numel()
    lin = cost(fc, (torch.randn(4, 9, 12),))
    assert lin.macs == 4 * 9 * 12 * 5


def test_prepared_model_counts_skeleton_ops_as_weight_side():
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 64, 64)
    dense = cost(model, (x,))
    prepared = swpfx.prepare(model, (x,))
    report = cost(prepared, (x,))
    assert report.macs == dense.macs
    assert report.flops == flop_counter_total(prepared.eval(), (x,))
    assert report.other_flops == dense.other_flops
    assert report.params == sum(p.numel() for p in prepared.parameters())
    skeleton_numel = sum(s.numel() for s in swpfx.skeletons(prepared).values())
    assert report.params - dense.params == skeleton_numel
    weight_rows = [r for r in report.rows if r.weight_side and r.kind != "get_attr"]
    assert {r.op for r in weight_rows} == {"Tensor.unsqueeze", "mul"}
    conv_weight_numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert report.weight_op_flops == conv_weight_numel  # one mul per weight element; unsqueeze is a view
    # parameters are attributed to the conv that consumes them, not to the get_attr nodes
    conv1 = next(r for r in report.rows if r.name == "conv1")
    assert conv1.params == 64 * 3 * 7 * 7 + 64 * 7 * 7
    assert report.peak_activation_bytes == dense.peak_activation_bytes


def lowered_stripe_conv() -> tuple[fx.GraphModule, dict]:
    """A hand-written lowering of a 3×3 conv (C=4, O=6) with the ops convert emits:
    1×1 conv to the kept stripes, pad, per-tap slices, cat, index_select, a grouped conv,
    reshape + sum, and a bias-map buffer add."""
    root = nn.Module()
    root.pointwise = nn.Conv2d(4, 9, 1, bias=False)
    root.accumulate = nn.Conv2d(9, 9, 3, groups=9, bias=False, padding=0)
    root.register_buffer("order", torch.tensor([8, 0, 3, 1, 7, 2, 4, 6, 5]))
    root.register_buffer("bias_map", torch.randn(1, 3, 8, 8))
    g = fx.Graph()
    x = g.placeholder("x")
    p = g.call_module("pointwise", (x,))
    padded = g.call_function(F.pad, (p, (1, 1, 1, 1)))
    taps = [g.call_function(operator.getitem, (padded, (slice(None), slice(None), slice(i, i + 8), slice(0, 10))))
            for i in range(3)]
    cat = g.call_function(torch.cat, (taps, 1))  # (N, 27, 8, 10)
    order = g.get_attr("order")
    picked = g.call_function(torch.index_select, (cat, 1, order))  # (N, 9, 8, 10)
    acc = g.call_module("accumulate", (picked,))  # (N, 9, 6, 8)
    grouped = g.call_method("reshape", (acc, -1, 3, 3, 6, 8))
    summed = g.call_method("sum", (grouped, 2))  # (N, 3, 6, 8)
    bias = g.get_attr("bias_map")
    sliced_bias = g.call_function(operator.getitem, (bias, (slice(None), slice(None), slice(0, 6), slice(0, 8))))
    out = g.call_function(operator.add, (summed, sliced_bias))
    g.output(out)
    gm = fx.GraphModule(root, g)
    gm.graph.lint()
    names = {"pad": padded.name, "slice": taps[0].name, "cat": cat.name, "index_select": picked.name,
             "reshape": grouped.name, "sum": summed.name, "add": out.name, "acc": acc.name, "pw": p.name}
    return gm, names


def test_lowering_ops_are_counted_in_memory_columns():
    gm, names = lowered_stripe_conv()
    n = 2
    x = torch.randn(n, 4, 8, 8)
    report = cost(gm, (x,))
    rows = {r.name: r for r in report.rows}
    pw, pad, tap, cat = rows[names["pw"]], rows[names["pad"]], rows[names["slice"]], rows[names["cat"]]
    assert pw.macs == n * 9 * 8 * 8 * 4
    assert rows[names["acc"]].macs == n * 9 * 6 * 8 * 9
    assert report.macs == pw.macs + rows[names["acc"]].macs
    assert (pad.flops, pad.other_flops) == (0, 0)
    assert pad.bytes_read == FLOAT * n * 9 * 8 * 8 and pad.bytes_written == FLOAT * n * 9 * 10 * 10
    assert (tap.bytes_read, tap.bytes_written) == (0, 0)  # a basic slice is a view: no copy
    assert tap.activation_bytes == FLOAT * n * 9 * 8 * 10
    assert cat.bytes_read == 3 * tap.activation_bytes and cat.bytes_written == FLOAT * n * 27 * 8 * 10
    sel = rows[names["index_select"]]
    assert sel.bytes_written == FLOAT * n * 9 * 8 * 10
    assert sel.bytes_read == sel.bytes_written + 9 * 8  # gathered elements + int64 indices
    reshape = rows[names["reshape"]]
    assert (reshape.bytes_read, reshape.bytes_written, reshape.category) == (0, 0, "view")
    assert rows[names["sum"]].other_flops == n * 9 * 6 * 8
    assert rows[names["add"]].other_flops == n * 3 * 6 * 8
    assert report.buffers == 9 + 3 * 8 * 8  # index + bias map, owned by their consumers
    assert report.params == 4 * 9 + 9 * 9
    assert report.unknown_ops == []
    assert report.bytes_read == sum(r.bytes_read for r in report.per_layer)


def test_peak_activation_liveness_by_hand():
    class Chain(nn.Module):
        def forward(self, x):  # x: 64 floats = 256 bytes
            a = x * 2  # 256
            b = torch.cat([x, a], 1)  # 512; x and a die here
            v = b.view(-1)  # alias of b
            c = v + 1  # 512; b dies here (last alias user)
            d = c.relu_()  # in place: no new storage
            return d.sum() + x.sum()  # keeps x alive until here

    x = torch.randn(1, 1, 8, 8)
    report = cost(Chain(), (x,))
    # at `c = v + 1`: x (256, used at the end) + b (512) + c (512)
    assert report.peak_activation_bytes == 256 + 512 + 512
    assert report.peak_node == "add"
    rows = {r.name: r for r in report.rows}
    assert rows["cat"].live_bytes == 256 + 256 + 512
    assert rows["relu_"].live_bytes == 256 + 512  # b freed after the add, relu_ reuses c


def test_shared_parameters_counted_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 3)
            self.tail = nn.Linear(3, 3)
            self.tail.weight = self.head.weight  # tied

        def forward(self, x):
            x = self.conv(self.conv(x))
            return self.tail(self.head(x.mean((2, 3))))

    model = Shared()
    report = cost(model, (torch.randn(2, 3, 8, 8),))
    assert report.params == sum(p.numel() for p in model.parameters())
    conv_rows = [r for r in report.per_layer if r.op == "Conv2d"]
    assert [r.params for r in conv_rows] == [3 * 3 * 9 + 3, 0]
    assert [r.macs for r in conv_rows] == [2 * 3 * 64 * 27] * 2
    tail = next(r for r in report.per_layer if r.name == "tail")
    assert tail.params == 3  # only its own bias


class Cumulative(nn.Module):
    def forward(self, x):
        return x * 3


def test_unknown_ops_are_listed_with_memory_and_zero_flops():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.leaf = Cumulative()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(torch.cumsum(self.leaf(x), dim=1))

    x = torch.randn(2, 2, 4, 4)
    report = cost(Odd(), (x,), leaf_modules=[Cumulative])
    assert report.unknown_ops == ["leaf (Cumulative)", "cumsum (cumsum)"]
    rows = {r.name: r for r in report.per_layer}
    for name in ("leaf", "cumsum"):
        assert not rows[name].known
        assert rows[name].macs == rows[name].other_flops == 0
        assert rows[name].bytes_read == rows[name].bytes_written == FLOAT * x.numel()
    assert report.macs == 2 * 2 * 4 * 4 * 2
    assert "no cost formula" in report.table() and "cumsum" in report.table()


class OpaqueBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x)) * x


def test_unknown_leaf_still_counts_conv_work_inside_it():
    class WithLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = OpaqueBlock()

        def forward(self, x):
            return torch.einsum("nchw,dc->ndhw", self.block(x), torch.ones(3, 2))

    model = WithLeaf()
    x = torch.randn(2, 2, 5, 5)
    report = cost(model, (x,), leaf_modules=[OpaqueBlock])
    assert report.unknown_ops == ["block (OpaqueBlock)"]  # einsum has a formula
    rows = {r.name: r for r in report.per_layer}
    assert rows["block"].macs == 2 * 2 * 25 * 2 * 9 and rows["block"].other_flops == 0
    assert rows["block"].params == 2 * 2 * 9 + 2
    assert rows["einsum"].known and rows["einsum"].macs == 2 * 3 * 25 * 2
    assert report.flops == flop_counter_total(model, (x,))


def test_caller_model_untouched():
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(0))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost(model, (torch.randn(2, 3, 32, 32),))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prepared = swpfx.prepare(model, (torch.randn(2, 3, 32, 32),))
    cost(prepared, (torch.randn(2, 3, 32, 32),))
    assert prepared.training
    assert all("cost" not in n.meta.get("swpfx", {}) for n in prepared.graph.nodes)


def test_meta_written_by_pass():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).eval()
    result = count_costs(gm, (torch.randn(1, 3, 6, 6),))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    assert conv.meta["swpfx"]["cost"] is result.rows[1]
    assert conv.meta["swpfx"]["cost"].macs == 4 * 4 * 4 * 27


def test_batch_scaling():
    model = torchvision.models.resnet18(num_classes=10).eval()
    one = cost(model, (torch.randn(1, 3, 32, 32),))
    four = cost(model, (torch.randn(4, 3, 32, 32),))
    assert four.macs == 4 * one.macs and four.other_flops == 4 * one.other_flops
    assert four.params == one.params
    assert four.peak_activation_bytes == 4 * one.peak_activation_bytes


def test_table_compare_and_json():
    x = torch.randn(1, 8, 16, 16)
    wide = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    narrow = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    a, b = cost(wide, (x,)), cost(narrow, (x,))
    assert isinstance(a, CostReport)
    text = str(a)
    assert text == a.table()
    assert "TOTAL" in text and "Conv2d" in text and human(a.flops) in text
    assert len(a.table(top=1).splitlines()) < len(text.splitlines())
    side = compare(a, b, names=("dense", "pruned"))
    assert "dense/pruned" in side
    macs_line = next(line for line in side.splitlines() if line.startswith("MACs"))
    assert "2.00×" in macs_line and "50.0 %" in macs_line
    layer_line = next(line for line in side.splitlines() if line.startswith("0 "))
    assert "2.00×" in layer_line
    data = json.loads(json.dumps(a.to_dict()))
    assert data["totals"]["macs"] == a.macs == 16 * 16 * 8 * 8 * 9
    assert len(data["rows"]) == len(a.rows)


def test_human_units():
    assert human(1_820_000_000, "FLOPs") == "1.82 GFLOPs"
    assert human(11_689_512) == "11.7 M"
    assert human(512) == "512"
    assert human(0) == "0"


@pytest.mark.parametrize("protocol, lowering", [("random", "always"), ("structured", "never")])
def test_converted_model_costs(protocol, lowering):
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 64, 64)
    prepared = swpfx.prepare(model, (x,))
    synthetic_skeletons_(prepared, protocol, threshold=0.05, seed=1)
    converted = convert(prepared, threshold=0.05, lowering=lowering)
    dense, report = cost(model, (x,)), cost(converted, (x,))
    assert report.unknown_ops == []
    assert report.flops == flop_counter_total(converted.eval(), (x,))
    assert report.params == sum(p.numel() for p in converted.parameters())
    assert report.macs < dense.macs and report.params < dense.params
    if lowering == "never":  # dense convs with fewer channels: no data-movement ops added by lowering
        roles = {n.name: n.meta.get("swpfx", {}).get("role") for n in converted.graph.nodes}
        memory = [r for r in report.per_layer if r.category == "memory"]
        # only remove_channels' ones maps for removed channels' constants (resolution-independent, issue 13 §1)
        assert all(roles[r.name] == "dead_channel_constant" and r.op.endswith("new_ones") for r in memory), memory
    text = compare(dense, report)
    assert "conv1" in text and "reduction" in text


LARGE_MODELS = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf",
                "efficientnet_b6", "efficientnet_b7"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in torchvision.models.list_models(module=torchvision.models)
                                  if n not in LARGE_MODELS])
def test_every_torchvision_classifier_matches_flop_counter_mode(name):
    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    size = 224 if name.startswith(("vit", "swin", "maxvit")) else 96 if name == "inception_v3" else 64
    model = torchvision.models.get_model(name, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    report = cost(model, (x,))
    assert report.flops == flop_counter_total(model, (x,))
    assert report.params == sum(p.numel() for p in model.parameters())
    allowed_unknown = ("shifted_window_attention", "_get_relative_position_bias", "_patch_merging_pad",
                       "_get_relative_position_bias_v2")  # swin's fx-wrapped functions
    assert all(op.split(" (")[1].rstrip(")") in allowed_unknown for op in report.unknown_ops), report.unknown_ops


def test_peak_memory_counts_only_the_visible_part_of_an_input_view():
    from swpfx.cost import cost

    model = torch.nn.Conv2d(3, 4, 1)
    big = torch.randn(100, 3, 16, 16)
    assert cost(model, (big[:1],)).peak_activation_bytes == cost(model, (big[:1].clone(),)).peak_activation_bytes


# ---------------------------------------------------------------- effective FLOPs (kept stripes only)


def test_effective_equals_executed_without_stripe_masks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    for report in (cost(model, (x,)), cost(swpfx.prepare(model, (x,)), (x,))):
        assert report.effective_flops == report.flops > 0
        assert report.effective_macs == report.macs
        assert all(r.effective_macs == r.macs for r in report.rows)


class StripeNet(nn.Sequential):
    """Three 3×3 convs (one strided, one dilated) and a Linear; no grouping, so channel removal is by hand."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 32, 3, padding=2, dilation=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )


def random_masks(prepared, generator) -> dict[str, torch.Tensor]:
    """About half the stripes kept, every kept filter with its centre, two dead filters per conv."""
    masks = {}
    for name, skel in swpfx.skeletons(prepared).items():
        mask = torch.rand(skel.shape, generator=generator) < 0.5
        mask[:, 1, 1] = True
        mask[:2] = False
        masks[name] = mask
    return masks


def hand_effective_macs(masks: dict, batch: int) -> int:
    """N·Ho·Wo · kept input channels · kept stripes per conv, plus the Linear on the kept channels."""
    kept = {name: int(m.flatten(1).any(1).sum()) for name, m in masks.items()}
    stripes = {name: int(m.sum()) for name, m in masks.items()}
    convs = [("0", 3, 16 * 16), ("3", kept["0"], 8 * 8), ("6", kept["3"], 8 * 8)]  # (name, in_channels, Ho·Wo)
    return sum(batch * pixels * c_in * stripes[name] for name, c_in, pixels in convs) + batch * kept["6"] * 10


@pytest.mark.parametrize("lowering", ["never", "always"])
def test_effective_flops_count_kept_stripes_by_hand(lowering):
    torch.manual_seed(0)
    model = randomize_batchnorm_(StripeNet(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 16, 16)
    prepared = swpfx.prepare(model, (x,))
    masks = random_masks(prepared, torch.Generator().manual_seed(3))
    synthetic.skeletons_from_masks_(prepared, masks, threshold=0.05, generator=torch.Generator().manual_seed(4))
    deployed = convert(prepared, threshold=0.05, lowering=lowering, channel_multiple=1)
    report = cost(deployed, (x,))
    assert report.effective_macs == hand_effective_macs(masks, batch=2)
    assert report.effective_flops == 2 * report.effective_macs
    assert report.effective_macs < report.macs  # zeroed stripes (never) or one-hot/box helpers (always) run
    decisions = conv_decisions(deployed)
    assert len(decisions) == 3
    if lowering == "always":
        assert "dense" not in decisions.values()
        lowered_rows = [r for r in report.per_layer if r.group in ("0", "3", "6")]
        assert sum(r.effective_macs > 0 for r in lowered_rows) == 3  # counted once per conv, helpers 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["effective_flops"] == report.effective_flops
    assert data["totals"]["flops"] == report.flops
    assert sum(r["effective_macs"] for r in data["rows"]) == report.effective_macs


@pytest.mark.parametrize("form, groups", [("boxes", 1), ("boxes", 4), ("onehot", 1), ("shift", 1)])
def test_every_lowering_form_keeps_the_masked_convs_effective_count(form, groups):
    from swpfx.passes.lower_stripe_convs import lower_conv, mark_stripe_conv

    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=groups)
    gm = fx.symbolic_trace(nn.Sequential(conv, nn.ReLU()))
    mask = torch.rand(12, 3, 3, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[:, 1, 1] = True
    x = torch.randn(3, 8, 13, 11)
    mark_stripe_conv(gm, "0", mask, example_input=x)
    out = gm(x)
    expected = out.numel() // 12 * (8 // groups) * int(mask.sum())
    dense = cost(gm, (x,))
    assert dense.effective_macs == expected < dense.macs == out.numel() * (8 // groups) * 9
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    conv_node_name = node.name
    lower_conv(gm, node, form, min_group=1)
    gm.graph.lint()
    gm.recompile()
    lowered = cost(gm, (x,))
    parts = [r for r in lowered.per_layer if r.group == "0"]
    assert len(parts) > 1 and sum(r.effective_macs > 0 for r in parts) == 1
    assert lowered.effective_macs == expected
    assert conv_decisions(gm) == {conv_node_name: form}  # keyed by the conv node's name


def test_table_and_compare_show_both_flop_counts():
    torch.manual_seed(0)
    model = StripeNet().eval()
    x = torch.randn(1, 3, 16, 16)
    prepared = swpfx.prepare(model, (x,))
    synthetic.skeletons_from_masks_(prepared, random_masks(prepared, torch.Generator().manual_seed(3)), 0.05,
                                    torch.Generator().manual_seed(4))
    dense, pruned = cost(model, (x,)), cost(convert(prepared, lowering="never", channel_multiple=1), (x,))
    table = pruned.table()
    assert "eff. FLOPs" in table.splitlines()[0]
    total = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert human(pruned.flops) in total and human(pruned.effective_flops) in total
    side = compare(dense, pruned).splitlines()
    eff_line = next(line for line in side if line.startswith("effective FLOPs"))
    assert ratio(dense.effective_flops, pruned.effective_flops) in eff_line
    flops_line = next(line for line in side if line.startswith("FLOPs"))
    assert ratio(dense.flops, pruned.flops) in flops_line
    assert ratio(dense.flops, pruned.flops) != ratio(dense.effective_flops, pruned.effective_flops)
    assert "eff. ratio" in "\n".join(side)
