"""``hash_model``: the paper's deep hashing network trained on the training split."""

import time
from typing import Literal

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.card import ModelArtefact, library_versions, weights_fingerprint
from nodule_pipeline.hashing.network import NetworkConfig
from nodule_pipeline.hashing.training import (
    EpochStats,
    TrainConfig,
    classification_metrics,
    encode,
    train_hash_model,
)
from nodule_pipeline.pictures import markdown_image, training_curves
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, roi_images, table_fingerprint


class TrainingConfig(Config):
    """The paper's settings by default: 256 bits, Adam, batch 32, 25 epochs, L2 0.01.
    ``validation_fraction`` carves validation patients out of the training split, never the test split.
    ``accuracy_floor``: the least test-split accuracy a model needs to reach the index (a blocking
    check; 0 turns the gate off, for data sets too small to measure)."""

    bits: int = 256
    variant: Literal[
        "ours", "cnn", "bilstm", "cnn_am", "bilstm_am", "serial_bilstm_cnn", "serial_cnn_bilstm", "parallel"
    ] = "ours"
    epochs: int = 25
    batch_size: int = 32
    learning_rate: float = 1e-3
    l2: float = 0.01
    seed: int = 0
    device: str = "auto"
    validation_fraction: float = 0.0
    accuracy_floor: float = 0.7


def upstream_metadata(context: AssetExecutionContext, asset: str, key: str) -> object:
    """A metadata value of the latest materialization of an upstream asset (None if absent)."""
    event = context.instance.get_latest_materialization_event(AssetKey(asset))
    entry = event.asset_materialization.metadata.get(key) if event and event.asset_materialization else None
    return entry.value if entry is not None else None


ACCURACY_FLOOR = "test_accuracy_floor"


@asset(
    group_name="hashing",
    code_version="1",
    kinds={"pytorch"},
    check_specs=[AssetCheckSpec(ACCURACY_FLOOR, asset="hash_model", blocking=True)],
)
def hash_model(context: AssetExecutionContext, config: TrainingConfig, roi_dataset: pd.DataFrame):
    """Cross-entropy plus L2, Adam, seeded; CUDA with mixed precision when present. Test-split
    metrics go into the model card with the data version and split it was trained on."""
    train = roi_dataset[roi_dataset[SPLIT_COLUMN] == TRAIN]
    test = roi_dataset[roi_dataset[SPLIT_COLUMN] == TEST]
    if len(train) < 2:
        raise InputDataError(f"the training split has {len(train)} ROIs; at least 2 are needed")
    if train["label"].nunique() < 2:
        context.log.warning(f"the training split holds one class only {train['label'].value_counts().to_dict()}")
    network = NetworkConfig(bits=config.bits, variant=config.variant)
    settings = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        l2=config.l2,
        seed=config.seed,
        device=config.device,
        validation_fraction=config.validation_fraction,
    )

    def progress(stats: EpochStats) -> None:
        validation = f", val acc {stats.val_accuracy:.3f}" if stats.val_accuracy is not None else ""
        context.log.info(
            f"epoch {stats.epoch}/{settings.epochs}: loss {stats.loss:.4f}, acc {stats.accuracy:.3f}{validation}, "
            f"{stats.images_per_s:.0f} images/s"
        )

    started = time.perf_counter()
    model = train_hash_model(
        roi_images(train), train["label"].to_numpy(), train["patient_id"].to_numpy(), network, settings, progress
    )
    metrics = (
        classification_metrics(test["label"].to_numpy(), encode(model, roi_images(test)).predicted) if len(test) else {}
    )
    version = weights_fingerprint(model.module)
    card = {
        "model_version": version,
        "data_version": table_fingerprint(roi_dataset),
        "split": {
            "mode": upstream_metadata(context, "roi_dataset", "split_mode"),
            "train_rois": len(train),
            "test_rois": len(test),
            "train_patients": sorted(train["patient_id"].unique().tolist()),
            "test_patients": sorted(test["patient_id"].unique().tolist()),
        },
        "test_metrics": metrics,
        "device": model.device,
        "seconds": round(time.perf_counter() - started, 1),
        "images_per_s": round(model.images_per_s, 1),
        "libraries": library_versions(),
    }
    size_mb = sum(p.numel() * p.element_size() for p in model.module.parameters()) / 2**20
    history = model.history
    curve = training_curves(
        [h.epoch for h in history],
        [h.loss for h in history],
        [h.accuracy for h in history],
        f"{config.variant}, {config.bits} bits",
    )
    yield Output(
        ModelArtefact(model, card),
        data_version=DataVersion(version),
        metadata={
            "model_version": version,
            "data_version": card["data_version"],
            "device": model.device,
            "train_rois": len(train),
            "test_rois": len(test),
            **{f"test_{name}": float(np.round(value, 4)) for name, value in metrics.items() if name != "n"},
            "images_per_s": card["images_per_s"],
            "seconds": card["seconds"],
            "model_size_mb": round(size_mb, 2),
            "curves": MetadataValue.md(markdown_image(curve, "loss and accuracy per epoch")),
            "card": MetadataValue.json(card),
            "config": MetadataValue.json(config.model_dump()),
        },
    )
    accuracy = metrics.get("accuracy")
    passed = config.accuracy_floor <= 0 or (accuracy is not None and accuracy >= config.accuracy_floor)
    if not passed:
        context.log.error(
            f"model {version}: test accuracy {accuracy if accuracy is not None else 'unmeasured (no test split)'} "
            f"is below the floor {config.accuracy_floor}; the index keeps the model it was built with"
        )
    yield AssetCheckResult(
        check_name=ACCURACY_FLOOR,
        passed=passed,
        metadata={
            "test_accuracy": float(accuracy) if accuracy is not None else -1.0,
            "floor": config.accuracy_floor,
            "test_rois": len(test),
            "model_version": version,
        },
        description=None
        if accuracy is not None
        else "no test split to measure the model on: it cannot reach the index",
    )
