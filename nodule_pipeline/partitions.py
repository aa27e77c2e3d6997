"""One partition per patient: the key is the LIDC patient id (e.g. ``LIDC-IDRI-0001``)."""

from dagster import DynamicPartitionsDefinition

patients_partitions = DynamicPartitionsDefinition(name="patients")
