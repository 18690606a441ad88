"""Feature-level forgetting (issue 16): does a linear probe still find the forgotten class?

For MNIST-1D (forget class 3, the demo's fixed UNSC recipe) this trains the original and the
retrained model (cached), unlearns with UNSC with and without a feature-calibration term, and
reports for each model: head accuracy on the forgotten class, remaining accuracy, and the
forgotten-class test accuracy of a logistic-regression probe trained on the penultimate features
of the training data (all classes, true labels).

Feature calibration adds ``weight * ||phi(x_f) - mu_{y_hat}||^2 / ||mu||^2`` to the pseudo-label
loss: each forget sample's penultimate features ``phi`` are pulled toward the original model's
feature centroid (on remaining training data) of its pseudo-label class. Updates stay in the
null space of the remaining inputs, so remaining outputs do not move whatever the loss.

    python benchmarks/feature_forgetting.py --seeds 0 1 2 --weights 0 1 10 --json ff.json
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _common import parser, setup, table, write_json
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.recipes import EMBEDDED
from unsc_lightning.lab.runs import make_datamodule, make_trainer, train_classifier
from unsc_lightning.lab.scoring import evaluate

FORGET = 3


def head_of(model: nn.Module) -> nn.Linear:
    """The last Linear layer: its input is the penultimate feature vector."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@torch.no_grad()
def features(model: nn.Module, loader: Any) -> tuple[Tensor, Tensor]:
    captured: list[Tensor] = []
    handle = head_of(model).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    labels = []
    model.eval()
    try:
        for x, y in loader:
            model(x)
            labels.append(y)
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(labels)


def probe_accuracy(model: nn.Module, dm: Any) -> float:
    """Forgotten-class test accuracy of a linear probe on the penultimate features (%)."""
    retain_x, retain_y = features(model, dm.retain_dataloader())
    forget_x, forget_y = features(model, dm.forget_dataloader())
    x_train, y_train = torch.cat([retain_x, forget_x]), torch.cat([retain_y, forget_y])
    x_test, y_test = features(model, dm.test_dataloader()[1])  # forgotten-class test data
    probe = LogisticRegression(max_iter=2000)
    probe.fit(x_train.numpy(), y_train.numpy())
    return float((probe.predict(x_test.numpy()) == y_test.numpy()).mean() * 100)


class FeatureCalibrated(UnlearningModule):
    """UNSC's pseudo-label loss plus a pull of forget features toward remaining centroids."""

    def __init__(self, model: nn.Module, centroids: Tensor, weight: float, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.register_buffer("centroids", centroids)
        self.weight = weight
        self._features: list[Tensor] = []
        head_of(model).register_forward_pre_hook(lambda m, a: self._features.append(a[0]))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._features.clear()
        inputs, labels = batch[0], batch[1]
        targets = self.pseudo_label(inputs, labels)
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        if self.weight:
            phi = self._features[-1]
            scale = self.centroids.pow(2).sum(1).mean()
            loss = loss + self.weight * (phi - self.centroids[targets]).pow(2).sum(1).mean() / scale
        return loss


def centroids_of(model: nn.Module, dm: Any, num_classes: int) -> Tensor:
    x, y = features(model, dm.retain_dataloader())
    out = torch.zeros(num_classes, x.shape[1])
    for k in y.unique():
        out[k] = x[y == k].mean(0)
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--seeds", nargs="+", type=int, default=[0])
    args.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0, 10.0])
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_ff_cache"))
    options = args.parse_args()
    setup(options)
    spec = EMBEDDED["mnist1d"]
    recipe = spec["unlearn"]
    forget = ForgetSpec(kind="class", classes=[FORGET])
    rows: list[dict[str, Any]] = []
    for seed in options.seeds:
        dm = make_datamodule("mnist1d", forget, seed, "forget", recipe.batch_size)
        dm.setup("fit")
        original, _, _ = train_classifier("mnist1d", forget, seed, "all", options.cache_dir)
        retrain, _, _ = train_classifier("mnist1d", forget, seed, "retain", options.cache_dir)
        models: dict[str, nn.Module] = {"original": original, "retrain": retrain}
        centroids = centroids_of(original, dm, dm.num_classes)
        for weight in options.weights:
            L.seed_everything(seed, verbose=False)
            model = copy.deepcopy(original)
            module = FeatureCalibrated(
                model,
                centroids,
                weight,
                num_classes=dm.num_classes,
                forget_classes=[FORGET],
                lr=recipe.lr,
                optimizer="sgd",
                stop_at_target=False,
            )
            callback = NullSpaceCalibration(
                threshold=recipe.threshold,
                class_threshold_step=recipe.class_threshold_step,
                rule=recipe.rule,
            )
            make_trainer(recipe.epochs, [callback]).fit(module, datamodule=dm)
            models[f"unsc (feature weight {weight:g})"] = model
        for name, model in models.items():
            accuracy = evaluate(model, dm)
            rows.append(
                {
                    "seed": seed,
                    "model": name,
                    "acc_r": round(float(accuracy["acc_r"]), 2),
                    "head_acc_f": round(float(accuracy["acc_f"]), 2),
                    "probe_acc_f": round(probe_accuracy(model, dm), 2),
                }
            )
            print(rows[-1], flush=True)
    print(table(rows, ["seed", "model", "acc_r", "head_acc_f", "probe_acc_f"]))
    write_json(options, {"results": rows})


if __name__ == "__main__":
    main()
