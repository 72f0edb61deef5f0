"""Image models of the her2st benchmark: hand-made features, ridge with in-patient CV, DenseNet-121.

Everything here is plain numpy / scikit-image / torch (torchvision does not import beside the
project's torch, so DenseNet-121 is written out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def pearson_per_gene(
    a, b
):  # lazy: importing squall_sd pulls spatialdata; the GPU job has only torch/numpy
    from squall_sd.tl._evaluate import pearson_per_gene as f

    return f(a, b)


# ----------------------------------------------------------------------- hand-made features
HAND_FEATURE_NAMES: list[str] = []


def _stats(values: np.ndarray, prefix: str) -> tuple[list[float], list[str]]:
    q = np.percentile(values, [10, 50, 90], axis=0)
    feats = np.concatenate([values.mean(0), values.std(0), q.ravel()])
    k = values.shape[1]
    names = [f"{prefix}{c}_{s}" for s in ("mean", "std", "p10", "p50", "p90") for c in range(k)]
    return list(feats), names


def hand_features(tiles: np.ndarray, log: Callable = print) -> np.ndarray:
    """Colour (RGB, HED) statistics over tissue pixels, gradient and LBP texture, tissue fraction.

    ``tiles``: (n, H, W, 3) uint8. Returns (n, 63) float64.
    """
    from skimage.color import rgb2hed
    from skimage.feature import local_binary_pattern

    t0 = time.time()
    out = []
    for i, tile in enumerate(tiles):
        rgb = tile.astype(np.float64) / 255.0
        grey = rgb @ np.array([0.299, 0.587, 0.114])
        tissue = ~(tile.min(axis=2) > 215)  # white glass (and blacked-out background made white)
        frac = tissue.mean()
        mask = tissue if tissue.sum() >= 50 else np.ones_like(tissue)
        f_rgb, n_rgb = _stats(rgb[mask], "rgb")
        hed = rgb2hed(tile)
        f_hed, n_hed = _stats(hed[mask], "hed")
        gy, gx = np.gradient(grey)
        mag = np.hypot(gx, gy)[mask]
        small = grey.reshape(grey.shape[0] // 2, 2, grey.shape[1] // 2, 2).mean((1, 3))
        sy, sx = np.gradient(small)
        mag2 = np.hypot(sx, sy).ravel()
        f_grad = [
            mag.mean(),
            mag.std(),
            *np.percentile(mag, [50, 90]),
            mag2.mean(),
            mag2.std(),
            *np.percentile(mag2, [50, 90]),
        ]
        g8 = (grey * 255).astype(np.uint8)
        lbp1 = local_binary_pattern(g8, 8, 1, method="uniform")
        lbp3 = local_binary_pattern(g8, 8, 3, method="uniform")
        h1 = np.bincount(lbp1[mask].astype(int), minlength=10)[:10] / mask.sum()
        h3 = np.bincount(lbp3[mask].astype(int), minlength=10)[:10] / mask.sum()
        dark = [(grey[mask] < 0.35).mean(), (grey[mask] < 0.55).mean()]
        out.append(np.concatenate([f_rgb, f_hed, f_grad, h1, h3, dark, [frac]]))
        if i == 0 and not HAND_FEATURE_NAMES:
            HAND_FEATURE_NAMES.extend(
                n_rgb
                + n_hed
                + [
                    f"grad_{s}"
                    for s in ("mean", "std", "p50", "p90", "mean2", "std2", "p50_2", "p90_2")
                ]
                + [f"lbp1_{k}" for k in range(10)]
                + [f"lbp3_{k}" for k in range(10)]
                + ["dark35", "dark55", "tissue_frac"]
            )
    log(f"  hand features: {len(tiles)} tiles in {time.time() - t0:.1f}s")
    return np.asarray(out, dtype=np.float64)


# ------------------------------------------------------------------------------------ ridge
class Standardizer:
    def fit(self, x: np.ndarray) -> Standardizer:
        self.mean_ = x.mean(0)
        sd = x.std(0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_


class RidgePipeline:
    """standardise → (optional PCA to ``n_pca``) → ridge; all alphas solved at once via SVD."""

    def __init__(self, n_pca: int | None = None):
        self.n_pca = n_pca

    def _prep_fit(self, x: np.ndarray) -> np.ndarray:
        self.std_ = Standardizer().fit(x)
        z = self.std_.transform(x)
        self.pca_ = None
        if self.n_pca is not None:
            k = min(self.n_pca, z.shape[0] - 1, z.shape[1])
            _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
            self.pca_ = vt[:k].T
            z = z @ self.pca_
            self.std2_ = Standardizer().fit(z)  # whiten components so alpha acts alike on all
            z = self.std2_.transform(z)
        return z

    def _prep(self, x: np.ndarray) -> np.ndarray:
        z = self.std_.transform(x)
        if self.pca_ is not None:
            z = self.std2_.transform(z @ self.pca_)
        return z

    def fit_path(self, x: np.ndarray, y: np.ndarray) -> RidgePipeline:
        z = self._prep_fit(x)
        self.zmean_ = z.mean(0)
        self.ymean_ = y.mean(0)
        u, s, vt = np.linalg.svd(z - self.zmean_, full_matrices=False)
        self.svd_ = (u, s, vt)
        self.uty_ = u.T @ (y - self.ymean_)
        return self

    def coef(self, alpha: float) -> np.ndarray:
        _, s, vt = self.svd_
        return vt.T @ ((s / (s**2 + alpha))[:, None] * self.uty_)

    def predict(self, x: np.ndarray, alpha: float) -> np.ndarray:
        return (self._prep(x) - self.zmean_) @ self.coef(alpha) + self.ymean_


def ridge_cv(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    alphas: np.ndarray,
    n_pca: int | None = None,
    score_cols: np.ndarray | None = None,
) -> tuple[RidgePipeline, float, dict]:
    """Pick alpha by leave-one-group-out (groups = training sections) mean per-gene Pearson; refit on all.

    Only training data is seen here. Returns the refitted pipeline, the alpha and the CV curve.
    """
    ug = np.unique(groups)
    scores = np.zeros((len(ug), len(alphas)))
    for gi, g in enumerate(ug):
        tr, va = groups != g, groups == g
        pipe = RidgePipeline(n_pca).fit_path(x[tr], y[tr])
        for ai, a in enumerate(alphas):
            pred = pipe.predict(x[va], a)
            yt = y[va] if score_cols is None else y[va][:, score_cols]
            pp = pred if score_cols is None else pred[:, score_cols]
            scores[gi, ai] = np.nanmean(pearson_per_gene(yt, pp))
    mean = scores.mean(0)
    best = int(np.nanargmax(mean))
    pipe = RidgePipeline(n_pca).fit_path(x, y)
    return (
        pipe,
        float(alphas[best]),
        {"alphas": alphas.tolist(), "cv_mean_r": mean.tolist(), "cv_best_r": float(mean[best])},
    )


# ------------------------------------------------------------------------------ DenseNet-121
class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(feats, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class _DenseBlock(nn.Module):
    def __init__(self, n_layers: int, c_in: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(c_in + i * growth, growth, bn_size) for i in range(n_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class _Transition(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet121(nn.Module):
    """DenseNet-121 (Huang et al. 2017): growth 32, blocks (6, 12, 24, 16), bn_size 4, 64 initial
    features, compression 0.5; the classifier is a linear head with ``n_out`` outputs (ST-Net)."""

    def __init__(
        self,
        n_out: int,
        growth: int = 32,
        blocks: tuple[int, ...] = (6, 12, 24, 16),
        bn_size: int = 4,
        init_features: int = 64,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, init_features, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = init_features
        for i, n in enumerate(blocks):
            layers.append(_DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                layers.append(_Transition(c, c // 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_out)
        self.n_features = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.head(h)


# -------------------------------------------------------------------------------- ResNet-18
class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): 7×7 stem + max-pool, four stages of two basic blocks (64-512
    channels), global average pooling and a linear head with ``n_out`` outputs; 11.6 M parameters
    with 848 outputs. The last BatchNorm of each block starts at zero (Goyal et al. 2017)."""

    def __init__(self, n_out: int, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = widths[0]
        for i, w in enumerate(widths):
            layers += [_BasicBlock(c, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_out)
        self.n_features = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, _BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.head(h)


class SquallTinyRegressor(nn.Module):
    """The ViT of the ``squall-tiny-her2st`` recipe (squall-tiny at 2 µm/px, 112 px, convolutional
    stem, trunc-normal init, drop path 0.1) as a plain regressor: the mean of its ``forward_rgb``
    tokens → Linear. Trained in :func:`train_densenet`'s loop it isolates the backbone from the rest
    of the recipe (phase 1, the spot-disc head, validation-based stopping). Needs squall_sd."""

    def __init__(self, n_out: int):
        super().__init__()
        from squall_sd.models import create

        self.vit = create(
            "squall-tiny", mpp=2.0, img_size=112, expr_size=28, stem="conv", init="trunc_normal", drop_path_rate=0.1
        )
        self.head = nn.Linear(self.vit.config.embed_dim, n_out)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_rgb(x, 2.0).mean(dim=1))


CNN_ARCHS = {"densenet121": DenseNet121, "resnet18": ResNet18, "squall-tiny": SquallTinyRegressor}


def _to_input(
    tiles: np.ndarray, size: int, mean: torch.Tensor, std: torch.Tensor, device: str
) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(tiles)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return (x - mean) / std


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def degrade(patches: np.ndarray, mpp: float, to_mpp: float) -> np.ndarray:
    """Tiles (n, P, P, 3) uint8 at ``mpp`` as if read from an image of ``to_mpp`` µm/px (box down, bilinear up).

    ``squall_sd.pp.degrade_patches`` (channels first) written out for ``_cnn_job.py``, which runs where
    squall_sd is not installed; a test checks that the two agree pixel for pixel."""
    size = patches.shape[1]
    small = max(1, round(size * mpp / to_mpp))
    out = np.empty_like(patches)
    for i, tile in enumerate(patches):
        im = Image.fromarray(tile).resize((small, small), Image.Resampling.BOX)
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return out


#: The 8 views of ``squall`` ``model.predict(tta=True)``, as
#: :data:`squall_sd.models._inference.DIHEDRAL` lists them (``k`` quarter turns, then mirrored
#: left-right); written out so that ``_cnn_job.py`` runs where squall_sd is not installed (a test
#: checks that the two agree).
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def dihedral_mean(predict: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray) -> np.ndarray:
    """Test-time augmentation of a per-tile predictor: the mean of ``predict`` over the 8 rotations and
    mirror images (:data:`DIHEDRAL`) of the (n, H, W, 3) tiles."""
    views = []
    for k, flip in DIHEDRAL:
        v = np.rot90(tiles, k, axes=(1, 2))
        views.append(predict(np.ascontiguousarray(v[:, :, ::-1] if flip else v)))
    return np.mean(views, axis=0)


def train_densenet(
    tiles: np.ndarray,
    y: np.ndarray,
    *,
    arch: str = "densenet121",
    bf16: bool = False,
    size: int = 112,
    epochs: int = 10,
    max_minutes: float | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str = "cpu",
    log: Callable = print,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Train a from-scratch CNN (``arch``: DenseNet-121 or ResNet-18) on z-scored targets (MSE),
    dihedral augmentation, AdamW with a cosine schedule over ``epochs``; stop early only when
    ``max_minutes`` is exceeded (recorded). ``bf16``: CPU/GPU autocast for the forward pass.
    Returns a predictor (tiles → targets in the original scale) and a record of what ran."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ymean, ysd = y.mean(0), y.std(0)
    ysd = np.where(ysd > 1e-8, ysd, 1.0)
    yz = torch.from_numpy(((y - ymean) / ysd).astype(np.float32))
    sample = torch.from_numpy(tiles[: min(len(tiles), 256)]).float() / 255.0
    mean = sample.mean((0, 1, 2)).view(1, 3, 1, 1).to(device)
    std = sample.std((0, 1, 2)).view(1, 3, 1, 1).to(device)
    model = CNN_ARCHS[arch](y.shape[1]).to(device)
    dev_type = torch.device(device).type
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(tiles) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    t0 = time.time()
    done = 0
    steps = 0
    stopped = False
    for ep in range(epochs):
        model.train()
        order = rng.permutation(len(tiles))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if len(idx) < 2:
                continue
            x = _to_input(tiles[idx], size, mean, std, device)
            x = _dihedral(x, int(rng.integers(8)))
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            loss = F.mse_loss(out.float(), yz[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            steps += 1
            if max_minutes is not None and time.time() - t0 > max_minutes * 60:
                stopped = True
                break
        done = ep + 1
        el = time.time() - t0
        log(f"    {arch} epoch {done}/{epochs}: loss {np.mean(losses):.4f} ({el:.0f}s)")
        if stopped:
            log(
                f"    {arch}: time cap {max_minutes} min reached in epoch {done} (step {steps}/{total})"
            )
            break

    @torch.no_grad()
    def predict(t: np.ndarray) -> np.ndarray:
        model.eval()
        outs = []
        for b in range(0, len(t), 64):
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                out = model(_to_input(t[b : b + 64], size, mean, std, device))
            outs.append(out.float().cpu().numpy())
        return np.concatenate(outs) * ysd + ymean

    record = {
        "arch": arch,
        "bf16": bf16,
        "input_px": size,
        "epochs_planned": epochs,
        "epochs_run": done,
        "steps_run": steps,
        "steps_planned": total,
        "stopped_by_time_cap": stopped,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seconds": time.time() - t0,
        "device": device,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    return predict, record
