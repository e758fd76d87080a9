"""What the task suites share: backbones from a norm name, data helpers, results writing."""
