"""Interchange with Hugging Face transformers (Llama, Mistral, Qwen2, Qwen3)."""
