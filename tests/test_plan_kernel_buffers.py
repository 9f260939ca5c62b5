"""Tests for passes/plan_kernel_buffers.py and swpfx/kernels/buffers.py: reused output memory of kernel calls.

The pass is checked on stand-in modules (its plan: no two outputs alive at once share a slot, outputs that leave
the kernel calls stay fresh); the planned fused graphs of ``convert(lowering="fused")`` are checked bit for bit
against the same graphs without the plan, on seeded inputs with random BatchNorm statistics and random masks,
across input shapes, threads and forward hooks. Tests that run the compiled kernel are skipped, with the
reason, only when it cannot be built here.
"""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import swpfx
from swpfx.kernels import stripe_conv
from swpfx.kernels.buffers import KernelBuffers, SlotBuffers
from swpfx.passes.graph_utils import PassError, swpfx_meta
from swpfx.passes.plan_kernel_buffers import ROLE, assign_slots, plan_kernel_buffers, unplan_kernel_buffers
from swpfx.synthetic import synthetic_skeletons_

from helpers import RUNTIME_MODEL, randomize_batchnorm_

needs_kernel = pytest.mark.skipif(not stripe_conv.is_available(),
                                  reason=f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason()}")


class Kernel(nn.Module):
    """A stand-in for a kernel call: adds its inputs times a constant, into the given slot when there is one."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = scale

    def forward(self, x, residual=None, *, buffers=None, slot=None):
        y = x * self.scale if residual is None else x * self.scale + residual
        if buffers is None:
            return y
        out = buffers.take(slot, tuple(y.shape))
        out.copy_(y)
        return out


class Leaves(fx.Tracer):
    def is_leaf_module(self, module, name):
        return isinstance(module, Kernel) or super().is_leaf_module(module, name)


def is_kernel(gm, node):
    return isinstance(gm.get_submodule(node.target), Kernel)


class ResidualChain(nn.Module):
    """Two residual blocks of kernel calls, then outputs read by ops that are not kernel calls."""

    def __init__(self):
        super().__init__()
        self.k = nn.ModuleList(Kernel(1.0 + i / 8) for i in range(7))

    def forward(self, x):
        a = self.k[0](x)
        b = self.k[1](self.k[2](a), a)  # a is read twice: by k2 and, later, by k1 as its residual
        d = self.k[4](self.k[3](b), b)
        e = self.k[5](d)
        return F.gelu(self.k[6](e)) + e  # e is last read by the add; k6's output by gelu, not in the pass's tables


def traced(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, Leaves().trace(module))


def lifetimes_overlap(order, a, b, last) -> bool:
    position = {n: i for i, n in enumerate(order)}
    (a0, a1), (b0, b1) = (position[a], last[a]), (position[b], last[b])
    return not (a1 < b0 or b1 < a0)


def last_readers(order) -> dict:
    position = {n: i for i, n in enumerate(order)}
    return {n: max(position[u] for u in n.users) for n in order if n.users}


def test_plan_shares_slots_only_between_outputs_never_alive_at_once():
    gm = traced(ResidualChain())
    x = torch.randn(2, 3, 5, 5)
    expected = gm(x)
    result = plan_kernel_buffers(gm, is_kernel, KernelBuffers)
    order = list(gm.graph.nodes)
    by_name = {n.name: n for n in order}
    # a, k2(a), b: all alive at k1; then k3(b), d and e reuse the slots of the values dead before them
    assert result.slots == {"k_0": 0, "k_2": 1, "k_1": 2, "k_3": 0, "k_4": 1, "k_5": 0} and result.fresh == ["k_6"]
    for a in result.slots:
        for b in result.slots:
            if a < b and result.slots[a] == result.slots[b]:
                assert not lifetimes_overlap(order, by_name[a], by_name[b], last_readers(order)), (a, b)
    assert result.planned == len(set(result.slots.values())) == gm.kernel_buffers.slots
    buffers = next(n for n in order if n.op == "call_module" and n.target == "kernel_buffers")
    assert swpfx_meta(buffers)["role"] == ROLE and buffers.args == () and buffers is order[1]
    for name, slot in result.slots.items():
        assert by_name[name].kwargs == {"buffers": buffers, "slot": slot} == {**by_name[name].kwargs}
        assert swpfx_meta(by_name[name])["buffer_slot"] == slot
    gm.graph.lint()
    assert torch.equal(gm(x), expected)
    assert torch.equal(gm(x * 3), traced(ResidualChain())(x * 3))  # the memory is reused correctly


def test_outputs_read_by_other_ops_or_returned_stay_fresh():
    class Returned(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Kernel(), Kernel()

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y  # y is returned as well as read by b

    gm = traced(Returned())
    result = plan_kernel_buffers(gm, is_kernel, KernelBuffers)
    assert result.slots == {} and not result.modified and result.fresh == ["a", "b"]
    assert not any(n.op == "call_module" and n.target == "kernel_buffers" for n in gm.graph.nodes)


def test_planning_twice_names_the_pass_and_the_node():
    gm = traced(ResidualChain())
    plan_kernel_buffers(gm, is_kernel, KernelBuffers)
    with pytest.raises(PassError, match=r"swpfx\.plan_kernel_buffers: .*planned twice.* at node"):
        plan_kernel_buffers(gm, is_kernel, KernelBuffers)


def test_assign_slots_keeps_lifetimes_apart_on_random_graphs():
    """Random DAGs of candidate and other nodes: slots shared only by outputs whose lifetimes are disjoint, and a
    node never gets the slot of one of its inputs."""
    rng = random.Random(0)
    for _ in range(200):
        graph = fx.Graph()
        values = [graph.placeholder("x")]
        planned = set()
        for i in range(rng.randint(2, 25)):
            inputs = rng.sample(values, k=min(len(values), rng.randint(1, 3)))
            node = graph.call_function(torch.add if len(inputs) > 1 else torch.neg, tuple(inputs[:2]))
            values.append(node)
            if rng.random() < 0.7:
                planned.add(node)
        graph.output(values[-1])
        planned = {n for n in planned if n.users}
        order = list(graph.nodes)
        last = last_readers(order)
        slots = assign_slots(order, {n: last[n] for n in planned})
        assert set(slots) == planned
        for a in planned:
            assert all(slots.get(i) != slots[a] for i in a.all_input_nodes if i in planned)
            for b in planned:
                if a is not b and slots[a] == slots[b]:
                    assert not lifetimes_overlap(order, a, b, last)


def test_views_extend_a_lifetime_and_unknown_readers_stop_the_plan():
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = Kernel(), Kernel(), Kernel(), Kernel()

        def forward(self, x):
            y = self.a(x)
            flat = y.flatten(1)  # a view of y, read at the end: d must not take y's slot though c read y last
            z = self.b(self.d(self.c(y)))
            return z.sum() + flat.sum() + torch.special.erf(z).sum()  # erf: not in the tables, so z stays fresh

    gm = traced(Viewed())
    x = torch.randn(2, 3, 4, 4)
    expected = gm(x)
    result = plan_kernel_buffers(gm, is_kernel, KernelBuffers)
    assert result.slots == {"a": 0, "c": 1, "d": 2} and result.fresh == ["b"]
    assert torch.equal(gm(x), expected)


def test_slot_buffers_reuse_memory_and_grow():
    buffers = SlotBuffers(2)
    a = buffers.take(0, (1, 2, 3))
    assert buffers.take(0, (1, 2, 3)) is a and a.is_contiguous() and a.dtype == torch.float32
    b = buffers.take(0, (6,))
    assert b.data_ptr() == a.data_ptr()  # the same memory, another shape
    c = buffers.take(0, (4, 5))  # larger: the slot grows
    assert c.shape == (4, 5) and buffers.take(1, (4, 5)).data_ptr() != c.data_ptr()
    with torch.inference_mode():
        assert not SlotBuffers(1).take(0, (3,)).is_inference()  # usable outside inference mode too


def test_kernel_buffers_are_per_thread_and_none_while_traced():
    module = KernelBuffers(3)
    mine = module()
    assert module() is mine and isinstance(mine, SlotBuffers)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(module()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine
    assert copy.deepcopy(module)() is not mine  # copies do not carry the memory
    module.release()
    assert module() is not mine
    with pytest.raises(ValueError, match="slots must be >= 1"):
        KernelBuffers(0)

    class Uses(nn.Module):
        def __init__(self):
            super().__init__()
            self.buffers_ = KernelBuffers(1)

        def forward(self, x):
            return x + 1 if self.buffers_() is None else x - 1

    assert torch.equal(torch.jit.trace(Uses(), torch.zeros(2), check_trace=False)(torch.zeros(2)), torch.ones(2))


# ---------------------------------------------------------------- the planned fused graphs of convert


def fused_resnet18(seed: int = 0, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), g)
    x = torch.randn(1, 3, size, size, generator=g)
    prepared = swpfx.prepare(model, (x,))
    synthetic_skeletons_(prepared, protocol="random", threshold=0.05, seed=seed)
    deployed = swpfx.convert(prepared, threshold=0.05, lowering="fused", runtime_model=RUNTIME_MODEL)
    return deployed, x


def without_plan(gm: fx.GraphModule) -> fx.GraphModule:
    plain = copy.deepcopy(gm)
    assert unplan_kernel_buffers(plain).modified and not unplan_kernel_buffers(plain).modified
    return plain


@needs_kernel
def test_convert_fused_plans_the_kernel_outputs_and_stays_bit_exact():
    deployed, x = fused_resnet18()
    slots = {n.name: swpfx_meta(n)["buffer_slot"] for n in deployed.graph.nodes if "buffer_slot" in swpfx_meta(n)}
    # every kernel call (20 convs, the max pool) writes a slot: their readers are kernel calls, the dead-channel
    # maps' shape/new_ones, residual adds and the average pool; 3 slots suffice
    assert len(slots) == 21 and deployed.kernel_buffers.slots == 3
    plain = without_plan(deployed)
    assert not hasattr(plain, "kernel_buffers")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        first = deployed(x)
        kept = first.clone()
        for shape in [(1, 3, 64, 64), (3, 3, 64, 64), (2, 3, 48, 40), (1, 3, 64, 64)]:  # slots grow and shrink
            xb = torch.randn(shape, generator=g)
            assert torch.equal(deployed(xb), plain(xb)), shape
        assert torch.equal(first, kept)  # an output returned earlier is never overwritten
    with torch.inference_mode():
        xb = torch.randn(2, 3, 64, 64, generator=g)
        assert torch.equal(deployed(xb), plain(xb))


@needs_kernel
def test_planned_graph_is_exact_from_concurrent_threads():
    deployed, _ = fused_resnet18(seed=2, size=48)
    plain = without_plan(deployed)
    inputs = [torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        expected = [plain(x) for x in inputs]
    results, errors = {}, []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    results[i] = deployed(inputs[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[i], expected[i]) for i in range(4))


@needs_kernel
def test_a_hooked_kernel_call_writes_a_fresh_output():
    deployed, x = fused_resnet18(seed=3, size=32)
    seen = []
    handle = deployed.get_submodule("layer1.0.conv1").register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        deployed(x)
        kept = seen[0].clone()
        deployed(torch.randn(x.shape))
    handle.remove()
    assert torch.equal(seen[0], kept) and seen[0].data_ptr() != seen[1].data_ptr()
