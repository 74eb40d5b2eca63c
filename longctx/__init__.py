"""longctx: train LLaMA-style models at very long context."""
