"""megakv: pre-training recipe for transformers whose KV cache can be shared across depth (R-CLA)."""

__version__ = "0.1.0"
