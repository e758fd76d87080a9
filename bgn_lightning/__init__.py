"""Batch Group Normalization for PyTorch Lightning."""
