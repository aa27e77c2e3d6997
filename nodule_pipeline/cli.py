"""``nodule-pipeline``: the user-facing command (demo data, runs, exports, search, the UI, the search page)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from nodule_pipeline.benchmarks.ingest import DEFAULT_ROOT
from nodule_pipeline.errors import InputDataError

DEFAULT_DEMO_PATIENTS = 24
DAGSTER_URL_ENV = "NODULE_PIPELINE_DAGSTER_URL"


def _print_summary(summary, data_dir: Path) -> None:
    from nodule_pipeline.ingest_summary import summary_lines

    print()
    skipped = sum(o.skipped for o in summary.outcomes if o.ok)
    lines = summary_lines(summary.ingestion)
    print(lines[0] + (f" ({skipped} of the ok up to date, not rerun)" if skipped else ""), *lines[1:], sep="\n")
    dataset = summary.library_metadata.get("roi_dataset", {})
    if dataset:
        sides = {key: value for key, value in dataset.items() if key.startswith(("train_", "test_"))}
        print(
            f"roi_dataset: {dataset.get('rows')} rows, {dataset.get('patients')} patients, "
            f"split {dataset.get('split_mode')}: " + ", ".join(f"{key}={value}" for key, value in sorted(sides.items()))
        )
    if "no_test_split" in dataset:
        print(f"  {dataset['no_test_split']}")
    model = summary.library_metadata.get("hash_model", {})
    if model:
        measured = (
            f"test accuracy {model['test_accuracy']:.3f}, recall {model.get('test_recall', float('nan')):.3f}, "
            f"F1 {model.get('test_f1', float('nan')):.3f}"
            if "test_accuracy" in model
            else "unmeasured (no test split)"
        )
        print(
            f"hash_model {model.get('model_version')}: {measured} "
            f"({model.get('device')}, {model.get('images_per_s')} images/s, {model.get('seconds')} s)"
        )
        if model.get("small_data"):
            print(f"  {model['small_data']}")
        if model.get("validation"):
            print(f"  validation {model['validation']}")
    if summary.model_verdict:
        print(f"  {summary.model_verdict}")
    index = summary.library_metadata.get("hash_index", {})
    if index:
        print(
            f"hash_index {index.get('index_version')}: {index.get('items')} nodule ROIs, {index.get('bits')} bits, "
            f"{index.get('bytes_per_item')} bytes per item"
            + ("; built from an unmeasured model" if index.get("model_measured") is False else "")
        )
    evaluation = summary.library_metadata.get("retrieval_evaluation", {})
    if "skipped" in evaluation:
        print(f"retrieval_evaluation: skipped ({evaluation['skipped']})")
    elif evaluation:
        print(
            f"retrieval_evaluation (model {evaluation.get('model_version')} through index "
            f"{evaluation.get('index_version')}): accuracy {evaluation['accuracy']:.3f}, "
            f"P@10 {evaluation['p_at_10']:.3f}, MAP@10 {evaluation['map_at_10']:.3f} "
            f"(codes alone {evaluation.get('map_at_10_codes_alone', float('nan')):.3f}), "
            f"nDCG@10 {evaluation['ndcg_at_10']:.3f} (within class "
            f"{evaluation.get('ndcg_at_10_within_class', float('nan')):.3f}), "
            f"{evaluation.get('distinct_codes')} distinct codes; report {evaluation.get('report')}"
        )
        if "reader_agreement_summary" in evaluation:
            print(f"  {evaluation['reader_agreement_summary']}")
    if summary.diagnosis:
        print(f"diagnosis: {summary.diagnosis}")
    study = summary.study
    if "failed" in study or "skipped" in study:
        outcome = "FAILED" if "failed" in study else "skipped"
        print(f"comparison_study: {outcome} ({study.get('failed') or study['skipped']})")
    elif study:
        print(
            f"comparison_study ({study.get('profile')}, every method retrained): ours MAP@10 "
            f"{study['map_at_10']:.3f} (seed mean {study['map_at_10_seed_mean']:.3f}), best baseline "
            f"{study.get('best_baseline')}; {study.get('leakage')}; report {study.get('report')}"
        )
        if study.get("profile") != "full":
            print("  the whole study: make demo REPORT=full, or run --report full (about an hour on 2 cores)")
    for outcome in summary.failed:
        print(f"FAILED {outcome.patient_id}: {outcome.error}")
    print(f"instance and artefacts: {data_dir}  (open the UI: nodule-pipeline ui --data-dir {data_dir})")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from nodule_pipeline.lidc.demo_data import generate_demo_dataset

    count = None if args.all else args.patients
    started = time.perf_counter()

    def progress(done: int, total: int, patient_id: str) -> None:
        print(f"[{done}/{total}] {patient_id}", flush=True)

    patients = generate_demo_dataset(Path(args.out), count, seed=args.seed, progress=progress)
    print(f"{len(patients)} demo patients in {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from nodule_pipeline.runner import run_pipeline

    data_dir = Path(args.data_dir).resolve()
    options = (
        ("epochs", args.epochs),
        ("recipe", args.recipe),
        ("bits", args.bits),
        ("accuracy_floor", args.accuracy_floor),
    )
    training = {key: value for key, value in options if value is not None}
    if args.dicomweb and not args.annotations:
        print(
            "error: --dicomweb needs --annotations DIR (the LIDC XML readings, matched by SeriesInstanceUID)",
            file=sys.stderr,
        )
        return 2
    summary = run_pipeline(
        Path(args.lidc_root) if args.lidc_root else None,
        data_dir,
        args.patients,
        progress=lambda line: print(line, flush=True),
        training=training,
        report=args.report,
        rerun=args.rerun_all,
        diagnosis_sheet=Path(args.diagnosis) if args.diagnosis else None,
        dicomweb_url=args.dicomweb,
        annotations_dir=Path(args.annotations) if args.annotations else None,
    )
    _print_summary(summary, data_dir)
    return 1 if summary.failed or summary.library_ok is False else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the demo scans if absent, then run everything on them."""
    lidc_root = Path(args.data_dir) / "lidc"
    args.out, args.all = str(lidc_root), False
    cmd_demo_data(args)
    args.lidc_root, args.patients, args.diagnosis = str(lidc_root), None, None
    args.dicomweb = args.annotations = None  # the demo's scans are folders
    return cmd_run(args)


def cmd_export_rois(args: argparse.Namespace) -> int:
    from nodule_pipeline.roi_table import read_roi_table, write_roi_table
    from nodule_pipeline.storage import roi_dataset_file

    source = roi_dataset_file(Path(args.data_dir).resolve())
    if not source.exists():
        raise InputDataError("roi_dataset is not materialized yet (run `nodule-pipeline run` first)", path=source)
    table = read_roi_table(source)
    write_roi_table(table, Path(args.out))
    print(f"{len(table)} ROIs of {table['patient_id'].nunique()} patients written to {args.out}")
    return 0


def _triple(text: str, option: str) -> tuple[float, ...]:
    """The numbers of a comma-separated position option; whether they make a position (three of
    them, finite, whole voxel indices, inside the volume) is for the searcher to say."""
    numbers = []
    for part in text.split(","):
        try:
            numbers.append(float(part))
        except ValueError:
            raise InputDataError(f"{option} {text!r}: {part.strip()!r} is not a number") from None
    return tuple(numbers)


def cmd_search(args: argparse.Namespace) -> int:
    """The k most similar known nodules to a query ROI, a library nodule or a nodule in a DICOM
    series. The query is read and checked before the library is loaded, so a bad one fails at once."""
    import json

    from nodule_pipeline.hashing.searcher import NoduleSearcher, load_query_roi
    from nodule_pipeline.pictures import hit_caption, search_results

    positions = (args.at, args.at_mm)
    series_given = args.dicom is not None or args.dicomweb is not None
    given = [args.roi is not None, args.nodule is not None, series_given or positions != (None, None)]
    if sum(given) > 1 or (args.dicom is not None and args.dicomweb is not None):
        raise InputDataError(
            "give one query, not both: --roi FILE, --nodule ID, --dicom DIR or --dicomweb URL with a position"
        )
    if not (given[0] or given[1]) and (not series_given or positions == (None, None)):
        raise InputDataError(
            "give --roi FILE, or --dicom DIR with --at I,J,K or --at-mm X,Y,Z (or --dicomweb URL --study UID "
            "--series UID with either), or --nodule ID"
        )
    if args.dicomweb is not None and not (args.study and args.series):
        raise InputDataError("--dicomweb needs --study UID and --series UID: the series to search from")
    if args.store_results and args.dicomweb is None:
        raise InputDataError("--store-results stores the answer in the query's study: it needs a --dicomweb query")
    if args.nodule is not None and args.exclude_patient is not None:
        raise InputDataError("--nodule leaves out the nodule's own patient; --exclude-patient does not apply")
    query = load_query_roi(Path(args.roi)) if args.roi is not None else None
    voxel = _triple(args.at, "--at") if args.at is not None else None
    position = _triple(args.at_mm, "--at-mm") if args.at_mm is not None else None
    series_dir = Path(args.dicom) if args.dicom is not None else None
    pacs_series = None
    if args.dicomweb is not None:  # fetched and read before the library loads: a PACS fault fails at once
        import tempfile

        from nodule_pipeline.lidc.dicomweb import QUERY_PATIENT, Pacs, fetch_query_series
        from nodule_pipeline.lidc.series import load_series

        pacs = Pacs(args.dicomweb)
        with tempfile.TemporaryDirectory(prefix="nodule-query-") as scratch:
            pacs_series = load_series(fetch_query_series(pacs, args.study, args.series, Path(scratch)), QUERY_PATIENT)
    searcher = NoduleSearcher.from_data_dir(Path(args.data_dir))
    unit = "annotation" if args.per_annotation else "nodule"
    options = {"k": args.k, "mode": args.mode, "exclude_patient": args.exclude_patient, "unit": unit}
    if query is not None:
        response = searcher.search_roi(query, source=args.roi, **options)
    elif args.nodule is not None:
        response = searcher.search_nodule(args.nodule, k=args.k, mode=args.mode, unit=unit)
    elif pacs_series is not None:
        response = searcher.search_series(pacs_series, voxel, position, **options)
    else:
        response = searcher.search_dicom(series_dir, voxel=voxel, position_mm=position, **options)
    hits = response.hits
    if args.picture:  # first, so that an unwritable picture fails before anything is printed
        rois = searcher.index.rois
        blank = np.full((32, 32), -1024, dtype=np.float32)
        png = search_results(
            response.query_image,
            f"query\np(malig.) {response.malignant_probability:.2f}",
            [rois[hit.row] if rois is not None else blank for hit in hits],
            [hit.label for hit in hits],
            [hit_caption(hit.rank, hit.nodule_id, f"ham {hit.hamming}") for hit in hits],
        ).png()
        try:
            Path(args.picture).write_bytes(png)
        except OSError as error:
            raise InputDataError(f"cannot write the picture ({error.strerror or error})", path=args.picture) from None
    for warning in response.warnings:  # on stderr: --json output stays the list of hits
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.json:
        printed = []
        for hit in hits:
            readers = {} if unit == "annotation" else {"readers": len(searcher.nodule_rows(hit.nodule_id))}
            printed.append(hit.to_json() | readers | {"diagnosis": searcher.diagnoses.get(hit.nodule_id)})
        print(json.dumps(printed, indent=2))
    else:
        print(response.as_text(searcher.index.index_version, searcher.diagnoses))
        if args.picture:
            print(f"picture: {args.picture}")
    if args.store_results:
        from nodule_pipeline.pacs_results import store_results
        from nodule_pipeline.serve.library import response_json

        query = {"kind": "series", "voxel": list(voxel) if voxel else None}
        at = voxel or pacs_series.voxel_at_mm(*position)
        stored = store_results(pacs, response_json(searcher, response, query), pacs_series, at)
        print(
            f"stored in study {stored.study_uid}: report {stored.report_uid}, key images {stored.key_images_uid} "
            f"({stored.key_images} image(s))",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def cmd_evaluate_rois(args: argparse.Namespace) -> int:
    """Train, index and evaluate on any ROI table of the contract (patient-level split)."""
    from nodule_pipeline.hashing.evaluation import EvaluationConfig, evaluate
    from nodule_pipeline.hashing.report import (
        leakage_summary,
        pathology_summary,
        reader_agreement_summary,
        write_report,
    )
    from nodule_pipeline.roi_table import assign_split, read_roi_table

    table = assign_split(read_roi_table(Path(args.rois)), mode="patient", seed=args.split_seed)
    diagnosis = None
    if args.diagnosis:
        from nodule_pipeline.lidc.diagnosis import read_diagnosis_sheet

        diagnosis = read_diagnosis_sheet(Path(args.diagnosis))
    profile = "quick" if args.quick else "full"
    config = EvaluationConfig.profile(profile, bits=args.bits, epochs=args.epochs, seeds=args.seeds)
    started = time.perf_counter()
    evaluation = evaluate(
        table,
        config,
        log=lambda line: print(f"[{time.perf_counter() - started:6.0f} s] {line}"),
        diagnosis=diagnosis,
    )
    files = write_report(evaluation, Path(args.out))
    report = evaluation.report
    ours, spread = report["ours"], report["ours"]["spread"]["map_at_10"]
    codes_alone = report["ablation"]["hamming"]["map_at_k"]["10"]
    retrieving = {name: m["map_at_k"]["10"] for name, m in report["baselines"].items() if "map_at_k" in m}
    best = max(retrieving, key=retrieving.get) if retrieving else None
    print(
        f"ours (hierarchical): accuracy {ours['accuracy']:.4f}, P@10 {ours['p_at_10']:.4f}, "
        f"MAP@10 {ours['map_at_k']['10']:.4f} (mean {spread['mean']:.4f} ± {spread['std']:.4f} over "
        f"{len(spread['values'])} seeds), nDCG@10 {report['ndcg_at_10']:.4f} "
        f"(within class {ours['ndcg_at_10_within_class']:.4f}); codes alone (flat Hamming) MAP@10 "
        f"{codes_alone:.4f}, {ours['code_health']['distinct_codes']} distinct codes"
        + (f"; best baseline {best} MAP@10 {retrieving[best]:.4f}" if best else "")
    )
    print(f"{leakage_summary(report.get('leakage')) or 'leakage not measured'}")
    print(reader_agreement_summary(report.get("reader_agreement")))
    if report.get("pathology"):
        print(pathology_summary(report["pathology"]))
    print(f"report: {files['markdown']} ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nodule_pipeline.benchmarks.run import run_bench

    lidc_root = Path(args.lidc_root).resolve()
    if not lidc_root.is_dir():
        print(f"error: scan root {lidc_root} not found (--lidc-root)", file=sys.stderr)
        return 2
    out = Path(args.out)
    bench = run_bench(out, lidc_root, quick=args.quick, progress=lambda line: print(line, flush=True))
    missed = [t["target"] for t in bench["targets"] if not t["met"]]
    print(f"{out / 'bench.json'}, {out / 'bench.md'} ({bench['seconds']:.0f} s)")
    print("all targets met" if not missed else "targets missed: " + "; ".join(missed))
    return 0


def cmd_reveal(args: argparse.Namespace) -> int:
    """Print what a pseudonym stands for: on the machine that holds the key and the scans only."""
    from nodule_pipeline.privacy import reveal

    try:
        found = reveal(args.pseudonym, [Path(args.lidc_root)])
    except ValueError as error:
        raise InputDataError(str(error)) from None
    if not found:
        raise InputDataError(f"nothing under the scan root has the pseudonym {args.pseudonym!r}", path=args.lidc_root)
    for path in found:
        print(path)
    return 0


def installed_workspace() -> str:
    """The workspace an installed package serves: the checkout's workspace.yaml, written out."""
    from nodule_pipeline.runner import CODE_LOCATION

    return (
        "load_from:\n  - python_module:\n      module_name: nodule_pipeline.definitions\n"
        f"      location_name: {CODE_LOCATION}\n"
    )


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the Dagster UI on the instance and artefacts under ``--data-dir`` (127.0.0.1 only).

    ``dg dev``, not ``dagster dev`` (superseded in 1.13): in a checkout it loads the dg project of
    ``pyproject.toml``; an installed package (no checkout) is loaded as its module, from a
    workspace file that names its code location as the checkout does."""
    from nodule_pipeline.resources import DATA_DIR_ENV
    from nodule_pipeline.runner import instance_home

    data_dir = Path(args.data_dir).resolve()
    env = {**os.environ, "DAGSTER_HOME": str(instance_home(data_dir)), DATA_DIR_ENV: str(data_dir)}
    if sys.prefix != sys.base_prefix:  # dg compares the active environment with the project's .venv
        env["VIRTUAL_ENV"] = sys.prefix
    project = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "dagster_dg_cli.cli", "dev", "-h", args.host, "-p", str(args.port)]
    if (project / "pyproject.toml").exists():
        command += ["--target-path", str(project)]
    else:  # a workspace naming the location as the runner's runs do, so the UI files them under their jobs
        workspace = instance_home(data_dir) / "workspace.yaml"
        workspace.write_text(installed_workspace())
        command += ["-w", str(workspace)]
    os.execvpe(command[0], command, env)
    return 0


SERVE_CONCURRENCY = 64
"""Connections the search server holds at once; beyond them uvicorn answers 503 at once."""


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the search page and its JSON API for the index under ``--data-dir`` (127.0.0.1 by
    default). Without a token it answers on loopback only: a non-loopback ``--host`` needs one."""
    import logging

    import uvicorn

    from nodule_pipeline.resources import scan_source_for
    from nodule_pipeline.serve.app import create_app
    from nodule_pipeline.serve.audit import AuditLog
    from nodule_pipeline.serve.security import TOKEN_ENV, Access, is_loopback, read_token

    token = read_token(os.environ.get(TOKEN_ENV), args.token_file)
    if token is None and not is_loopback(args.host):
        raise InputDataError(
            f"--host {args.host} would open the library (patient identifiers) to the network without a "
            f"token: set ${TOKEN_ENV} or --token-file, or serve on 127.0.0.1"
        )
    data_dir = Path(args.data_dir).resolve()
    dicomweb_url = args.dicomweb or scan_source_for(data_dir).dicomweb_url or None
    access = Access.for_server(token, args.host, args.allowed_host)
    audit = AuditLog(data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signing = "a token is needed" if token else "no token: this computer only"
    pacs = f"; PACS {dicomweb_url}" if dicomweb_url else ""
    print(f"search page: http://{args.host}:{args.port}/  (API: /openapi.json; {signing}; audit {audit.path}{pacs})")
    sys.stdout.flush()
    try:
        uvicorn.run(
            create_app(data_dir, dagster_url=args.dagster_url, access=access, audit=audit, dicomweb_url=dicomweb_url),
            host=args.host,
            port=args.port,
            log_level="info",
            access_log=False,  # the app's own access log leaves query strings and ids out
            limit_concurrency=SERVE_CONCURRENCY,
        )
    finally:
        audit.close()
    return 0


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of a pipeline run: training, report, and whether to redo what is current."""
    parser.add_argument(
        "--rerun-all",
        action="store_true",
        help="redo every patient and the library, even those current (default: only what is missing or changed)",
    )
    parser.add_argument("--epochs", type=int, help="most training epochs of hash_model (default: the recipe's, 40)")
    parser.add_argument(
        "--recipe", choices=["default", "paper"], help="training recipe of hash_model (default: default)"
    )
    parser.add_argument("--bits", type=int, help="hash bits (default 256, the paper's best)")
    parser.add_argument(
        "--accuracy-floor",
        type=float,
        help="least test accuracy a model needs to reach the index (default 0.7; 0 for tiny data sets)",
    )
    parser.add_argument(
        "--report",
        choices=["short", "quick", "full", "none"],
        default="quick",
        help="the deployed model's evaluation, then the comparison study at this profile: short (one seed, "
        "no leakage study), quick (three seeds, minutes), full (the whole study, about an hour on 2 cores), "
        "or none (neither)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodule-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo_data = commands.add_parser(
        "demo-data", help="generate the embedded demo data set (synthetic CT, real LIDC annotations)"
    )
    demo_data.add_argument(
        "--patients", type=int, default=DEFAULT_DEMO_PATIENTS, help="number of patients (default %(default)s)"
    )
    demo_data.add_argument("--all", action="store_true", help="all 1018 LIDC scans (full size, ~130 GB)")
    demo_data.add_argument("--out", default="data/lidc", help="scan root to write (default %(default)s)")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(func=cmd_demo_data)

    run = commands.add_parser("run", help="materialize the chain for the patients under a scan root or in a PACS")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--lidc-root", help="scan root in TCIA layout")
    source.add_argument(
        "--dicomweb",
        metavar="URL",
        help="a PACS's DICOMweb root (QIDO-RS, WADO-RS): every CT study it holds, grouped by PatientID; "
        "credentials from NODULE_PIPELINE_DICOMWEB_TOKEN or _USER/_PASSWORD, CA bundle from _CA_BUNDLE",
    )
    run.add_argument("--annotations", metavar="DIR", help="with --dicomweb: the LIDC XML readings (any layout)")
    run.add_argument("--data-dir", default="data", help="instance and artefacts (default %(default)s)")
    run.add_argument("--patients", nargs="+", help="only these patient ids")
    run.add_argument(
        "--diagnosis",
        metavar="FILE",
        help="TCIA's diagnosis spreadsheet (.xls), to show what nodules really were "
        "(default: *diagnosis*.xls at the scan root or in --annotations, if any)",
    )
    add_run_options(run)
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="generate the demo data if absent and run everything on it")
    demo.add_argument("--data-dir", default="data")
    demo.add_argument("--patients", type=int, default=DEFAULT_DEMO_PATIENTS)
    demo.add_argument("--seed", type=int, default=0)
    add_run_options(demo)
    demo.set_defaults(func=cmd_demo)

    export = commands.add_parser("export-rois", help="write the materialized roi_dataset as a ROI table")
    export.add_argument("--data-dir", default="data")
    export.add_argument("--out", required=True, help="parquet file to write")
    export.set_defaults(func=cmd_export_rois)

    search = commands.add_parser("search", help="find the most similar known nodules")
    search.add_argument("--roi", help="query ROI: 32x32 .npy in HU, or a lung-window .png")
    search.add_argument("--nodule", help="query a library nodule by id (its own patient left out)")
    search.add_argument("--dicom", help="query DICOM series folder")
    search.add_argument(
        "--dicomweb", metavar="URL", help="query a CT series in a PACS (DICOMweb root; with --study and --series)"
    )
    search.add_argument("--study", metavar="UID", help="with --dicomweb: the StudyInstanceUID")
    search.add_argument("--series", metavar="UID", help="with --dicomweb: the SeriesInstanceUID")
    search.add_argument(
        "--store-results",
        action="store_true",
        help="with --dicomweb: store the answer in the query's study (a DICOM SR and a key-image KOS, STOW-RS)",
    )
    search.add_argument("--at", help="nodule voxel in the series: row,col,slice (slice in ascending z)")
    search.add_argument("--at-mm", help="nodule position in patient coordinates: x,y,z in mm")
    search.add_argument("--data-dir", default="data")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--mode", choices=["hierarchical", "hamming", "rerank"], default="hierarchical")
    search.add_argument("--exclude-patient", help="leave this patient's nodules out of the results")
    search.add_argument(
        "--per-annotation",
        action="store_true",
        help="one hit per reader annotation, as the paper counts (default: one hit per nodule)",
    )
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument("--picture", help="write the query beside its results to this PNG")
    search.set_defaults(func=cmd_search)

    evaluate = commands.add_parser("evaluate-rois", help="train, index and evaluate on any ROI table")
    evaluate.add_argument("rois", help="ROI table (parquet; the columns the README's 'The ROI table' lists)")
    evaluate.add_argument("--out", required=True, help="folder for evaluation.json, evaluation.md and figures")
    evaluate.add_argument("--bits", type=int)
    evaluate.add_argument("--epochs", type=int)
    evaluate.add_argument("--seeds", type=int)
    evaluate.add_argument("--split-seed", type=int, default=0)
    evaluate.add_argument(
        "--diagnosis",
        metavar="FILE",
        help="TCIA's diagnosis spreadsheet (.xls): add how often the readers and ours agree with it (pathology)",
    )
    evaluate.add_argument(
        "--quick", action="store_true", help="12 epochs, two bit sizes, no Table 2 variants, 3 seeds a split (minutes)"
    )
    evaluate.set_defaults(func=cmd_evaluate_rois)

    bench = commands.add_parser("bench", help="ingestion, search and training benchmarks: bench.json + bench.md")
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--quick", action="store_true", help="search up to 10^6 items (no 10^7), fewer repeats")
    bench.add_argument(
        "--lidc-root",
        default=str(DEFAULT_ROOT),
        help="real LIDC scans (default: ../shared/lidc-sample)",
    )
    bench.set_defaults(func=cmd_bench)

    reveal = commands.add_parser(
        "reveal", help="which scan folder or file a pseudonym stands for (needs NODULE_PIPELINE_PSEUDONYM_KEY)"
    )
    reveal.add_argument("pseudonym", help="a patient pseudonym (P...) or a path token (F...) from an error or log")
    reveal.add_argument("--lidc-root", required=True, help="scan root the pseudonyms were made from")
    reveal.set_defaults(func=cmd_reveal)

    ui = commands.add_parser("ui", help="open the Dagster UI on a data dir")
    ui.add_argument("--data-dir", default="data")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)

    serve = commands.add_parser("serve", help="the similar-nodule search page and its JSON API")
    serve.add_argument("--data-dir", default="data")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default %(default)s; another needs a token)"
    )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--dicomweb",
        metavar="URL",
        help="the PACS that 'Open from PACS' lists and fetches from (default: $NODULE_PIPELINE_DICOMWEB_URL, "
        "or the one run --dicomweb used); credentials from NODULE_PIPELINE_DICOMWEB_TOKEN or _USER/_PASSWORD",
    )
    serve.add_argument(
        "--token-file", help="file holding the token every request needs (default: $NODULE_PIPELINE_SERVE_TOKEN)"
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the server answers to besides localhost and the bound address (repeatable)",
    )
    serve.add_argument(
        "--dagster-url",
        default=os.environ.get(DAGSTER_URL_ENV),
        help=f"the Dagster UI's address, for links to the index and model (default: ${DAGSTER_URL_ENV})",
    )
    serve.set_defaults(func=cmd_serve)
    return parser


POSITION_OPTIONS = ("--at", "--at-mm")


def _attach_position_values(argv: list[str]) -> list[str]:
    """``--at-mm -100,20,-150`` as ``--at-mm=-100,20,-150``: patient coordinates are often
    negative, and argparse would take a value starting with '-' for an option."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in POSITION_OPTIONS and arg.startswith("-") and not arg.startswith("--"):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_position_values(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
