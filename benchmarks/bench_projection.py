"""Per-step cost of the null-space projection on the CIFAR ResNet-18 (batch 128).

For each rank fraction (``--ranks``: the basis of every constrained layer has
``r = fraction * d`` random orthonormal columns, the ranks UNSC gets at energy thresholds of
0.97-0.99 on trained networks) the script times, in one process and interleaved:

- an unprojected optimizer step (forward + backward + ``SGD.step``), the reference;
- the projection of every constrained weight gradient alone, as implemented
  (:class:`~unsc_lightning.nullspace.NullSpaceProjector.project_`, low-rank or complement form,
  whichever is cheaper), with a dense ``d x d`` projector, and with an in-place variant
  (``addmm_`` into the gradient, no temporaries beyond ``G U``);
- a full projected step (``mode="gradient"``) and the extra work of ``mode="update"`` (copy
  every constrained weight before the step, project the change after it; the same for any
  optimizer, so it is timed around no step at all).

Timings are the fastest of ``--repeats``. Content does not change the cost of dense products, so
the bases are random; every projector is checked against the dense reference first.

Example:
    python benchmarks/bench_projection.py --threads 1 --json bench_projection.json
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import best, machine, parser, setup, table, timed, write_json
from torch import Tensor, nn

from unsc_lightning.models.paper import ResNet18CIFAR
from unsc_lightning.nullspace import NullSpaceProjector
from unsc_lightning.nullspace.layers import select_layers

BATCH = 128


def random_orthogonal(dims: set[int], device: torch.device, seed: int = 0) -> dict[int, Tensor]:
    """One random orthogonal ``d x d`` matrix per distinct layer dimension."""
    generator = torch.Generator().manual_seed(seed)
    return {
        d: torch.linalg.qr(torch.randn(d, d, generator=generator))[0].to(device)
        for d in sorted(dims)
    }


def projector_from(orthogonal: Tensor, rank: int) -> NullSpaceProjector:
    """A :class:`NullSpaceProjector` for ``U = Q[:, :rank]`` without recomputing the complement.

    The complement of the first ``rank`` columns of an orthogonal ``Q`` is its other columns;
    this is the factor the constructor would compute with a (slow, d x d) QR.
    """
    dim = orthogonal.shape[0]
    projector = NullSpaceProjector(orthogonal[:, :0])
    projector.dim, projector.rank = dim, rank
    projector.use_complement = rank > dim / 2
    factor = orthogonal[:, rank:] if projector.use_complement else orthogonal[:, :rank]
    projector.factor = factor.contiguous()
    return projector


def project_in_place(projector: NullSpaceProjector, grad: Tensor) -> None:
    """Proposed ``project_``: one ``G @ F`` temporary, the second product written into ``G``."""
    matrix = grad.view(grad.shape[0], -1)
    factor = projector.factor
    if projector.use_complement:
        torch.mm(matrix @ factor, factor.T, out=matrix)
    elif projector.rank:
        matrix.addmm_(matrix @ factor, factor.T, alpha=-1)


def step_flops(model: nn.Module, layers: dict[str, nn.Module], inputs: Tensor) -> float:
    """Multiply-adds of forward + backward of the weight layers (3x the forward's)."""
    macs: list[float] = []
    handles = [
        layer.register_forward_hook(
            lambda m, args, out: macs.append(out.numel() * m.weight[0].numel())
        )
        for layer in layers.values()
    ]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return 3.0 * sum(macs)


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--ranks", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    args.add_argument("--num-classes", type=int, default=100)
    options = args.parse_args()
    device = setup(options)

    torch.manual_seed(0)
    model = ResNet18CIFAR(num_classes=options.num_classes).to(device)
    layers = select_layers(model).layers
    weights = {name: layer.weight for name, layer in layers.items()}
    inputs = torch.randn(BATCH, 3, 32, 32, device=device)
    targets = torch.randint(0, options.num_classes, (BATCH,), device=device)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    orthogonal = random_orthogonal({int(w[0].numel()) for w in weights.values()}, device)
    flops = step_flops(model, layers, inputs)

    def backward() -> None:
        sgd.zero_grad(set_to_none=False)
        F.cross_entropy(model(inputs), targets).backward()

    def plain_step() -> None:
        backward()
        sgd.step()

    rows: list[dict[str, Any]] = []
    backward()  # warm-up, and gradients for the projection-only timings
    for fraction in options.ranks:
        row = measure(
            fraction, orthogonal, weights, plain_step, backward, sgd, device, options.repeats
        )
        row["flop_ratio"] = row.pop("projection_macs") / flops
        row["flop_ratio_dense"] = row.pop("dense_macs") / flops
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    columns = [
        "rank_fraction",
        "step_s",
        "projection_s",
        "overhead",
        "overhead_inplace",
        "overhead_dense",
        "overhead_update_mode",
        "measured_step_ratio",
        "flop_ratio",
    ]
    print(table(rows, columns))
    layer_dims = {name: [int(w.shape[0]), int(w[0].numel())] for name, w in weights.items()}
    write_json(
        options.json,
        {
            "benchmark": "bench_projection",
            "model": f"ResNet18CIFAR(num_classes={options.num_classes})",
            "batch": BATCH,
            "layers": layer_dims,
            "step_macs": flops,
            "machine": machine(device),
            "results": rows,
        },
    )


def measure(
    fraction: float,
    orthogonal: dict[int, Tensor],
    weights: dict[str, nn.Parameter],
    plain_step: Callable[[], None],
    backward: Callable[[], None],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Timings of one rank fraction (fastest of the repeats), as ratios to the unprojected step."""
    projectors = {
        name: projector_from(orthogonal[int(w[0].numel())], round(fraction * w[0].numel()))
        for name, w in weights.items()
    }
    dense = {
        name: torch.eye(p.dim, device=device)
        - orthogonal[p.dim][:, : p.rank] @ orthogonal[p.dim][:, : p.rank].T
        for name, p in projectors.items()
    }
    check_against_dense(projectors, dense, weights)

    def project_as_implemented() -> None:
        for name, projector in projectors.items():
            projector.project_(weights[name].grad)

    def project_dense() -> None:
        for name, weight in weights.items():
            grad = weight.grad
            grad.copy_((grad.view(grad.shape[0], -1) @ dense[name]).view_as(grad))

    def project_proposed() -> None:
        for name, projector in projectors.items():
            project_in_place(projector, weights[name].grad)

    def projected_step() -> None:
        backward()
        project_as_implemented()
        optimizer.step()

    def update_mode_extra() -> None:
        # what `mode="update"` adds around an optimizer step (see NullSpaceCalibration)
        before = {name: w.detach().clone() for name, w in weights.items()}
        with torch.no_grad():
            for name, old in before.items():
                weight = weights[name]
                delta = projectors[name].project_(weight.detach() - old)
                weight.copy_(old + delta)

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for key, fn in (
            ("step_s", plain_step),
            ("projected_step_s", projected_step),
            ("projection_s", project_as_implemented),
            ("projection_inplace_s", project_proposed),
            ("projection_dense_s", project_dense),
            ("update_mode_extra_s", update_mode_extra),
        ):
            times.setdefault(key, []).append(timed(fn, device))
    row: dict[str, Any] = {"rank_fraction": fraction, **{k: best(v) for k, v in times.items()}}
    step = row["step_s"]
    row.update(
        overhead=row["projection_s"] / step,
        overhead_inplace=row["projection_inplace_s"] / step,
        overhead_dense=row["projection_dense_s"] / step,
        overhead_update_mode=row["update_mode_extra_s"] / step,
        measured_step_ratio=row["projected_step_s"] / step,
        projection_macs=sum(
            2 * weights[name].shape[0] * p.dim * min(p.rank, p.dim - p.rank)
            for name, p in projectors.items()
        ),
        dense_macs=sum(weights[name].shape[0] * p.dim * p.dim for name, p in projectors.items()),
    )
    return row


def check_against_dense(
    projectors: dict[str, NullSpaceProjector], dense: dict[str, Tensor], weights: dict[str, Any]
) -> None:
    """Every projector (as implemented and in place) equals the dense ``G (I - U Uᵀ)``."""
    generator = torch.Generator().manual_seed(1)
    for name, projector in projectors.items():
        grad = torch.randn(weights[name].shape, generator=generator).to(dense[name].device)
        reference = grad.view(grad.shape[0], -1) @ dense[name]
        as_implemented = projector.project_(grad.clone()).view(grad.shape[0], -1)
        in_place = grad.clone()
        project_in_place(projector, in_place)
        scale = float(reference.abs().max()) + 1e-12
        for got in (as_implemented, in_place.view(grad.shape[0], -1)):
            error = float((got - reference).abs().max()) / scale
            if error > 1e-4:
                raise AssertionError(
                    f"projection of `{name}` differs from the dense reference ({error:.1e})"
                )


if __name__ == "__main__":
    main()
