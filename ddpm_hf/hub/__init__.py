"""The Hugging Face Hub: id checks, offline mode, model cards and uploads."""
