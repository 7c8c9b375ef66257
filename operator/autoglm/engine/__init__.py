"""The generation engine: continuous batching, a bounded KV cache and sampling (no Triton)."""
