"""Peak memory (MB) of a process that runs one forward pass of a tiny model: `python tests/padded_memory.py LENGTH
MODE`, MODE alone (a LENGTH-token prompt) or padded (that prompt batched with a left-padded 5-token one). Run in a
fresh process per mode by tests/test_reliability.py."""

import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from tiny import PAD, qwenvl_model  # noqa: E402


def main(length, mode):
    model = qwenvl_model("2.5")
    generator = torch.Generator().manual_seed(0)
    long = torch.randint(3, 299, (1, length), generator=generator)
    short = torch.randint(3, 299, (1, 5), generator=generator)
    ids, mask = long, torch.ones_like(long)
    if mode == "padded":
        ids = torch.cat([long, torch.cat([torch.full((1, length - 5), PAD), short], 1)])
        mask = torch.cat([mask, (ids[1:] != PAD).long()])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    print(peak_mb())


def peak_mb():
    """This process's peak resident memory. Not ru_maxrss: Linux keeps the parent's peak there across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
