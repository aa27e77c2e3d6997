"""``hash_index``: the searchable database built with the current model (no retraining)."""

from typing import Literal

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    asset,
    asset_check,
)

from nodule_pipeline.assets.refresh import WHEN_DATASET_OR_MODEL_CHANGES
from nodule_pipeline.concurrency import INDEX_POOL
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.index import HashIndex, build_index, bytes_per_item
from nodule_pipeline.hashing.query_checks import reference_from_index
from nodule_pipeline.hashing.search import fold_hits, nodule_of_rows, rows_for_nodules, search
from nodule_pipeline.hashing.training import encode
from nodule_pipeline.pictures import hit_caption, markdown_image, search_results
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, roi_images, table_fingerprint

EXAMPLE_QUERIES = 3


class IndexConfig(Config):
    """``train``: the paper's database is the training split; ``all`` indexes every row."""

    database: Literal["train", "all"] = "train"


def database_rows(roi_dataset: pd.DataFrame, database: str) -> pd.DataFrame:
    """The rows an index over ``roi_dataset`` holds, in index order."""
    return roi_dataset if database == "all" else roi_dataset[roi_dataset[SPLIT_COLUMN] == TRAIN]


def row_keys(table: pd.DataFrame) -> list[tuple[str, ...]]:
    """Per-row identity for comparing an index with a table: patient, nodule and annotation."""
    columns = [c for c in ("patient_id", "nodule_id", "annotation_id") if c in table.columns]
    return list(table[columns].astype(str).itertuples(index=False, name=None))


def example_pictures(index, model, queries: pd.DataFrame, k: int = 6) -> str:
    """Markdown pictures of a few test-split queries with their top results."""
    pictures = []
    nodules = nodule_of_rows(index)
    for _, row in queries.head(EXAMPLE_QUERIES).iterrows():
        image = np.asarray(row["image"], dtype=np.float32).reshape(32, 32)
        encoded = encode(model, image[None])
        rows = search(index, encoded.codes[0], encoded.fc[0], int(encoded.predicted[0]), k=rows_for_nodules(nodules, k))
        hits = fold_hits(rows, nodules, k)  # one picture per nodule, as users see hits
        png = search_results(
            image,
            f"query {row['nodule_id']}\nlabel {int(row['label'])}",
            [index.rois[h.row] for h in hits],
            [h.label for h in hits],
            [hit_caption(rank, h.nodule_id, f"ham {h.hamming}") for rank, h in enumerate(hits, 1)],
        ).png()
        pictures.append(markdown_image(png, f"query {row['nodule_id']}"))
    return "\n\n".join(pictures) or "no test queries"


@asset(
    group_name="hashing",
    code_version="4",  # 4: the model's class and rating predictions per item, for searches by a library nodule
    kinds={"numpy"},
    pool=INDEX_POOL,
    automation_condition=WHEN_DATASET_OR_MODEL_CHANGES,
)
def hash_index(
    context: AssetExecutionContext, config: IndexConfig, hash_model: ModelArtefact, roi_dataset: pd.DataFrame
):
    """Bit-packed codes, fc features, labels, ids and characteristics of the database rows,
    computed with the current model (no retraining); records the model version, whether that
    model was measured on a test split, the data version and the patient set it was built from.
    Refreshes by itself when the dataset or model changes."""
    rows = database_rows(roi_dataset, config.database)
    images = roi_images(rows)
    patients = sorted(rows["patient_id"].unique().tolist())
    data_version = table_fingerprint(roi_dataset)
    encoded = encode(hash_model.model, images)
    items = rows.drop(columns=["image"]).reset_index(drop=True)
    index = build_index(
        encoded.codes,
        encoded.fc,
        rows["label"].to_numpy(),
        items,
        model_version=hash_model.model_version,
        predicted=encoded.predicted,
        rois=images,
        probs=encoded.probs,
        predicted_ratings=encoded.ratings,
        lineage={
            "data_version": data_version,
            "database": config.database,
            "patients": patients,
            "model_measured": hash_model.measured,
        },
    )
    # how far the library's own nodules are from their nearest hit: a query farther is warned of
    index.lineage["query_reference"] = reference_from_index(index)
    labels = index.labels
    queries = roi_dataset[roi_dataset[SPLIT_COLUMN] == TEST]
    return Output(
        index,
        data_version=DataVersion(index.index_version),
        metadata={
            "items": len(index),
            "patients": len(patients),
            "benign": int((labels == 0).sum()),
            "malignant": int((labels == 1).sum()),
            "bits": index.bits,
            "bytes_per_item": bytes_per_item(index),
            "database": config.database,
            "model_version": index.model_version,
            "model_measured": hash_model.measured,
            "index_version": index.index_version,
            "data_version": data_version,
            "patient_ids": MetadataValue.json(patients),
            "model_data_version": str(hash_model.card.get("data_version")),
            "example_queries": MetadataValue.md(
                example_pictures(index, hash_model.model, queries) if len(index) else ""
            ),
        },
    )


@asset_check(
    asset=hash_index,
    additional_ins={"roi_dataset": AssetIn("roi_dataset")},
    description="The index holds exactly the database rows of the current roi_dataset (none missing, none stale).",
)
def index_rows_match_database(hash_index: HashIndex, roi_dataset: pd.DataFrame) -> AssetCheckResult:
    expected = row_keys(database_rows(roi_dataset, hash_index.lineage.get("database", "train")))
    held = row_keys(hash_index.items)
    missing, stale = set(expected) - set(held), set(held) - set(expected)
    return AssetCheckResult(
        passed=expected == held,
        metadata={
            "index_rows": len(held),
            "database_rows": len(expected),
            "missing_from_index": len(missing),
            "not_in_database": len(stale),
            "examples": MetadataValue.json([list(k) for k in sorted(missing | stale)[:10]]),
        },
    )


@asset_check(
    asset=hash_index,
    additional_ins={"hash_model": AssetIn("hash_model")},
    description="The index codes were computed by the current hash_model version.",
)
def index_uses_current_model(hash_index: HashIndex, hash_model: ModelArtefact) -> AssetCheckResult:
    current = str(hash_model.card.get("model_version", ""))
    return AssetCheckResult(
        passed=hash_index.model_version == current,
        metadata={"index_model_version": hash_index.model_version, "current_model_version": current},
    )
