"""The output loads in transformers as is, and its logits equal those of a model built from the reference weights."""

import torch
from helpers import reference, tiny_llama_config, write_checkpoint
from transformers import AutoModelForCausalLM, LlamaForCausalLM


def test_output_loads_and_logits_match_reference(tmp_path, cli):
    config = tiny_llama_config(vocab_size=128, intermediate_size=64, attention_bias=False)
    torch.manual_seed(0)
    base = {k: v.bfloat16() for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = {k: (v.float() + 3e-3 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    instruct = {k: (v.float() + 3e-3 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "tuned", tuned, 2)
    instruct_dir = write_checkpoint(tmp_path / "instruct", instruct, 3)
    config.dtype = "bfloat16"
    config.save_pretrained(instruct_dir)
    code, _, err = cli(
        "merge",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--instruct",
        instruct_dir,
        "--output",
        tmp_path / "out",
        "--quiet",
    )
    assert code == 0, err

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    want_sd = {k: reference(instruct[k], tuned[k], base[k]) for k in instruct}
    for k, v in merged.state_dict().items():
        assert torch.equal(v, want_sd[k]), k
    # built the same way (from_pretrained), then given the reference weights
    expected = AutoModelForCausalLM.from_pretrained(instruct_dir, dtype=torch.bfloat16).eval()
    expected.load_state_dict(want_sd)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    unmerged = AutoModelForCausalLM.from_pretrained(instruct_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        got, want, before = merged(ids).logits, expected(ids).logits, unmerged(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, before)
