"""A search by a library nodule needs no network: the index keeps what the model made of each
item (codes, features, class and rating predictions), so ``search --nodule`` answers without
importing torch, with the hits of the same nodule's image sent through the network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodule_pipeline.hashing.searcher import NoduleSearcher
from nodule_pipeline_tests.test_serve_api import QUERY

PROBE = """
import json, sys
from nodule_pipeline.cli import main
code = main(["search", "--nodule", sys.argv[1], "--data-dir", sys.argv[2], "--k", "4", "--json"])
print(json.dumps({"exit": code, "torch": "torch" in sys.modules}))
"""


def test_search_by_a_library_nodule_does_not_import_torch(served_library: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, QUERY, str(served_library)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    hits_text, _, probe = done.stdout.rpartition("\n{")
    assert json.loads("{" + probe) == {"exit": 0, "torch": False}
    printed = [(hit["nodule_id"], hit["hamming"]) for hit in json.loads(hits_text)]
    expected = NoduleSearcher.from_data_dir(served_library).search_nodule(QUERY, k=4).hits
    assert printed == [(hit.nodule_id, hit.hamming) for hit in expected] and printed


def test_it_finds_what_the_network_finds_for_the_nodules_image(served_library: Path) -> None:
    searcher = NoduleSearcher.from_data_dir(served_library)
    stored = searcher.search_nodule(QUERY, k=4)
    row = int(searcher.nodule_rows(QUERY)[0])
    patient = str(searcher.index.items["patient_id"].iloc[row])
    through_network = searcher.search_roi(searcher.index.rois[row], k=4, exclude_patient=patient)
    assert [(h.nodule_id, h.hamming) for h in stored.hits] == [(h.nodule_id, h.hamming) for h in through_network.hits]
    # the index keeps features in float16: distances agree to its precision
    assert [h.euclidean for h in stored.hits] == pytest.approx([h.euclidean for h in through_network.hits], rel=2e-3)
    assert stored.predicted_class == through_network.predicted_class
    assert stored.malignant_probability == pytest.approx(through_network.malignant_probability, abs=1e-5)
    assert stored.predicted_ratings == through_network.predicted_ratings
