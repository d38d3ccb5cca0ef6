"""The driver side: CLI, planning, dispatch over Ray, resume, index, readers and review."""
