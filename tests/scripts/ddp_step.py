"""One optimizer step of a tiny model with token selection, on 1 process (a batch of 8) or 2 DDP processes (4 each),
for tests/test_loss_scale.py. Usage: ddp_step.py OUT.pt DEVICES NORMALIZATION [select | dft | otr+weights]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tests.test_loss_scale import one_step  # noqa: E402

if __name__ == "__main__":
    out, devices, normalization = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    case = sys.argv[4] if len(sys.argv) > 4 else "select"
    method = {"select": None, "dft": "dft", "otr+weights": "otr"}[case]
    params = one_step(devices=devices, normalization=normalization, strategy="ddp" if devices > 1 else "auto",
                      method=method, weighted=case.endswith("weights"))
    if params is not None:
        torch.save(params, out)
