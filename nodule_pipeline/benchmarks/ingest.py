"""Per-patient ingestion cost next to pylidc's ``Scan.to_volume()`` on the same scans, same run.

Three stages, each the work of one per-patient asset exactly as a run does it: the asset's own
body (direct invocation, so its metadata and pictures are made too) plus the
:class:`~nodule_pipeline.resources.ArtefactIOManager` reads and writes around it:

- ``load``: ``lidc_scan`` (find, read and validate the DICOM series, fingerprint the folder,
  thumbnail) and storing the scan;
- ``mask``: reading the stored scan back, ``lung_mask`` (segmentation, lung count, volume,
  thumbnail) and storing the bit-packed masks;
- ``rois``: reading the stored scan (lazily, as the asset asks) and the masks, ``nodule_rois``
  and storing the ROI table.

Two ways of running, both in spawned interpreters that import everything and warm the
libraries' first-call initialisation up on tiny inputs before any clock starts:

- **warm** (the headline times): one process per patient runs pylidc's ``to_volume()`` and the
  three stages in turn, one unmeasured round and then ``repeat`` measured ones; the best round
  counts. This is how the issue's earlier figures were taken, and the stricter comparison for
  us, since pylidc gains most from a warm process.
- **cold**: every stage, and ``to_volume()``, in a fresh process of its own that reads its
  inputs from the stored artefacts, as Dagster's multiprocess executor runs steps. These
  processes measure peak memory: the resident-set high-water mark (``VmHWM``, reset after the
  imports through ``/proc/self/clear_refs`` where Linux allows it, else ``ru_maxrss``) minus the
  resident set after the imports, i.e. what the stage itself adds; the raw ``ru_maxrss`` is
  reported too. Cold times are reported beside the warm ones.

Times are the best of ``repeat`` (the machine may be shared), peaks the highest. Targets: the
whole chain within 3x pylidc's ``to_volume()``, peak memory within 4x the int16 volume.

    python -m nodule_pipeline.benchmarks.ingest [--lidc-root ../shared/lidc-sample] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from nodule_pipeline.benchmarks import environment
from nodule_pipeline.lidc.layout import find_patient_folders

STAGES = ("load", "mask", "rois")
TIME_RATIO_TARGET = 3.0
MEMORY_RATIO_TARGET = 4.0
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "shared" / "lidc-sample"
"""The real two-patient LIDC sample beside the repository (``../shared/lidc-sample``)."""

Runs = dict[str, list[dict[str, Any]]]
"""Per stage (and ``"pylidc"``): one dict of figures per measured run."""


def run_ingest_benchmark(
    lidc_root: Path,
    repeat: int = 3,
    progress: Callable[[str], None] | None = print,
    patients: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Benchmark the ingestion chain against pylidc on every patient under ``lidc_root``.

    ``patients`` limits the run to some patient ids (default: every patient folder with DICOM
    files). Returns a JSON-ready dict keyed by patient where per patient: ``seconds_per_patient``
    (warm chain seconds), ``pylidc_to_volume_seconds`` (warm), ``time_ratio`` (their ratio),
    ``peak_rss_mb`` (highest stage peak), ``volume_mb`` (int16 volume), ``memory_ratio``
    (peak / volume), ``cold`` (fresh-process times and ratio), ``stages`` (per stage: best warm
    and cold seconds with read/compute/store split, peak, raw and baseline RSS) and ``pylidc``
    (its times and peak); plus ``targets``, ``met``, ``rss_method`` and ``environment``.
    """
    lidc_root = Path(lidc_root).resolve()
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    say = progress or (lambda _line: None)
    if patients is None:
        patients = sorted(find_patient_folders(lidc_root))
    patients = list(patients)
    if not patients:
        raise ValueError(f"no patient folders with DICOM files under {lidc_root}")

    warm: dict[str, Runs] = {}
    cold: dict[str, Runs] = {pid: {s: [] for s in ("pylidc", *STAGES)} for pid in patients}
    with tempfile.TemporaryDirectory(prefix="ingest-benchmark-") as workdir:
        for pid in patients:
            say(f"{pid}: warm, 1 + {repeat} rounds in one process")
            warm[pid] = _in_fresh_process(_warm_worker, str(lidc_root), pid, workdir, repeat)
            say(f"{pid}: warm {_round_line(warm[pid])}")
        for round_ in range(1, repeat + 1):
            for pid in patients:
                # pylidc and our stages alternate, so both see the same machine load.
                cold[pid]["pylidc"].append(_in_fresh_process(_pylidc_worker, str(lidc_root), pid))
                for stage in STAGES:
                    cold[pid][stage].append(_in_fresh_process(_stage_worker, stage, str(lidc_root), pid, workdir))
                peak = max(cold[pid][s][-1]["peak_rss_mb"] for s in STAGES)
                say(f"{pid}: cold [{round_}/{repeat}] {_round_line(cold[pid])}, peak RSS {peak:.0f} MB")
    return _summarise(warm, cold, lidc_root, repeat)


def format_ingest_table(result: dict[str, Any]) -> str:
    """The per-patient figures of :func:`run_ingest_benchmark` as a plain-text table."""
    header = [
        "patient_id",
        "load_s",
        "mask_s",
        "rois_s",
        "chain_s",
        "pylidc_s",
        "time_ratio",
        "cold_ratio",
        "volume_mb",
        "peak_rss_mb",
        "memory_ratio",
    ]
    lines = [" | ".join(header)]
    for pid in result["patients"]:
        stages = result["stages"][pid]
        row = [
            pid,
            *(f"{stages[s]['seconds']:.3f}" for s in STAGES),
            f"{result['seconds_per_patient'][pid]:.3f}",
            f"{result['pylidc_to_volume_seconds'][pid]:.3f}",
            f"{result['time_ratio'][pid]:.2f}",
            f"{result['cold']['time_ratio'][pid]:.2f}",
            f"{result['volume_mb'][pid]:.1f}",
            f"{result['peak_rss_mb'][pid]:.1f}",
            f"{result['memory_ratio'][pid]:.2f}",
        ]
        lines.append(" | ".join(row))
    targets = result["targets"]
    lines.append(
        f"targets: time_ratio <= {targets['time_ratio']}, memory_ratio <= {targets['memory_ratio']}; "
        f"times warm, best of {result['repeat']} (cold_ratio: each stage in a fresh process); "
        f"peak RSS: {result['rss_method']}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Summary


def _round_line(runs: Runs) -> str:
    last = {stage: figures[-1]["seconds"] for stage, figures in runs.items()}
    detail = ", ".join(f"{s} {last[s]:.2f}" for s in STAGES)
    return f"chain {sum(last[s] for s in STAGES):.2f} s ({detail}), pylidc to_volume {last['pylidc']:.2f} s"


def _chains(runs: Runs) -> list[float]:
    """The chain of each round: its three stages."""
    return [sum(figures) for figures in zip(*([r["seconds"] for r in runs[s]] for s in STAGES), strict=True)]


def _summarise(warm: dict[str, Runs], cold: dict[str, Runs], lidc_root: Path, repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "lidc_root": str(lidc_root),
        "repeat": repeat,
        "patients": list(warm),
        "seconds_per_patient": {},
        "pylidc_to_volume_seconds": {},
        "time_ratio": {},
        "peak_rss_mb": {},
        "volume_mb": {},
        "memory_ratio": {},
        "cold": {"seconds_per_patient": {}, "pylidc_to_volume_seconds": {}, "time_ratio": {}},
        "stages": {},
        "pylidc": {},
        "targets": {"time_ratio": TIME_RATIO_TARGET, "memory_ratio": MEMORY_RATIO_TARGET},
        "met": {},
        "rss_method": "",
        "environment": environment(),
    }
    methods = set()
    for pid in warm:
        volume_mb = cold[pid]["load"][0]["volume_mb"]
        chain, pylidc = min(_chains(warm[pid])), min(r["seconds"] for r in warm[pid]["pylidc"])
        cold_chain, cold_pylidc = min(_chains(cold[pid])), min(r["seconds"] for r in cold[pid]["pylidc"])
        stages = {s: {**_fastest(warm[pid][s]), "cold": _cold(cold[pid][s])} for s in STAGES}
        peak = max(stages[s]["cold"]["peak_rss_mb"] for s in STAGES)
        result["seconds_per_patient"][pid] = round(chain, 4)
        result["pylidc_to_volume_seconds"][pid] = round(pylidc, 4)
        result["time_ratio"][pid] = round(chain / pylidc, 3)
        result["peak_rss_mb"][pid] = round(peak, 1)
        result["volume_mb"][pid] = round(volume_mb, 1)
        result["memory_ratio"][pid] = round(peak / volume_mb, 3)
        result["cold"]["seconds_per_patient"][pid] = round(cold_chain, 4)
        result["cold"]["pylidc_to_volume_seconds"][pid] = round(cold_pylidc, 4)
        result["cold"]["time_ratio"][pid] = round(cold_chain / cold_pylidc, 3)
        result["stages"][pid] = {
            **stages,
            "chain_seconds_all": [round(c, 4) for c in _chains(warm[pid])],
            "peak_stage": max(STAGES, key=lambda s: stages[s]["cold"]["peak_rss_mb"]),
        }
        pylidc_cold = _cold(cold[pid]["pylidc"])
        result["pylidc"][pid] = {
            **_fastest(warm[pid]["pylidc"]),
            "cold": pylidc_cold,
            "memory_ratio": round(pylidc_cold["peak_rss_mb"] / volume_mb, 3),
        }
        result["met"][pid] = {
            "time": result["time_ratio"][pid] <= TIME_RATIO_TARGET,
            "memory": result["memory_ratio"][pid] <= MEMORY_RATIO_TARGET,
        }
        methods.update(r["rss_method"] for runs in cold[pid].values() for r in runs)
    result["rss_method"] = ", ".join(sorted(methods))
    return result


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run's seconds (with its read/compute/store split) and every run's seconds."""
    fastest = min(runs, key=lambda r: r["seconds"])
    out = {key: round(value, 4) for key, value in fastest.items() if key.endswith("_s") or key == "seconds"}
    out["seconds_all"] = [round(r["seconds"], 4) for r in runs]
    return out


def _cold(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fresh-process runs: fastest seconds, every run's seconds, highest memory figures."""
    out = _fastest(runs)
    for key in ("peak_rss_mb", "raw_maxrss_mb", "baseline_rss_mb"):
        out[key] = round(max(r[key] for r in runs), 1)
    return out


# --------------------------------------------------------------------------------------------
# Fresh processes and their memory


def _in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a newly spawned interpreter (nothing inherited, nothing cached)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024.0  # bytes on macOS, KiB elsewhere


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _Meter:
    """Wall time of a block, and the resident memory it adds over the RSS at its start."""

    def __enter__(self) -> _Meter:
        gc.collect()
        self.baseline = _proc_status_mb("VmRSS") or _maxrss_mb()
        self.reset = _reset_peak() and _proc_status_mb("VmHWM") is not None
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.raw_maxrss = _maxrss_mb()
        high = _proc_status_mb("VmHWM") if self.reset else None
        self.peak = max(0.0, (high or self.raw_maxrss) - self.baseline)

    def figures(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "peak_rss_mb": self.peak,
            "raw_maxrss_mb": self.raw_maxrss,
            "baseline_rss_mb": self.baseline,
            "rss_method": "VmHWM reset after imports" if self.reset else "ru_maxrss (not reset)",
        }


# --------------------------------------------------------------------------------------------
# Work (runs in the spawned processes)


class _Pylidc:
    """pylidc's ``to_volume()`` for one patient (the scan row looked up once, outside the clock)."""

    def __init__(self, lidc_root: str, patient_id: str):
        import pydicom

        from nodule_pipeline.lidc.pylidc_compat import pylidc_dicom_root

        root = Path(lidc_root)
        pydicom.dcmread(next((root / patient_id).rglob("*.dcm"))).pixel_array  # noqa: B018  (warm-up)
        self._context = pylidc_dicom_root(root)
        pl = self._context.__enter__()
        self.scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).first()
        if self.scan is None:
            raise ValueError(f"{patient_id} is not in pylidc's annotation database")

    def run(self) -> float:
        clock = time.perf_counter()
        self.scan.to_volume(verbose=False)
        return time.perf_counter() - clock


def _output_value(events: Iterator[Any]) -> Any:
    """The value an asset body yields as its output, its check results computed as in a run."""
    from dagster import Output

    (output,) = [event for event in events if isinstance(event, Output)]
    return output.value


class _Stages:
    """The three per-patient assets' work on one patient, reading and writing under ``workdir``."""

    def __init__(self, lidc_root: str, patient_id: str, workdir: str):
        warnings.simplefilter("ignore")  # Dagster's beta/preview notices
        from dagster import AssetKey, DagsterInstance, build_asset_context, build_input_context, build_output_context

        from nodule_pipeline.assets.lung_masks import lung_mask
        from nodule_pipeline.assets.rois import RoiConfig, nodule_rois
        from nodule_pipeline.assets.scans import lidc_scan
        from nodule_pipeline.resources import ArtefactIOManager, ScanSource

        self.patient_id = patient_id
        self.scan_source = ScanSource(root=lidc_root)
        self.io_manager = ArtefactIOManager(base_dir=workdir)
        self.instance = DagsterInstance.ephemeral()
        self.assets = {"lidc_scan": lidc_scan, "lung_mask": lung_mask, "nodule_rois": nodule_rois}
        self.roi_config = RoiConfig()
        self._key, self._asset_context = AssetKey, build_asset_context
        self._input_context, self._output_context = build_input_context, build_output_context
        _warm_up(Path(lidc_root) / patient_id, Path(workdir))

    def contexts(self, stage: str) -> _StageContexts:
        """The Dagster contexts of one stage, built before any clock starts (building a context
        is the benchmark's doing, not the asset's)."""
        consumer, inputs, output = _STAGE_ASSETS[stage]
        return _StageContexts(
            asset=self._asset_context(partition_key=self.patient_id, instance=self.instance),
            inputs={
                name: self._input_context(
                    asset_key=self._key(name),
                    partition_key=self.patient_id,
                    definition_metadata=_input_metadata(self.assets[consumer], name),
                    instance=self.instance,
                )
                for name in inputs
            },
            output=self._output_context(
                asset_key=self._key(output), partition_key=self.patient_id, instance=self.instance
            ),
        )

    def run(self, stage: str, contexts: _StageContexts) -> dict[str, Any]:
        """One stage with its reads and writes; seconds of each part (not of the whole)."""
        times: dict[str, Any] = {}
        clock = time.perf_counter()
        loaded = {name: self.io_manager.load_input(context) for name, context in contexts.inputs.items()}
        if loaded:
            times["read_s"], clock = _lap(clock)
        if stage == "load":
            value = _output_value(self.assets["lidc_scan"](contexts.asset, scan_source=self.scan_source))
            times["volume_mb"] = sum(s.hu.nbytes for s in value) / 2**20
        elif stage == "mask":
            value = _output_value(self.assets["lung_mask"](contexts.asset, **loaded))
        elif stage == "rois":
            value = _output_value(self.assets["nodule_rois"](contexts.asset, config=self.roi_config, **loaded))
        else:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        times["compute_s"], clock = _lap(clock)
        self.io_manager.handle_output(contexts.output, value)
        times["store_s"], _ = _lap(clock)
        return times


_STAGE_ASSETS = {
    "load": ("lidc_scan", (), "lidc_scan"),
    "mask": ("lung_mask", ("lidc_scan",), "lung_mask"),
    "rois": ("nodule_rois", ("lidc_scan", "lung_mask"), "nodule_rois"),
}
"""Per stage: the asset, the inputs it reads through the IO manager, the output it stores."""


@dataclass
class _StageContexts:
    asset: Any
    inputs: dict[str, Any]
    output: Any

    def __enter__(self) -> _StageContexts:
        self.asset.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.asset.__exit__(*exc)


def _lap(clock: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - clock, now


def _input_metadata(asset_def: Any, name: str) -> dict:
    """The metadata an asset declares on one of its inputs (what its IO manager is handed)."""
    for input_def in asset_def.node_def.input_defs:
        if input_def.name == name:
            return dict(input_def.metadata or {})
    return {}


def _warm_up(patient_dir: Path, workdir: Path) -> None:
    """First-call initialisation of the libraries the stages use, on tiny inputs: pydicom's pixel
    handlers, PIL's PNG writer, scipy/skimage's labelling and watershed, parquet."""
    import numpy as np
    import pandas as pd
    import pydicom
    from skimage.draw import polygon

    from nodule_pipeline.lidc.lung_mask import label_lungs, segment_lungs
    from nodule_pipeline.pictures import markdown_image, mask_overlay, roi_montage
    from nodule_pipeline.roi_table import validate_roi_table, write_roi_table

    pydicom.dcmread(next(patient_dir.rglob("*.dcm"))).pixel_array  # noqa: B018
    markdown_image(mask_overlay(np.zeros((8, 8), np.int16), np.ones((8, 8), bool)), "")
    roi_montage(np.zeros((1, 32, 32), np.float32), np.zeros(1, np.int8))
    volume = np.full((24, 24, 6), -1000, np.int16)
    volume[4:20, 4:20] = 0
    volume[6:18, 6:11] = volume[6:18, 13:18] = -900
    label_lungs(segment_lungs(volume, (1.0, 1.0, 1.0), min_lung_ml=0.01))
    polygon(np.array([1, 5, 5]), np.array([1, 1, 5]), (8, 8))
    table = validate_roi_table(
        pd.DataFrame({"patient_id": ["p"], "nodule_id": ["n"], "label": [0], "image": [np.zeros(1024, np.float32)]})
    )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        write_roi_table(table, Path(tmp) / "rois.parquet")


def _pylidc_worker(lidc_root: str, patient_id: str) -> dict[str, Any]:
    """Cold: pylidc's ``to_volume()`` once in this fresh process, metered."""
    pylidc = _Pylidc(lidc_root, patient_id)
    with _Meter() as meter:
        pylidc.run()
    return meter.figures()


def _stage_worker(stage: str, lidc_root: str, patient_id: str, workdir: str) -> dict[str, Any]:
    """Cold: one stage once in this fresh process, metered (inputs read from ``workdir``)."""
    stages = _Stages(lidc_root, patient_id, workdir)
    with stages.contexts(stage) as contexts, _Meter() as meter:
        parts = stages.run(stage, contexts)
    return {**meter.figures(), **parts}


def _warm_worker(lidc_root: str, patient_id: str, workdir: str, repeat: int) -> Runs:
    """Warm: pylidc and the three stages in turn, one unmeasured round then ``repeat`` rounds."""
    pylidc, stages = _Pylidc(lidc_root, patient_id), _Stages(lidc_root, patient_id, workdir)
    runs: Runs = {s: [] for s in ("pylidc", *STAGES)}
    for round_ in range(repeat + 1):
        figures: dict[str, dict[str, Any]] = {"pylidc": {"seconds": pylidc.run()}}
        for stage in STAGES:
            with stages.contexts(stage) as contexts:
                clock = time.perf_counter()
                parts = stages.run(stage, contexts)
                figures[stage] = {"seconds": time.perf_counter() - clock, **parts}
        if round_:
            for stage, value in figures.items():
                runs[stage].append(value)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lidc-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--patients", nargs="*", help="patient ids (default: every patient folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run_ingest_benchmark(args.lidc_root, args.repeat, patients=args.patients or None)
    print(format_ingest_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
