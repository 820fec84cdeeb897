"""bpfree: a reference suite for decoupled and backprop-free learning rules."""

__version__ = "0.1.0"
