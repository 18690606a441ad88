"""Objectives tried for issue 16 (plain loop on the NullSpaceEngine; numbers in docs/feature_forgetting.md).

    python benchmarks/feature_objectives.py mnist1d 0,1,2 "ref;obj=ce;obj=swd,w=1;obj=nn,w=0.3"

Config keys: ``obj`` = ce (pseudo-label loss only) | pull (centroid of the pseudo-label class) |
nn (mean of the k nearest remaining samples of the pseudo-label class) | swd (sliced Wasserstein
to remaining samples of the pseudo-label class) | mom (batch mean + covariance match) | adv
(online linear probe forget-vs-remaining, its loss maximised); ``w`` weight; ``thr`` threshold
of every layer but the head (``base``: the recipe's per-class rule everywhere).
"""

import copy
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.recipes import EMBEDDED
from unsc_lightning.lab.runs import make_datamodule, train_classifier
from unsc_lightning.lab.scoring import evaluate, mia_efficacy_of, recovery
from unsc_lightning.nullspace import NullSpaceEngine
from unsc_lightning.pseudo_labels import unsc_pseudo_labels

torch.set_num_threads(1)
DS = sys.argv[1]
SEEDS = [int(s) for s in sys.argv[2].split(",")]
CONFIGS = sys.argv[3].split(";")
FORGET = 3
CACHE = Path("/tmp/unsc_ff_cache")
spec = EMBEDDED[DS]
recipe = spec["unlearn"]
forget = ForgetSpec(kind="class", classes=[FORGET])


def head(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def feats(model, loader):
    cap = []
    h = head(model).register_forward_pre_hook(lambda m, a: cap.append(a[0]))
    ys = []
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            model(x)
            ys.append(y)
    h.remove()
    return torch.cat(cap), torch.cat(ys)


def parse(cfg):
    d = {}
    for kv in cfg.split(","):
        k, v = kv.split("=")
        d[k] = v
    return d


def run(cfg, original, dm, stats, seed):
    c = parse(cfg)
    obj = c.get("obj", "ce")
    w = float(c.get("w", 0))
    thr = c.get("thr", "base")
    L.seed_everything(seed, verbose=False)
    model = copy.deepcopy(original)
    if thr == "base":
        threshold = recipe.threshold
    else:
        t = float(thr)
        threshold = {"classifier.2": recipe.threshold, "*": t}
    eng = NullSpaceEngine(
        model,
        threshold=threshold,
        rule=recipe.rule,
        class_threshold_step=recipe.class_threshold_step,
    )
    eng.build(dm.retain_dataloader())
    ranks = {k: (i.rank, i.dim) for k, i in eng.layer_infos.items()}
    cap = []
    h = head(model).register_forward_pre_hook(lambda m, a: cap.append(a[0]))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=float(c.get("lr", recipe.lr))
    )
    mu, bank, bank_y = stats["mu"], stats["bank"], stats["bank_y"]
    scale = mu.pow(2).sum(1).mean()
    probe = nn.Linear(mu.shape[1], 2)
    popt = torch.optim.SGD(probe.parameters(), lr=0.1)
    epochs = int(c.get("ep", recipe.epochs))
    with eng.guard():
        model.train()
        eng.keep_norm_eval()
        for _ep in range(epochs):
            for x, y in dm.train_dataloader():
                cap.clear()
                with torch.no_grad():
                    t = unsc_pseudo_labels(original(x), y, [FORGET])
                logits = model(x)
                phi = cap[-1]
                loss = F.cross_entropy(logits, t)
                if obj == "pull" and w:
                    loss = loss + w * (phi - mu[t]).pow(2).sum(1).mean() / scale
                elif obj == "nn" and w:  # nearest remaining samples of pseudo-label class
                    k = int(c.get("k", 10))
                    tgt = []
                    with torch.no_grad():
                        for i in range(len(x)):
                            B = bank[bank_y == t[i]]
                            d = torch.cdist(phi[i : i + 1].detach(), B)[0]
                            tgt.append(B[d.topk(k, largest=False).indices].mean(0))
                    loss = loss + w * (phi - torch.stack(tgt)).pow(2).sum(1).mean() / scale
                elif (
                    obj == "swd" and w
                ):  # sliced W2 between forget features and remaining features (pseudo-class matched)
                    idx = torch.cat(
                        [
                            (bank_y == tt).nonzero()[
                                torch.randint(0, int((bank_y == tt).sum()), (1,))
                            ][0]
                            for tt in t
                        ]
                    )
                    R = bank[idx]
                    P = torch.randn(phi.shape[1], 64)
                    P = P / P.norm(dim=0)
                    a = (phi @ P).sort(0).values
                    b = (R @ P).sort(0).values
                    loss = loss + w * (a - b).pow(2).mean() * phi.shape[1] / scale
                elif obj == "mom" and w:  # mean + cov match to pseudo-class stats
                    m = phi.mean(0)
                    loss = loss + w * (m - mu[t].mean(0)).pow(2).sum() / scale
                    C = torch.cov(phi.T)
                    Cr = stats["cov_all"]
                    loss = loss + w * (C - Cr).pow(2).sum() / (Cr.pow(2).sum())
                elif (
                    obj == "adv" and w
                ):  # online probe: forget vs remaining; maximise its loss -> push to chance
                    idx = torch.randint(0, len(bank), (len(x),))
                    R = bank[idx]
                    for _ in range(int(c.get("pi", 5))):
                        z = probe(torch.cat([phi.detach(), R]))
                        lab = torch.cat([torch.ones(len(x)), torch.zeros(len(x))]).long()
                        popt.zero_grad()
                        F.cross_entropy(z, lab).backward()
                        popt.step()
                    z = probe(phi)  # want the probe to say "remaining"
                    loss = loss + w * F.cross_entropy(z, torch.zeros(len(x)).long())
                opt.zero_grad()
                loss.backward()
                eng.project_gradients_()
                opt.step()
    h.remove()
    model.eval()
    return model, ranks


results = []
for seed in SEEDS:
    dm = make_datamodule(DS, forget, seed, "forget", recipe.batch_size)
    dm.setup("fit")
    original, _, _ = train_classifier(DS, forget, seed, "all", CACHE)
    retrain, _, _ = train_classifier(DS, forget, seed, "retain", CACHE)
    original.eval()
    bank, bank_y = feats(original, dm.retain_dataloader())
    mu = torch.zeros(dm.num_classes, bank.shape[1])
    for k in bank_y.unique():
        mu[k] = bank[bank_y == k].mean(0)
    stats = {"mu": mu, "bank": bank, "bank_y": bank_y, "cov_all": torch.cov(bank.T)}
    o_f = evaluate(original, dm)["acc_f"]
    models = {}
    if "ref" in CONFIGS:
        models = {"original": (original, None), "retrain": (retrain, None)}
    for cfg in CONFIGS:
        if cfg == "ref":
            continue
        t0 = time.time()
        m, r = run(cfg, original, dm, stats, seed)
        models[cfg] = (m, r)
    for name, (m, r) in models.items():
        a = evaluate(m, dm)
        rec = recovery(m, dm, o_f, seed=seed) if "--norec" not in sys.argv else {}
        mia = mia_efficacy_of(m, dm, seed=seed) if "--mia" in sys.argv else None
        row = {
            "ds": DS,
            "seed": seed,
            "cfg": name,
            "acc_r": round(a["acc_r"], 2),
            "head_f": round(a["acc_f"], 2),
            "probe_f": round(rec.get("probe_acc_f", float("nan")), 1),
            "relearn": rec.get("relearn_steps"),
            "mia": mia,
        }
        if r and "--ranks" in sys.argv:
            row["ranks"] = r
        print(json.dumps(row), flush=True)
        results.append(row)
