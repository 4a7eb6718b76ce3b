"""Files on disk: safetensors headers and shard writing, input files, the output folder, JSON."""
