"""Protected health information never leaves the scans.

Every DICOM file of two generated patients is given the attributes of the DICOM basic
de-identification profile (PS3.15 E.1-1) that can be set, each with a distinctive value: names,
birth dates, record and accession numbers, institutions, physicians, device serials, dates,
times, UIDs, free-text comments, and sequences holding more of them. After a real run, a search
and a failing patient, every output is searched for those values: every file under the data dir
(artefacts, reports, the Dagster instance's databases and logs; parquet, zstd and zip contents
decoded) and everything the run printed. With pseudonyms on, the patient folder names, the
original UIDs and the reader ids must be absent too, and ``reveal`` must lead back to the file.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
import zstandard
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from nodule_pipeline.cli import main
from nodule_pipeline.errors import InputDataError
from nodule_pipeline.lidc.demo_data import generate_patient
from nodule_pipeline.privacy import PSEUDONYM_KEY_ENV, Pseudonymiser
from nodule_pipeline.resources import load_artefact
from nodule_pipeline.runner import run_pipeline
from nodule_pipeline.storage import artefact_folder, artefacts_dir
from nodule_pipeline_tests.conftest import QUICK_TRAINING

PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0957")
REPORTED_PATIENTS = (*PATIENTS, "LIDC-IDRI-0171")
"""Enough patients for a test split, so the evaluation report is written (and searched) in full."""
KEY = "test-key-0123456789abcdef"

BASIC_PROFILE = """
AccessionNumber AcquisitionComments AcquisitionContextSequence AcquisitionDate AcquisitionDateTime
AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription AcquisitionTime ActualHumanPerformersSequence
AdditionalPatientHistory AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
AdmittingTime AffectedSOPInstanceUID Allergies Arbitrary AuthorObserverSequence BranchOfService CassetteID
CommentsOnThePerformedProcedureStep ConcatenationUID ConfidentialityConstraintOnPatientDataDescription
ConsultingPhysicianName ContentCreatorName ContentDate ContentTime ContextGroupExtensionCreatorUID ContrastBolusAgent
ContributionDescription CountryOfResidence CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence
DataSetTrailingPadding DerivationDescription DetectorID DeviceSerialNumber DeviceUID DigitalSignatureUID
DimensionOrganizationUID DischargeDiagnosisDescription DistributionAddress DistributionName DoseReferenceUID
EthnicGroup FailedSOPInstanceUIDList FiducialUID FillerOrderNumberImagingServiceRequest FrameComments
FrameOfReferenceUID GantryID GeneratorID HumanPerformerName HumanPerformerOrganization IconImageSequence
IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments Impressions
InstanceCreatorUID InstitutionAddress InstitutionCodeSequence InstitutionName InstitutionalDepartmentName
InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer InterpretationRecorder
InterpretationText InterpretationTranscriber IrradiationEventUID IssuerOfAdmissionID IssuerOfPatientID
IssuerOfServiceEpisodeID LargePaletteColorLookupTableUID MAC MediaStorageSOPInstanceUID MedicalAlerts
MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence
OperatorsName OriginalAttributesSequence OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation
OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayComments OverlayDate OverlayTime
PaletteColorLookupTableUID ParticipantSequence PatientAddress PatientAge PatientBirthDate PatientBirthName
PatientBirthTime PatientComments PatientID PatientInsurancePlanCodeSequence PatientMotherBirthName PatientName
PatientPrimaryLanguageCodeSequence PatientReligiousPreference PatientSexNeutered PatientSize PatientState
PatientTelephoneNumbers PatientTransportArrangements PatientWeight PerformedLocation PerformedProcedureStepDescription
PerformedProcedureStepEndDate PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate
PerformedProcedureStepStartTime PerformedStationAETitle PerformedStationName PerformingPhysicianName
PersonAddress PersonName PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
PhysiciansReadingStudyIdentificationSequence PlacerOrderNumberImagingServiceRequest PlateID PreMedication
ProtocolName ReasonForStudy ReferencedPatientAliasSequence ReferencedPatientSequence ReferencedSOPInstanceUID
ReferringPhysicianAddress ReferringPhysicianName ReferringPhysicianTelephoneNumbers RegionOfResidence
RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription
RequestedProcedureID RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer ReviewerName
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
ScheduledProcedureStepLocation ScheduledProcedureStepStartDate ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationName SeriesDate SeriesDescription SeriesTime ServiceEpisodeDescription ServiceEpisodeID
SmokingStatus SourceImageSequence SpecialNeeds StationName StorageMediaFileSetUID StudyComments StudyDate
StudyDescription StudyID StudyIDIssuer StudyTime SynchronizationFrameOfReferenceUID TemplateExtensionCreatorUID
TemplateExtensionOrganizationUID TextComments TextString TimezoneOffsetFromUTC TopicAuthor TopicKeywords
TopicSubject TopicTitle TransactionUID UID VerifyingObserverIdentificationCodeSequence VerifyingObserverName
VerifyingObserverSequence VerifyingOrganization VisitComments
""".split()
"""Keywords of the basic profile's attributes; those this test cannot give a distinctive value
(binary, numeric-only, coded or file-meta attributes) are listed by :func:`phi_values` as skipped.
Study, Series and SOP Instance UIDs are checked separately: they are kept (pseudonymised)."""

VALUE_BY_VR = {
    "PN": "PHIMARK{n:03d}^TESTNAME",
    **dict.fromkeys(("LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"), "PHIMARK{n:03d}"),
    "DA": "1931{month:02d}{day:02d}",
    "TM": "1314{second:02d}.{n:03d}",
    "DT": "1931{month:02d}{day:02d}1314{second:02d}.{n:03d}",
    "UI": "1.2.826.0.1.3680043.9.4242.{n}",
    "DS": "{n}.4242",
    "AS": "093Y",
    "SQ": "PHIMARK{n:03d}^IN^SEQUENCE",  # an item holding this name and an id
}
"""A distinctive value per value representation; ``n`` is the attribute's place in the list."""


def phi_values() -> tuple[dict[str, str], list[str]]:
    """A distinctive value per settable attribute, and the keywords skipped."""
    values, skipped = {}, []
    for n, keyword in enumerate(BASIC_PROFILE, start=1):
        tag = keyword_dict.get(keyword)
        vr = dictionary_VR(tag) if tag is not None and tag >> 16 not in (0x0000, 0x0002) else None  # no command/meta
        if vr in VALUE_BY_VR:
            values[keyword] = VALUE_BY_VR[vr].format(n=n, month=n % 12 + 1, day=n % 28 + 1, second=n % 60)
        else:
            skipped.append(keyword)
    return values, skipped


def add_phi(ds: Dataset, values: dict[str, str]) -> None:
    for keyword, value in values.items():
        if dictionary_VR(keyword_dict[keyword]) == "SQ":
            item = Dataset()
            item.PatientName = value  # a name inside a sequence item
            item.PatientID = value.split("^")[0] + "-ID"
            setattr(ds, keyword, Sequence([item]))
        else:
            setattr(ds, keyword, value)


def markers(values: dict[str, str]) -> dict[str, bytes]:
    """What to search for: each value, and the name part of names (a reformatted name keeps it)."""
    found = {keyword: value.encode() for keyword, value in values.items()}
    found.update({f"{k}.name": v.split("^")[0].encode() for k, v in values.items() if "^" in v})
    return found


def dress_patient(root: Path, patient_id: str, values: dict[str, str], folder_name: str) -> dict[str, set[str]]:
    """Generate a patient, give every DICOM file the PHI values, name its folder ``folder_name``;
    returns its original UIDs (study, series, SOP) and reader ids."""
    generate_patient(patient_id, root, seed=0)
    uids: dict[str, set[str]] = {"uid": set(), "reader": set()}
    for path in sorted((root / patient_id).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        add_phi(ds, values)
        uids["uid"] |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        ds.save_as(path)
    for xml in (root / patient_id).rglob("*.xml"):
        text = xml.read_text()
        uids["reader"] |= {
            line.split(">")[1].split("<")[0] for line in text.splitlines() if "servicingRadiologistID" in line
        }
    (root / patient_id).rename(root / folder_name)
    return uids


def decoded_views(path: Path) -> Iterator[bytes]:
    """The file's bytes, and the text inside it when it is compressed or columnar."""
    data = path.read_bytes()
    yield data
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        yield table.to_pandas().to_csv().encode()
        yield str(table.schema.metadata).encode()
    elif path.suffix == ".zst":
        yield zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                yield name.encode() + archive.read(name)


def leaks(data_dir: Path, printed: str, searched: dict[str, bytes]) -> tuple[dict[str, list[str]], int]:
    """Where each searched value turns up (file names or "printed"), and how many files were read."""
    found: dict[str, list[str]] = {}
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    for path in files:
        views = list(decoded_views(path))
        for name, needle in searched.items():
            if any(needle in view for view in views) or needle in str(path.relative_to(data_dir)).encode():
                found.setdefault(name, []).append(str(path.relative_to(data_dir)))
    for name, needle in searched.items():
        if needle in printed.encode():
            found.setdefault(name, []).append("printed")
    return found, len(files)


def search_first_nodule(data_dir: Path, series_folder: Path) -> int:
    index = load_artefact(artefact_folder(artefacts_dir(data_dir), ["hash_index"]))
    row = index.items.iloc[0]
    at = f"{row['center_i']},{row['center_j']},{row['center_k']}"
    return main(["search", "--dicom", str(series_folder), "--at", at, "--data-dir", str(data_dir), "--json"])


@pytest.fixture(scope="module")
def profile() -> tuple[dict[str, str], list[str]]:
    return phi_values()


def test_the_profile_is_mostly_settable(profile) -> None:
    values, skipped = profile
    assert len(values) >= 150, skipped


def test_no_dicom_phi_reaches_any_output(profile, tmp_path: Path, capfd, one_torch_thread) -> None:
    values, skipped = profile
    root, data_dir = tmp_path / "lidc", tmp_path / "data"
    for patient_id in PATIENTS:
        dress_patient(root, patient_id, values, patient_id)
    lines: list[str] = []
    summary = run_pipeline(root, data_dir, progress=lines.append, training=QUICK_TRAINING, report="none")
    assert not summary.failed and summary.library_ok
    series_folder = next((root / PATIENTS[0]).rglob("*.dcm")).parent
    assert search_first_nodule(data_dir, series_folder) == 0
    captured = capfd.readouterr()
    found, files = leaks(data_dir, "\n".join(lines) + captured.out + captured.err, markers(values))
    assert not found, found
    with capfd.disabled():
        print(
            f"\nPHI: {len(values)} basic-profile attributes set in every file ({len(skipped)} not settable), "
            f"none found in {files} output files or the printed output"
        )


def test_pseudonyms_hide_patients_uids_readers_and_paths(
    profile, tmp_path: Path, capfd, monkeypatch, one_torch_thread
) -> None:
    values, _ = profile
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, KEY)
    root, data_dir = tmp_path / "lidc", tmp_path / "data"
    folders = {pid: f"Doe^Jane_{n}_MRN-4711{n}" for n, pid in enumerate(REPORTED_PATIENTS)}
    secrets: dict[str, bytes] = {}
    for patient_id, folder in folders.items():
        originals = dress_patient(root, patient_id, values, folder)
        secrets[f"folder {folder}"] = folder.encode()
        secrets[f"MRN of {folder}"] = folder.split("_", 2)[2].encode()
        secrets[f"LIDC id {patient_id}"] = patient_id.encode()
        secrets |= {f"uid {uid}": uid.encode() for uid in originals["uid"]}
        secrets |= {f"reader {reader}": reader.encode() for reader in originals["reader"]}
    broken_folder = "Roe^Richard_MRN-0815"
    generate_patient("LIDC-IDRI-0957", tmp_path / "broken", seed=0)
    (tmp_path / "broken" / "LIDC-IDRI-0957").rename(root / broken_folder)
    victim = sorted((root / broken_folder).rglob("*.dcm"))[7]
    victim.write_bytes(victim.read_bytes()[:300])
    secrets[f"folder {broken_folder}"] = broken_folder.encode()
    secrets["MRN-0815"] = b"MRN-0815"

    lines: list[str] = []
    summary = run_pipeline(root, data_dir, progress=lines.append, training=QUICK_TRAINING, report="quick")
    evaluation = summary.library_metadata["retrieval_evaluation"]
    assert summary.library_ok and "p_at_10" in evaluation  # a real report
    assert evaluation["reader_agreement_summary"].startswith(("readers agree", "reader agreement not measured"))
    keys = sorted(o.patient_id for o in summary.outcomes)
    assert all(k.startswith("P") and len(k) == 17 for k in keys)
    (failure,) = summary.failed
    series_folder = next((root / folders[PATIENTS[0]]).rglob("*.dcm")).parent
    assert search_first_nodule(data_dir, series_folder) == 0
    captured = capfd.readouterr()
    found, files = leaks(data_dir, "\n".join(lines) + captured.out + captured.err, markers(values) | secrets)
    assert not found, found

    token = next(word for word in failure.error.split() if word.startswith("F") and ".dcm" in word).rstrip(":")
    assert f"{failure.patient_id}: {token}" in failure.error  # the patient and the file, as pseudonyms
    assert main(["reveal", token, "--lidc-root", str(root)]) == 0
    assert main(["reveal", failure.patient_id, "--lidc-root", str(root)]) == 0
    revealed = capfd.readouterr().out.split()
    assert revealed == [str(victim), str(root / broken_folder)]
    with capfd.disabled():
        print(
            f"\nPHI with pseudonyms: {len(secrets)} identifiers (folder names, MRNs, UIDs, readers) and "
            f"{len(values)} attributes absent from {files} output files and the printed output"
        )


def test_pseudonyms_are_keyed_stable_and_valid() -> None:
    first, again, other = Pseudonymiser(KEY), Pseudonymiser(KEY), Pseudonymiser(KEY[::-1])
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
    assert first.patient("Doe^Jane") == again.patient("Doe^Jane") != other.patient("Doe^Jane")
    assert first.uid(uid) == again.uid(uid) != other.uid(uid)
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", first.uid(uid)) and len(first.uid(uid)) <= 64  # a valid DICOM UID
    assert first.patient("a") != first.patient("b") and first.path("/x/1.dcm").endswith(".dcm")
    with pytest.raises(ValueError, match="at least 16"):
        Pseudonymiser("short")


def test_errors_show_a_patients_paths_as_tokens(monkeypatch, tmp_path: Path) -> None:
    path = tmp_path / "Doe^Jane" / "1.2.3" / "000001.dcm"
    assert str(path) in str(InputDataError("bad", patient_id="P1", path=path))
    monkeypatch.setenv(PSEUDONYM_KEY_ENV, KEY)
    message = str(InputDataError("bad", patient_id="P1", path=path))
    assert "Doe" not in message and Pseudonymiser(KEY).path(path) in message
    assert str(tmp_path / "query.npy") in str(InputDataError("bad", path=tmp_path / "query.npy"))  # not a patient's
