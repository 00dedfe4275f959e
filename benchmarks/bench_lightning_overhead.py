"""Lightning path vs a plain PyTorch loop doing the same full-batch GD on the default synthetic config.

Both train the upstream model (task 1, T1 steps) and a downstream model (task 2, T2 steps) with the same
data, init, step size and accuracy evaluations every ``eval_every`` steps; the Lightning path is
``FullBatchGD`` under a ``pl.Trainer`` exactly as the pipeline builds it (tracking off). Prints the
seconds of each and the ratio (bar: Lightning <= 1.5x plain).

    python benchmarks/bench_lightning_overhead.py [--repeats 3] [overrides...]
"""

from __future__ import annotations

import argparse
import time

import torch

from ptlab.cli import compose_spec, quiet_lightning
from ptlab.engines.base import Stage
from ptlab.engines.lightning import LightningEngine
from ptlab.modules import logistic_loss, sign_accuracy
from ptlab.pipeline.synthetic import build_model, make_data


def plain_fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    lr: float,
    steps: int,
    eval_every: int,
) -> list[float]:
    """The reference loop: GD with the same loss, step and evaluation schedule as FullBatchGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, accs = [], []
    for step in range(steps):
        optimizer.zero_grad()
        margin = model(x)
        loss = logistic_loss(margin, y)
        loss.backward()
        losses.append(loss.detach())
        if step % eval_every == 0:
            with torch.no_grad():
                accs.append((sign_accuracy(margin, y), sign_accuracy(model(test_x), test_y)))
        optimizer.step()
    with torch.no_grad():
        accs.append((sign_accuracy(model(x), y), sign_accuracy(model(test_x), test_y)))
    return [v.item() for v in losses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_lightning()
    spec = compose_spec(["logger=none", "cache.enabled=false", "engine=lightning", *args.overrides])
    data = make_data(spec)
    train_cfg, task = spec.train, spec.task
    stages = [
        ("upstream", 1, data.task1_train, data.task1_test, train_cfg.upstream_steps),
        ("downstream", 2, data.task2_train, data.task2_test, train_cfg.downstream_steps),
    ]
    print(
        f"d={task.d} m={spec.model.width} N1={task.n1} N2={task.n2} T1={train_cfg.upstream_steps} "
        f"T2={train_cfg.downstream_steps} eval_every={train_cfg.eval_every} threads={torch.get_num_threads()}"
    )
    lightning = LightningEngine(trainer=dict(spec.trainer))
    best = {"lightning": float("inf"), "plain": float("inf")}
    for _ in range(args.repeats):
        for engine in ("plain", "lightning"):
            start = time.perf_counter()
            for stream, task_id, train, test, steps in stages:
                model = build_model(spec, stream)
                if engine == "plain":
                    plain_fit(model, train.x, train.y, test.x, test.y, train_cfg.lr, steps, train_cfg.eval_every)
                else:
                    lightning.train_stage(
                        Stage(
                            stream,
                            model,
                            train,
                            test,
                            steps,
                            train_cfg.lr,
                            train_cfg.eval_every,
                            data.directions,
                            task_id,
                            dtype=train_cfg.dtype,
                        )
                    )
            best[engine] = min(best[engine], time.perf_counter() - start)
    ratio = best["lightning"] / best["plain"]
    print(
        f"plain loop: {best['plain']:.3f} s   Lightning: {best['lightning']:.3f} s   "
        f"ratio: {ratio:.3f}x (bar <= 1.5x; best of {args.repeats})"
    )


if __name__ == "__main__":
    main()
