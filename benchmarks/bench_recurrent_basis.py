"""Basis pass of recurrent layers: each call's layers run once for all the weights' rows.

A two-layer bidirectional LSTM has eight constrained weights; their rows (each layer's input
steps, the hidden states each step starts from) come from running the layer's kernel one layer
at a time. ``shared`` (the library) keeps one call's per-layer outputs for all its weights;
``separate`` clears that cache before every weight's rows, as before 2026-11-27 late (each
weight ran the layers below it again). Times ``NullSpaceEngine.build`` against a plain no-grad
forward over the same batches, interleaved, fastest of ``--repeats``, in one process.

Example:
    python benchmarks/bench_recurrent_basis.py --threads 1 --json docs/results/bench_recurrent_basis.json
"""

from __future__ import annotations

from typing import Any

import torch
from _common import best, machine, parser, setup, table, timed, write_json
from torch import Tensor, nn

from unsc_lightning.nullspace import NullSpaceEngine
from unsc_lightning.nullspace.representations import recurrent


class SequenceModel(nn.Module):
    def __init__(self, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = nn.LSTM(16, 64, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(64 * (2 if bidirectional else 1), 10)

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


def separate_runs() -> Any:
    """Patch the run cache so that every weight's rows run the layers again (the former way)."""
    original = recurrent.recurrent_run

    def run(layer: Any, args: Any, kwargs: Any, last: bool = False) -> Any:
        recurrent.RECURRENT_RUNS.clear()
        return original(layer, args, kwargs, last)

    recurrent.recurrent_run = run
    return original


def measure(layers: int, bidirectional: bool, options: Any, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SequenceModel(layers, bidirectional).to(device).eval()
    x = torch.randn(options.samples, options.steps, 16)
    y = torch.randint(0, 10, (options.samples,))
    batches = [(a.to(device), b.to(device)) for a, b in zip(x.split(256), y.split(256))]

    def forward() -> None:
        with torch.no_grad():
            for inputs, _ in batches:
                model(inputs)

    def build() -> None:
        NullSpaceEngine(model, threshold=0.97, rule="per_class").build(batches, device=device)

    def build_separate() -> None:
        original = separate_runs()
        try:
            build()
        finally:
            recurrent.recurrent_run = original

    times: dict[str, list[float]] = {"forward_s": [], "shared_s": [], "separate_s": []}
    for _ in range(options.repeats):
        times["forward_s"].append(timed(forward, device))
        times["shared_s"].append(timed(build, device))
        times["separate_s"].append(timed(build_separate, device))
    row: dict[str, Any] = {"layers": layers, "bidirectional": bidirectional}
    row.update({key: best(values) for key, values in times.items()})
    row["shared_over_forward"] = row["shared_s"] / row["forward_s"]
    row["separate_over_forward"] = row["separate_s"] / row["forward_s"]
    row["separate_over_shared"] = row["separate_s"] / row["shared_s"]
    return row


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=3000)
    args.add_argument("--steps", type=int, default=20)
    options = args.parse_args()
    device = setup(options)
    rows = [measure(layers, bi, options, device) for layers, bi in ((1, False), (2, True))]
    columns = [
        "layers", "bidirectional", "forward_s", "shared_s", "separate_s", "shared_over_forward",
        "separate_over_forward", "separate_over_shared",
    ]  # fmt: skip
    print(table(rows, columns))
    write_json(
        options.json,
        {
            "benchmark": "bench_recurrent_basis",
            "samples": options.samples,
            "steps": options.steps,
            "repeats": options.repeats,
            "results": rows,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
