"""The nas task suite."""
