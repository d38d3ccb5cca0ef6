# Shared fixtures live in plugin modules, one per concern, so each can change on its own.
pytest_plugins = ["tests.plugins.s3", "tests.plugins.tiny_sd"]
