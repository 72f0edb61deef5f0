"""Learning curves of squall training runs (Lightning CSV logs): a table and a figure.

    python scripts/her2st_curves.py runs/her2st-spots/*/finetune                 # per-epoch table
    python scripts/her2st_curves.py --summary runs/her2st-ablation/*/*/finetune  # one row per run
    python scripts/her2st_curves.py --plot docs/_static/her2st_curves.png runs/her2st-spots/*/finetune

Per epoch: mean training loss, validation loss and ``val/pearson`` (mean per-gene r within each
validation section). The summary gives, per run, the epochs run, the best epoch by ``val/pearson``
(the checkpoint the recipe's early stopping keeps), its r and validation loss, and the lowest
validation loss.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import pandas as pd


def curves(run: str | Path) -> pd.DataFrame:
    """Per-epoch train loss (mean over the epoch's steps), val/loss and val/pearson of one run."""
    files = sorted(glob.glob(f"{run}/logs/*/metrics.csv"))
    if not files:
        return pd.DataFrame(columns=["epoch", "step", "train", "val/loss", "val/pearson"])
    d = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    train = d.dropna(subset=["train/loss"]).groupby("epoch")["train/loss"].mean()
    cols = [c for c in ("val/loss", "val/pearson") if c in d]
    if not cols:
        return pd.DataFrame({"epoch": train.index, "train": train.values})
    v = d.dropna(subset=[cols[0]]).drop_duplicates("epoch", keep="last")[["epoch", "step", *cols]]
    v = v.assign(train=v["epoch"].map(train)).reset_index(drop=True)
    jsonl = Path(run) / "metrics.jsonl"
    if jsonl.is_file():  # every step's loss (the CSV log keeps one in log_every_n_steps): the epoch's mean
        steps = pd.read_json(jsonl, lines=True).drop_duplicates("step", keep="last")
        edges = [0, *v["step"].tolist()]
        bounds = zip(edges[:-1], edges[1:], strict=True)
        v["train"] = [steps.loc[(steps["step"] > a) & (steps["step"] <= b), "loss"].mean() for a, b in bounds]
    return v


def summary(runs: list[str]) -> pd.DataFrame:
    """One row per run: epochs run, best epoch by val/pearson, its r and loss, and the lowest loss.

    The best epoch by ``val/pearson`` is the one the recipe's early stopping keeps.
    """
    rows = []
    for run in runs:
        c = curves(run)
        parts = Path(run).parts
        name = "/".join(parts[-3:-1]) if len(parts) >= 3 else run
        if c.empty or "val/pearson" not in c:
            rows.append({"run": name, "epochs": 0})
            continue
        b = c.loc[c["val/pearson"].idxmax()]
        rows.append(
            {
                "run": name,
                "epochs": int(c["epoch"].max()) + 1,
                "best epoch": int(b["epoch"]) + 1,
                "val r (best)": round(float(b["val/pearson"]), 4),
                "val loss (best)": round(float(b["val/loss"]), 4),
                "val loss (min)": round(float(c["val/loss"].min()), 4),
            }
        )
    return pd.DataFrame(rows)


def plot(runs: list[str], out: Path) -> None:
    """Train and validation loss, and validation r, per epoch for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in runs:
        c = curves(run)
        if c.empty:
            continue
        label = "/".join(Path(run).parts[-3:-1])  # e.g. her2st-spots/AC: distinct across run folders
        ep = c["epoch"] + 1
        line = axes[0].plot(ep, c["train"], "--", lw=1)[0]
        if "val/loss" in c:
            axes[0].plot(ep, c["val/loss"], "-", color=line.get_color(), label=f"{label}: val (—), train (--)")
        if "val/pearson" in c:
            axes[1].plot(ep, c["val/pearson"], "-", color=line.get_color(), label=label)
            b = c["val/pearson"].idxmax()  # the epoch early stopping keeps
            axes[1].plot(ep[b], c["val/pearson"][b], "o", color=line.get_color())
            if "val/loss" in c:
                axes[0].plot(ep[b], c["val/loss"][b], "o", color=line.get_color())
    axes[0].set(xlabel="epoch", ylabel="MSE (targets z-scored per section)", title="loss")
    axes[1].set(xlabel="epoch", ylabel="mean per-gene r", title="validation sections: r")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--summary", action="store_true")
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if args.plot is not None:
        plot(args.runs, args.plot)
    elif args.summary:
        print(summary(args.runs).to_markdown(index=False))
    else:
        for run in args.runs:
            print(run)
            print(curves(run).to_string(index=False))


if __name__ == "__main__":
    main()
