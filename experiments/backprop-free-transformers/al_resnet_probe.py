"""Why AL on ResNet-20 predicted a constant (issue 12), on 5,000 cifar10_jpeg training images: test accuracy
(1,000 test images), local losses and the spread of AL's targets across the 10 classes (std over classes of
g_i(...g_1(onehot)), mean over units) every 50 steps, for one way of applying the L2 1e-4 of §5.2.

    PYTHONPATH=. python experiments/backprop-free-transformers/al_resnet_probe.py WD STEPS INIT SCOPE
      WD     L2 coefficient (1e-4 for the ResNets)
      INIT   model init: default (the committed 1-epoch runs) or he_normal (the authors')
      SCOPE  all = Adam weight_decay on every parameter (the old config);
             f   = Adam weight_decay on the f side and bridges only (the authors' scope; method.l2 does
                   the same with an explicit penalty on their kernels)
Measured (batch 32, Adam 1e-3, bridge_pool 4): `1e-4 300 default all` stays at 0.095-0.104 with the
spread of t_3, t_4 falling to 0.0000; `1e-4 600 he_normal f` reaches 0.25 at step 450.
"""
import sys
import time

import torch
import torch.nn.functional as F

from bpfree.data import load_dataset
from bpfree.models import build_model
from bpfree.rules import build_rule

if __name__ == "__main__":
    torch.set_num_threads(1)
    wd, steps, init, scope = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    d = load_dataset("cifar10_jpeg", "/work/shared/data" if len(sys.argv) < 6 else sys.argv[5], ".cache/bpfree",
                     subset=5000, test_subset=1000)
    torch.manual_seed(0)
    m = build_model("resnet20", (3, 32, 32), 10, fc=[1500, 300, 300, 300, 300], init=init)
    r = build_rule("al", m, F.nll_loss, components=[["stem"], ["s1b*"], ["s2b*"], ["s3b*"]], bridge_pool=4)
    t_ids = {id(p) for p in r.t_side_parameters()}
    if scope == "all":
        opt = torch.optim.Adam(r.parameters(), lr=1e-3, weight_decay=wd)
        r._optimizer_checked = id(opt)  # bypass the rule's guard, to show what it guards against
    else:
        opt = torch.optim.Adam([{"params": [p for p in r.parameters() if id(p) not in t_ids], "weight_decay": wd},
                                {"params": r.t_side_parameters(), "weight_decay": 0.0}], lr=1e-3)
    X, Y = d.train.x, d.train.y
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (32,), generator=g)
        out = r.train_step(X[idx], Y[idx], opt)
        if step % 50 == 0:
            r.eval()
            with torch.no_grad():
                acc = (r.predict(d.test.x).argmax(1) == d.test.y).float().mean().item()
                t, spread = F.one_hot(torch.arange(10), 10).float(), []
                for e in r.encoders:
                    t = e(t)
                    spread.append(t.std(0).mean().item())
            r.train()
            print(f"wd={wd}/{scope}/{init} step {step} acc {acc:.4f} loss {out['loss']:.5f} "
                  + " ".join(f"{k}={float(v):.5f}" for k, v in out.items() if k.startswith(("assoc", "ae")))
                  + " t_spread " + " ".join(f"{s:.4f}" for s in spread) + f" {time.time() - t0:.0f}s", flush=True)
