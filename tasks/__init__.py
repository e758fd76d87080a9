"""The five BGN task suites. They import ``bgn_lightning``; never the reverse."""
