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

from nodule_pipeline.concurrency import GPU_POOL
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.hashing.card import ModelArtefact, library_versions, weights_fingerprint
from nodule_pipeline.hashing.codes import code_health
from nodule_pipeline.hashing.metrics import table_ratings
from nodule_pipeline.hashing.network import NetworkConfig
from nodule_pipeline.hashing.training import (
    EpochStats,
    TrainConfig,
    TrainedModel,
    classification_metrics,
    encode,
    fit_to_data,
    train_hash_model,
)
from nodule_pipeline.pictures import markdown_image, training_curves
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, roi_images, split_settings, table_fingerprint


class TrainingConfig(Config):
    """``recipe``: ``default`` (chosen on real LIDC nodules: cross-entropy plus the DPSH pairwise,
    quantization, bit-balance and decorrelation terms, a head predicting the readers' ratings and
    the pairwise term on their graded similarity where the table has them, augmentation, a
    one-cycle schedule, validation patients carved out of the training split for model selection
    and early stopping) or ``paper`` (cross-entropy only, as Hao et al. trained). Every other field left
    empty takes the recipe's value; see ``nodule_pipeline.hashing.training.TrainConfig``.
    ``accuracy_floor``: the least test-split accuracy a model needs to reach the index (a
    blocking check; 0 turns the gate off, for data sets too small to measure)."""

    recipe: Literal["default", "paper"] = "default"
    bits: int = 256
    variant: Literal[
        "ours", "cnn", "bilstm", "cnn_am", "bilstm_am", "serial_bilstm_cnn", "serial_cnn_bilstm", "parallel"
    ] = "ours"
    lstm_hidden: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    l2: float | None = None
    augment: bool | None = None
    pairwise_weight: float | None = None
    quantization_weight: float | None = None
    balance_weight: float | None = None
    decorrelation_weight: float | None = None
    ratings_weight: float | None = None
    graded_pairwise: bool | None = None
    validation_fraction: float | None = None
    early_stopping_patience: int | None = None
    num_threads: int | None = None
    seed: int = 0
    device: str = "auto"
    accuracy_floor: float = 0.7

    def network(self) -> NetworkConfig:
        if self.lstm_hidden is None:
            return NetworkConfig(bits=self.bits, variant=self.variant)
        return NetworkConfig(self.bits, self.variant, lstm_hidden=self.lstm_hidden, attention_dim=self.lstm_hidden)

    def training(self) -> TrainConfig:
        return TrainConfig.recipe(self.recipe, **{name: getattr(self, name) for name in self.recipe_fields()})

    @classmethod
    def recipe_fields(cls) -> list[str]:
        """The fields that are :class:`TrainConfig`'s (None: the recipe's value)."""
        return sorted(set(TrainConfig.__dataclass_fields__) & set(cls.model_fields))

    def as_trained(self, network: NetworkConfig, trained: TrainConfig) -> dict:
        """This config with the values it trained with (``trained``: the recipe's, fitted to the
        data) in place of the empty ones, exactly: what ``hash_model``'s ``config`` shows, and what
        the runner compares the settings it is asked for with."""
        return {
            **self.model_dump(),
            **{name: getattr(trained, name) for name in self.recipe_fields()},
            "lstm_hidden": network.lstm_hidden,
        }


def ratings_note(model: TrainedModel) -> str:
    """Whether the model learnt the readers' ratings (and so re-ranks by them), in words."""
    if model.network.rating_outputs:
        graded = ", the pairwise term on their graded similarity" if model.config.graded_pairwise else ""
        return f"learnt: a head predicts the nine ratings{graded}; the hierarchical search re-ranks by them"
    if model.config.ratings_weight:
        return "none in the table: trained on the labels alone; the search re-ranks by fc distance"
    return "not used by the recipe; the search re-ranks by fc distance"


SIGNIFICANT_DIGITS = 4


def readable(value):
    """``value`` with every float in it (in dicts and lists too) to :data:`SIGNIFICANT_DIGITS`
    significant digits, for metadata people read; the stored card keeps them exact."""
    if isinstance(value, float | np.floating):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: readable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [readable(item) for item in value]
    return value


def latest_metadata(context: AssetExecutionContext, asset: str) -> dict | None:
    """The metadata values of an asset's latest materialization (None: never materialized)."""
    event = context.instance.get_latest_materialization_event(AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    return {key: entry.value for key, entry in event.asset_materialization.metadata.items()}


def floor_verdict(accuracy: float | None, floor: float, index: dict | None) -> tuple[bool, str]:
    """Whether a model may reach the index, and why. A model without a test split (too few
    patients) is unmeasured: it may build the first index, or replace an unmeasured one, never
    an index built from a measured model unless the floor is 0."""
    if floor <= 0:
        return True, "the accuracy floor is 0: the gate is off"
    if accuracy is not None:
        verdict = "reaches" if accuracy >= floor else "is below"
        return accuracy >= floor, f"test accuracy {accuracy:.4f} {verdict} the floor {floor}"
    if index is None or index.get("model_measured") is False:
        return True, "unmeasured (no test split): indexed, as no index of a measured model exists"
    return False, (
        f"unmeasured (no test split): the index keeps the measured model {index.get('model_version')}; "
        "set accuracy_floor to 0 (run --accuracy-floor 0) to index this model anyway"
    )


ACCURACY_FLOOR = "test_accuracy_floor"


@asset(
    group_name="hashing",
    code_version="2",
    kinds={"pytorch"},
    pool=GPU_POOL,
    check_specs=[AssetCheckSpec(ACCURACY_FLOOR, asset="hash_model", blocking=True)],
)
def hash_model(context: AssetExecutionContext, config: TrainingConfig, roi_dataset: pd.DataFrame):
    """The recipe's objective and schedule (see ``TrainingConfig``), seeded; CUDA with mixed
    precision when present. Test-split metrics and the database codes' health go into the model
    card with the recipe, the data version and the split it was trained on."""
    train = roi_dataset[roi_dataset[SPLIT_COLUMN] == TRAIN]
    test = roi_dataset[roi_dataset[SPLIT_COLUMN] == TEST]
    if len(train) < 2:
        raise InputDataError(f"the training split has {len(train)} ROIs; at least 2 are needed")
    if train["label"].nunique() < 2:
        context.log.warning(f"the training split holds one class only {train['label'].value_counts().to_dict()}")
    network = config.network()
    settings, small_data = config.training(), None
    if config.epochs is None:  # an epoch count asked for is trained as asked
        settings, small_data = fit_to_data(settings, len(train))
    if small_data:
        context.log.warning(small_data)

    def progress(stats: EpochStats) -> None:
        validation = f", val acc {stats.val_accuracy:.3f}" if stats.val_accuracy is not None else ""
        context.log.info(
            f"epoch {stats.epoch}/{settings.epochs}: loss {stats.loss:.4f}, acc {stats.accuracy:.3f}{validation}, "
            f"{stats.images_per_s:.0f} images/s"
        )

    started = time.perf_counter()
    model = train_hash_model(
        roi_images(train),
        train["label"].to_numpy(),
        train["patient_id"].to_numpy(),
        network,
        settings,
        progress,
        ratings=table_ratings(train),
    )
    metrics = (
        classification_metrics(test["label"].to_numpy(), encode(model, roi_images(test)).predicted) if len(test) else {}
    )
    health = code_health(encode(model, roi_images(train)).codes, train["label"].to_numpy())
    version = weights_fingerprint(model.module)
    card = {
        "model_version": version,
        "data_version": table_fingerprint(roi_dataset),
        "split": {
            "mode": (split_settings(roi_dataset) or {}).get("mode"),
            "train_rois": len(train),
            "test_rois": len(test),
            "train_patients": sorted(train["patient_id"].unique().tolist()),
            "test_patients": sorted(test["patient_id"].unique().tolist()),
        },
        "test_metrics": metrics,
        "measured": bool(metrics),
        "code_health": health,
        "network": model.network.to_dict(),
        "training": model.used_config.to_dict(),
        "validation": model.validation,
        "validation_patients": model.validation_patients,
        "small_data": small_data,
        "selected_epoch": model.selected_epoch,
        "epochs_run": len(model.history),
        "device": model.device,
        "seconds": round(time.perf_counter() - started, 1),
        "images_per_s": round(model.images_per_s, 1),
        "libraries": library_versions(),
    }
    size_mb = sum(p.numel() * p.element_size() for p in model.module.parameters()) / 2**20
    curve = training_curves(model.history, model.selected_epoch, f"{config.variant}, {config.bits} bits")
    yield Output(
        ModelArtefact(model, card),
        data_version=DataVersion(version),
        metadata={
            **readable(
                {
                    "model_version": version,
                    "data_version": card["data_version"],
                    "device": model.device,
                    "train_rois": len(train),
                    "test_rois": len(test),
                    **{f"test_{name}": value for name, value in metrics.items() if name != "n"},
                    "images_per_s": card["images_per_s"],
                    "seconds": card["seconds"],
                    "model_size_mb": size_mb,
                    "selected_epoch": model.selected_epoch,
                    "validation": model.validation,
                    "readers_ratings": ratings_note(model),
                    "measured": bool(metrics),
                    **({"small_data": small_data} if small_data else {}),
                    **{f"codes_{name}": value for name, value in health.items() if value is not None},
                }
            ),
            "curves": MetadataValue.md(markdown_image(curve, "loss and accuracy per epoch")),
            "card": MetadataValue.json(readable(card)),
            # exact, not rounded: the settings as typed or the recipe's, which the runner compares
            "config": MetadataValue.json(config.as_trained(network, model.used_config)),
        },
    )
    accuracy = metrics.get("accuracy")
    passed, verdict = floor_verdict(accuracy, config.accuracy_floor, latest_metadata(context, "hash_index"))
    (context.log.info if passed else context.log.error)(f"model {version}: {verdict}")
    yield AssetCheckResult(
        check_name=ACCURACY_FLOOR,
        passed=passed,
        metadata={
            "test_accuracy": readable(float(accuracy)) if accuracy is not None else -1.0,
            "measured": accuracy is not None,
            "floor": config.accuracy_floor,
            "test_rois": len(test),
            "model_version": version,
        },
        description=verdict,
    )
