"""The fsl task suite."""
