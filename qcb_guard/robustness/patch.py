"""Universal adversarial patches (Brown et al. 2017, "Adversarial Patch") against float and
quantized models: one targeted patch that works on any image.

Brown et al. §2 maximise ``E_{x∼X, l∼L}[log Pr(ŷ | A(p, x, l))]`` over the patch ``p``, with
``A`` pasting ``p`` at location ``l``. Two location distributions ``L``: ``placement="random"``
samples ``l`` uniformly per image and per step (the paper's EOT over placements), and
``placement="center"`` fixes ``l`` at the image centre (the fixed-location setting of
LaVAN-style localized patches, Karmon et al. 2018). Adam on ``p``, kept in [0, 1];
rotations and scaling of the paper's EOT are omitted (deviation, docs/robustness.md): digits
are small and centred, and the study is about bit-widths, not physical robustness. On
SmallCNN (a fully connected head over a 7×7 feature map, so not translation invariant)
random-placement patches stay weak; see docs/benchmarks.md. Optimising through a
:class:`~qcb_guard.robustness.fakequant.FakeQuantModel` gives the "quantized-model" patch
(straight-through gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qcb_guard.errors import ConfigError, DataError

__all__ = [
    "PLACEMENTS",
    "PatchConfig",
    "apply_patch",
    "patch_asr",
    "placements",
    "random_positions",
    "spatial_map",
    "train_patch",
]

Predictor = Callable[[Tensor], Tensor]
PLACEMENTS = ("random", "center")


@dataclass(frozen=True, kw_only=True)
class PatchConfig:
    """A square patch of ``size`` pixels pushed towards class ``target``.

    ``size=None`` means ``round(0.3·H)`` (about 9 % of the image area, within Brown et al.'s
    range); ``steps`` Adam steps of ``batch_size`` images each at learning rate ``lr``;
    ``placement`` is ``"random"`` (uniform over every place it fits) or ``"center"``.
    """

    size: int | None = None
    target: int = 0
    steps: int = 300
    batch_size: int = 64
    lr: float = 0.1
    placement: str = "random"
    progress: bool = False

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("target", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if self.size is not None and (
            isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1
        ):
            raise ConfigError(f"patch size must be an int >= 1, got {self.size!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        check_placement(self.placement)

    def side(self, image_shape: tuple[int, ...]) -> int:
        h, w = image_shape[-2:]
        size = self.size if self.size is not None else max(1, round(0.3 * h))
        if size > min(h, w):
            raise ConfigError(f"patch size {size} does not fit {h}x{w} images")
        return size


def random_positions(n: int, height: int, width: int, size: int, generator: torch.Generator):
    """``n`` top-left corners (row, col), uniform over every place the patch fits."""
    rows = torch.randint(0, height - size + 1, (n,), generator=generator)
    cols = torch.randint(0, width - size + 1, (n,), generator=generator)
    return rows, cols


def check_placement(placement: Any) -> str:
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    return placement


def placements(
    n: int, height: int, width: int, size: int, placement: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` top-left corners for ``placement``: uniform (``random``) or the centre."""
    if check_placement(placement) == "random":
        return random_positions(n, height, width, size, generator)
    return (
        torch.full((n,), (height - size) // 2, dtype=torch.long),
        torch.full((n,), (width - size) // 2, dtype=torch.long),
    )


def apply_patch(x: Tensor, patch: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``A(p, x, l)``: paste ``patch`` [C, s, s] into each image at (rows[i], cols[i]);
    differentiable w.r.t. ``patch``."""
    _, _, h, w = x.shape
    s = patch.shape[-1]
    ones = torch.ones_like(patch)
    canvases, masks = [], []
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        pad = (c, w - c - s, r, h - r - s)
        canvases.append(F.pad(patch, pad))
        masks.append(F.pad(ones, pad))
    canvas, mask = torch.stack(canvases), torch.stack(masks)
    return x * (1 - mask) + canvas * mask


def _non_target(x: Tensor, y: Tensor, target: int) -> Tensor:
    keep = y != target
    if not bool(keep.any()):
        raise DataError(f"every image has the target label {target}: patch ASR is undefined")
    return x[keep]


def train_patch(
    model: nn.Module, x: Tensor, y: Tensor, config: PatchConfig, *, seed: int = 0
) -> Tensor:
    """Optimise a universal targeted patch on the non-target images of ``x`` (Brown et al.
    §2); returns the patch [C, s, s] in [0, 1]. The model's weights are not touched."""
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and config.target >= num_classes:
        raise ConfigError(f"target {config.target} is not a class of a {num_classes}-class model")
    pool = _non_target(x, y, config.target)
    c, h, w = pool.shape[1:]
    size = config.side((c, h, w))
    generator = torch.Generator().manual_seed(seed)
    patch = torch.rand((c, size, size), generator=generator).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=config.lr)
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    target = torch.full((config.batch_size,), config.target, dtype=torch.long)
    try:
        for _ in tqdm(range(config.steps), desc="patch", disable=not config.progress, leave=False):
            idx = torch.randint(0, len(pool), (config.batch_size,), generator=generator)
            rows, cols = placements(config.batch_size, h, w, size, config.placement, generator)
            out = model(apply_patch(pool[idx], patch, rows, cols))
            loss = F.cross_entropy(out, target)  # −log Pr(ŷ | A(p, x, l))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
    finally:
        for m, flag in flags:
            m.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)
    return patch.detach()


def _predict(predict: Predictor | nn.Module, x: Tensor) -> Tensor:
    if isinstance(predict, nn.Module):
        flags = [(m, m.training) for m in predict.modules()]
        predict.eval()
        try:
            with torch.no_grad():
                return predict(x).argmax(1)
        finally:
            for m, flag in flags:
                m.training = flag
    with torch.no_grad():
        return torch.as_tensor(predict(x)).argmax(1)


def patch_asr(
    predict: Predictor | nn.Module,
    x: Tensor,
    y: Tensor,
    patch: Tensor,
    target: int,
    *,
    seed: int = 0,
    batch_size: int = 500,
    placement: str = "random",
) -> float:
    """ASR: share of non-target images classified ``target`` with the patch at a random
    (seeded, so every model sees the same placements) location, or at the centre."""
    pool = _non_target(x, y, target)
    _, _, h, w = pool.shape
    rows, cols = placements(
        len(pool), h, w, patch.shape[-1], placement, torch.Generator().manual_seed(seed)
    )
    hits = 0
    for i in range(0, len(pool), batch_size):
        sl = slice(i, i + batch_size)
        patched = apply_patch(pool[sl], patch, rows[sl], cols[sl])
        hits += int((_predict(predict, patched) == target).sum())
    return hits / len(pool)


def spatial_map(
    predict: Predictor | nn.Module,
    x: Tensor,
    y: Tensor,
    patch: Tensor,
    target: int,
    *,
    stride: int = 1,
) -> list[list[float]]:
    """ASR with the patch at each top-left corner (every ``stride`` pixels): where it works
    best. Row ``i``, column ``j`` is the corner ``(i·stride, j·stride)``."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"stride must be an int >= 1, got {stride!r}")
    pool = _non_target(x, y, target)
    _, _, h, w = pool.shape
    s = patch.shape[-1]
    grid = []
    for r in range(0, h - s + 1, stride):
        row = []
        for c in range(0, w - s + 1, stride):
            n = len(pool)
            patched = apply_patch(pool, patch, torch.full((n,), r), torch.full((n,), c))
            row.append(float((_predict(predict, patched) == target).float().mean()))
        grid.append(row)
    return grid


def check_image_fits(image_shape: tuple[int, ...], config: PatchConfig) -> int:
    """The patch side for images of ``image_shape`` (ConfigError when it does not fit)."""
    return config.side(image_shape)


def patch_area(size: int, image_shape: tuple[int, ...]) -> float:
    return size * size / math.prod(image_shape[-2:])


def describe(config: PatchConfig, image_shape: tuple[int, ...]) -> dict[str, Any]:
    size = config.side(image_shape)
    return {
        "size": size,
        "area": patch_area(size, image_shape),
        "target": config.target,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "placement": config.placement,
    }


class PatchAttack:
    """What the ``patch`` attack registers: ``attack(model, x, y, *, seed, **PatchConfig
    fields) -> patch``, with ``asr`` and ``spatial`` to measure it on any model or real flow."""

    kind = "patch"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, seed: int = 0, **options: Any):
        from qcb_guard.config import config_from

        return train_patch(model, x, y, config_from(PatchConfig, options), seed=seed)

    @staticmethod
    def asr(
        predict: Any,
        x: Tensor,
        y: Tensor,
        patch: Tensor,
        target: int,
        *,
        seed: int = 0,
        placement: str = "random",
    ):
        return patch_asr(predict, x, y, patch, target, seed=seed, placement=placement)

    @staticmethod
    def spatial(predict: Any, x: Tensor, y: Tensor, patch: Tensor, target: int, *, stride: int = 1):
        return spatial_map(predict, x, y, patch, target, stride=stride)
