"""Per-step cost of the null-space projection modes, on random and on trained bases.

Two kinds of configuration, each timed in one process, interleaved, fastest of ``--repeats``,
every figure a ratio to the unprojected optimizer step (forward + backward + ``SGD.step``) of the
same model and batch (128):

- ``random``: the CIFAR ResNet-18 (``ResNet18CIFAR``, 100 classes) with random orthonormal bases
  of ``r = fraction * d`` columns in every layer (``--ranks``; content does not change the cost
  of dense products);
- ``trained`` (``--trained``): zoo models trained inside this script (or read from the zoo's
  ``--cache-dir``): the MNIST-1D CNN and the digits CNN (``unsc_lightning.models``) and,
  on request, torchvision's ResNet-18 on digits upsampled to 32x32, with the bases
  :class:`~unsc_lightning.nullspace.NullSpaceEngine` builds from their remaining data at
  ``--threshold`` (the ranks UNSC really uses).

Timed per configuration:

- ``gradient``: :meth:`NullSpaceEngine.project_gradients_` alone (``mode="gradient"``), and a
  whole projected step;
- ``update``: what ``mode="update"`` adds to a step: before (``update_old``: copy every weight
  before the step, project the change after it) and now (:meth:`NullSpaceEngine.attach`: one
  copy at fit start, ``W₀ + (W - W₀)(I - UUᵀ)`` written in place after the step); and a whole
  step under ``attach``;
- ``relative``: what ``UnlearningModule``'s default step (relative steps, gradient mode)
  projects: the callback's projection, then a second projection of the gradients that the
  direct form ``G - (G U) Uᵀ`` left with under ``SECOND_PROJECTION_BELOW`` of their norm
  (``project_step_``), against ``relative_twice``, every gradient projected twice (the
  module before 2026-11-27 night); the gradient is that of the batch's cross-entropy, not of
  UNSC's pseudo-labels;
- ``every_K`` (``--every``): ``project_every=K`` projects the weights once every ``K`` steps:
  its cost per step is the weight projection's divided by ``K`` (the optimizer step is
  untouched in between; hook bookkeeping is a counter).

Also reported per model: the rank fraction of each basis, the projection multiply-adds as a
share of the step's, and the arithmetic of projecting a layer's input rows instead (cheaper
only where the layer's output positions x batch ``L·B`` are fewer than its outputs).

Example:
    python benchmarks/bench_projection.py --threads 1 --json docs/results/bench_projection.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import best, machine, parser, setup, table, timed, trainer_options, write_json
from torch import Tensor, nn

from unsc_lightning.models.paper import ResNet18CIFAR
from unsc_lightning.nullspace import SECOND_PROJECTION_BELOW, NullSpaceProjector
from unsc_lightning.nullspace.engine import NullSpaceEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BATCH = 128
FORGET = 3


def orthogonal_of(dim: int, device: torch.device, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed + dim)
    return torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0].to(device)


def projector_from(orthogonal: Tensor, rank: int) -> NullSpaceProjector:
    """A :class:`NullSpaceProjector` for ``U = Q[:, :rank]`` of an orthogonal ``Q``: its
    complement is the other columns (the factor the constructor would get from a d x d QR)."""
    dim = orthogonal.shape[0]
    projector = NullSpaceProjector(orthogonal[:, :0])
    projector.dim, projector.rank = dim, rank
    projector.use_complement = rank > dim / 2
    factor = orthogonal[:, rank:] if projector.use_complement else orthogonal[:, :rank]
    projector.factor = factor.contiguous()
    return projector


def layer_shapes(engine: NullSpaceEngine, inputs: Tensor) -> dict[str, dict[str, int]]:
    """Per basis key: ``out``, ``d`` and ``LB`` (output positions x batch) of one forward."""
    outputs = {
        key: int(c.spec.to_matrix(c.parameter).shape[0])
        for key, c in engine.accounting.constraints.items()
    }
    positions: dict[str, int] = {}
    handles = []
    for key, constraint in engine.accounting.constraints.items():

        def hook(m: nn.Module, args: Any, out: Any, key: str = key) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, Tensor):
                positions[key] = max(1, out.numel() // outputs[key])

        handles.append(constraint.sites[0][1].register_forward_hook(hook))
    with torch.no_grad():
        engine.model(inputs)
    for handle in handles:
        handle.remove()
    return {
        key: {"out": outputs[key], "d": c.dim, "LB": positions.get(key, inputs.shape[0])}
        for key, c in engine.accounting.constraints.items()
    }


def arithmetic(engine: NullSpaceEngine, inputs: Tensor) -> dict[str, Any]:
    """Multiply-adds of the step and of each projection form (ranks of the engine's bases)."""
    shapes = layer_shapes(engine, inputs)
    step = sum(3.0 * s["out"] * s["d"] * s["LB"] for s in shapes.values())
    weights = rows = 0.0
    layers = {}
    for key, s in shapes.items():
        projector = engine._projectors[key]
        small = min(projector.rank, projector.dim - projector.rank)
        weight_form = 2.0 * s["out"] * s["d"] * small
        row_form = 2.0 * s["LB"] * s["d"] * small
        weights += weight_form
        rows += min(weight_form, row_form)
        layers[key] = {**s, "r": projector.rank, "rank_fraction": projector.rank / s["d"]}
    return {
        "step_macs": step,
        "projection_macs_ratio": weights / step,
        "projection_macs_ratio_with_row_form": rows / step,
        "layers_where_rows_are_cheaper": [k for k, s in shapes.items() if s["LB"] < s["out"]],
        "layers": layers,
    }


def old_update_extra(engine: NullSpaceEngine) -> Callable[[Callable[[], None]], None]:
    """``mode="update"`` before amortisation: clone each weight, step, project the change."""

    @torch.no_grad()
    def around(step: Callable[[], None]) -> None:
        before = {
            pid: c[0][1].parameter.detach().clone() for pid, c in engine._by_parameter.items()
        }
        step()
        for pid, old in before.items():
            for key, constraint in engine._by_parameter[pid]:
                delta = constraint.parameter.detach() - old
                spec = constraint.spec
                spec.write_matrix_(delta, engine._projectors[key].project(spec.to_matrix(delta)))
                constraint.parameter.copy_(old + delta)

    return around


def measure(
    engine: NullSpaceEngine,
    inputs: Tensor,
    targets: Tensor,
    everies: list[int],
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Timings of one configuration as ratios to the unprojected step."""
    model = engine.model
    model.train()
    engine.freeze_()  # as in a fit: frozen parameters get no gradient in any variant
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=1e-6)
    attached = torch.optim.SGD(params, lr=1e-6)
    engine.attach(attached, every=1)  # the weight copy W₀ and the after-step projection

    def backward() -> None:
        sgd.zero_grad(set_to_none=False)
        F.cross_entropy(model(inputs), targets).backward()

    def plain_step() -> None:
        backward()
        sgd.step()

    def gradient_step() -> None:
        backward()
        engine.project_gradients_()
        sgd.step()

    def update_step() -> None:
        attached.zero_grad(set_to_none=False)
        F.cross_entropy(model(inputs), targets).backward()
        attached.step()  # + project_weights_ in the post-step hook

    # UnlearningModule's default step (relative steps, gradient mode): the callback's
    # projection, then a second one only where the first left float32 cancellation error that
    # matters (direct form, under SECOND_PROJECTION_BELOW of the gradient kept)
    backward()
    raw = {id(p): p.grad.norm() for p in params if p.grad is not None}
    engine.project_gradients_()
    direct = [
        key
        for key, projector in engine._projectors.items()
        if projector.rank and not projector.use_complement
    ]
    parameters = {key: engine.accounting.constraints[key].parameter for key in direct}
    again = [
        key
        for key, parameter in parameters.items()
        if parameter.grad is not None
        and float(parameter.grad.norm()) < SECOND_PROJECTION_BELOW * float(raw[id(parameter)])
    ]

    def relative_projection() -> None:
        engine.project_gradients_()
        engine.project_step_(raw)

    def relative_projection_twice() -> None:
        engine.project_gradients_()
        engine.project_gradients_()

    around = old_update_extra(engine)
    variants: list[tuple[str, Callable[[], None]]] = [
        ("step_s", plain_step),
        ("gradient_step_s", gradient_step),
        ("update_step_s", update_step),
        ("gradient_projection_s", engine.project_gradients_),
        ("relative_projection_s", relative_projection),
        ("relative_projection_twice_s", relative_projection_twice),
        ("weight_projection_s", engine.project_weights_),
        ("update_old_extra_s", lambda: around(lambda: None)),
    ]
    backward()
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for key, fn in variants:
            times.setdefault(key, []).append(timed(fn, device))
    engine.release_()
    row: dict[str, Any] = {k: best(v) for k, v in times.items()}
    step = row["step_s"]
    row.update(
        overhead_gradient=row["gradient_projection_s"] / step,
        overhead_update_old=row["update_old_extra_s"] / step,
        overhead_update=row["weight_projection_s"] / step,
        measured_gradient_step_ratio=row["gradient_step_s"] / step,
        measured_update_step_ratio=row["update_step_s"] / step,
        update_vs_gradient=row["weight_projection_s"] / row["gradient_projection_s"],
        update_old_vs_gradient=row["update_old_extra_s"] / row["gradient_projection_s"],
    )
    for every in everies:
        row[f"overhead_every_{every}"] = row["weight_projection_s"] / every / step
    row.update(
        overhead_relative=row["relative_projection_s"] / step,
        overhead_relative_twice=row["relative_projection_twice_s"] / step,
        direct_form_layers=len(direct),
        relative_second_projections=len(again),
    )
    return row


def check_projectors(engine: NullSpaceEngine) -> None:
    """Each projector equals the dense ``G (I - U Uᵀ)`` (in place and as a copy)."""
    generator = torch.Generator().manual_seed(1)
    for key, projector in engine._projectors.items():
        factor = projector.factor.cpu().double()
        dense = factor @ factor.T
        if not projector.use_complement:
            dense = torch.eye(projector.dim, dtype=torch.float64) - dense
        grad = torch.randn(3, projector.dim, generator=generator)
        reference = grad.double() @ dense
        got = projector.project_matrix_(grad.to(projector.factor.device)).cpu().double()
        error = float((got - reference).abs().max()) / (float(reference.abs().max()) + 1e-12)
        if error > 1e-4:
            raise AssertionError(f"projection of `{key}` differs from the dense reference")


def random_configuration(
    fraction: float, num_classes: int, device: torch.device
) -> tuple[NullSpaceEngine, Tensor, Tensor]:
    torch.manual_seed(0)
    model = ResNet18CIFAR(num_classes=num_classes).to(device)
    engine = NullSpaceEngine(model)
    orthogonals: dict[int, Tensor] = {}
    projectors = {}
    for key, constraint in engine.accounting.constraints.items():
        dim = constraint.dim
        if dim not in orthogonals:
            orthogonals[dim] = orthogonal_of(dim, device)
        projectors[key] = projector_from(orthogonals[dim], round(fraction * dim))
    engine.make_projectors(projectors)
    inputs = torch.randn(BATCH, 3, 32, 32, device=device)
    targets = torch.randint(0, num_classes, (BATCH,), device=device)
    return engine, inputs, targets


def trained_configuration(
    name: str, threshold: float, rule: str, retain_samples: int, cache: Path, device: torch.device
) -> tuple[NullSpaceEngine, Tensor, Tensor]:
    from helpers.zoo import ZOO, zoo_tensors  # the zoo lives with the tests
    from zoo import trained  # benchmarks/zoo.py: trains the original, or reads the cache

    entry = ZOO[name]
    accelerator = trainer_options(device)["accelerator"]
    model = trained(entry, [FORGET], False, 0, accelerator, cache).to(device)
    x_train, y_train, _, _ = zoo_tensors(entry.data)
    keep = y_train != FORGET
    retain = list(
        zip(
            x_train[keep][:retain_samples].split(BATCH),
            y_train[keep][:retain_samples].split(BATCH),
            strict=True,
        )
    )
    if rule == "auto":
        rule = "pooled" if name == "resnet18" else "per_class"
    engine = NullSpaceEngine(model, threshold=threshold, rule=rule)  # type: ignore[arg-type]
    engine.build(retain, device=device)
    return engine, x_train[:BATCH].to(device), y_train[:BATCH].to(device)


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--ranks", type=float, nargs="*", default=[0.5])
    args.add_argument("--num-classes", type=int, default=100)
    args.add_argument("--trained", nargs="*", default=["mnist1d_conv", "digits_conv"])
    args.add_argument("--threshold", type=float, default=0.97)
    args.add_argument(
        "--rule",
        default="auto",
        choices=["auto", "per_class", "pooled"],
        help="basis rule; auto: per_class, pooled for resnet18 (per-class d=4608 eigh is slow)",
    )
    args.add_argument("--retain-samples", type=int, default=1024)
    args.add_argument("--every", type=int, nargs="+", default=[4, 16])
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_zoo_cache"))
    options = args.parse_args()
    device = setup(options)

    configurations: list[tuple[str, Callable[[], tuple[NullSpaceEngine, Tensor, Tensor]]]] = [
        (f"ResNet18CIFAR random r={f:g}d", lambda f=f: random_configuration(f, 100, device))
        for f in options.ranks
    ]
    configurations += [
        (
            f"{name} trained, threshold {options.threshold:g}, rule {options.rule}",
            lambda name=name: trained_configuration(
                name,
                options.threshold,
                options.rule,
                options.retain_samples,
                options.cache_dir,
                device,
            ),
        )
        for name in options.trained
    ]
    rows: list[dict[str, Any]] = []
    for label, make in configurations:
        engine, inputs, targets = make()
        check_projectors(engine)
        shape = arithmetic(engine, inputs)
        row: dict[str, Any] = {
            "configuration": label,
            **measure(engine, inputs, targets, options.every, device, options.repeats),
        }
        row.update({k: v for k, v in shape.items() if k != "layers"})
        fractions = [layer["rank_fraction"] for layer in shape["layers"].values()]
        row["rank_fraction_min_max"] = [min(fractions), max(fractions)]
        row["layers"] = shape["layers"]
        rows.append(row)
        printed = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        printed.pop("layers")
        print(printed, flush=True)

    columns = [
        "configuration",
        "step_s",
        "overhead_gradient",
        "overhead_update_old",
        "overhead_update",
        "overhead_relative",
        "overhead_relative_twice",
        "relative_second_projections",
        "direct_form_layers",
        *[f"overhead_every_{k}" for k in options.every],
        "measured_gradient_step_ratio",
        "measured_update_step_ratio",
        "projection_macs_ratio",
        "projection_macs_ratio_with_row_form",
    ]
    print(table(rows, columns))
    write_json(
        options.json,
        {
            "benchmark": "bench_projection",
            "batch": BATCH,
            "threshold": options.threshold,
            "rule": options.rule,
            "retain_samples": options.retain_samples,
            "machine": machine(device),
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
