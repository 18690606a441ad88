"""Every trainable parameter of a model, sorted: constrained by a basis, or frozen for the fit.

The guarantee "remaining outputs do not move" holds only if *every* parameter that can change is
either projected onto its layer's null space or frozen. :func:`account_parameters` decides which
is which, once, before anything is built; the engine then acts on the decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from unsc_lightning.nullspace.covariance import Site
from unsc_lightning.nullspace.representations import WeightRows, representations_of

#: Normalisation layers: their affine parameters are frozen and their running statistics kept.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    NORM_LAYERS = (*NORM_LAYERS, nn.RMSNorm)


@dataclass
class Constraint:
    """One weight (or block of a packed weight) kept in the null space of its inputs.

    Attributes:
        key: basis key: the layer's name, or ``"<layer>.<suffix>"`` for one of several weights.
        parameter_name: the parameter's name in ``model.named_parameters()``.
        parameter: the parameter itself.
        spec: how the parameter (or its gradient/update) is viewed as an ``out x d`` matrix.
        sites: every layer whose inputs this weight multiplies (two for a tied weight).
    """

    key: str
    parameter_name: str
    parameter: nn.Parameter
    spec: WeightRows
    sites: list[Site] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return self.spec.dim


@dataclass
class Accounting:
    """Result of :func:`account_parameters`.

    Attributes:
        constraints: ``key -> Constraint`` in ``named_modules()`` order.
        frozen: ``name -> reason`` of every other trainable parameter; reasons are ``"bias"``
            (bias of a constrained layer), ``"norm"`` (normalisation affine), ``"unsupported"``
            (weight of a layer type without a handler, or a raw ``nn.Parameter`` such as a class
            token), ``"excluded"`` (of a layer left out by ``layers``/``exclude_layers``) and
            ``"parametrized"`` (behind ``torch.nn.utils.parametrize``). Parameters of excluded
            layers are left free by the engine; the others are frozen by default.
        parameters: ``name -> parameter`` of every trainable parameter.
        norm_layers: normalisation layers (kept in eval mode during a fit).
        unmatched_patterns: ``layers`` patterns that matched no supported trainable layer.
    """

    constraints: dict[str, Constraint] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    norm_layers: list[nn.Module] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)

    @property
    def constrained_parameters(self) -> list[str]:
        """Names of the parameters projected onto a null space (each once)."""
        return list(dict.fromkeys(c.parameter_name for c in self.constraints.values()))

    @property
    def layers(self) -> dict[str, nn.Module]:
        """``key -> first layer`` of every constraint (the layer that owns the weight)."""
        return {key: c.sites[0][1] for key, c in self.constraints.items()}

    def sites(self) -> list[Site]:
        return [site for c in self.constraints.values() for site in c.sites]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _get_parameter(layer: nn.Module, path: str) -> object:
    owner: object = layer
    for part in path.split("."):
        owner = getattr(owner, part, None)
    return owner


def _same_view(first: WeightRows, second: WeightRows, parameter: Tensor) -> bool:
    # Two uses of one parameter share a basis only if they read it as the same matrix (a tied
    # Linear used twice); an Embedding tied to a Linear head reads it transposed, and each then
    # keeps its own basis (left and right projections commute).
    if first.dim != second.dim:
        return False
    probe = torch.arange(parameter.numel(), dtype=torch.float64).reshape(parameter.shape)
    a, b = first.to_matrix(probe), second.to_matrix(probe)
    return a.shape == b.shape and bool(torch.equal(a, b))


def account_parameters(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> Accounting:
    """Sort every trainable parameter of ``model`` into constrained or frozen.

    Args:
        model: the module whose ``named_modules()`` names are matched.
        include: ``fnmatch`` patterns a layer name must match to be constrained (``None`` =
            every supported layer).
        exclude: patterns of layers to leave unconstrained (their parameters are frozen).
    """
    result = Accounting()
    names = {id(p): name for name, p in model.named_parameters()}
    result.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    used: set[str] = set()
    excluded: set[int] = set()
    excluded_layers: set[str] = set()
    by_parameter: dict[int, list[Constraint]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, NORM_LAYERS):
            result.norm_layers.append(layer)
        specs = representations_of(layer) if name else None
        if specs is None:
            continue
        selected = not (exclude and _matches(name, exclude))
        if selected and include is not None:
            hits = [pattern for pattern in include if fnmatchcase(name, pattern)]
            used.update(hits)
            selected = bool(hits)
        for spec in specs:
            parameter = _get_parameter(layer, spec.parameter)
            if not isinstance(parameter, nn.Parameter) or not parameter.requires_grad:
                continue  # frozen by the user, or behind a parametrization (reported below)
            if not selected:
                excluded.add(id(parameter))
                excluded_layers.add(name)
                continue
            key = name if not spec.suffix else f"{name}.{spec.suffix}"
            site: Site = (key, layer, spec)
            shared = by_parameter.setdefault(id(parameter), [])
            twin = next((c for c in shared if _same_view(c.spec, spec, parameter)), None)
            if twin is not None:
                twin.sites.append((twin.key, layer, spec))
                continue
            constraint = Constraint(key, names[id(parameter)], parameter, spec, [site])
            shared.append(constraint)
            result.constraints[key] = constraint
    if include is not None:
        result.unmatched_patterns = [p for p in include if p not in used]
    constrained = set(by_parameter)
    norm_parameters = {id(p) for layer in result.norm_layers for p in layer.parameters()}
    parametrized = {
        id(p)
        for layer in model.modules()
        if parametrize.is_parametrized(layer)
        for p in layer.parametrizations.parameters()  # type: ignore[union-attr]
    }
    owners = {id(c.sites[0][1]) for c in result.constraints.values()}
    for name, parameter in result.parameters.items():
        pid = id(parameter)
        if pid in constrained and by_parameter[pid]:
            continue
        if pid in excluded or _on_excluded_layer(name, excluded_layers):
            reason = "excluded"
        elif pid in norm_parameters:
            reason = "norm"
        elif pid in parametrized:
            reason = "parametrized"
        elif _is_bias_of(model, name, owners):
            reason = "bias"
        else:
            reason = "unsupported"
        result.frozen[name] = reason
    return result


def _is_bias_of(model: nn.Module, name: str, owners: set[int]) -> bool:
    # A parameter directly on a constrained layer that is not its constrained weight: a bias
    # (``bias``, ``in_proj_bias``, ``out_proj.bias`` of attention)
    layer_name, _, attribute = name.rpartition(".")
    try:
        layer = model.get_submodule(layer_name) if layer_name else model
    except AttributeError:
        return False
    if "bias" not in attribute:
        return False
    parent_name = layer_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if layer_name else None
    return id(layer) in owners or (parent is not None and id(parent) in owners)


def _on_excluded_layer(name: str, layers: set[str]) -> bool:
    # a bias of an excluded layer trains with its weight
    return name.rpartition(".")[0] in layers
