"""The GPU side: the shard actor, model loading, attention capture, the SeeDiff algorithm, encoding, shard writing."""
