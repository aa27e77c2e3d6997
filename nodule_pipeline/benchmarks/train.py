"""Training throughput of the ``hash_model`` asset next to a bare PyTorch loop, same run.

The asset path is the real ``hash_model`` asset materialized with Dagster's ``materialize()`` on
a generated ROI table (the ROI-table contract plus a ``split`` column, handed over as the stored
``roi_dataset``), with the project's IO manager: its wall-clock time covers Dagster's run
machinery, reading the table, normalisation, the training loop, the test-split metrics, storing
the model twice (by version and as the asset) and the accuracy check. The in-loop figure is the
asset's own ``images_per_s`` metadata (training passes only).

The bare loop trains :class:`~nodule_pipeline.hashing.network.HashNet` with the same
``NetworkConfig``, data, batch size, optimizer (AdamW with the L2 weight decay on weights only,
fused where torch has it), per-batch work of the default recipe (its augmentation and its whole
objective: cross-entropy plus the hashing terms) and device (mixed precision on CUDA, as the
asset), with the normalised tensors prepared before the clock starts: the reference for what the
hardware does. What it leaves out is what the asset adds around that math: Dagster, storage, the
validation pass and model selection, the schedule, metrics and the card.

Both run in this process, taking turns (and turns at going first), after one small unmeasured
warm-up of each; the best of ``repeat`` counts. On a shared machine pass ``threads=1``: two
OpenMP threads competing with other work for two cores make single runs several times slower
at random. Target: the asset path within 10% of the bare loop.

    python -m nodule_pipeline.benchmarks.train [--rois 512] [--epochs 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RATIO_TARGET = 0.9
"""The asset path's images/s over the bare loop's should be at least this."""
ROIS_PER_PATIENT = 4


def synthetic_roi_table(rois: int, test_rois: int, seed: int = 0) -> pd.DataFrame:
    """A ROI table of the contract with a ``split`` column: ``rois`` training rows and ``test_rois``
    test rows, four ROIs per patient, each patient on one side. Images are lung-like noise (HU)
    with a disc-shaped nodule, larger and denser for label 1, so the classes can be learned."""
    from nodule_pipeline.roi_table import ROI_SIZE, SPLIT_COLUMN, TEST, TRAIN

    if rois < 2:
        raise ValueError(f"rois must be at least 2, got {rois}")
    rng = np.random.default_rng(seed)
    n = rois + test_rois
    labels = np.arange(n) % 2  # both classes on both sides
    rng.shuffle(labels[:rois])
    rng.shuffle(labels[rois:])
    grid = np.mgrid[:ROI_SIZE, :ROI_SIZE] - (ROI_SIZE - 1) / 2
    distance = np.hypot(grid[0][None], grid[1][None])
    radius = rng.uniform(2.5, 6.0, n) + 3.0 * labels
    density = rng.uniform(-150.0, 50.0, n) + 80.0 * labels
    images = rng.normal(-850.0, 60.0, (n, ROI_SIZE, ROI_SIZE))
    inside = distance < radius[:, None, None]
    images = np.where(inside, density[:, None, None] + rng.normal(0, 30.0, images.shape), images)
    side = np.array([TRAIN] * rois + [TEST] * test_rois)
    patient = np.concatenate([np.arange(rois) // ROIS_PER_PATIENT, 10**6 + np.arange(test_rois) // ROIS_PER_PATIENT])
    return pd.DataFrame(
        {
            "patient_id": [f"SYN-{p:07d}" for p in patient],
            "nodule_id": [f"SYN-{p:07d}-N{i % ROIS_PER_PATIENT + 1:02d}" for i, p in enumerate(patient)],
            "label": labels.astype(np.int8),
            "image": list(images.astype(np.float32).reshape(n, -1)),
            SPLIT_COLUMN: side,
        }
    )


def run_train_benchmark(
    rois: int = 512,
    epochs: int = 2,
    progress: Callable[[str], None] | None = print,
    repeat: int = 2,
    device: str = "auto",
    test_rois: int | None = None,
    batch_size: int = 32,
    threads: int | None = None,
) -> dict[str, Any]:
    """Training images per second through the ``hash_model`` asset and through a bare loop.

    ``rois`` training ROIs (plus ``test_rois``, default a quarter of them, on the test side),
    ``epochs`` epochs, ``device`` as the asset's config ("auto": CUDA when present), ``threads``
    torch's intra-op threads for the run (None: as they are). Returns a JSON-ready dict:
    ``images_per_s`` (asset path, wall-clock of the whole materialization),
    ``in_loop_images_per_s`` (the asset's own metadata), ``bare_torch_images_per_s``, ``ratio``
    (asset wall-clock / bare), ``in_loop_ratio``, ``device``, the seconds behind them
    (``asset_seconds`` split into the asset body, its training loop and the rest) and the
    settings.
    """
    import torch

    from nodule_pipeline.hashing.training import resolve_device, torch_threads

    if repeat < 1 or epochs < 1:
        raise ValueError(f"repeat and epochs must be at least 1, got repeat={repeat}, epochs={epochs}")
    say = progress or (lambda _line: None)
    test_rois = max(2, rois // 4) if test_rois is None else test_rois
    table = synthetic_roi_table(rois, test_rois)
    resolved = str(resolve_device(device))
    config = {"epochs": epochs, "batch_size": batch_size, "device": resolved, "accuracy_floor": 0.0}

    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="train-benchmark-") as workdir:
        say(f"warm-up (unmeasured) on {resolved}, torch threads {torch.get_num_threads()}")
        small = synthetic_roi_table(2 * batch_size, 8, seed=1)
        _asset_run(small, {**config, "epochs": 1}, Path(workdir) / "warm-up")
        _bare_run(small, 1, batch_size, resolved)
        asset_runs, bare_runs = [], []
        for round_ in range(1, repeat + 1):
            # Alternate which goes first, so neither always runs on the other's leftovers.
            if round_ % 2:
                asset_runs.append(_asset_run(table, config, Path(workdir) / f"run-{round_}"))
                bare_runs.append(_bare_run(table, epochs, batch_size, resolved))
            else:
                bare_runs.append(_bare_run(table, epochs, batch_size, resolved))
                asset_runs.append(_asset_run(table, config, Path(workdir) / f"run-{round_}"))
            say(
                f"[{round_}/{repeat}] asset {asset_runs[-1]['wall_seconds']:.2f} s "
                f"(in-loop {asset_runs[-1]['in_loop_images_per_s']:.0f} images/s), "
                f"bare loop {bare_runs[-1]['seconds']:.2f} s"
            )
        threads_used = torch.get_num_threads()

    images = rois * epochs
    asset = min(asset_runs, key=lambda r: r["wall_seconds"])
    bare = min(bare_runs, key=lambda r: r["seconds"])
    asset_ips = images / asset["wall_seconds"]
    in_loop = max(r["in_loop_images_per_s"] for r in asset_runs)
    bare_ips = images / bare["seconds"]
    return {
        "images_per_s": round(asset_ips, 2),
        "in_loop_images_per_s": round(in_loop, 2),
        "bare_torch_images_per_s": round(bare_ips, 2),
        "ratio": round(asset_ips / bare_ips, 4),
        "in_loop_ratio": round(in_loop / bare_ips, 4),
        "target_ratio": RATIO_TARGET,
        "met": asset_ips / bare_ips >= RATIO_TARGET,
        "device": resolved,
        "torch_threads": threads_used,
        "rois": rois,
        "test_rois": test_rois,
        "epochs": epochs,
        "batch_size": batch_size,
        "repeat": repeat,
        "images": images,
        "asset_seconds": {
            "wall": round(asset["wall_seconds"], 4),
            "asset_body": asset["body_seconds"],
            "training_loop": round(images / asset["in_loop_images_per_s"], 4),
            "all": [round(r["wall_seconds"], 4) for r in asset_runs],
        },
        "bare_seconds": {"loop": round(bare["seconds"], 4), "all": [round(r["seconds"], 4) for r in bare_runs]},
        "final_train_loss": {"asset": asset["final_loss"], "bare": bare["final_loss"]},
        "torch_version": torch.__version__,
    }


def format_train_summary(result: dict[str, Any]) -> str:
    """The figures of :func:`run_train_benchmark` in three lines."""
    seconds = result["asset_seconds"]
    return "\n".join(
        [
            f"device {result['device']} ({result['torch_threads']} threads), {result['rois']} ROIs x "
            f"{result['epochs']} epochs, batch {result['batch_size']}, best of {result['repeat']}",
            f"hash_model asset: {result['images_per_s']:.1f} images/s wall-clock ({seconds['wall']:.2f} s: asset body "
            f"{seconds['asset_body']:.2f} s, training loop {seconds['training_loop']:.2f} s), "
            f"in-loop {result['in_loop_images_per_s']:.1f} images/s",
            f"bare PyTorch loop: {result['bare_torch_images_per_s']:.1f} images/s; ratio {result['ratio']:.3f} "
            f"(in-loop {result['in_loop_ratio']:.3f}); target >= {result['target_ratio']}",
        ]
    )


# --------------------------------------------------------------------------------------------


def _asset_run(table: pd.DataFrame, config: dict[str, Any], base: Path) -> dict[str, Any]:
    """Materialize ``hash_model`` on ``table`` stored as ``roi_dataset``; wall seconds and metadata."""
    from dagster import BetaWarning, DagsterInstance, PreviewWarning, SourceAsset, materialize

    from nodule_pipeline.assets.model import hash_model
    from nodule_pipeline.hashing.model_files import read_model_card
    from nodule_pipeline.resources import ArtefactIOManager
    from nodule_pipeline.roi_table import write_roi_table
    from nodule_pipeline.storage import ROI_TABLE_FILE, artefact_folder

    write_roi_table(table, artefact_folder(base, ["roi_dataset"]) / ROI_TABLE_FILE)
    instance = DagsterInstance.ephemeral()  # an instance exists before any real run: not timed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)
        warnings.simplefilter("ignore", PreviewWarning)
        clock = time.perf_counter()
        result = materialize(
            [SourceAsset("roi_dataset"), hash_model],
            instance=instance,
            resources={"io_manager": ArtefactIOManager(base_dir=str(base))},
            run_config={
                "ops": {"hash_model": {"config": config}},
                "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            },
        )
        wall = time.perf_counter() - clock
    if not result.success:
        raise RuntimeError("hash_model did not materialize")
    (event,) = result.asset_materializations_for_node("hash_model")
    metadata = {key: value.value for key, value in event.metadata.items()}
    card = metadata["card"]
    history = read_model_card(artefact_folder(base, ["hash_model"]))["history"]
    return {
        "wall_seconds": wall,
        "body_seconds": float(card["seconds"]),
        "in_loop_images_per_s": float(metadata["images_per_s"]),
        "final_loss": round(float(history[-1]["loss"]), 4),
    }


def _bare_run(table: pd.DataFrame, epochs: int, batch_size: int, device: str) -> dict[str, Any]:
    """The plain loop: HashNet, AdamW (L2 on weights), shuffled batches, the default recipe's
    augmentation and objective."""
    import torch

    from nodule_pipeline.hashing.augment import augment_batch
    from nodule_pipeline.hashing.network import HashNet, NetworkConfig, normalise_rois
    from nodule_pipeline.hashing.objective import hashing_objective
    from nodule_pipeline.hashing.training import TrainConfig
    from nodule_pipeline.roi_table import SPLIT_COLUMN, TRAIN, roi_images

    train = table[table[SPLIT_COLUMN] == TRAIN]
    target = torch.device(device)
    amp = target.type == "cuda"
    x = torch.from_numpy(normalise_rois(roi_images(train))[0]).to(target)
    y = torch.from_numpy(train["label"].to_numpy().astype(np.int64)).to(target)
    recipe = TrainConfig()
    generator = torch.Generator(device=target).manual_seed(0)
    torch.manual_seed(0)
    model = HashNet(NetworkConfig()).to(target).train()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    try:
        optimizer = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scaler = torch.amp.GradScaler(target.type, enabled=amp)
    n = len(y)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    clock = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, device=target)
        loss_sum = torch.zeros((), device=target)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm needs two
                continue
            batch = augment_batch(x[index], generator, recipe.augment, recipe.shift_pixels)
            with torch.autocast(device_type=target.type, dtype=torch.float16, enabled=amp):
                out = model(batch)
            loss, _ = hashing_objective(out.logits, out.hash_probs, y[index], recipe.objective)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(index)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    seconds = time.perf_counter() - clock
    return {"seconds": seconds, "final_loss": round(float(loss_sum) / n, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: as they are)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run_train_benchmark(args.rois, args.epochs, repeat=args.repeat, device=args.device, threads=args.threads)
    print(format_train_summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
