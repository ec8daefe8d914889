"""The tiny prepared dataset of the training tests (built once per test module, a few seconds); it lives in
the package so that `python -m megakv.testing.gpu_check` can build the same one on a GPU node."""

from megakv.testing.tiny_data import prepare_tiny_dataset, synthetic_text

__all__ = ["prepare_tiny_dataset", "synthetic_text"]
