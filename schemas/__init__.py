"""What the data looks like: manifest, run config, records. No torch, no I/O beyond parsing."""
