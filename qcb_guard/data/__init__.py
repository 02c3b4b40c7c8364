"""Data sets, loaders and triggers.

Built-in offline sets (``digits``, ``mnist5k``), loaders for users' own data (arrays, IDX,
image folders, .npz/.npy, torch datasets) that all return one validated :class:`DataSplit`,
and the backdoor triggers attacks plant and defenses measure.
"""

from __future__ import annotations

from qcb_guard.data.datasets import (
    DATASETS,
    DatasetInfo,
    DataSplit,
    TrainTest,
    load_dataset,
    mnist5k_path,
    stratified_split,
    to_loader,
)
from qcb_guard.data.loaders import (
    IMAGE_EXTENSIONS,
    MAX_BYTES,
    from_arrays,
    from_torch_dataset,
    load_data,
    load_idx,
    load_image_folder,
    load_npy,
    load_npz,
    read_idx,
    read_npz_arrays,
)
from qcb_guard.data.triggers import (
    POSITIONS,
    TRIGGERS,
    Poisoned,
    Trigger,
    blended,
    checkerboard,
    from_mask_pattern,
    make_trigger,
    non_target_mask,
    poison,
    poison_split,
    square,
    triggered_split,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "MAX_BYTES",
    "POSITIONS",
    "TRIGGERS",
    "DataSplit",
    "DatasetInfo",
    "Poisoned",
    "TrainTest",
    "Trigger",
    "blended",
    "checkerboard",
    "from_arrays",
    "from_mask_pattern",
    "from_torch_dataset",
    "load_data",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "load_npy",
    "load_npz",
    "make_trigger",
    "mnist5k_path",
    "non_target_mask",
    "poison",
    "poison_split",
    "read_idx",
    "read_npz_arrays",
    "square",
    "stratified_split",
    "to_loader",
    "triggered_split",
]
