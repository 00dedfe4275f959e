"""LightningModules: how each model family is trained."""

from ptlab.modules.full_batch_gd import FullBatchGD, logistic_loss, sign_accuracy

__all__ = ["FullBatchGD", "logistic_loss", "sign_accuracy"]
