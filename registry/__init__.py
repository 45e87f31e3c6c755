"""Built-in mask strategies, one module each; each registers itself with :func:`mthlib.masking.register_mask`."""
