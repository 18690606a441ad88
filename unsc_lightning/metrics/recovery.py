"""Does the forgotten class come back? Relearning time and linear-probe recovery.

Class-wise unlearning can hide a class instead of removing it: the head stops predicting it
while the features still separate it. Two checks, each run on a *copy* of the model:

* :func:`relearning_time` -- fine-tune on a handful of forgotten training samples and count the
  steps until forgotten-class test accuracy is back at half of the original model's. A model that
  truly never saw the class (the retrained one) needs a number of steps too: compare with it.
* :func:`linear_probe_accuracy` -- freeze the model up to its penultimate layer, fit a linear
  classifier on its features of remaining *and* forgotten training data, and report its
  forgotten-class test accuracy. Features that still encode the class give a high number.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics.functional.recovery import (
    class_mean_accuracy,
    select_per_class,
    steps_to_reach,
)
from unsc_lightning.nullspace.context import eval_mode

#: the fixed fine-tuning recipe of :func:`relearning_time`
RELEARN_LR = 0.01
RELEARN_MOMENTUM = 0.9
RELEARN_MAX_STEPS = 100
#: attribute names of the classification head in torchvision / timm style models
HEAD_ATTRIBUTES = ("fc", "head", "classifier")


@dataclass
class RelearningResult:
    """What :func:`relearning_time` measured."""

    #: steps until the forgotten-class test accuracy reached ``target``; ``None``: not within
    #: ``max_steps``
    steps: int | None
    #: the accuracy that counts as relearned (``fraction`` of the original's)
    target: float
    #: forgotten-class test accuracy before fine-tuning and after each step
    accuracies: list[float] = field(default_factory=list)


def _batched_logits(model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    return torch.cat([model(chunk) for chunk in inputs.split(batch_size)])


def relearning_time(
    model: nn.Module,
    train_inputs: Tensor,
    train_targets: Tensor,
    test_inputs: Tensor,
    test_targets: Tensor,
    forget_classes: Sequence[int],
    original_accuracy: float,
    *,
    samples_per_class: int = 10,
    retain_per_class: int | None = None,
    fraction: float = 0.5,
    lr: float = RELEARN_LR,
    max_steps: int = RELEARN_MAX_STEPS,
    seed: int = 0,
) -> RelearningResult:
    """Steps of fine-tuning until the forgotten classes come back (on a copy of ``model``).

    The fixed recipe: ``samples_per_class`` forgotten training samples of each forgotten class
    (drawn with ``seed``) plus ``retain_per_class`` samples of every other class present in
    ``train_targets`` (default: as many as forgotten ones, so fine-tuning must *separate* the
    class again instead of predicting it everywhere; ``0`` fine-tunes on forgotten samples only),
    all in one full batch per step; cross-entropy on the true labels; plain SGD with
    ``lr=0.01``, momentum 0.9, no weight decay, every parameter trainable; the copy stays in
    eval mode (normalisation statistics and dropout fixed), so the count depends on the weights
    only. After each step the forgotten-class test accuracy (mean over ``forget_classes``) is
    measured; the result is the first step at which it reaches ``fraction`` of
    ``original_accuracy`` (the original model's forgotten-class test accuracy).

    Args:
        model: the model to probe (unlearned, retrained or original); not modified.
        train_inputs: training inputs to draw fine-tuning samples from (remaining and forgotten).
        train_targets: their labels.
        test_inputs: held-out inputs of the forgotten classes (others are ignored).
        test_targets: their labels.
        forget_classes: the forgotten classes.
        original_accuracy: the original model's forgotten-class test accuracy in ``[0, 1]``.
        samples_per_class: forgotten training samples per forgotten class (k).
        retain_per_class: training samples per remaining class; ``None``: ``samples_per_class``.
        fraction: share of ``original_accuracy`` that counts as relearned.
        lr: SGD learning rate.
        max_steps: steps before giving up (``steps=None``).
        seed: seed of the sample draw.

    Returns:
        A :class:`RelearningResult`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x, y = torch.randn(60, 4) + torch.arange(3).repeat(20)[:, None], torch.arange(3).repeat(20)
        >>> result = relearning_time(nn.Linear(4, 3), x, y, x, y, [2], original_accuracy=0.8)
        >>> result.target
        0.4
    """
    forget = sorted({int(k) for k in forget_classes})
    if not forget:
        raise UnlearningConfigError(
            f"Expected `forget_classes` to name at least one class, got {forget_classes!r}."
        )
    if not 0.0 <= original_accuracy <= 1.0:
        raise UnlearningConfigError(
            f"Expected `original_accuracy` in [0, 1], got {original_accuracy!r}."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise UnlearningConfigError(f"Expected `max_steps` >= 1 (an integer), got {max_steps!r}.")
    retain_k = samples_per_class if retain_per_class is None else retain_per_class
    others = sorted({int(k) for k in train_targets.unique().tolist()} - set(forget))
    index = torch.cat(
        [
            select_per_class(train_targets, forget, samples_per_class, seed),
            select_per_class(train_targets, others, retain_k, seed + 1),
        ]
    )
    if not bool(torch.isin(train_targets.cpu()[index], torch.tensor(forget)).any()):
        raise RuntimeError(
            f"`train_targets` hold no sample of the forgotten classes {forget}: nothing to relearn."
        )
    device = next(iter(model.parameters())).device
    inputs, targets = train_inputs[index].to(device), train_targets[index].to(device)
    keep = torch.isin(test_targets, torch.tensor(forget, device=test_targets.device))
    test_x, test_y = test_inputs[keep].to(device), test_targets[keep].to(device)
    target = fraction * original_accuracy

    student = copy.deepcopy(model).eval().requires_grad_(True)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=RELEARN_MOMENTUM)

    def forgotten_accuracy() -> float:
        with torch.no_grad():
            return class_mean_accuracy(_batched_logits(student, test_x), test_y, forget)

    accuracies = [forgotten_accuracy()]
    while accuracies[-1] < target and len(accuracies) <= max_steps:
        optimizer.zero_grad()
        F.cross_entropy(student(inputs), targets).backward()
        optimizer.step()
        accuracies.append(forgotten_accuracy())
    return RelearningResult(steps_to_reach(accuracies, target), target, accuracies)


def find_feature_layer(model: nn.Module) -> str:
    """Name of the classification layer whose *input* is the model's penultimate representation.

    Found for an ``nn.Sequential`` (its last child with parameters) and for models with a
    torchvision / timm style ``fc``, ``head`` or ``classifier`` attribute; a container found that
    way is searched again the same way (e.g. ``classifier.2`` of a two-layer MLP head keeps the
    hidden layer in the frozen part).

    Raises:
        UnlearningConfigError: when no such layer is found; pass ``feature_layer=`` then.
    """
    names = {module: name for name, module in model.named_modules()}
    current = model
    while True:
        child = _head_of(current)
        if child is None:
            break
        current = child
    if current is model:
        raise UnlearningConfigError(
            f"Cannot find the classification head of {type(model).__name__}: it is neither an "
            f"`nn.Sequential` nor has one of the attributes {list(HEAD_ATTRIBUTES)}. Pass "
            "`feature_layer=` naming (as in `named_modules()`) the final layer whose input is "
            "the penultimate representation, e.g. `feature_layer='head.proj'`."
        )
    return names[current]


def _head_of(module: nn.Module) -> nn.Module | None:
    """The next module down towards the classification layer, or ``None`` at a leaf."""
    if isinstance(module, nn.Sequential):
        with_parameters = [c for c in module.children() if any(True for _ in c.parameters())]
        return with_parameters[-1] if with_parameters else None
    for attribute in HEAD_ATTRIBUTES:
        child = getattr(module, attribute, None)
        if isinstance(child, nn.Module) and any(True for _ in child.parameters()):
            return child
    return None


@torch.no_grad()
def extract_features(
    model: nn.Module, inputs: Tensor, feature_layer: str | None = None, batch_size: int = 1024
) -> Tensor:
    """The input of ``feature_layer`` (flattened per sample) for every row of ``inputs``.

    ``feature_layer=None`` finds it with :func:`find_feature_layer`. The model runs in eval mode
    without gradients; its mode is restored afterwards.
    """
    name = find_feature_layer(model) if feature_layer is None else feature_layer
    layers = dict(model.named_modules())
    if name not in layers:
        raise UnlearningConfigError(
            f"Expected `feature_layer` to name a module of {type(model).__name__} (as in "
            f"`named_modules()`), got {name!r}."
        )
    captured: list[Tensor] = []
    handle = layers[name].register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().flatten(1).cpu())
    )
    device = next(iter(model.parameters())).device
    try:
        with eval_mode(model):
            for chunk in inputs.split(batch_size):
                model(chunk.to(device))
    finally:
        handle.remove()
    return torch.cat(captured)


@dataclass
class ProbeResult:
    """What :func:`linear_probe_accuracy` measured."""

    #: forgotten-class test accuracy of the probe (mean over forgotten classes)
    forget_acc: float
    #: remaining-class test accuracy of the probe (mean over the other classes)
    retain_acc: float
    #: the layer whose input was probed
    feature_layer: str


def linear_probe_accuracy(
    model: nn.Module,
    train_inputs: Tensor,
    train_targets: Tensor,
    test_inputs: Tensor,
    test_targets: Tensor,
    forget_classes: Sequence[int],
    *,
    feature_layer: str | None = None,
    max_iter: int = 1000,
) -> ProbeResult:
    """Forgotten-class accuracy of a linear probe on the model's frozen penultimate features.

    The probe: scikit-learn ``LogisticRegression`` (multinomial, L-BFGS, ``C=1``, ``max_iter``
    iterations) on standardised features (mean and scale of the training features) of
    ``train_inputs`` -- remaining *and* forgotten training data with their true labels; the
    model itself is not trained. High forgotten-class accuracy means the features still
    separate the forgotten classes.

    Args:
        model: the model to probe; not modified.
        train_inputs: probe training inputs (remaining and forgotten classes).
        train_targets: their labels.
        test_inputs: held-out inputs.
        test_targets: their labels.
        forget_classes: the forgotten classes.
        feature_layer: the final layer whose input is probed (``named_modules()`` name);
            ``None``: :func:`find_feature_layer`.
        max_iter: L-BFGS iterations of the probe.

    Returns:
        A :class:`ProbeResult`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    name = find_feature_layer(model) if feature_layer is None else feature_layer
    forget = sorted({int(k) for k in forget_classes})
    train_features = extract_features(model, train_inputs, name).double().numpy()
    test_features = extract_features(model, test_inputs, name).double().numpy()
    train_y = train_targets.cpu().numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(train_features, train_y)
    predictions = torch.as_tensor(probe.predict(test_features))
    test_y = test_targets.cpu()
    one_hot = F.one_hot(predictions.long(), int(max(test_y.max(), predictions.max())) + 1)
    others = sorted(set(np.unique(test_y.numpy()).tolist()) - set(forget))
    return ProbeResult(
        forget_acc=class_mean_accuracy(one_hot.double(), test_y, forget),
        retain_acc=class_mean_accuracy(one_hot.double(), test_y, others),
        feature_layer=name,
    )
