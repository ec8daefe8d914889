"""Parallelism applied from outside the model: layout, process groups, and how the model is wrapped."""

from megakv.parallel.context import ParallelContext, init_parallel, shutdown_parallel
from megakv.parallel.layout import ParallelLayout

__all__ = ["ParallelContext", "ParallelLayout", "init_parallel", "shutdown_parallel"]
