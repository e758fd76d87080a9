"""Default LightningCLI configs, one per task (shipped as package data)."""
