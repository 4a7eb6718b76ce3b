"""What users run without graftcore: PEFT loads the adapter onto Instruct, merges, and saves.

python bench/peft_merge.py INSTRUCT ADAPTER OUT
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(instruct: str, adapter: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
