"""The GPU path, measured: the default recipe trained on a ROI table with mixed precision on CUDA,
its images/s against the CPU (the recipe's own thread count), its accuracy against the spread of
CPU seeds, the library encoded on
the GPU (codes compared with the CPU's) and searched. One JSON; a few minutes on a GPU machine.

    python -m nodule_pipeline.benchmarks.gpu ROIS.parquet [--out gpu.json] [--epochs 12] [--cpu-seeds 3]

Without a CUDA device it says so, writes ``{"gpu": null, "reason": ...}`` and measures nothing:
CI and most laptops have none. ``--device cpu`` runs the same steps on the CPU (what the tests do,
on a small table), so the script's logic is exercised where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodule_pipeline.hashing.index import build_index
from nodule_pipeline.hashing.metrics import table_ratings
from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline.hashing.training import TrainConfig, TrainedModel, encode, train_hash_model
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, assign_split, read_roi_table, roi_images

SPREAD_SIGMAS = 2.0
"""The GPU model's accuracy counts as within the CPU seeds' spread when it is within this many
standard deviations of their mean (and never tighter than one test row)."""
DEFAULT_EPOCHS = 12


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU path (None: it can)."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA device on this machine (torch {torch.__version__}, {build}): nothing measured"
    return None


def _train(table_train, recipe: TrainConfig, device: str, seed: int) -> TrainedModel:
    config = replace(recipe, device=device, mixed_precision=device.startswith("cuda"), seed=seed)
    return train_hash_model(
        roi_images(table_train),
        table_train["label"].to_numpy(),
        table_train["patient_id"].to_numpy(),
        config=config,
        ratings=table_ratings(table_train),
    )


def _accuracy(model: TrainedModel, test) -> float:
    return float(np.mean(encode(model, roi_images(test)).predicted == test["label"].to_numpy()))


def run_gpu_benchmark(
    rois: Path, device: str = "cuda", epochs: int = DEFAULT_EPOCHS, cpu_seeds: int = 3, split_seed: int = 0
) -> dict[str, Any]:
    """Every figure of the GPU path on ``rois`` (a ROI table), trained and searched on ``device``."""
    table = assign_split(read_roi_table(rois), mode="patient", seed=split_seed)
    train, test = table[table[SPLIT_COLUMN] == TRAIN], table[table[SPLIT_COLUMN] == TEST]
    recipe = replace(TrainConfig(), epochs=epochs)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rois": {"train": len(train), "test": len(test)},
        "epochs": epochs,
    }

    cpu_models = [_train(train, recipe, "cpu", seed) for seed in range(cpu_seeds)]
    cpu_accuracy = [_accuracy(model, test) for model in cpu_models]
    model = _train(train, recipe, device, 0)
    accuracy = _accuracy(model, test)
    mean, std = float(np.mean(cpu_accuracy)), float(np.std(cpu_accuracy))
    tolerance = max(SPREAD_SIGMAS * std, 1.0 / len(test))
    result["train"] = {
        "images_per_s": round(model.images_per_s, 1),
        "cpu_images_per_s": round(float(np.mean([m.images_per_s for m in cpu_models])), 1),
        "speedup": round(model.images_per_s / max(np.mean([m.images_per_s for m in cpu_models]), 1e-9), 2),
        "seconds": round(model.seconds, 1),
        "mixed_precision": device.startswith("cuda"),
        "accuracy": round(accuracy, 4),
        "cpu_accuracy": [round(a, 4) for a in cpu_accuracy],
        "within_cpu_spread": bool(abs(accuracy - mean) <= tolerance),
        "tolerance": round(tolerance, 4),
    }

    images = roi_images(train)
    started = time.perf_counter()
    on_cpu = encode(model, images)
    cpu_seconds = time.perf_counter() - started
    model.module.to(device)
    started = time.perf_counter()
    on_device = encode(model, images)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    device_seconds = time.perf_counter() - started
    result["encode"] = {
        "items": len(images),
        "images_per_s": round(len(images) / device_seconds, 1),
        "cpu_images_per_s": round(len(images) / cpu_seconds, 1),
        "codes_equal_to_cpu": float(np.mean(on_device.codes == on_cpu.codes)),
    }

    index = build_index(
        on_device.codes,
        on_device.fc,
        train["label"].to_numpy(),
        train.drop(columns=["image"]).reset_index(drop=True),
        "gpu-benchmark",
        predicted=on_device.predicted,
        rois=images,
    )
    searcher = NoduleSearcher(model, index, "gpu-benchmark")
    queries = roi_images(test)
    started = time.perf_counter()
    _, found = searcher.search_many(queries, k=10, exclude_patients=list(test["patient_id"]))
    seconds = time.perf_counter() - started
    result["search"] = {
        "queries": len(queries),
        "queries_per_s": round(len(queries) / seconds, 1),
        "encoded_on": str(next(model.module.parameters()).device),
        "hits_per_query": int(np.asarray(found.rows).shape[1]),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rois", type=Path, help="a ROI table (parquet) with the readers' ratings, such as the dev set")
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--cpu-seeds", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to run the same steps without a GPU")
    args = parser.parse_args(argv)
    reason = no_gpu_reason() if args.device.startswith("cuda") else None
    if reason:
        print(reason)
        args.out.write_text(json.dumps({"gpu": None, "reason": reason}, indent=2))
        return 0
    result = {
        "gpu": args.device.startswith("cuda"),
        **run_gpu_benchmark(args.rois, args.device, args.epochs, args.cpu_seeds),
    }
    args.out.write_text(json.dumps(result, indent=2))
    train, encoded, search = result["train"], result["encode"], result["search"]
    print(
        f"{result['device']}: training {train['images_per_s']} images/s ({train['speedup']}x the CPU's "
        f"{train['cpu_images_per_s']}), accuracy {train['accuracy']} against the CPU seeds' {train['cpu_accuracy']} "
        f"({'within' if train['within_cpu_spread'] else 'OUTSIDE'} their spread); encoding {encoded['images_per_s']} "
        f"images/s, codes {encoded['codes_equal_to_cpu']:.4f} equal to the CPU's; search {search['queries_per_s']} "
        f"queries/s; {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
