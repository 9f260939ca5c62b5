"""Insert a learnable filter skeleton on every 2-D convolution.

Stripe-Wise Pruning ("Pruning Filter in Filter", NeurIPS 2020) sees a filter
``F ∈ R^{C×Kh×Kw}`` as ``Kh·Kw`` stripes and learns one scalar per stripe. This
pass turns every conv into its functional form and multiplies a skeleton
``I ∈ R^{O×Kh×Kw}`` (initialised to ones) into the effective weight::

    layer1_0_conv1_weight = getattr(self.layer1, "0").conv1.weight
    layer1_0_conv1_skeleton = getattr(self.layer1, "0").conv1.skeleton
    layer1_0_conv1_stripes = layer1_0_conv1_skeleton.unsqueeze(1)
    layer1_0_conv1_skeleton_weight = layer1_0_conv1_weight * layer1_0_conv1_stripes
    layer1_0_conv1 = torch.conv2d(relu, layer1_0_conv1_skeleton_weight, None, (1, 1), (1, 1), (1, 1), 1)

Conv sites handled: ``nn.Conv2d`` call_module nodes (any padding mode; a
non-zero mode becomes an explicit ``F.pad`` node, as ``nn.Conv2d`` itself does),
and functional ``conv2d`` calls whose weight is computed from parameters alone
(Conv2d subclasses with their own ``forward`` are traced through into these).
Anything else that convolves is left dense and reported in the result.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_utils import (
    Conv2dArgs,
    depends_only_on_attributes,
    evaluate_attribute_expression,
    get_attr_path,
    is_conv2d_call,
    pass_error,
    split_path,
    swpfx_meta,
)
from .pass_result import PassResult

PASS = "insert_skeletons"
OTHER_CONV_MODULES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
OTHER_CONV_FUNCTIONS = (F.conv1d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclass(frozen=True)
class SkippedConv:
    """A convolution that stays dense, and why."""

    node: str
    reason: str


@dataclass
class ConvSite:
    """A conv node that gets a skeleton: its name (skeleton key), owner module and weight parameter."""

    node: fx.Node
    name: str
    owner_type: type
    weight_param: str  # get_attr target of the root weight parameter


@dataclass
class InsertSkeletonsResult(PassResult):
    skeletons: dict[str, str] = field(default_factory=dict)  # conv name -> skeleton attribute path
    skipped: list[SkippedConv] = field(default_factory=list)


# ---------------------------------------------------------------- predicates


def skeleton_key(weight_target: str) -> tuple[str, str]:
    """(conv name, skeleton attribute path) for a weight parameter path.

    A parameter not called ``weight`` (or a root-level ``weight``) keeps its full path as the name.

    Example:
        >>> skeleton_key("layer1.0.conv1.weight")
        ('layer1.0.conv1', 'layer1.0.conv1.skeleton')
        >>> skeleton_key("kernel")
        ('kernel', 'kernel_skeleton')
    """
    owner, leaf = split_path(weight_target)
    if leaf == "weight" and owner:
        return owner, f"{owner}.skeleton"
    return weight_target, f"{weight_target}_skeleton"


def find_weight_parameter(gm: fx.GraphModule, conv: fx.Node) -> tuple[str | None, str]:
    """The get_attr target of the parameter a functional conv's weight is computed from.

    Returns ``(target, "")`` or ``(None, reason)``.
    """
    weight = Conv2dArgs.of(conv).weight
    if not isinstance(weight, fx.Node) or not depends_only_on_attributes(weight):
        return None, "its weight is computed from the inputs, not from parameters"
    shape = evaluate_attribute_expression(gm, weight).shape
    candidates = [weight] if weight.op == "get_attr" else []
    stack = list(weight.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            candidates.append(n)
        stack.extend(n.all_input_nodes)
    params = {
        n.target
        for n in candidates
        if isinstance(get_attr_path(gm, n.target), nn.Parameter) and get_attr_path(gm, n.target).shape == shape
    }
    if len(params) != 1:
        return None, f"its weight is not derived from exactly one parameter of shape {tuple(shape)}"
    return params.pop(), ""


def owner_type_of(gm: fx.GraphModule, conv: fx.Node, owner_path: str) -> type:
    """The class of the module owning a functional conv's weight, as it was at tracing time.

    The GraphModule replaces traced-through modules by plain ``nn.Module`` holders,
    so the type comes from the ``nn_module_stack`` the tracer recorded on the node.
    """
    for qualname, module_type in reversed(list(conv.meta.get("nn_module_stack", {}).values())):
        if qualname == owner_path and isinstance(module_type, type):
            return module_type
    return type(gm.get_submodule(owner_path)) if owner_path else type(gm)


def already_prepared(conv: fx.Node) -> bool:
    return swpfx_meta(conv).get("role") == "conv"


# ---------------------------------------------------------------- graph surgery


def functionalize_conv_module(gm: fx.GraphModule, node: fx.Node) -> None:
    """Rewrite ``self.conv(x)`` into ``torch.conv2d(x, conv.weight, conv.bias, ...)`` in place.

    A non-zero padding mode becomes an explicit ``F.pad`` node with the module's
    own padding amounts, followed by an unpadded conv (what ``nn.Conv2d`` does).
    """
    conv: nn.Conv2d = gm.get_submodule(node.target)
    (x,) = node.args if node.args else (node.kwargs["input"],)
    base = node.name
    with gm.graph.inserting_before(node):
        weight = gm.graph.create_node("get_attr", f"{node.target}.weight", name=f"{base}_weight")
        bias = None
        if conv.bias is not None:
            bias = gm.graph.create_node("get_attr", f"{node.target}.bias", name=f"{base}_bias")
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = gm.graph.create_node(
                "call_function",
                F.pad,
                (x, conv._reversed_padding_repeated_twice),
                {"mode": conv.padding_mode},
                name=f"{base}_pad",
            )
            padding = 0
    node.op, node.target = "call_function", torch.conv2d
    node.args = (x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
    node.kwargs = {}


def multiply_skeleton_into_weight(gm: fx.GraphModule, conv: fx.Node, skeleton_path: str, name: str) -> None:
    """Insert ``weight * skeleton.unsqueeze(1)`` between the conv and its weight."""
    args = Conv2dArgs.of(conv)
    base = name.replace(".", "_")  # named after the conv, also when the conv node itself is 'conv2d_3'
    with gm.graph.inserting_before(conv):
        skel = gm.graph.create_node("get_attr", skeleton_path, name=f"{base}_skeleton")
        stripes = gm.graph.create_node("call_method", "unsqueeze", (skel, 1), name=f"{base}_stripes")
        masked = gm.graph.create_node("call_function", operator.mul, (args.weight, stripes), name=f"{base}_skeleton_weight")
    args.weight = masked
    conv.args, conv.kwargs = args.as_args(), {}
    for n, role in ((skel, "skeleton"), (stripes, "skeleton"), (masked, "skeleton_weight"), (conv, "conv")):
        swpfx_meta(n).update(role=role, conv=name)


def register_skeleton(gm: fx.GraphModule, weight_target: str, skeleton_path: str) -> None:
    weight: nn.Parameter = get_attr_path(gm, weight_target)
    owner, leaf = split_path(skeleton_path)
    module = gm.get_submodule(owner) if owner else gm
    if hasattr(module, leaf):
        raise pass_error(PASS, None, f"'{skeleton_path}' already exists; is this model already prepared?")
    ones = torch.ones(weight.shape[0], *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    module.register_parameter(leaf, nn.Parameter(ones, requires_grad=weight.requires_grad))


# ---------------------------------------------------------------- the pass


def collect_conv_sites(gm: fx.GraphModule) -> tuple[list[ConvSite], list[SkippedConv]]:
    """Functionalize conv modules and return every conv that can carry a skeleton."""
    sites, skipped = [], []
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Conv2d) and type(module).forward is not nn.Conv2d.forward:
                # A leaf subclass with its own forward: rewriting it as torch.conv2d would drop that forward.
                reason = (f"{type(module).__name__} has its own forward and was kept as a leaf module, "
                          "so its weight expression is not in the graph")
                skipped.append(SkippedConv(node.name, reason))
                continue
            if isinstance(module, nn.Conv2d):
                functionalize_conv_module(gm, node)
                owner_type = type(module)
            elif isinstance(module, OTHER_CONV_MODULES):
                skipped.append(SkippedConv(node.name, f"{type(module).__name__} is not a 2-D convolution"))
                continue
            else:
                continue
        elif node.op == "call_function" and node.target in OTHER_CONV_FUNCTIONS:
            skipped.append(SkippedConv(node.name, f"{node.target.__name__} is not a 2-D convolution"))
            continue
        elif is_conv2d_call(node):
            owner_type = None
        else:
            continue
        if already_prepared(node):
            raise pass_error(PASS, node, "this conv already has a skeleton; prepare a model only once")
        target, reason = find_weight_parameter(gm, node)
        if target is None:
            skipped.append(SkippedConv(node.name, reason))
            continue
        name, _ = skeleton_key(target)
        if owner_type is None:
            owner_type = owner_type_of(gm, node, split_path(target)[0])
        sites.append(ConvSite(node, name, owner_type, target))
    return sites, skipped


def select_sites(sites: list[ConvSite], include, exclude) -> tuple[list[ConvSite], list[SkippedConv]]:
    """Apply the user's include/exclude lists (qualified names or module types)."""
    known = {s.name for s in sites}
    for spec in list(include or ()) + list(exclude or ()):
        if isinstance(spec, str) and spec not in known:
            import difflib

            close = difflib.get_close_matches(spec, sorted(known), n=3)
            hint = f" Did you mean {close}?" if close else f" Known convs: {sorted(known)[:10]}..."
            raise pass_error(PASS, None, f"config names conv '{spec}', which is not in the model.{hint}")

    def matches(site: ConvSite, specs) -> bool:
        return any(
            (isinstance(s, str) and s == site.name) or (isinstance(s, type) and issubclass(site.owner_type, s))
            for s in specs or ()
        )

    chosen, skipped = [], []
    for site in sites:
        if include is not None and not matches(site, include):
            skipped.append(SkippedConv(site.node.name, "not selected by config['include']"))
        elif matches(site, exclude):
            skipped.append(SkippedConv(site.node.name, "excluded by config['exclude']"))
        else:
            chosen.append(site)
    return chosen, skipped


def insert_skeletons(gm: fx.GraphModule, include=None, exclude=()) -> InsertSkeletonsResult:
    """Give every selected 2-D conv of ``gm`` (modified in place) a skeleton parameter.

    Example:
        >>> import torch, torchvision
        >>> from swpfx.tracing import trace
        >>> gm = trace(torchvision.models.resnet18())
        >>> result = insert_skeletons(gm)
        >>> len(result.skeletons)
        20
    """
    sites, skipped = collect_conv_sites(gm)
    sites, deselected = select_sites(sites, include, exclude)
    result = InsertSkeletonsResult(gm, modified=bool(sites), skipped=skipped + deselected)
    for site in sites:
        _, skeleton_path = skeleton_key(site.weight_param)
        if site.name not in result.skeletons:
            register_skeleton(gm, site.weight_param, skeleton_path)
            result.skeletons[site.name] = skeleton_path
        multiply_skeleton_into_weight(gm, site.node, skeleton_path, site.name)
    gm.graph.lint()
    gm.recompile()
    return result
