"""What users ask of a pair or an output: similarity and verify (with --recompute)."""
