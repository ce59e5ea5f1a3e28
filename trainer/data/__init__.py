"""Raw text in Parquet → tokens on the fly → packed, mixed, sharded batches with a small, rescalable state."""
