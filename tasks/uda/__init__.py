"""The uda task suite."""
