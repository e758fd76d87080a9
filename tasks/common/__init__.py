"""What the task suites share: the task contract, norm arguments, backbones, data, metrics, results."""
