"""Membership-inference metrics: MIA-efficacy and forget-vs-test AUROC."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from unsc_lightning.metrics.functional.mia import (
    MIA_SPLITS,
    MIAAttacker,
    MIAFeature,
    _forget_vs_test_auroc_compute,
    _mia_arg_validation,
    _mia_efficacy_compute,
    _parse_split,
    mia_features,
)


class MIAEfficacy(Metric):
    """MIA-efficacy: fraction of forget samples a membership attacker calls non-members.

    The figure used by SalUn, "model sparsity" unlearning and UNSC's released code. An attacker
    learns to tell remaining *training* samples (members, label 1) from held-out *test* samples
    (non-members, label 0) by one per-sample feature, then labels the forget samples; the score
    is the fraction labelled non-member. Higher means more forgetting; compare with the retrained
    model's value (about 1.0 for class-wise forgetting). For class-wise forgetting pass test data
    with the forgotten classes already removed.

    The SVC and threshold attackers give different numbers, so the metric carries its attacker in
    :attr:`name` (``"mia_efficacy_svc"`` / ``"mia_efficacy_threshold"``) and in its ``repr``.
    ``UnlearningModule`` logs ``val/mia_efficacy`` with the cheap threshold attacker and
    ``test/mia_efficacy`` with the SVC, the one comparable to published numbers.

    Args:
        attacker: ``"svc"``: ``sklearn.svm.SVC(C=3, gamma="auto", kernel="rbf")`` on the 1-D
            feature, with members balanced 1:1 with non-members by subsampling the larger group
            (both groups sorted, then ``torch.randperm`` with a generator seeded by ``seed``), so
            the result depends only on the values and not on batch order or the number of
            processes. Costs ``O(n^2)`` in the number of balanced samples. ``"threshold"``: the
            single threshold on the feature with the best balanced accuracy over all members and
            non-members (pure torch, sort-based; candidate thresholds lie only between distinct
            values, ties in accuracy go to the smallest threshold), deterministic likewise.
        feature: per-sample feature, see :func:`~unsc_lightning.metrics.functional.mia_features`:
            ``"confidence"`` (true-class softmax probability, the field's default), ``"entropy"``,
            ``"modified_entropy"`` or ``"loss"``.
        seed: seed of the SVC balancing subsample.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        UnlearningConfigError: if ``attacker``, ``feature`` or ``seed`` is invalid.

    The states are lists of per-sample features per split with ``dist_reduce_fx="cat"``: under
    DDP :meth:`compute` gathers every sample's feature from all processes (memory grows with the
    data set, one scalar per sample) and every process fits the same attacker. Features are stored
    in the metric's dtype (float32 unless changed with ``set_dtype``).

    Example:
        >>> import torch
        >>> metric = MIAEfficacy(attacker="threshold")
        >>> metric
        MIAEfficacy(attacker='threshold', feature='confidence', seed=0)
        >>> metric.name
        'mia_efficacy_threshold'
        >>> confident = torch.tensor([[5.0, 0.0], [6.0, 0.0]])
        >>> unsure = torch.tensor([[0.5, 0.0], [0.2, 0.0]])
        >>> labels = torch.tensor([0, 0])
        >>> metric.update(confident, labels, "retain")
        >>> metric.update(unsure, labels, "test")
        >>> metric.update(unsure, labels, split=2)  # 0 = retain, 1 = test, 2 = forget
        >>> metric.compute()
        tensor(1.)
    """

    is_differentiable = False
    # closeness to the retrained model's value is what matters, not the raw direction
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    retain_features: list[Tensor]
    test_features: list[Tensor]
    forget_features: list[Tensor]

    def __init__(
        self,
        attacker: MIAAttacker = "svc",
        feature: MIAFeature = "confidence",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _mia_arg_validation(attacker, feature, seed)
        self.attacker = attacker
        self.feature = feature
        self.seed = seed
        for split in MIA_SPLITS:
            self.add_state(f"{split}_features", default=[], dist_reduce_fx="cat")

    @property
    def name(self) -> str:
        """Name that tells the attackers apart, e.g. ``"mia_efficacy_svc"``."""
        return f"mia_efficacy_{self.attacker}"

    def update(self, logits: Tensor, targets: Tensor, split: str | int | Tensor) -> None:
        """Add a batch of logits ``(N, C)`` and labels ``(N,)`` from one split.

        Args:
            logits: model outputs on the batch.
            targets: true labels.
            split: ``"retain"`` (remaining training data, members), ``"test"`` (held-out
                non-members) or ``"forget"``; or the integer codes 0, 1, 2 respectively (also as
                a one-element integer tensor). One split per call.

        Raises:
            ValueError: if ``split`` is unknown or the shapes do not match.
        """
        name = _parse_split(split, MIA_SPLITS)
        features = mia_features(logits.detach(), targets, self.feature).to(self.dtype)
        getattr(self, f"{name}_features").append(features)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate a batch like :meth:`update` and return ``None``.

        A per-batch value does not exist: the attack needs samples of every split.
        """
        self.update(*args, **kwargs)

    def compute(self) -> Tensor:
        """Fraction of forget samples the attacker calls non-members.

        Raises:
            RuntimeError: if the retain, test or forget split received no samples.
        """
        return _mia_efficacy_compute(
            _cat(self.retain_features),
            _cat(self.test_features),
            _cat(self.forget_features),
            self.attacker,
            self.feature,
            self.seed,
        )

    def extra_repr(self) -> str:
        return f"attacker={self.attacker!r}, feature={self.feature!r}, seed={self.seed}"


class ForgetVsTestAUROC(Metric):
    """AUROC of the loss attack separating forget samples (positive) from test samples (negative).

    The attack score is the negative cross-entropy loss, so 0.5 means the forget samples are
    indistinguishable from unseen data by their loss and values above 0.5 mean they still look
    like training data. For class-wise forgetting with remaining-class test data the ideal is the
    retrained model's value, not 0.5. Computed exactly from ranks (ties count one half, as
    ``sklearn.metrics.roc_auc_score``); the result depends only on the two multisets of scores.

    The states are lists of per-sample scores with ``dist_reduce_fx="cat"``: under DDP
    :meth:`compute` gathers every sample's score from all processes.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = ForgetVsTestAUROC()
        >>> metric.update(torch.tensor([[4.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]), "forget")
        >>> metric.update(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]), "test")
        >>> metric.compute()
        tensor(0.8750)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    forget_scores: list[Tensor]
    test_scores: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("forget_scores", default=[], dist_reduce_fx="cat")
        self.add_state("test_scores", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, targets: Tensor, split: str | int | Tensor) -> None:
        """Add a batch of logits ``(N, C)`` and labels ``(N,)`` from one split.

        Args:
            logits: model outputs on the batch.
            targets: true labels.
            split: ``"forget"`` or ``"test"`` (or the codes 2 and 1 shared with
                :class:`MIAEfficacy`).

        Raises:
            ValueError: if ``split`` is unknown or the shapes do not match.
        """
        name = _parse_split(split, ("test", "forget"))
        scores = -mia_features(logits.detach(), targets, "loss").to(self.dtype)
        getattr(self, f"{name}_scores").append(scores)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate a batch like :meth:`update` and return ``None``.

        A per-batch value does not exist: the attack needs samples of every split.
        """
        self.update(*args, **kwargs)

    def compute(self) -> Tensor:
        """AUROC in ``[0, 1]``.

        Raises:
            RuntimeError: if the forget or test split received no samples.
        """
        return _forget_vs_test_auroc_compute(_cat(self.forget_scores), _cat(self.test_scores))


def _cat(values: list[Tensor] | Tensor) -> Tensor:
    """Concatenate a list state (a Tensor already after a DDP sync); empty list -> empty tensor."""
    if isinstance(values, Tensor):
        return values.flatten()
    if len(values) == 0:
        return torch.empty(0)
    return dim_zero_cat(values).flatten()
