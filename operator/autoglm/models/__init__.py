"""Model code: shared layers, one module per architecture, checkpoint import."""
