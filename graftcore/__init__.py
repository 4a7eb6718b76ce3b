"""graftcore: graft a fine-tune of a Base model onto its Instruct model, tensor by tensor, streaming."""

__version__ = "0.1.0"
