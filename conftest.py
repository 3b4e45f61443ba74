"""Root conftest: the splitrl pytest plugin (options, markers, GPU skips, fixtures) lives in fixtures/."""
pytest_plugins = ["fixtures.plugin", "fixtures.gpu"]
