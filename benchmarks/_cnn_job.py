"""Train the from-scratch CNN rows of the her2st benchmark (ST-Net-style DenseNet-121, ResNet-18)
from an exported pack.

The main script writes the pack (``--cnn-export``: the same JPEG-q95-encoded tiles, training
targets and splits) so that the from-scratch CNN can be trained where there is a GPU; its
predictions come back with ``--cnn-preds``. Needs only numpy, pillow and torch (squall_sd need not
be installed there):

    python benchmarks/_cnn_job.py PACK.npz PREDS.npz --device cuda --epochs 39 --px 112 --bf16 --tta

``--tta`` also writes each test section's mean over the 8 rotations / mirror images of its tiles
(the views of squall's ``predict(tta=True)``) as ``<tag>__<section>__tta``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M  # noqa: E402


def encode_tiles(tiles: np.ndarray, quality: int = 95) -> np.ndarray:
    out = []
    for t in tiles:
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, format="JPEG", quality=quality)
        out.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    lens = np.array([len(b) for b in out])
    return np.concatenate(out), lens


def decode_tiles(blob: np.ndarray, lens: np.ndarray) -> np.ndarray:
    offs = np.concatenate([[0], np.cumsum(lens)])
    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(blob[offs[i] : offs[i + 1]].tobytes())).convert("RGB"))
            for i in range(len(lens))
        ]
    )


def write_pack(path: Path, tiles: np.ndarray, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a pack for this job: every section's tiles in ``meta["sections"]`` order (JPEG q95),
    ``meta`` (sections, tiles per section, splits) and the training targets ``ytr_<tag>``."""
    blob, lens = encode_tiles(tiles)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, blob=blob, lens=lens, meta=json.dumps(meta), **arrays)


def read_preds(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The per-split records and the prediction arrays (``<tag>__<section>[__tta]``) this job wrote."""
    z = np.load(path, allow_pickle=False)
    return json.loads(str(z["records"])), {k: z[k] for k in z.files if k != "records"}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("pack")
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="densenet121", choices=sorted(M.CNN_ARCHS))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as her2st_expression.py --cnn-bf16)")
    p.add_argument("--tta", action="store_true", help="also the 8-view test-time augmentation")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    z = np.load(a.pack, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    tiles = decode_tiles(z["blob"], z["lens"])
    sections = meta["sections"]
    offs = np.concatenate([[0], np.cumsum(meta["n_per_section"])])
    sec_tiles = {s: tiles[offs[i] : offs[i + 1]] for i, s in enumerate(sections)}
    out, records = {}, {}
    for split, sp in meta["splits"].items():
        tr = np.concatenate([sec_tiles[s] for s in sp["train"]])
        ytr = z[f"ytr_{sp['tag']}"]
        t = time.time()
        predict, rec = M.train_densenet(
            tr,
            ytr,
            arch=a.arch,
            bf16=a.bf16,
            size=a.px,
            epochs=a.epochs,
            max_minutes=a.minutes,
            batch_size=a.batch,
            lr=a.lr,
            seed=a.seed,
            device=a.device,
        )
        degrade = sp.get("test_degrade", {})  # her2st_expression.py --match-resolution
        for s in sp["test"]:
            t_s = M.degrade(sec_tiles[s], sp["mpp"], degrade[s]) if s in degrade else sec_tiles[s]
            out[f"{sp['tag']}__{s}"] = predict(t_s).astype(np.float32)
            if a.tta:
                out[f"{sp['tag']}__{s}__tta"] = M.dihedral_mean(predict, t_s).astype(np.float32)
        rec["seconds"] = time.time() - t
        rec["seed"] = a.seed
        rec["test_degrade"] = degrade
        rec["gpu"] = torch.cuda.get_device_name() if a.device.startswith("cuda") else ""
        records[split] = rec
        print(split, rec, flush=True)
    np.savez(a.out, records=json.dumps(records), **out)


if __name__ == "__main__":
    main()
