"""Merge methods. Each is a ``MergeMethod`` subclass picked by ``class_path`` in a config;
these explicit imports are the whole catalogue (no registry)."""

from mergelit.methods.base import MergeMethod
from mergelit.methods.ensemble import SimpleEnsemble
from mergelit.methods.fisher import FisherMerging
from mergelit.methods.individual import Individual
from mergelit.methods.pretrained import Pretrained
from mergelit.methods.regmean import RegMean
from mergelit.methods.simple_average import SimpleAverage
from mergelit.methods.task_arithmetic import TaskArithmetic
from mergelit.methods.ties import TiesMerging

__all__ = [
    "FisherMerging",
    "Individual",
    "MergeMethod",
    "Pretrained",
    "RegMean",
    "SimpleAverage",
    "SimpleEnsemble",
    "TaskArithmetic",
    "TiesMerging",
]
