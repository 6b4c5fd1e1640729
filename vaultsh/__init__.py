"""vaultsh: collect, store and inspect transformer activations."""

__version__ = "0.1.0"
