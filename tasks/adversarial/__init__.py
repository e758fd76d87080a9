"""The adversarial task suite."""
