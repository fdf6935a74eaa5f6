"""Image data: decoding, packing into Parquet shards, reading shards, and the subset rules. No stage logic."""
