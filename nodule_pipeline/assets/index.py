"""``hash_index``: the searchable database built with the current model (no retraining)."""

from typing import Literal

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, Config, DataVersion, MetadataValue, Output, asset

from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.index import build_index, bytes_per_item
from nodule_pipeline.hashing.search import search
from nodule_pipeline.hashing.training import encode
from nodule_pipeline.pictures import markdown_image, search_results
from nodule_pipeline.roi_table import SPLIT_COLUMN, TEST, TRAIN, roi_images, table_fingerprint

EXAMPLE_QUERIES = 3


class IndexConfig(Config):
    """``train``: the paper's database is the training split; ``all`` indexes every row."""

    database: Literal["train", "all"] = "train"


def example_pictures(index, model, queries: pd.DataFrame, k: int = 6) -> str:
    """Markdown pictures of a few test-split queries with their top results."""
    pictures = []
    for _, row in queries.head(EXAMPLE_QUERIES).iterrows():
        image = np.asarray(row["image"], dtype=np.float32).reshape(32, 32)
        encoded = encode(model, image[None])
        hits = search(index, encoded.codes[0], encoded.fc[0], int(encoded.predicted[0]), k=k)
        png = search_results(
            image,
            f"query {row['nodule_id']}\nlabel {int(row['label'])}",
            [index.rois[h.row] for h in hits],
            [h.label for h in hits],
            [f"{h.nodule_id}\nham {h.hamming}" for h in hits],
        )
        pictures.append(markdown_image(png, f"query {row['nodule_id']}"))
    return "\n\n".join(pictures) or "no test queries"


@asset(group_name="hashing", code_version="1", kinds={"numpy"})
def hash_index(
    context: AssetExecutionContext, config: IndexConfig, hash_model: ModelArtefact, roi_dataset: pd.DataFrame
):
    """Bit-packed codes, fc features, labels, ids and characteristics of the database rows,
    computed with the current model; records the model and data versions it was built from."""
    rows = roi_dataset if config.database == "all" else roi_dataset[roi_dataset[SPLIT_COLUMN] == TRAIN]
    images = roi_images(rows)
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
    )
    labels = index.labels
    queries = roi_dataset[roi_dataset[SPLIT_COLUMN] == TEST]
    return Output(
        index,
        data_version=DataVersion(index.index_version),
        metadata={
            "items": len(index),
            "patients": int(items["patient_id"].nunique()) if len(items) else 0,
            "benign": int((labels == 0).sum()),
            "malignant": int((labels == 1).sum()),
            "bits": index.bits,
            "bytes_per_item": bytes_per_item(index),
            "database": config.database,
            "model_version": index.model_version,
            "index_version": index.index_version,
            "data_version": table_fingerprint(roi_dataset),
            "model_data_version": str(hash_model.card.get("data_version")),
            "example_queries": MetadataValue.md(
                example_pictures(index, hash_model.model, queries) if len(index) else ""
            ),
        },
    )
