"""The classification task suite."""
