"""Turn a phase-3 (expression fine-tuning) export into the bundled model ``squall-tiny-her2st``.

The fine-tuning head is a per-gene affine calibration (``head.safetensors``: scale, shift) on top
of the expression output layer ``decoder.increase_dim_rgb.fc2``; it is folded into that layer
(``W' = scale * W``, ``b' = scale * b + shift``) so that ``model.predict`` returns log1p(CP10k)
directly and ``squall_sd.models.load("squall-tiny-her2st")`` needs no head file.

    python scripts/train_her2st_export.py runs/her2st-spots/AC/finetune/checkpoints/best \
        src/squall_sd/models/weights/squall-tiny-her2st [--fp16]

The training run's ``config.yaml`` and ``metrics.json`` are copied beside the weights (what the
model was trained on, for ``benchmarks/niches.py --from-he`` and the model card).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

DESCRIPTION = (
    "squall-tiny with a convolutional stem, pretrained by masked-token RGB reconstruction on the H&E of "
    "her2st C2-C5 and four mouse olfactory bulb sections, then trained on her2st patients A and C "
    "(Andersson et al. 2021) by spot-level expression regression on spot-centred 224 um tiles (112 px at "
    "2 um/px; tiles of scans sharper than 3.202 um/px degraded to it, effective_mpp), best epoch on a held-out "
    "section kept; the 848 output channels predict log1p(CP10k) of the hvg785 + top-50 panel (fine-tuning "
    "head folded into fc2). See the model card README.md."
)


def fold(
    src: Path, dst: Path, *, fp16: bool = False, name: str = "squall-tiny-her2st", description: str = DESCRIPTION
) -> Path:
    """Fold the fine-tuning head of the export at ``src`` into ``fc2`` and save the model to ``dst``."""
    import squall_sd as squall

    model = squall.models.load(src)
    head = load_file(str(src / "head.safetensors"))
    meta = json.loads((src / "head.json").read_text())
    idx = torch.as_tensor(model.gene_index(meta["genes"]), dtype=torch.long)
    fc2 = model.decoder.increase_dim_rgb.fc2
    with torch.no_grad():
        s, b = head["scale"].float(), head["shift"].float()
        fc2.weight[idx] = fc2.weight[idx] * s[:, None]
        fc2.bias[idx] = fc2.bias[idx] * s + b
    vocab = model.vocabulary
    # the head was fitted on spot means of the cell outputs (task.level spot): predict with reduce="mean"
    model.config = model.config.replace(name=name, description=description, region_reduce="mean",
                                        licence="BSD-3-Clause (squall-sd; trained on her2st, Andersson et al. 2021)")
    if fp16:
        model = model.half()
    model.set_vocabulary(vocab)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, overwrite=True)
    import shutil

    for f in ("config.yaml", "metrics.json"):
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f"training_{f}" if f == "metrics.json" else dst / f)
    return dst


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--name", default="squall-tiny-her2st")
    p.add_argument("--description", default=DESCRIPTION)
    a = p.parse_args()
    print(fold(a.src, a.dst, fp16=a.fp16, name=a.name, description=a.description))
