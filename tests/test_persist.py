"""swpfx.persist: exact round trips, and corrupted or tampered files refused before anything runs."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

import swpfx
from helpers import randomize_batchnorm_
from random_cnns import build, example_input, net_specs
from swpfx.convert import convert
from swpfx.persist import _digest, load, save
from swpfx.synthetic import synthetic_skeletons_

THRESHOLD = 0.05


def squash(code: str) -> str:
    return re.sub(r"\s+", "", code)


def same_value(a, b) -> bool:
    """Structural equality for meta values (tensors compared exactly, with dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assert_round_trip(gm: fx.GraphModule, x: torch.Tensor, path) -> fx.GraphModule:
    save(gm, path)
    loaded = load(path)
    assert isinstance(loaded, fx.GraphModule) and loaded is not gm
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x)), "outputs are not bit-identical"
    assert squash(loaded.code) == squash(gm.code)
    ours, theirs = gm.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert [(n, p.requires_grad) for n, p in gm.named_parameters()] == [
        (n, p.requires_grad) for n, p in loaded.named_parameters()]
    assert [m.training for m in gm.modules()] == [m.training for m in loaded.modules()]
    assert same_value(gm.meta.get("swpfx"), loaded.meta.get("swpfx"))
    for a, b in zip(gm.graph.nodes, loaded.graph.nodes):
        assert (a.op, a.name) == (b.op, b.name)
        assert same_value(a.meta.get("swpfx"), b.meta.get("swpfx")), a.name
    loaded.graph.lint()
    return loaded


def prepared_torchvision(name: str, size: int = 32):
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    prepared = swpfx.prepare(model, (x,)).eval()
    synthetic_skeletons_(prepared, "random", THRESHOLD, seed=0)
    return prepared, x


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name,lowering", [("resnet18", "always"), ("mobilenet_v2", "never")])
def test_prepared_round_trip_keeps_skeletons_and_converts_identically(name, lowering, tmp_path):
    prepared, x = prepared_torchvision(name)
    loaded = assert_round_trip(prepared, x, tmp_path / "prepared.safetensors")
    assert type(loaded).__name__ == type(prepared).__name__
    skels = swpfx.skeletons(loaded)
    assert list(skels) == list(swpfx.skeletons(prepared))
    assert all(isinstance(s, nn.Parameter) and s.requires_grad for s in skels.values())
    a = convert(prepared, THRESHOLD, lowering=lowering)
    b = convert(loaded, THRESHOLD, lowering=lowering)
    assert squash(a.code) == squash(b.code)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # and it still trains: the penalty reaches the loaded skeletons
    swpfx.skeleton_penalty(loaded, 1e-3).backward()
    assert all(s.grad is not None for s in skels.values())


@pytest.mark.parametrize("name,lowering", [("resnet18", "never"), ("resnet18", "always"), ("mobilenet_v2", "always")])
def test_converted_round_trip(name, lowering, tmp_path):
    prepared, x = prepared_torchvision(name)
    deployed = convert(prepared, THRESHOLD, lowering=lowering)
    loaded = assert_round_trip(deployed, x, tmp_path / "deployed.safetensors")
    if lowering == "always":
        forms = {n.meta["swpfx"].get("lowering") for n in loaded.graph.nodes if "swpfx" in n.meta}
        assert forms - {None, "dense"}, "the lowering choices should be recorded in node.meta"


def test_plain_traced_model_round_trip(tmp_path):
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    gm = fx.symbolic_trace(model)
    assert_round_trip(gm, torch.randn(1, 3, 64, 64), tmp_path / "traced.safetensors")


def test_tied_parameters_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    loaded = assert_round_trip(fx.symbolic_trace(Tied()), torch.randn(2, 4), tmp_path / "tied.safetensors")
    assert loaded.a.weight is loaded.b.weight


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(spec=net_specs(max_blocks=3), seed=st.integers(0, 1000))
def test_random_cnn_round_trips(tmp_path_factory, spec, seed):
    import warnings

    from test_fuzz import set_random_skeletons_

    model = build(spec, seed)
    x = example_input(spec, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = swpfx.prepare(model, (x,)).eval()
        set_random_skeletons_(prepared, seed)
        deployed = convert(prepared, THRESHOLD, lowering="always")
    d = tmp_path_factory.mktemp("rt")
    assert_round_trip(prepared, x, d / "p.safetensors")
    assert_round_trip(deployed, x, d / "d.safetensors")


def test_loading_unpickles_nothing(tmp_path, monkeypatch):
    prepared, x = prepared_torchvision("resnet18")
    path = save(prepared, tmp_path / "m.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used during load")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    loaded = load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), prepared(x))
    for source_file in Path(swpfx.persist.__file__).parent.glob("*.py"):  # every module of the package
        source = source_file.read_text()
        assert "import pickle" not in source and "torch.load(" not in source


# ---------------------------------------------------------------- what save refuses


def test_save_refuses_leaf_modules_outside_the_allowlist(tmp_path):
    class Opaque(nn.Module):
        def forward(self, x):
            return x * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.opaque = Opaque()

        def forward(self, x):
            return self.opaque(self.conv(x))

    prepared = swpfx.prepare(Net(), (torch.randn(1, 3, 8, 8),), config={"leaf_modules": ["opaque"]})
    with pytest.raises(ValueError, match="opaque.*not on the allowlist"):
        save(prepared, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_requires_a_graph_module(tmp_path):
    with pytest.raises(TypeError, match="GraphModule"):
        save(nn.Conv2d(1, 1, 1), tmp_path / "m.safetensors")


# ---------------------------------------------------------------- corrupted and tampered files


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    prepared = swpfx.prepare(model.eval(), (torch.randn(1, 3, 8, 8),))
    return save(prepared, tmp_path_factory.mktemp("saved") / "m.safetensors")


def read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(src, dst, edit_plan=None, edit_tensors=None):
    """Write a tampered copy with a *valid* checksum, as a deliberate attacker would."""
    metadata, tensors = read_raw(src)
    plan = json.loads(metadata["plan"])
    if edit_plan:
        edit_plan(plan)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(plan)
    metadata.update(plan=text, sha256=_digest(text, tensors))
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def node_entry(plan, pred):
    return next(n for n in plan["nodes"] if pred(n))


def test_truncated_file_is_refused(saved_file, tmp_path):
    data = saved_file.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="swpfx.load"):
            load(bad)


def test_bit_flips_are_detected(saved_file, tmp_path):
    data = bytearray(saved_file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    plan_at = data.index(b'nodes')  # inside the JSON header
    for i, where in enumerate((plan_at + 3, 8 + header_len + 5, len(data) - 3)):  # JSON, first and last tensor bytes
        flipped = bytearray(data)
        flipped[where] ^= 0x04
        bad = tmp_path / f"flip{i}.safetensors"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="swpfx.load"):
            load(bad)


def test_not_a_swpfx_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not a swpfx model file"):
        load(path)
    with pytest.raises(ValueError, match="no such file"):
        load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("target", ["os:system", "builtins:eval", "builtins:exec", "torch:load", "torch:save",
                                    "operator:attrgetter", "operator:methodcaller", "subprocess:run",
                                    "torch.nn.functional:_canonical_mask", "torch:os"])
def test_function_outside_the_allowlist_is_refused(saved_file, tmp_path, monkeypatch, target):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))

    def edit(plan):
        node = node_entry(plan, lambda n: n["op"] == "call_function")
        node["target"] = target
        node["args"] = {"tuple": ["echo pwned"]}

    bad = rewrite(saved_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError, match="not allowed|not on the allowlist|malformed"):
        load(bad)
    assert calls == []


@pytest.mark.parametrize("method", ["register_hook", "__reduce__", "apply_", "_backward_hooks"])
def test_method_outside_the_allowlist_is_refused(saved_file, tmp_path, method):
    def edit(plan):
        node_entry(plan, lambda n: n["op"] == "call_method")["target"] = method

    with pytest.raises(ValueError, match="not an allowlisted tensor method"):
        load(rewrite(saved_file, tmp_path / "bad.safetensors", edit))


def test_private_getattr_is_refused(saved_file, tmp_path):
    def edit(plan):
        node = node_entry(plan, lambda n: n["op"] == "call_method")
        node["op"], node["target"] = "call_function", "builtins:getattr"
        node["args"] = {"tuple": [node["args"]["tuple"][0], "__class__"]}

    with pytest.raises(ValueError, match="getattr is only allowed for the tensor properties"):
        load(rewrite(saved_file, tmp_path / "bad.safetensors", edit))


@pytest.mark.parametrize("name", ["x; import os", "import", "a b", "__import__('os')"])
def test_code_injection_through_names_is_refused(saved_file, tmp_path, name):
    def edit(plan):
        plan["nodes"][1]["name"] = name

    with pytest.raises(ValueError, match="malformed node name|duplicate or reserved"):
        load(rewrite(saved_file, tmp_path / "bad.safetensors", edit))


@pytest.mark.parametrize("target", ['0"); import os; os.system("echo pwned"); ("', "0.weight\\", "0..weight", ""])
def test_code_injection_through_targets_is_refused(saved_file, tmp_path, target):
    def edit(plan):
        node_entry(plan, lambda n: n["op"] == "get_attr")["target"] = target

    with pytest.raises(ValueError, match="malformed get_attr target"):
        load(rewrite(saved_file, tmp_path / "bad.safetensors", edit))


def test_module_type_outside_the_allowlist_is_refused(saved_file, tmp_path):
    def edit(plan):
        entry = next(m for m in plan["modules"] if m.get("type") == "ReLU")
        entry["type"] = "Sequential"

    with pytest.raises(ValueError, match="not on the allowlist"):
        load(rewrite(saved_file, tmp_path / "bad.safetensors", edit))


def test_weight_with_the_wrong_shape_is_refused(saved_file, tmp_path):
    key = "t/4.weight"  # the Linear

    def swap(tensors):
        tensors[key] = torch.zeros(2, 255)

    with pytest.raises(ValueError, match="4.weight.*shape"):
        load(rewrite(saved_file, tmp_path / "a.safetensors", edit_tensors=swap))

    def consistent_plan(plan):  # the plan agrees with the tensor: the module still does not
        next(t for t in plan["tensors"] if t["path"] == "4.weight")["shape"] = [2, 255]

    with pytest.raises(ValueError, match=r"Linear '4' needs \(2, 256\)"):
        load(rewrite(saved_file, tmp_path / "b.safetensors", consistent_plan, swap))


def test_missing_tensor_is_refused(saved_file, tmp_path):
    def drop(plan):
        plan["tensors"] = [t for t in plan["tensors"] if t["path"] != "1.running_var"]

    with pytest.raises(ValueError, match="no values for.*1.running_var"):
        load(rewrite(saved_file, tmp_path / "bad.safetensors", drop))


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_all_torchvision_models_round_trip(name, tmp_path):
    """Every torchvision classification model, prepared: bit-identical outputs and code after save/load."""
    from test_prepare_torchvision import MIN_TEST_SIZE, SMALLEST_INPUT

    if name in ("regnet_y_128gf", "vit_h_14"):  # > 600 M parameters: the round trip holds ~4 copies (> 10 GB)
        pytest.skip("too large for a shared CI machine's memory")

    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = max(SMALLEST_INPUT[name], MIN_TEST_SIZE)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    prepared = swpfx.prepare(model, (x,)).eval()
    del model
    loaded = assert_round_trip(prepared, x, tmp_path / "m.safetensors")
    assert list(swpfx.skeletons(loaded)) == list(swpfx.skeletons(prepared))
