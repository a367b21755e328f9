"""The control plane: accounts, grants, datasets, certificates and the audit log."""
