import os

# Triton's interpreter runs the fused capture kernels (workers/attention_kernels.py) on CPU tensors; it is chosen when
# the kernels are defined, so it must be set before anything imports them.
os.environ["TRITON_INTERPRET"] = "1"

# Shared fixtures live in plugin modules, one per concern, so each can change on its own.
pytest_plugins = ["tests.plugins.s3", "tests.plugins.tiny_sd", "tests.plugins.tiny_mmdit", "tests.plugins.local_ray"]
