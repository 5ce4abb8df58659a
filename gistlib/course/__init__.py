"""The experiment: the config, the runner for every tier, the report, plots, widgets and the tour."""
