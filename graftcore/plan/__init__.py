"""The plan layer: every input matched under Instruct's names, and what each output tensor is (a Plan of
TensorOps per output shard), decided before any output byte is written and without torch.

Modules: `ops` (what a plan is), `build` (matching policies -> Plan), `names` (an input's names in Instruct's),
`layouts` (MoE expert layouts), `projections` (`--targets projections`), `inputs` (REFs -> Checkpoints),
`report` (Report, Progress, VerifyReport). Adapters are planned by the `graftcore.lora` package.

Example:
    >>> from graftcore.plan import Action
    >>> Action.GRAFT.value
    'graft'
"""

from graftcore.lazy import lazy_attributes

# loaded on first use, so that importing one module of the layer (plan.names, say) loads no other
_LAZY = {
    "Action": "plan.ops",
    "Term": "plan.ops",
    "TensorOp": "plan.ops",
    "Ignored": "plan.ops",
    "DeltaInput": "plan.ops",
    "OutShard": "plan.ops",
    "Plan": "plan.ops",
    "tuned_role": "plan.ops",
    "plan_entries": "plan.ops",
    "entries_digest": "plan.ops",
    "headers_entries": "plan.ops",
    "MatchedInputs": "plan.build",
    "match_inputs": "plan.build",
    "build_plan": "plan.build",
    "swapped_hint": "plan.build",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = sorted(_LAZY)
