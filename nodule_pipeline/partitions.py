"""One partition per patient: the key is the LIDC patient id (e.g. ``LIDC-IDRI-0001``)."""

import warnings

from dagster import AssetCheckSpec, DynamicPartitionsDefinition, PreviewWarning

patients_partitions = DynamicPartitionsDefinition(name="patients")


def patient_check(name: str, asset: str, description: str, blocking: bool = False) -> AssetCheckSpec:
    """A check of a per-patient asset with a result per patient partition, as the UI shows it.
    Partitioned checks are a preview API in Dagster 1.13: its warning is silenced here, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return AssetCheckSpec(
            name, asset=asset, description=description, blocking=blocking, partitions_def=patients_partitions
        )
