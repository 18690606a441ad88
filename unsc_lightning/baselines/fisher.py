"""Fisher forgetting (Golatkar, Achille, Soatto, CVPR 2020): noise shaped by the remaining data's Fisher.

The diagonal Fisher information of the model's predictive distribution on remaining data says
how much each weight matters for what remains. Fisher forgetting adds Gaussian noise with
variance ``alpha / F`` (clipped): weights that the remaining data do not pin down are scrambled,
which destroys what they encoded about the forgotten data; weights that the remaining data need
barely move. It takes no gradient step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from unsc_lightning.arguments import flag, integer, number
from unsc_lightning.baselines.base import BaselineModule
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics import find_feature_layer
from unsc_lightning.nullspace.context import eval_mode

#: Variance (before ``alpha``) given to the head rows of forgotten classes when they are reset
#: (the authors' code: mean 0, variance 1e-4).
FORGET_HEAD_VARIANCE = 1e-4


def fisher_diagonal(model: nn.Module, inputs: Tensor, chunk_size: int = 32) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``model``'s predictive distribution, summed over ``inputs``.

    ``F_i = Σ_x Σ_y p(y|x) (∂ log p(y|x) / ∂θ_i)²`` — the expectation over the model's own
    predictions, not the empirical Fisher of the labels (Golatkar et al. 2020, Eq. 8). Per-example
    Jacobians of the log-probabilities come from :func:`torch.func.vmap` over
    :func:`torch.func.jacrev`, ``chunk_size`` examples at a time (memory: ``chunk_size ×
    classes × parameters`` floats). Run the model in eval mode (normalisation layers then use
    their running statistics, as one example at a time requires).

    Args:
        model: classifier returning logits of shape ``(batch, classes)``.
        inputs: a batch of inputs.
        chunk_size: examples per vectorised Jacobian.

    Returns:
        ``{parameter name: tensor of the parameter's shape}`` for every parameter that requires
        grad, summed (not averaged) over ``inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> fisher = fisher_diagonal(nn.Linear(3, 2), torch.randn(5, 3))
        >>> sorted(fisher), tuple(fisher["weight"].shape)
        (['bias', 'weight'], (2, 3))
    """
    integer("chunk_size", chunk_size, 1)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def log_probs(weights: dict[str, Tensor], x: Tensor) -> Tensor:
        logits = functional_call(model, ({**weights, **frozen}, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1).squeeze(0)

    per_example_jacobian = vmap(jacrev(log_probs), in_dims=(None, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for chunk in inputs.split(chunk_size):
        with torch.no_grad():
            probs = torch.softmax(model(chunk), dim=-1)  # (batch, classes)
        jacobians = per_example_jacobian(params, chunk)  # name -> (batch, classes, *shape)
        for name, jacobian in jacobians.items():
            weights = probs.reshape(*probs.shape, *([1] * (jacobian.ndim - 2)))
            fisher[name] += (weights * jacobian.detach().square()).sum(dim=(0, 1))
    return fisher


def fisher_noise_variance(
    fisher: Tensor, alpha: float, max_variance: float, min_fisher: float = 1e-8
) -> Tensor:
    """``alpha · min(1 / (F + min_fisher), max_variance)``: the noise variance of each weight."""
    return alpha * (1.0 / (fisher + min_fisher)).clamp(max=max_variance)


class FisherForgetting(BaselineModule):
    """Fisher forgetting: ``θ ← θ + sqrt(α · clip(F_r⁻¹)) ⊙ ε``, ``ε ~ N(0, I)``.

    ``F_r`` is the diagonal Fisher of the model's predictive distribution on remaining data
    (:func:`fisher_diagonal`), averaged over the samples seen; ``F_r⁻¹`` is clipped at
    ``max_variance`` so that weights the remaining data never use get bounded noise. The module
    trains on the remaining split (``train_on = "retain"``, one epoch, manual optimisation: no
    optimizer step): ``training_step`` accumulates the Fisher, the end of training adds the
    noise once. With ``reset_forget_head`` and class-wise forgetting, the classification
    layer's rows of the forgotten classes are drawn around zero (variance
    ``alpha · 1e-4``) as in the authors' class-forgetting code; that code also averages the
    variance over each weight row and scales the head's and normalisation layers' variance by
    10, which this module does not do (one per-weight rule).

    Args:
        model: trained classifier; changed in place.
        num_classes: number of classes.
        forget_classes: forgotten classes (``None``/``[]``: sample forgetting, no head reset).
        alpha: noise scale ``α`` (the method's one knob: more forgets more and costs accuracy).
        max_variance: clip of ``1 / F`` per weight.
        max_samples: remaining samples the Fisher is estimated on (``None``: one full epoch).
        reset_forget_head: reset the forgotten classes' head rows (class-wise forgetting).
        head_layer: name (as in ``named_modules()``) of the classification layer; ``None``:
            found as :func:`~unsc_lightning.metrics.find_feature_layer` finds it.
        chunk_size: examples per vectorised Jacobian in :func:`fisher_diagonal`.
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule` (``lr`` is unused: the
            method takes no gradient step).

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> FisherForgetting(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).hparams.alpha
        1e-06
    """

    train_on = "retain"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        alpha: float = 1e-6,
        max_variance: float = 1e3,
        max_samples: int | None = None,
        reset_forget_head: bool = True,
        head_layer: str | None = None,
        chunk_size: int = 32,
        **kwargs: Any,
    ) -> None:
        number("alpha", alpha, 0.0)
        number("max_variance", max_variance, 0.0)
        if max_samples is not None:
            integer("max_samples", max_samples, 1)
        integer("chunk_size", chunk_size, 1)
        flag("reset_forget_head", reset_forget_head)
        if head_layer is not None and not isinstance(head_layer, str):
            raise UnlearningConfigError(
                f"Expected `head_layer` to be a module name or None, got {head_layer!r}."
            )
        super().__init__(model, num_classes, forget_classes, **kwargs)
        self.save_hyperparameters(
            "alpha", "max_variance", "max_samples", "reset_forget_head", "head_layer", "chunk_size"
        )
        self.automatic_optimization = False
        self.alpha, self.max_variance = float(alpha), float(max_variance)
        self.max_samples, self.chunk_size = max_samples, chunk_size
        self.reset_forget_head, self.head_layer = reset_forget_head, head_layer
        self.fisher: dict[str, Tensor] = {}
        self.fisher_samples = 0
        self._noised = False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.reset_forget_head and self.forget_classes:
            self._head()  # a missing head fails before the Fisher pass, not after

    def on_train_start(self) -> None:
        self.fisher, self.fisher_samples, self._noised = {}, 0, False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        inputs = batch[0]
        if self.max_samples is not None:
            inputs = inputs[: max(0, self.max_samples - self.fisher_samples)]
        if len(inputs) == 0:
            return None
        with eval_mode(self.model):
            contribution = fisher_diagonal(self.model, inputs, self.chunk_size)
        for name, value in contribution.items():
            self.fisher[name] = self.fisher.get(name, 0) + value
        self.fisher_samples += len(inputs)
        return None

    def on_train_end(self) -> None:
        if self._noised or not self.fisher:
            return
        # one Fisher over every process's share of the remaining data
        count = float(
            self.trainer.strategy.reduce(torch.tensor(float(self.fisher_samples)), reduce_op="sum")
        )
        with torch.no_grad():
            for name, parameter in self._trainable():
                total = self.trainer.strategy.reduce(self.fisher[name], reduce_op="sum")
                variance = fisher_noise_variance(total / count, self.alpha, self.max_variance)
                parameter.add_(variance.sqrt() * self._noise(parameter))
            if self.reset_forget_head and self.forget_classes:
                self._reset_head()
        self._noised = True

    # -- helpers ---------------------------------------------------------------------------------
    def _trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _noise(self, like: Tensor) -> Tensor:
        # drawn on the CPU generator of the module's seed: the same noise on every device
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def _head(self) -> nn.Module:
        name = self.head_layer or find_feature_layer(self.model)
        modules = dict(self.model.named_modules())
        if name not in modules:
            raise UnlearningConfigError(
                f"Expected `head_layer` to name a module of the model, got {name!r}; "
                f"e.g. {list(modules)[-3:]}."
            )
        head = modules[name]
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.shape[0] != self.num_classes:
            raise UnlearningConfigError(
                f"`head_layer={name!r}` has no weight with `num_classes={self.num_classes}` rows; "
                "pass the classification layer's name, or `reset_forget_head=False`."
            )
        return head

    def _reset_head(self) -> None:
        head = self._head()
        for parameter in (getattr(head, "weight", None), getattr(head, "bias", None)):
            if not isinstance(parameter, Tensor):
                continue
            rows = torch.tensor(self.forget_classes, device=parameter.device)
            # mean 0: the forgotten classes' logits no longer carry what the original learnt
            noise = self._noise(parameter[rows])
            parameter[rows] = (self.alpha * FORGET_HEAD_VARIANCE) ** 0.5 * noise
