"""mergelit: model merging for GPT-2 GLUE classifiers, as PyTorch Lightning modules."""

__version__ = "0.1.0"
