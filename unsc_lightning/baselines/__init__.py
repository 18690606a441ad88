"""Unlearning baselines that share UNSC's data module and metrics, for comparison.

=====================  =======================================================  ==============
name                   method                                                   trains on
=====================  =======================================================  ==============
``retrain``            :class:`RetrainFromScratch` (the reference)              remaining
``ft``                 :class:`FineTune`                                        remaining
``l1_sparse``          :class:`L1Sparse` (Jia et al., NeurIPS 2023)             remaining
``rl``                 :class:`RandomLabels`                                    forget
``ga``                 :class:`GradientAscent`                                  forget
``boundary_shrink``    :class:`BoundaryShrink` (Chen et al., CVPR 2023)         forget
``salun``              :class:`SalUn` (Fan et al., ICLR 2024)                   forget + remaining
``scrub``              :class:`SCRUB` (Kurmanji et al., NeurIPS 2023)           forget + remaining
``fisher``             :class:`FisherForgetting` (Golatkar et al., CVPR 2020)   remaining (no step)
``unsc_random_labels`` :func:`unsc_random_labels` (UNSC ablation)               forget
``unsc_no_nullspace``  :func:`unsc_no_nullspace` (UNSC ablation)                forget
=====================  =======================================================  ==============

Their tuned settings on the embedded data and the runner of ``unsc-lightning bench`` are
experiment code: :mod:`unsc_lightning.lab.recipes` and :mod:`unsc_lightning.lab.runs`.
"""

from unsc_lightning.baselines.ablations import unsc_no_nullspace, unsc_random_labels
from unsc_lightning.baselines.base import BaselineModule
from unsc_lightning.baselines.boundary_shrink import BoundaryShrink
from unsc_lightning.baselines.finetune import FineTune, L1Sparse
from unsc_lightning.baselines.fisher import (
    FisherForgetting,
    fisher_diagonal,
    fisher_noise_variance,
)
from unsc_lightning.baselines.gradient_ascent import GradientAscent
from unsc_lightning.baselines.random_labels import RandomLabels, SalUn, saliency_masks
from unsc_lightning.baselines.retrain import RetrainFromScratch
from unsc_lightning.baselines.scrub import SCRUB, distillation_kl
from unsc_lightning.baselines.stopping import StopAtHeldOutAccuracy, loader_accuracy

__all__ = [
    "SCRUB",
    "BaselineModule",
    "BoundaryShrink",
    "FineTune",
    "FisherForgetting",
    "GradientAscent",
    "L1Sparse",
    "RandomLabels",
    "RetrainFromScratch",
    "SalUn",
    "StopAtHeldOutAccuracy",
    "distillation_kl",
    "fisher_diagonal",
    "fisher_noise_variance",
    "loader_accuracy",
    "saliency_masks",
    "unsc_no_nullspace",
    "unsc_random_labels",
]
