"""mthlib: train a tiny subnetwork of a causal LM with GRPO, chosen by a pluggable mask strategy."""

__version__ = "0.1.0"
