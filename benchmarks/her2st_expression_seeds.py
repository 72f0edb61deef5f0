"""Mean ± sd over seeds of ``her2st_expression.py`` runs: is a lead or a gap bigger than the seed noise?

One run of ``benchmarks/her2st_expression.py`` trains every learned method once (the ResNet-18 from
scratch with ``--seed``, our model's run with its own training seed), so a difference of 0.01–0.02
between two rows may be one seed's luck. Run the benchmark once per seed, each time with that seed's
models of our recipe (``--seed N`` and ``--split-model`` pointing at the run trained with
``--set seed=N``; the same ``--split-label``), then

    python benchmarks/her2st_expression_seeds.py benchmarks/results/her2st_expression.json \
        benchmarks/results/her2st_expression_seed1.json benchmarks/results/her2st_expression_seed2.json

prints, per split, the mean over the test sections of each metric as mean ± sd over the runs, for the
methods present in every run, and whether our model's head beats every image baseline on the mean
over seeds and in how many of the runs. Deterministic methods (the ridges on hand-made features)
have sd 0.

``RUN.json+EXTRA.json`` adds to a run the rows of a second run of the same seed on the same tiles, e.g.
the CNN rows trained on a GPU from that run's ``--cnn-export`` pack and read back with ``--cnn-preds``
(``her2st_expression.py --model none --cnn-epochs 0 --cnn-preds PREDS.npz --seed N``). The rows the two
runs share (the ridges, the depth oracle) must agree exactly, which checks that both scored the same
spots, genes and splits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _her2st_data as data  # noqa: E402
from her2st_expression import KEY_METRICS, ours_and_baselines, section_means  # noqa: E402


def _same(a, b) -> bool:
    """Equal nested metrics, floats to 1e-9 (BLAS on another thread count changes the last digits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and bool(np.isclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True))
    return a == b


def merge_runs(base: dict, extra: dict, name: str = "extra") -> dict:
    """``base`` with the methods of ``extra`` added, split by split; the methods both hold must have the
    same numbers (to 1e-9) and each split the same training and test sections and top-50 genes.
    ``extra`` may hold only some of ``base``'s splits (a run of one split), but not one of its own."""
    out = json.loads(json.dumps(base))
    unknown = sorted(set(extra["splits"]) - set(out["splits"]))
    if unknown or not extra["splits"]:
        raise SystemExit(f"{name}: splits {unknown or 'none'} are not in the run it is added to")
    for split, res in out["splits"].items():
        other = extra["splits"].get(split)
        if other is None:
            continue
        for key in ("train", "test", "top50"):
            if res[key] != other[key]:
                raise SystemExit(f"{name}: split {split} has another {key}: {other[key]} vs {res[key]}")
        for meth, vals in other["methods"].items():
            if meth in res["methods"]:
                if not _same(res["methods"][meth], vals):
                    raise SystemExit(
                        f"{name}: {meth!r} in split {split} differs between the two runs; they did not score "
                        "the same tiles, genes and splits"
                    )
                continue
            res["methods"][meth] = vals
            res["notes"][meth] = other["notes"].get(meth, "")
            if meth in other["timing_s"]:
                res["timing_s"][meth] = other["timing_s"][meth]
    return out


def load_run(spec: str) -> dict:
    """One run: ``RUN.json``, or ``RUN.json+EXTRA.json[+...]`` merged with :func:`merge_runs`."""
    first, *rest = spec.split("+")
    run = json.loads(Path(first).read_text())
    for f in rest:
        run = merge_runs(run, json.loads(Path(f).read_text()), name=f)
    return run


def seed_table(runs: list[dict], split: str) -> list[str]:
    """Markdown lines for one split: per method, the mean ± sd over runs of its section means."""
    per_run = [section_means(r["splits"][split]) for r in runs]
    methods = [m for m in per_run[0] if all(m in p for p in per_run)]
    names = [n for n, _, _ in KEY_METRICS]
    vals = {m: np.array([[p[m][n] for n in names] for p in per_run]) for m in methods}
    res = runs[0]["splits"][split]
    lines = [
        f"**{split}** (train {', '.join(res['train'])}; test {', '.join(res['test'])}; mean over the test "
        f"sections, then mean ± sd over {len(runs)} runs)",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for m in methods:
        cells = [
            "—" if np.isnan(v).all() else f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}"
            for v in vals[m].T
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    ours, base = ours_and_baselines(methods)
    for o in ours:
        for k, name in enumerate(names[:2]):
            best = max(base, key=lambda b: np.nanmean(vals[b][:, k]))
            wins = int(sum(vals[o][i, k] > max(vals[b][i, k] for b in base) for i in range(len(runs))))
            ours_m, best_m = np.nanmean(vals[o][:, k]), np.nanmean(vals[best][:, k])
            verdict = "**beats every baseline**" if ours_m > best_m else "**does NOT beat every baseline**"
            lines.append(
                f"- {o}: {name} {ours_m:.3f} vs best baseline {best_m:.3f} ({best}) on the mean over runs: "
                f"{verdict}; beats every baseline in {wins} of {len(runs)} runs"
            )
    lines.append("")
    return lines


def main(argv=None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "results",
        nargs="+",
        help="JSON files written by her2st_expression.py, one per seed (RUN.json+EXTRA.json: add EXTRA's rows)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "her2st_expression_seeds.md")
    args = p.parse_args(argv)
    if len(args.results) < 2:
        raise SystemExit("Give at least two result files (one per seed): one run has no spread to report.")
    runs = [load_run(f) for f in args.results]
    splits = [s for s in runs[0]["splits"] if all(s in r["splits"] for r in runs)]
    if not splits:
        raise SystemExit("The result files have no split in common.")
    lines = [
        "# her2st virtual expression — mean ± sd over seeds",
        "",
        "Command: `python benchmarks/her2st_expression_seeds.py " + " ".join(str(f) for f in args.results) + "`",
        "",
    ]
    for s in splits:
        lines += seed_table(runs, s)
    data.emit_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
