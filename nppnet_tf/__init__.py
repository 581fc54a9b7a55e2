"""NPPNet-TF library: layers, models, genotypes, data, losses, metrics.

Knows nothing of Beam, MLflow or the command line.
"""

__version__ = "0.1.0"
