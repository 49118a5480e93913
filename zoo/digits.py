"""A family of small classifiers trained from different seeds on the same data (scikit-learn's
bundled `load_digits`: 1797 8x8 grey images of the digits 0-9), for permutation merging.

Models trained from different initializations order their hidden units differently, so
their plain average is poor; `merging.permutation` aligns and merges them. Everything is
seeded and trains in about a second per model on one CPU thread:

    train_digits("mlp", seed)      # MLP 64-96-96-96-10 (ReLU)
    train_digits("cnn", seed)      # VGG-style: conv 16, conv 32 (each + ReLU + max-pool 2), linear 10
    build_family(root, "mlp", [0, 1, 2])  # HF-style folders (config.json + model.safetensors)

The split is fixed (seed 1234, 1297 train / 500 test) whatever the model seed. Folders hold
`config.json` with `evomerge_arch` (so `merging.permutation.archs.build` rebuilds the module)
and `inputs.safetensors`-style data files can be written with `write_inputs` for REPAIR.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from merging.checkpoint import CheckpointReader, write_checkpoint
from merging.permutation.archs import build

ARCHS = {
    "mlp": {"kind": "mlp", "inputs": 64, "hidden": [96, 96, 96], "outputs": 10},
    "cnn": {"kind": "cnn", "in_channels": 1, "channels": [16, 32], "pool_after": [0, 1], "image": 8, "outputs": 10},
}
TRAIN = {"epochs": 40, "batch": 64, "lr": 3e-3}
N_TEST = 500


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); images as (n, 1, 8, 8) floats in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    return x[N_TEST:], y[N_TEST:], x[:N_TEST], y[:N_TEST]


def train_digits(kind: str, seed: int, epochs: int | None = None) -> torch.nn.Module:
    """A model of `ARCHS[kind]` initialized and trained with `seed` (Adam, cosine lr, full epochs)."""
    if kind not in ARCHS:
        raise ValueError(f"kind must be one of {sorted(ARCHS)}, got {kind!r}")
    xtr, ytr, _, _ = digits_data()
    torch.manual_seed(seed)
    model = build(ARCHS[kind])
    epochs = epochs or TRAIN["epochs"]
    steps = epochs * ((len(ytr) + TRAIN["batch"] - 1) // TRAIN["batch"])
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), TRAIN["batch"]):
            idx = order[i:i + TRAIN["batch"]]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the test split (or the given data)."""
    if x is None:
        _, _, x, y = digits_data()
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def model_from_state(kind: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    m = build(ARCHS[kind])
    m.load_state_dict(state)
    return m.eval()


def save_model(model: torch.nn.Module, kind: str, folder: Path) -> Path:
    folder = Path(folder)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = write_checkpoint(folder, tensors)
    (out / "config.json").write_text(json.dumps({"evomerge_arch": ARCHS[kind], "model_type": "evomerge_digits"},
                                                indent=2) + "\n")
    return out


def load_model(folder: Path) -> torch.nn.Module:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    m = build(cfg["evomerge_arch"])
    r = CheckpointReader(folder)
    m.load_state_dict({n: r.get(n) for n in r.names()})
    return m.eval()


def build_family(root: Path, kind: str, seeds: list[int]) -> list[Path]:
    """Trains (or reuses, when config and seed match) one folder per seed: root/<kind>-s<seed>."""
    root = Path(root)
    out = []
    for s in seeds:
        folder = root / f"{kind}-s{s}"
        stamp = folder / "train.json"
        want = {"arch": ARCHS[kind], "train": TRAIN, "seed": s, "torch": torch.__version__}
        if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
            save_model(train_digits(kind, s), kind, folder.with_name(folder.name + ".new"))
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            folder.with_name(folder.name + ".new").rename(folder)
            (folder / "train.json").write_text(json.dumps(want))
        out.append(folder)
    return out


def write_inputs(path: Path, n: int = 256) -> Path:
    """A safetensors file {"inputs": the first n training images} (REPAIR data for the merge spec)."""
    from safetensors.torch import save_file

    xtr, _, _, _ = digits_data()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"inputs": xtr[:n].contiguous()}, str(path))
    return Path(path)
