"""Peak anonymous memory of a merge stays a few chunks above the baseline, whatever the tensor size."""

import subprocess
import sys

import torch
from helpers import write_checkpoint

PROBE = r"""
import sys, threading, time
import graftcore, graftcore.api, graftcore.merge.engine  # torch and the engine loaded before the baseline

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
peak = [0]; stop = [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], rss_anon()); time.sleep(0.001)
base, tuned, instruct, out = sys.argv[1:5]
baseline = rss_anon()
thread = threading.Thread(target=sample); thread.start()
graftcore.graft(base=base, tuned=tuned, instruct=instruct, output=out, quiet=True)
stop[0] = True; thread.join()
print(peak[0] - baseline)
"""


def test_peak_rss_anon_is_bounded_for_a_64mb_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = (8192, 4096)  # 64 MiB in bfloat16
    paths = []
    for role in ("base", "tuned", "instruct"):
        sd = {
            "model.embed_tokens.weight": (torch.randn(big, generator=g) * 0.02).bfloat16(),
            "model.norm.weight": torch.ones(4096, dtype=torch.bfloat16),
        }
        paths.append(write_checkpoint(tmp_path / role, sd))
        del sd
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, paths), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    grew = int(run.stdout.strip())
    assert grew < 64 * 2**20, f"RssAnon grew by {grew / 2**20:.1f} MiB during the merge"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 64 * 2**20
