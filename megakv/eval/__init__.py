"""Evaluation of a model at several KV retention plans: loss / perplexity, table, JSON and plot."""
