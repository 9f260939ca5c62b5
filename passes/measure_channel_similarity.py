"""Measure how similar the output channels of convolutions are on calibration data.

Central Filter pruning ("Network Compression via Central Filter", arXiv
2112.05493) compares the feature maps of a conv's output channels: channel ``i``
and ``j`` are similar when their maps are correlated. The map of a conv is its
*post-activation* output: the pass follows the conv's single-user chain of
channel-wise ops (BatchNorm, activations) to the last one, as the reference
hooks the ReLU after each conv.

Similarity is the Pearson correlation of the flattened ``H×W`` maps, computed
per image and averaged over images, with the reference's conventions for maps
where Pearson is undefined:

- both maps constant (this includes both all-zero) → ``+1``;
- exactly one map all-zero → ``−1``;
- one map constant but not zero, the other not constant → ``0`` (the
  reference gets NaN here, which poisons the pair's average; 0 is "no evidence").

The reference tests "all-zero" with ``sum == 0``; this pass tests every value
(the two agree on post-ReLU maps, which are non-negative).

Calibration is streamed: per conv only the running sum of the per-image
``N×N`` correlation matrices and an image count are kept, so memory does not
grow with the number of batches. Results are stored in
``node.meta["swpfx"]["channel_similarity"]`` of each conv node.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_utils import pass_error, swpfx_meta
from .modes import eval_mode
from .pass_result import PassResult

PASS = "measure_channel_similarity"

CHANNELWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.Identity,
)
CHANNELWISE_FUNCTIONS = (
    F.relu, torch.relu, torch.relu_, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
)
CHANNELWISE_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_")

# Float64 working set per chunk of images (elements), so large maps are processed a few images at a time.
CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------- pure math


def pearson_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Channel-by-channel Pearson correlation of each image's maps, with the degenerate-map conventions.

    ``maps`` has shape ``(B, N, H, W)`` (or ``(B, N, L)``); the result has shape
    ``(B, N, N)``, float64, symmetric, with ones on the diagonal.

    Example:
        >>> x = torch.rand(2, 3, 4, 4)
        >>> x[:, 2] = 2 * x[:, 0] + 1          # an affine copy correlates perfectly
        >>> c = pearson_per_image(x)
        >>> round(float(c[0, 0, 2]), 6), round(float(c[1, 2, 2]), 6)
        (1.0, 1.0)
    """
    x = maps.detach().reshape(maps.shape[0], maps.shape[1], -1).to(torch.float64)
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    constant = hi == lo  # (B, N)
    zero = constant & (hi == 0)
    xc = x - x.mean(dim=-1, keepdim=True)
    xc = xc.masked_fill(constant.unsqueeze(-1), 0.0)  # exact zeros: rounding residue must not look like signal
    cov = xc @ xc.transpose(1, 2)
    std = cov.diagonal(dim1=1, dim2=2).sqrt()
    denom = std.unsqueeze(2) * std.unsqueeze(1)
    corr = torch.where(denom > 0, cov / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(cov))
    corr = ((corr + corr.transpose(1, 2)) / 2).clamp(-1.0, 1.0)  # BLAS may leave the triangles an ulp apart

    both_constant = constant.unsqueeze(2) & constant.unsqueeze(1)
    one_zero = zero.unsqueeze(2) ^ zero.unsqueeze(1)
    corr = torch.where(one_zero, torch.full_like(corr, -1.0), corr)
    corr = torch.where(both_constant, torch.ones_like(corr), corr)  # precedence as in the reference
    eye = torch.eye(corr.shape[1], dtype=torch.bool, device=corr.device)
    return corr.masked_fill(eye, 1.0)


def pearson_sum(maps: torch.Tensor) -> torch.Tensor:
    """``pearson_per_image(maps).sum(0)`` without the ``(B, N, N)`` intermediate.

    With each image's maps centred and scaled to unit norm (``z_b``, zero rows
    for constant maps), ``Σ_b z_b z_bᵀ`` is one ``N × (B·H·W)`` matrix product;
    the degenerate-map conventions are sums of outer products of per-image
    indicator vectors: ``+Σ const_b const_bᵀ`` and ``−Σ (zero_b varying_bᵀ + varying_b zero_bᵀ)``.
    The diagonal is exactly ``B``.

    Example:
        >>> x = torch.rand(3, 4, 5, 5); x[1, 2] = 0.0
        >>> torch.allclose(pearson_sum(x), pearson_per_image(x).sum(0), atol=1e-12)
        True
    """
    b, n = maps.shape[0], maps.shape[1]
    x = maps.detach().reshape(b, n, -1).to(torch.float64)
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    constant = hi == lo  # (B, N)
    zero = constant & (hi == 0)
    z = x - x.mean(dim=-1, keepdim=True)
    norm = z.square().sum(dim=-1, keepdim=True).sqrt()
    z = torch.where(constant.unsqueeze(-1), 0.0, z / norm.clamp_min(torch.finfo(torch.float64).tiny))
    z = z.transpose(0, 1).reshape(n, -1)  # (N, B·L)
    total = z @ z.T
    c, zr, varying = constant.double(), zero.double(), (~constant).double()
    total += c.T @ c
    minus = zr.T @ varying
    total -= minus + minus.T
    total = (total + total.T) / 2  # BLAS may leave the triangles an ulp apart
    total.diagonal().fill_(float(b))
    return total


class ChannelCorrelationSum:
    """Running sum of per-image correlation matrices for one conv; O(N²) memory whatever the data size."""

    def __init__(self, channels: int, device: torch.device | None = None):
        self.total = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        self.images = 0

    def update(self, maps: torch.Tensor) -> None:
        if maps.dim() < 3 or maps.shape[1] != self.total.shape[0]:
            raise ValueError(f"expected maps of shape (B, {self.total.shape[0]}, ...), got {tuple(maps.shape)}")
        per_image = max(1, maps[0].numel())
        chunk = max(1, CHUNK_ELEMENTS // per_image)
        for start in range(0, maps.shape[0], chunk):
            self.total += pearson_sum(maps[start:start + chunk]).to(self.total.device)
        self.images += maps.shape[0]

    def similarity(self) -> torch.Tensor:
        """The mean correlation over all images seen so far (``N×N``, float64)."""
        if self.images == 0:
            raise ValueError("no images were measured")
        return (self.total / self.images).clamp(-1.0, 1.0)

    def nbytes(self) -> int:
        """Bytes of tensor state held (constant in the number of batches)."""
        return self.total.numel() * self.total.element_size()


# ---------------------------------------------------------------- graph queries


def is_channelwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for BatchNorm / activation nodes that act on each channel separately."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in CHANNELWISE_METHODS
    return False


def feature_map_node(gm: fx.GraphModule, conv: fx.Node) -> fx.Node:
    """The last node of ``conv``'s single-user chain of channel-wise ops (the conv itself if none).

    Example:
        >>> import torchvision
        >>> from swpfx.tracing import trace
        >>> gm = trace(torchvision.models.resnet18())
        >>> conv = next(n for n in gm.graph.nodes if n.name == "layer1_0_conv1")
        >>> feature_map_node(gm, conv).name
        'layer1_0_relu'
    """
    node = conv
    while len(node.users) == 1:
        (user,) = node.users
        if not is_channelwise(gm, user) or not user.args or user.args[0] is not node:
            break
        node = user
    return node


# ---------------------------------------------------------------- calibration data


def calibration_inputs(batches: Iterable, example: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the input tensor of each calibration batch (a tensor, or a tuple/list whose first item is one).

    Raises TypeError for anything else, ValueError when there is no batch or a
    batch's rank or channel count differs from ``example``.
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"swpfx.{PASS}: calibration_batches must be an iterable of batches, not one tensor; wrap it: [x]")
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"swpfx.{PASS}: calibration_batches must be iterable, got {type(batches).__name__}") from None
    count = 0
    for i, batch in enumerate(iterator):
        x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) > 0 else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"swpfx.{PASS}: calibration batch {i} must be a tensor or a tuple/list whose first item is the "
                f"input tensor, got {type(batch).__name__}"
            )
        if example is not None and (x.dim() != example.dim() or (x.dim() > 1 and x.shape[1] != example.shape[1])):
            raise ValueError(
                f"swpfx.{PASS}: calibration batch {i} has shape {tuple(x.shape)}, which does not match the "
                f"example input's {tuple(example.shape)} (rank and channel count must agree)"
            )
        if x.shape[0] == 0:
            continue
        count += 1
        yield x
    if count == 0:
        raise ValueError(f"swpfx.{PASS}: calibration_batches is empty; give at least one non-empty batch")


# ---------------------------------------------------------------- the analysis


class MeasureChannelSimilarity(fx.Interpreter):
    """``fx.Interpreter`` that feeds each watched feature-map node's value into a correlation sum."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, ChannelCorrelationSum]):
        super().__init__(gm, garbage_collect_values=True)
        self.watched = watched  # feature-map node name -> sums (several convs may share one map)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        sums = self.watched.get(n.name)
        if sums is not None:
            if not isinstance(result, torch.Tensor) or result.dim() < 3:
                raise pass_error(PASS, n, "expected a feature map tensor of shape (B, C, ...)")
            sums.update(result)
        return result


@dataclass
class MeasureChannelSimilarityResult(PassResult):
    similarity: dict[str, torch.Tensor] = field(default_factory=dict)  # conv node name -> N×N similarity


def measure_channel_similarity(
    gm: fx.GraphModule, convs: Iterable[str], calibration_batches: Iterable, example_inputs: tuple | None = None
) -> MeasureChannelSimilarityResult:
    """Mean per-image Pearson similarity of the output channels of each named conv node.

    ``convs`` are node names of ``call_module`` nodes on ``nn.Conv2d``. The model
    runs in eval mode under ``no_grad`` (its training flag is restored). The
    result's ``similarity`` is ``{conv node name: N×N float64 tensor}``; each matrix
    is also stored in the conv node's ``meta["swpfx"]["channel_similarity"]``; the
    graph is not changed (``modified`` is False).

    Example:
        >>> import torch, torchvision
        >>> from swpfx.tracing import trace
        >>> gm = trace(torchvision.models.resnet18())
        >>> s = measure_channel_similarity(gm, ["layer1_0_conv1"], [torch.randn(2, 3, 32, 32)]).similarity
        >>> s["layer1_0_conv1"].shape
        torch.Size([64, 64])
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise pass_error(PASS, None, f"calibration needs a model with exactly one input, this one has {len(placeholders)}")
    example = example_inputs[0] if example_inputs else None
    sums: dict[str, ChannelCorrelationSum] = {}
    watched: dict[str, ChannelCorrelationSum] = {}
    map_of: dict[str, str] = {}
    for name in convs:
        conv = nodes.get(name)
        if conv is None or conv.op != "call_module" or not isinstance(gm.get_submodule(conv.target), nn.Conv2d):
            raise pass_error(PASS, conv, f"'{name}' is not a Conv2d call_module node of this graph")
        fmap = feature_map_node(gm, conv)
        map_of[name] = fmap.name
        if fmap.name not in watched:
            channels = gm.get_submodule(conv.target).out_channels
            watched[fmap.name] = ChannelCorrelationSum(channels)
        sums[name] = watched[fmap.name]

    device = next(itertools.chain(gm.parameters(), gm.buffers()), torch.empty(0)).device
    interpreter = MeasureChannelSimilarity(gm, watched)
    with eval_mode(gm), torch.no_grad():
        for i, x in enumerate(calibration_inputs(calibration_batches, example)):
            try:
                interpreter.run(x.to(device))
            except Exception as exc:
                raise pass_error(PASS, None, f"running calibration batch {i} of shape {tuple(x.shape)} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc

    similarity = {}
    for name, s in sums.items():
        similarity[name] = s.similarity()
        swpfx_meta(nodes[name])["channel_similarity"] = similarity[name]
        swpfx_meta(nodes[name])["feature_map"] = map_of[name]
    return MeasureChannelSimilarityResult(gm, False, similarity)
