"""sslab: a command-line lab for self-supervised learning ablation studies on images."""

__version__ = "0.1.0"
