"""USCL losses, one per module: NT-Xent (contrastive) and the semi-supervised cross-entropy."""
from ultrasound.losses.ntxent import NTXentLoss
from ultrasound.losses.semisup_ce import SemiSupervisedCE

__all__ = ["NTXentLoss", "SemiSupervisedCE"]
