import os

# Triton's interpreter runs the fused capture kernels (workers/attention_kernels.py) on CPU tensors; it is chosen when
# the kernels are defined, so it must be set before anything imports them.
os.environ["TRITON_INTERPRET"] = "1"

# Ray starts its workers (the shard actors) at niceness 15: on a machine shared with other jobs they then get a few
# percent of a core, and a 10 s test took past 400 s at a load average of 5 (37 s at niceness 0). Every Ray the tests
# start, in this process or in a CLI subprocess (which inherits the environment), runs its workers at normal priority.
os.environ["RAY_worker_niceness"] = "0"

# Shared fixtures live in plugin modules, one per concern, so each can change on its own.
pytest_plugins = ["tests.plugins.s3", "tests.plugins.tiny_sd", "tests.plugins.tiny_mmdit", "tests.plugins.local_ray"]
