"""NPPNet models: the derived network, the two search supernets and their
parameter/multiply-add summary (see docs/model.md)."""
