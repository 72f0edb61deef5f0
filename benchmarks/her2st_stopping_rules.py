"""Early-stopping rules judged on sections that take no part in the choice (training logs only).

The A model of the her2st recipe trains on one section and picks its epoch on one other (A2), whose
per-epoch r jumps by ±0.02; its three seeds then spread widely on the test patient. Whether another
stopping rule would pick better epochs cannot be measured on patient A (it has no third section), so
this script measures it in the same regime inside patient C: a run trained on C2 alone with C3 as the
monitored validation section and C4–C6 as watched sections (``val/pearson/<section>``, logged per epoch
by ``squall train`` when there are several validation sections), run for a fixed number of epochs
without stopping, so that every rule can be replayed on the same curves:

    D=data/her2st-spots112
    squall train finetune configs/her2st/spots_finetune_tiny.yaml --set run_dir=runs/stopsim/seed0 \
        --set "data.train=[$D/C2]" --set "data.val=[$D/C3,$D/C4,$D/C5,$D/C6]" --set task.genes=$D/panel.txt \
        --set model.init_from=runs/her2st-pretrain/C-ms/checkpoints/last \
        --set seed=0 --set trainer.max_steps=-1 --set trainer.max_epochs=40 --set trainer.early_stopping=null \
        --set checkpoint.best=null
    python benchmarks/her2st_stopping_rules.py runs/stopsim/seed* --monitor C3 --watch C4 C5 C6

For each rule and run: the epoch it keeps and the mean r of the watched sections at that epoch (what the
exported model would score there), then the mean ± sd over runs.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pandas as pd


def epoch_table(run: str | Path) -> pd.DataFrame:
    """Per validation epoch (numbered from 1): every ``val/pearson*`` column of the run's CSV logs."""
    files = sorted(glob.glob(f"{run}/logs/*/metrics.csv"))
    if not files:
        raise SystemExit(f"{run}: no logs/*/metrics.csv")
    d = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    cols = [c for c in d if c.startswith("val/pearson")]
    v = d.dropna(subset=["val/pearson"]).drop_duplicates("epoch", keep="last")[["epoch", *cols]]
    return v.assign(epoch=v["epoch"] + 1).reset_index(drop=True)


def patience_pick(score: np.ndarray, patience: int) -> int:
    """Index kept by early stopping with ``patience`` on ``score`` (higher is better): the best index
    seen before ``patience`` indices in a row fail to improve on it (or before the end)."""
    best, since = 0, 0
    for i in range(1, len(score)):
        if score[i] > score[best]:
            best, since = i, 0
        else:
            since += 1
            if since >= patience:
                break
    return best


def trailing_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last ``k`` values at each index (fewer at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - k, 0)
    return (c[i] - c[lo]) / (i - lo)


RULES = {
    "patience 8 (the recipe)": lambda m: patience_pick(m, 8),
    "patience 16": lambda m: patience_pick(m, 16),
    "patience 8 on the 3-epoch trailing mean": lambda m: patience_pick(trailing_mean(m, 3), 8),
    "patience 8 on the 5-epoch trailing mean": lambda m: patience_pick(trailing_mean(m, 5), 8),
    "best epoch of the whole run": lambda m: int(np.argmax(m)),
    "last epoch": lambda m: len(m) - 1,
}


def main(argv=None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--monitor", required=True, help="the validation section that chooses the epoch")
    p.add_argument("--watch", nargs="+", required=True, help="sections that take no part in the choice")
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        t = epoch_table(run)
        mon = t[f"val/pearson/{args.monitor}"].to_numpy()
        held = t[[f"val/pearson/{s}" for s in args.watch]].mean(axis=1).to_numpy()
        rules = {**RULES, "oracle: best watched epoch (not a rule)": lambda m, h=held: int(np.argmax(h))}
        for rule, pick in rules.items():
            i = pick(mon)
            rows.append(
                {"rule": rule, "run": Path(run).name, "epoch": i + 1, "monitor r": mon[i], "watched r": held[i]}
            )
    df = pd.DataFrame(rows)
    watched = ", ".join(args.watch)
    print(f"Monitor {args.monitor}; watched {watched} (mean r at the kept epoch); {len(args.runs)} runs\n")
    print("| rule | epochs kept | monitor r | watched r, mean ± sd | per run |")
    print("|---|---|---:|---:|---|")
    for rule, d in df.groupby("rule", sort=False):
        ep = " / ".join(str(e) for e in d["epoch"])
        per = " / ".join(f"{w:.3f}" for w in d["watched r"])
        print(f"| {rule} | {ep} | {d['monitor r'].mean():.3f} | {d['watched r'].mean():.3f} ± "
              f"{d['watched r'].std(ddof=0):.3f} | {per} |")


if __name__ == "__main__":
    main()
