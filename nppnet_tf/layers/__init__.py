"""Keras layers of NPPNet: ops, mixed ops, cells, interactions, fusion
cells, heads and architecture parameters (see docs/model.md)."""
