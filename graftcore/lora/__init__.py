"""PEFT adapters planned as low-rank updates: `adapter` (the adapter's config and which module each factor pair
adapts), `params` (LoRA on parameters: experts and routers), `update` (a term's `left @ right` over Instruct's
rows, DoRA's norm pass). Part of the plan layer: torch-free at import.

Example:
    >>> from graftcore.lora.adapter import is_adapter
    >>> is_adapter("no/such/folder")
    False
"""
