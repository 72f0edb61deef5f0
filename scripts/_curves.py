import glob, sys
import pandas as pd
for run in sys.argv[1:]:
    f = sorted(glob.glob(f"{run}/logs/*/metrics.csv"))
    if not f:
        print(run, "no log"); continue
    d = pd.concat([pd.read_csv(x) for x in f])
    cols = [c for c in ("val/loss", "val/pearson") if c in d]
    v = d.dropna(subset=cols[:1])[["epoch", "step", *cols]] if cols else d.iloc[:0]
    t = d.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean()
    v = v.assign(train=v["epoch"].map(t))
    print(run); print(v.to_string(index=False))
