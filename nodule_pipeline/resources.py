"""Configurable resources: where scans live and where artefacts go.

Both read their defaults from the environment (``NODULE_PIPELINE_DATA_DIR``,
``NODULE_PIPELINE_LIDC_ROOT``, or ``NODULE_PIPELINE_DICOMWEB_URL`` and
``NODULE_PIPELINE_ANNOTATIONS`` for a PACS) so the CLI, ``dg dev`` and tests point at the same
sources.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext

from nodule_pipeline import privacy
from nodule_pipeline.arrivals import Watched, content_fingerprint, watch_folder
from nodule_pipeline.errors import InputDataError, check_safe_key
from nodule_pipeline.hashing.card import ModelArtefact
from nodule_pipeline.hashing.index import MANIFEST as INDEX_MANIFEST
from nodule_pipeline.hashing.index import HashIndex, load_index, read_manifest, save_index
from nodule_pipeline.hashing.model_files import META_FILE as MODEL_META
from nodule_pipeline.hashing.model_files import read_model_card
from nodule_pipeline.hashing.training import load_model, save_model
from nodule_pipeline.lidc import dicomweb
from nodule_pipeline.lidc.layout import find_patient_folders
from nodule_pipeline.lidc.lung_mask import pack_mask, unpack_mask
from nodule_pipeline.lidc.series import CtSeries, SkippedSeries, open_scan, save_scan
from nodule_pipeline.roi_table import read_roi_table, write_roi_table
from nodule_pipeline.storage import (
    ROI_TABLE_FILE,
    TABLE_FILE,
    artefact_folder,
    atomic_write,
    model_version_folder,
    prune_model_versions,
    replace_dir,
)

DATA_DIR_ENV = "NODULE_PIPELINE_DATA_DIR"
LIDC_ROOT_ENV = "NODULE_PIPELINE_LIDC_ROOT"
DIAGNOSIS_ENV = "NODULE_PIPELINE_DIAGNOSIS"
ANNOTATIONS_ENV = "NODULE_PIPELINE_ANNOTATIONS"
PACS_CACHE = "pacs-cache"
SETTINGS_FILE = "settings.json"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data")).resolve()


def _settings(data_dir: Path) -> dict[str, str]:
    settings = data_dir / SETTINGS_FILE
    return json.loads(settings.read_text()) if settings.exists() else {}


def default_lidc_root(data_dir: Path) -> Path:
    """The scan root: the environment, else what ``nodule-pipeline run`` recorded, else data/lidc."""
    if os.environ.get(LIDC_ROOT_ENV):
        return Path(os.environ[LIDC_ROOT_ENV]).resolve()
    return Path(_settings(data_dir).get("lidc_root") or data_dir / "lidc")


def default_diagnosis_sheet(data_dir: Path) -> str:
    """The diagnosis sheet named by the environment or by ``run --diagnosis`` ("": found at the
    scan root, if there is one)."""
    return os.environ.get(DIAGNOSIS_ENV) or _settings(data_dir).get("diagnosis_sheet", "")


def remember_scan_source(data_dir: Path, source: ScanSource, diagnosis_sheet: Path | None = None) -> None:
    """Record the scan source (a scan root, or a PACS's URL and the readings' folder; never
    credentials) and a diagnosis sheet given to ``run`` beside the instance, so ``make ui`` and
    the sensors on that data dir find the scans."""
    if source.is_pacs:
        settings = {"dicomweb_url": source.dicomweb_url, "annotations_dir": source.annotations_dir}
    else:
        settings = {"lidc_root": str(Path(source.root).resolve())}
    if diagnosis_sheet is not None:
        settings["diagnosis_sheet"] = str(diagnosis_sheet.resolve())
    elif _settings(data_dir).get("diagnosis_sheet"):
        settings["diagnosis_sheet"] = _settings(data_dir)["diagnosis_sheet"]
    payload = json.dumps(settings, indent=2)
    atomic_write(data_dir / SETTINGS_FILE, lambda tmp: tmp.write_text(payload))


def scan_source_for(
    data_dir: Path,
    lidc_root: Path | None = None,
    diagnosis_sheet: Path | None = None,
    dicomweb_url: str | None = None,
    annotations_dir: Path | None = None,
) -> ScanSource:
    """The scan source of a data dir, the first that is set: a scan root or a DICOMweb URL given
    here, ``NODULE_PIPELINE_DICOMWEB_URL``, ``NODULE_PIPELINE_LIDC_ROOT``, what ``run`` recorded
    (``--dicomweb`` or ``--lidc-root``), else ``data/lidc`` (see :func:`default_lidc_root`)."""
    settings = _settings(data_dir)
    if lidc_root is None and not dicomweb_url:
        dicomweb_url = os.environ.get(dicomweb.DICOMWEB_URL_ENV)
        if not dicomweb_url and not os.environ.get(LIDC_ROOT_ENV):
            dicomweb_url = settings.get("dicomweb_url")
    sheet = str(diagnosis_sheet.resolve()) if diagnosis_sheet else default_diagnosis_sheet(data_dir)
    if dicomweb_url:
        readings = annotations_dir or os.environ.get(ANNOTATIONS_ENV) or settings.get("annotations_dir") or ""
        return ScanSource(
            dicomweb_url=dicomweb_url,
            annotations_dir=str(Path(readings).resolve()) if readings else "",
            cache_dir=str(data_dir.resolve() / PACS_CACHE),
            diagnosis_sheet=sheet,
        )
    return ScanSource(root=str((lidc_root or default_lidc_root(data_dir)).resolve()), diagnosis_sheet=sheet)


LAZY_VOLUMES = "lazy_volumes"
"""Input metadata (``AssetIn(metadata={LAZY_VOLUMES: True})``): a step that reads a few slices'
neighbourhoods of ``lidc_scan`` gets volumes that decompress only the rows it indexes."""
OPTIONAL_INPUT = "optional"
"""Input metadata (``AssetIn(metadata={OPTIONAL_INPUT: True})``): an upstream asset the step can do
without; it gets None while that asset has never been stored (no diagnosis sheet read yet)."""


def load_artefact(folder: Path, lazy_volumes: bool = False) -> object:
    """Read back whatever :class:`ArtefactIOManager` stored in ``folder`` (a scan's volumes
    decompressed on demand with ``lazy_volumes``, see :func:`open_scan`)."""
    if (folder / ROI_TABLE_FILE).exists():
        return read_roi_table(folder / ROI_TABLE_FILE)
    if (folder / TABLE_FILE).exists():
        return pd.read_parquet(folder / TABLE_FILE)
    if (folder / "scan.json").exists():
        return open_scan(folder, lazy=lazy_volumes)
    if (folder / MODEL_META).exists():
        return ModelArtefact(load_model(folder), read_model_card(folder).get("card", {}))
    if (folder / INDEX_MANIFEST).exists():
        return load_index(folder)
    if (folder / "masks.npz").exists():
        with np.load(folder / "masks.npz") as stored:
            shapes = json.loads(str(stored["__shapes__"]))
            return {uid: unpack_mask(stored[uid], tuple(shape)) for uid, shape in shapes.items()}
    raise FileNotFoundError(f"no stored artefact in {folder}")


@dataclass(frozen=True)
class LocalPatient:
    """A patient's scans on local disk for the folder reader: the patient folder under the scan
    root, or the cache of what a PACS sent; series the source skipped without fetching (a PACS's
    radiographs); the content fingerprint; and where the scans came from, as it may be shown."""

    folder: Path
    remote_skipped: list[SkippedSeries]
    fingerprint: str
    source: str


class ScanSource(ConfigurableResource):
    """Where LIDC scans come from: a folder as downloaded (``<root>/<patient_id>/<study>/<series>/
    *.dcm`` + XML, or the same under collection and download folders, see
    :mod:`nodule_pipeline.lidc.layout`), or a PACS over DICOMweb (``dicomweb_url``) whose CT
    studies are grouped by PatientID, with the LIDC XML readings from ``annotations_dir``.

    Partition keys are the patient folder names (PatientIDs), or their keyed pseudonyms when
    ``NODULE_PIPELINE_PSEUDONYM_KEY`` is set (see :mod:`nodule_pipeline.privacy`). The PACS's
    credentials come from the environment (:mod:`nodule_pipeline.lidc.dicomweb`), never from here."""

    root: str = ""
    diagnosis_sheet: str = ""
    """TCIA's diagnosis spreadsheet (.xls); "" looks for ``*diagnosis*.xls`` at the root (or in
    the annotations folder of a PACS source)."""
    dicomweb_url: str = ""
    annotations_dir: str = ""
    cache_dir: str = ""
    """Where a PACS's series are cached (complete series only), so a retry does not fetch again."""

    @property
    def is_pacs(self) -> bool:
        return bool(self.dicomweb_url)

    @property
    def where(self) -> str:
        """The source as a message names it."""
        return self.dicomweb_url or self.root

    @property
    def sheet_folder(self) -> Path:
        """Where a diagnosis sheet is looked for when none is named."""
        return Path(self.annotations_dir if self.is_pacs else self.root)

    def _pacs(self) -> dicomweb.Pacs:
        return dicomweb.Pacs(self.dicomweb_url)

    def _readings(self) -> dict[str, list[Path]]:
        return dicomweb.index_readings(Path(self.annotations_dir) if self.annotations_dir else None)

    def pacs_patients(self) -> dict[str, list[dicomweb.PacsStudy]]:
        """Partition key -> the patient's CT studies in the PACS. Studies that cannot be a
        partition (no PatientID, or one that is not a safe name) are left out and named in the
        error when nothing else is there."""
        grouped, refused = dicomweb.group_by_patient(self._pacs().studies())
        if refused and not grouped:
            raise InputDataError(f"no usable CT study in the PACS: {'; '.join(refused)}", path=self.dicomweb_url)
        pseudonymiser = privacy.active()
        return {(pseudonymiser.patient(name) if pseudonymiser else name): grouped[name] for name in sorted(grouped)}

    def patient_folders(self) -> dict[str, Path]:
        """Partition key -> folder, for every patient folder under the root that holds DICOM files."""
        pseudonymiser = privacy.active()
        found = find_patient_folders(Path(self.root))
        return {(pseudonymiser.patient(name) if pseudonymiser else name): found[name] for name in sorted(found)}

    def patient_dir(self, patient_id: str) -> Path:
        if privacy.active() is None and (Path(self.root) / check_safe_key(patient_id)).is_dir():
            return Path(self.root) / patient_id  # the common layout, without a look through the root
        folders = self.patient_folders()
        if patient_id not in folders:
            raise InputDataError(
                "no patient folder with DICOM files under the scan root", patient_id=patient_id, path=self.root
            )
        return folders[patient_id]

    def watch(self) -> dict[str, Watched]:
        """Every patient as the new-scan watcher sees it (see :mod:`nodule_pipeline.arrivals`)."""
        if not self.is_pacs:
            return {key: watch_folder(folder) for key, folder in self.patient_folders().items()}
        pacs, patients = self._pacs(), self.pacs_patients()

        def fingerprint(key: str) -> str:
            listing = dicomweb.list_patient(pacs, key, patients[key])
            readings = self._readings()
            matched = [path for s in listing.ct_series for path in readings.get(s.series_uid, [])]
            return dicomweb.source_fingerprint(listing.instance_uids(), matched)

        return {
            key: Watched(dicomweb.patient_signature(studies), False, lambda key=key: fingerprint(key))
            for key, studies in patients.items()
        }

    def fetch_patient(self, patient_id: str) -> LocalPatient:
        """The patient's scans on local disk, fetched from the PACS (complete series only, not
        again when cached) or found under the scan root."""
        if not self.is_pacs:
            folder = self.patient_dir(patient_id)  # under pseudonyms a look through the scan root: once
            return LocalPatient(folder, [], content_fingerprint(folder), privacy.shown_path(folder))
        patients = self.pacs_patients()
        if patient_id not in patients:
            raise InputDataError("no CT study of this patient in the PACS", patient_id=patient_id, path=self.where)
        cached = dicomweb.cache_patient(
            self._pacs(), patient_id, patients[patient_id], self._readings(), Path(self.cache_dir)
        )
        studies = ", ".join(privacy.shown_uid(uid) for uid in cached.studies)
        return LocalPatient(
            cached.folder, cached.skipped, cached.fingerprint, f"{self.dicomweb_url} (studies {studies})"
        )


class ReportStore(ConfigurableResource):
    """Where human-readable reports go (``<data-dir>/reports``)."""

    folder: str


class ArtefactIOManager(ConfigurableIOManager):
    """Stores each asset (partition) in its own folder under ``base_dir`` in a compact format:
    scans as zstd int16 volumes + JSON, masks bit-packed, ROI tables as parquet, the model as a
    weights-only state dict + card, the index as memory-mappable arrays. Writes are
    atomic, so a failed run never damages what an earlier run stored."""

    base_dir: str

    def _folder(self, asset_path: list[str], partition_key: str | None) -> Path:
        return artefact_folder(Path(self.base_dir), asset_path, partition_key)

    def handle_output(self, context: OutputContext, obj: object) -> None:
        partition = context.partition_key if context.has_asset_partitions else None
        folder = self._folder(context.asset_key.path, partition)
        if isinstance(obj, pd.DataFrame) and "image" in obj.columns:
            write_roi_table(obj, folder / ROI_TABLE_FILE)
        elif isinstance(obj, pd.DataFrame):
            atomic_write(folder / TABLE_FILE, lambda tmp: obj.to_parquet(tmp, index=False))
        elif isinstance(obj, ModelArtefact):
            versioned = model_version_folder(Path(self.base_dir), obj.card["model_version"])
            save_model(obj.model, versioned, obj.card)
            # The current model is the same files: hard links, not a second serialisation and checksum.
            replace_dir(folder, lambda tmp: shutil.copytree(versioned, tmp, dirs_exist_ok=True, copy_function=os.link))
            self._prune_old_models(context, obj.card["model_version"])
        elif isinstance(obj, HashIndex):
            save_index(obj, folder)
        elif isinstance(obj, list) and all(isinstance(s, CtSeries) for s in obj):
            save_scan(obj, folder)
        elif isinstance(obj, dict) and all(isinstance(m, np.ndarray) and m.dtype == bool for m in obj.values()):
            packed = {uid: pack_mask(mask) for uid, mask in obj.items()}
            shapes = {uid: list(mask.shape) for uid, mask in obj.items()}

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **packed, __shapes__=np.array(json.dumps(shapes)))

            atomic_write(folder / "masks.npz", write)
        else:
            raise TypeError(f"{context.asset_key.to_user_string()}: cannot store a {type(obj).__name__}")

    def stored(self, asset_path: list[str]) -> object | None:
        """What the last run stored for an unpartitioned asset (None before the first): how an
        asset reads its own earlier output. State that later runs rely on lives here, not in
        event-log metadata, so a new instance over the same data dir (PostgreSQL) still finds it."""
        try:
            return load_artefact(self._folder(asset_path, None))
        except FileNotFoundError:
            return None

    def _prune_old_models(self, context: OutputContext, current_version: str) -> None:
        """Keep the newest model versions and the one the index was built with; an index that
        cannot be read keeps them all (better a full disk than an index without its model)."""
        index = self._folder(["hash_index"], None)
        try:
            in_use = {current_version, *([read_manifest(index)["model_version"]] if index.is_dir() else [])}
        except (OSError, ValueError, KeyError):
            return
        deleted = prune_model_versions(Path(self.base_dir), in_use)
        if deleted:
            context.log.info(f"deleted {len(deleted)} old model version(s) no index uses: {', '.join(deleted)}")

    def load_input(self, context: InputContext) -> object:
        asset_path = context.asset_key.path
        if not context.has_asset_partitions:
            if (context.definition_metadata or {}).get(OPTIONAL_INPUT):
                return self.stored(asset_path)
            return load_artefact(self._folder(asset_path, None))
        if context.has_partition_key:  # a per-patient step reading the same patient upstream
            lazy = bool((context.definition_metadata or {}).get(LAZY_VOLUMES, False))
            return load_artefact(self._folder(asset_path, context.asset_partition_key), lazy_volumes=lazy)
        loaded = {}
        for key in context.asset_partition_keys:
            folder = self._folder(asset_path, key)
            if folder.exists():
                loaded[key] = load_artefact(folder)
            else:
                context.log.warning(f"{context.asset_key.to_user_string()}[{key}] has no stored result; skipped")
        return loaded
