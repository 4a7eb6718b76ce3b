"""The merge: `engine` (the pass's consumer that computes each step into pooled buffers), `writer` (the writer
thread and the buffers it drains), `job` (a Plan run into an output folder: claim, resume, finish), `distributed`
(torchrun, a process group or `--workers K`).
"""
