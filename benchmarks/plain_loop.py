"""The default ``python -m ptlab`` pipeline as a plain PyTorch script: the reference of ``bench_speed.py``.

Upstream on task 1 (T1 steps), an alpha-fraction of its filters copied into a fresh model (random filters,
the same positions), downstream on task 2 (T2 steps), and the scratch model on task 2: the paper's two-layer
ReLU CNN, full-batch GD with autograd and ``torch.optim.SGD``, the logistic loss every step and the train and
test accuracies every ``eval_every`` steps and at the end. Only torch is imported: the data, the inits and
the filter choice are drawn here with the seeds ptlab derives from ``seed`` (``ptlab.seeding.derive_seed``:
crc32 of ``"<seed>/<stream>"``), so the final accuracies equal those of ``python -m ptlab`` (default config,
``seed=0``); ``bench_speed.py`` checks that they do. No tracking, no config system, no figure.

    python benchmarks/plain_loop.py [--seed 0] [--d 2000] [--u-norm 2.0] [--eval-every 10]
    # prints one JSON line: each stage's final accuracies and loss, and the seconds after the imports
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Settings:
    """The default config's values (conf/config.yaml, conf/task/synthetic.yaml, conf/model/toy_cnn.yaml)."""

    seed: int = 0
    d: int = 2000
    n1: int = 200
    n2: int = 20
    n_test: int = 1000
    width: int = 40
    init_std: float = 0.01
    u_norm: float = 2.0
    v_norm: float = 2.0
    sigma_p1: float = 1.0
    sigma_p2: float = 1.0
    lr: float = 0.01
    t1: int = 800
    t2: int = 400
    eval_every: int = 10
    alpha: float = 0.5


def derive_seed(seed: int, *names: str) -> int:
    return zlib.crc32("/".join((str(seed), *names)).encode()) & 0x7FFFFFFF


def gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, name))


def make_data(s: Settings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two-patch samples [y (u + v_k), xi], xi ~ N(0, sigma^2 P), P projecting off span{u, v1, v2}."""
    data_seed, D = derive_seed(s.seed, "data"), s.d
    basis, _ = torch.linalg.qr(torch.randn(D, 3, generator=gen(data_seed, "directions"), dtype=torch.float64))
    u, v1, v2 = (basis[:, i] * norm for i, norm in enumerate((s.u_norm, s.v_norm, s.v_norm)))
    basis32 = basis.float().double()

    def sample(task: int, n: int, sigma: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = gen(data_seed, name)
        y = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        torch.rand(n, generator=g, dtype=torch.float64)  # the label-noise draw (no flips at label_noise=0)
        gauss = torch.randn(n, D, generator=g, dtype=torch.float64)
        noise = (sigma * (gauss - (gauss @ basis32) @ basis32.T)).float()
        signal = y[:, None] * (u.float() + (v1 if task == 1 else v2).float())[None, :]
        return torch.stack([signal, noise], dim=1), y

    return {
        "task1_train": sample(1, s.n1, s.sigma_p1, "task1_train"),
        "task1_test": sample(1, s.n_test, s.sigma_p1, "task1_test"),
        "task2_train": sample(2, s.n2, s.sigma_p2, "task2_train"),
        "task2_test": sample(2, s.n_test, s.sigma_p2, "task2_test"),
    }


class TwoLayerCNN(torch.nn.Module):
    """f(W; x) = (1/m) sum_r [relu(<w_{+1,r}, x1>) + relu(<w_{+1,r}, x2>)] - (the same for the -1 filters)."""

    def __init__(self, s: Settings, stream: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(2, s.width, s.d))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(s.seed, stream))
            torch.nn.init.normal_(self.weight, mean=0.0, std=s.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, width = self.weight.shape[2], self.weight.shape[1]
        act = torch.relu(x.reshape(-1, d) @ self.weight.reshape(-1, d).T).reshape(len(x), 2, 2, width)
        scores = act.sum(dim=1).mean(dim=-1)
        return scores[:, 0] - scores[:, 1]


def accuracy(margin: torch.Tensor, y: torch.Tensor) -> float:
    return ((margin > 0) == (y > 0)).float().mean().item()


def fit(
    model: TwoLayerCNN,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
    eval_every: int,
) -> dict[str, float]:
    """Full-batch GD; the loss every step, the accuracies every ``eval_every`` steps and after the last step."""
    (x, y), (test_x, test_y) = train, test
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, curve = [], []
    for step in range(steps):
        optimizer.zero_grad()
        margin = model(x)
        loss = F.softplus(-y * margin).mean()
        loss.backward()
        losses.append(loss.detach())
        if step % eval_every == 0:
            with torch.no_grad():
                curve.append((accuracy(margin, y), accuracy(model(test_x), test_y)))
        optimizer.step()
    with torch.no_grad():
        margin = model(x)
        final = {
            "train_acc": accuracy(margin, y),
            "test_acc": accuracy(model(test_x), test_y),
            "train_loss": F.softplus(-y * margin).mean().item(),
        }
    torch.stack(losses).tolist()
    return final


def pipeline(s: Settings) -> dict[str, dict[str, float]]:
    """Upstream, transfer (``round(alpha m)`` random filters of each output copied to the same positions), scratch."""
    data = make_data(s)
    upstream = TwoLayerCNN(s, "upstream")
    results = {"upstream": fit(upstream, data["task1_train"], data["task1_test"], s.t1, s.lr, s.eval_every)}
    transfer = TwoLayerCNN(s, "downstream")
    g = gen(s.seed, "selection")
    with torch.no_grad():
        for j in range(2):
            chosen = torch.randperm(s.width, generator=g)[: int(s.alpha * s.width + 0.5)]
            transfer.weight[j, chosen] = upstream.weight[j, chosen]
    results["transfer"] = fit(transfer, data["task2_train"], data["task2_test"], s.t2, s.lr, s.eval_every)
    results["scratch"] = fit(TwoLayerCNN(s, "downstream"), data["task2_train"], data["task2_test"], s.t2, s.lr, s.eval_every)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d", type=int, default=Settings.d)
    parser.add_argument("--u-norm", type=float, default=Settings.u_norm)
    parser.add_argument("--eval-every", type=int, default=Settings.eval_every)
    args = parser.parse_args()
    started = time.perf_counter()
    results = pipeline(Settings(seed=args.seed, d=args.d, u_norm=args.u_norm, eval_every=args.eval_every))
    print(json.dumps({**results, "seconds_after_import": round(time.perf_counter() - started, 3)}))


if __name__ == "__main__":
    main()
