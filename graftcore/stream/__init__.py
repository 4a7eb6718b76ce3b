"""The one streaming pass every command shares: `steps` (how each TensorOp is cut into steps and the input bytes
each reads), `readers` (the input streamer: ordered, bounded, concurrent reads), `driver` (`run_pass`: downloads,
the streamer, progress, a StepConsumer does the rest), `codec_steps` (quantized inputs decoded and outputs encoded
through their codecs), `compute_step` (one step's math, shared by the merge and verify --recompute).
"""
