"""Plain-PyTorch references: the specification of every variant, runnable on any device."""
