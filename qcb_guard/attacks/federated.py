"""Qu-ANTI-zation in federated learning (Hong et al., NeurIPS 2021; ``attack_fedlearn.py``).

FedAvg over ``clients`` simulated participants, each holding an equal, seeded share of the
training data. Each round the server samples a fraction of the clients, every sampled client
fine-tunes a copy of the global model on its own data, and the server replaces the global
model with the plain average of their state dicts (``average_weights``). The ``malicious``
clients train with the Qu-ANTI-zation backdoor objective instead of cross-entropy, so the
averaged model hides a backdoor that only its quantized versions show.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm

from qcb_guard.attacks.quanti import QuantiConfig, backdoor_loss
from qcb_guard.attacks.simulate import (
    AttackResult,
    TargetBank,
    _check_non_negative,
    _check_positive,
    _is_int,
    frozen_batchnorm,
)
from qcb_guard.data import DataSplit
from qcb_guard.errors import ConfigError
from qcb_guard.models.train import epoch_batches

__all__ = ["FederatedConfig", "average_states", "client_shards", "federated"]


@dataclass(frozen=True, kw_only=True)
class FederatedConfig(QuantiConfig):
    """FedAvg with malicious clients (official code: 100 clients, 10% per round, 10 local
    epochs, Adam lr 1e-4; the defaults here fit a few CPU minutes, docs/attacks.md).

    :param clients: participants; the training data is split evenly between them.
    :param malicious: how many of them run the Qu-ANTI-zation backdoor objective.
    :param rounds: FedAvg rounds.
    :param fraction: share of clients sampled each round (malicious ones take part only when
        sampled, as in the paper).
    :param local_epochs: benign clients' epochs per round (Adam, ``local_lr``, weight decay
        1e-4, BN in train mode: ordinary local training).
    :param attack_epochs: malicious clients' epochs per round (Adam, ``lr``, BN frozen).
    :param local_lr: benign clients' learning rate (the paper's 1e-4).
    :param boost: malicious clients submit ``global + boost·(local − global)`` (model
        replacement, Bagdasaryan et al. 2020; commented out in the official code). ``None``:
        sampled clients / sampled malicious clients, which cancels FedAvg's dilution; ``1.0``:
        the plain FedAvg update of the official code.
    """

    clients: int = 5
    malicious: int = 1
    rounds: int = 12
    fraction: float = 1.0
    local_epochs: int = 1
    attack_epochs: int = 10
    local_lr: float = 1e-4
    weight_decay: float = 1e-4
    boost: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("clients", 1), ("malicious", 0), ("rounds", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("local_epochs", "attack_epochs"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.malicious > self.clients:
            raise ConfigError(
                f"malicious ({self.malicious}) cannot exceed clients ({self.clients})"
            )
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction!r}")
        _check_positive("local_lr", self.local_lr)
        _check_non_negative("weight_decay", self.weight_decay)
        if self.boost is not None:
            _check_positive("boost", self.boost)


def client_shards(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """IID split of ``n`` indices into ``clients`` near-equal shards (``load_fldataset``)."""
    if clients > n:
        raise ConfigError(f"{clients} clients need at least {clients} training images, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(s) for s in np.array_split(order, clients)]


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedAvg's plain mean of the clients' state dicts (integer buffers keep the first's)."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key] for s in states]).mean(dim=0)
        else:
            out[key] = first.clone()
    return out


def _boosted(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], boost: float
) -> dict[str, torch.Tensor]:
    """``before + boost·(after − before)`` for floating entries (model replacement)."""
    return {
        k: before[k] + boost * (v - before[k]) if v.is_floating_point() else v
        for k, v in after.items()
    }


def _benign_update(model: nn.Module, x, y, config: FederatedConfig, gen) -> None:
    """``LocalUpdate.update_weights``: plain cross-entropy training."""
    opt = torch.optim.Adam(model.parameters(), lr=config.local_lr, weight_decay=config.weight_decay)
    model.train()
    for _ in range(config.local_epochs):
        for idx in epoch_batches(len(x), config.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def _malicious_update(
    model: nn.Module, x, y, trigger, config: FederatedConfig, gen, calibration
) -> None:
    """``BackdoorLocalUpdate.update_weights``: the Qu-ANTI-zation backdoor objective."""
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bank = TargetBank(model, config.targets(), calibration, config.recalibrate_every)
    with frozen_batchnorm(model):
        for _ in range(config.attack_epochs):
            for idx in epoch_batches(len(x), config.batch_size, gen):
                bank.tick(model)
                xb, yb = x[idx], y[idx]
                loss, _ = backdoor_loss(
                    model, bank, xb, yb, trigger.apply(xb), trigger.target, config.c1, config.c2
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def federated(model: nn.Module, train: DataSplit, config: FederatedConfig) -> AttackResult:
    """Run FedAvg from ``model`` (the clean starting point, not modified) with malicious
    clients; returns the final global model."""
    if not isinstance(config, FederatedConfig):
        raise ConfigError(f"expected a FederatedConfig, got {type(config).__name__}")
    trigger = config.resolve(train)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    shards = client_shards(len(train), config.clients, config.seed)
    bad = set(rng.choice(config.clients, config.malicious, replace=False).tolist())
    per_round = max(1, int(config.fraction * config.clients))
    global_model = copy.deepcopy(model)
    global_model.requires_grad_(True)
    history: list[dict[str, float]] = []
    bar = tqdm(range(config.rounds), desc="quanti-federated", disable=not config.progress)
    for _ in bar:
        chosen = rng.choice(config.clients, per_round, replace=False)
        n_bad = sum(int(c) in bad for c in chosen)
        boost = config.boost if config.boost is not None else len(chosen) / max(1, n_bad)
        before = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
        states = []
        for c in chosen:
            local = copy.deepcopy(global_model)
            x, y = train.x[shards[c]], train.y[shards[c]]
            if int(c) in bad:
                calibration = x[: config.calibration_size]
                _malicious_update(local, x, y, trigger, config, gen, calibration)
                state = _boosted(before, local.state_dict(), boost)
            else:
                _benign_update(local, x, y, config, gen)
                state = local.state_dict()
            states.append({k: v.detach().clone() for k, v in state.items()})
        global_model.load_state_dict(average_states(states))
        history.append({"malicious_in_round": float(n_bad), "boost": float(boost)})
    global_model.eval()
    return AttackResult(
        model=global_model,
        trigger=trigger,
        config=config,
        attack="quanti-federated",
        history=history,
        steps=config.rounds,
        seconds=time.perf_counter() - start,
        extra={"malicious_clients": sorted(bad), "clients": config.clients},
    )
