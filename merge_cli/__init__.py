"""merge-cli: fuse neural-network checkpoints from YAML recipes."""

__version__ = "0.1.0"
