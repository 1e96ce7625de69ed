"""The app's answers, voxel by voxel, with the shipped model on the held-out CT, through a real server the way
its clients drive it: 3D Slicer's NRRD from a datastore image stored in two voxel orders, a zipped DICOM series
uploaded as a session with a DICOM SEG back, and the answer saved as a final label. Each answer must hold the
organs where the reference label has them (Dice per structure): an empty label, or one transposed or flipped
on the way, fails these tests (checked here on the answer itself)."""

from __future__ import annotations

import json
import zipfile

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from delightsam.checkpoint import stored_config
from helpers import REPO, monailabel_server

pytestmark = pytest.mark.server

TS = {"liver": 5, "spleen": 1, "stomach": 6}  # TotalSegmentator's ids in the reference label
# the app's default (two stages) on this held-out series measured 0.963 / 0.931 / 0.849 (model card)
AT_LEAST = {"liver": 0.90, "spleen": 0.85, "stomach": 0.70}
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}
# the bundle's checkpoint is what `make run` serves (no --conf checkpoint)
SHIPPED_VERSION = stored_config(REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors")["version"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def _canonical(image: sitk.Image) -> np.ndarray:
    """Voxels in R-A-S order, whatever order the file stores them in (nibabel's canonical orientation)."""
    affine = np.eye(4)
    direction = np.reshape(image.GetDirection(), (3, 3))
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's LPS to RAS
    data = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # [x, y, z]
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, samples):
    """The held-out CT series as the datastore's images, stored R-A-S (NIfTI) and L-P-S (NRRD, as ITK reads the
    series), its DICOM files with UIDs (as a PACS holds them), and the reference organs in R-A-S."""
    tmp = tmp_path_factory.mktemp("voxels")
    studies = tmp / "studies"
    studies.mkdir()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(samples / "samples" / "ts_ct_dicom")))
    series = reader.Execute()
    sitk.WriteImage(series, str(studies / "held_out_lps.nrrd"))
    nifti = tmp / "lps.nii.gz"
    sitk.WriteImage(series, str(nifti))
    canonical = nib.as_closest_canonical(nib.load(nifti))
    nib.save(nib.Nifti1Image(np.asarray(canonical.dataobj), canonical.affine), studies / "held_out_ras.nii.gz")
    assert nib.aff2axcodes(nib.load(studies / "held_out_ras.nii.gz").affine) == ("R", "A", "S")
    reference = nib.as_closest_canonical(nib.load(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz"))
    reference = np.asarray(reference.dataobj)
    from pacs import prepare_ct  # scripts/ (conftest puts it on the path)

    prepare_ct(samples / "samples" / "ts_ct_dicom", tmp / "series")
    return {"tmp": tmp, "studies": studies, "series": tmp / "series",
            "reference": {name: reference == ts for name, ts in TS.items()}}


@pytest.fixture(scope="module")
def server(held_out):
    """A real server with the shipped model (no checkpoint configured: the default) and its default settings."""
    conf = ["--conf", "model_dir", str(held_out["tmp"] / "model")]
    with monailabel_server(held_out["tmp"], held_out["studies"], conf) as url:
        yield url


def _organs(labels: np.ndarray, names: dict[str, int], reference: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: round(_dice(labels == names[name], reference[name]), 3) for name in TS}


def test_slicer_gets_the_organs_in_either_storage_order(server, held_out):
    client = MONAILabelClient(server, tmpdir=str(held_out["tmp"]))
    answers = {}
    for image in ("held_out_ras", "held_out_lps"):
        label_file, params = client.infer("delightsam_ct", image, SLICER)
        assert params["refined"] is True and params["model_version"] == SHIPPED_VERSION
        label = sitk.ReadImage(label_file)
        assert label.GetPixelID() == sitk.sitkUInt8
        answers[image] = _canonical(label)
        scores = _organs(answers[image], params["label_names"], held_out["reference"])
        for name, least in AT_LEAST.items():
            assert scores[name] >= least, (image, scores)
    np.testing.assert_array_equal(answers["held_out_ras"], answers["held_out_lps"])
    # what these checks stand guard against: the same answer transposed in-plane, flipped, or empty fails them
    answer, names = answers["held_out_ras"], params["label_names"]
    assert _organs(np.swapaxes(answer, 0, 1), names, held_out["reference"])["liver"] < 0.5
    assert _organs(answer[::-1], names, held_out["reference"])["liver"] < AT_LEAST["liver"]
    assert _organs(np.zeros_like(answer), names, held_out["reference"])["liver"] == 0
    # the answer, saved back as Slicer saves it (segments numbered by position, named), annotates the organs
    saved = held_out["tmp"] / "answer.nrrd"
    sitk.WriteImage(sitk.ReadImage(label_file), str(saved))
    positions = [{"name": name, "idx": idx} for name, idx in params["label_names"].items()]
    reply = client.save_label("held_out_lps", str(saved), tag="final", params={"label_info": positions})
    assert any("annotates liver, spleen" in note for note in reply["notes"]), reply


def test_a_zipped_series_gets_a_dicom_seg_with_the_organs(server, held_out):
    archive = held_out["tmp"] / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(held_out["series"].iterdir()):
            z.write(f, f"series/{f.name}")
    session = requests.put(f"{server}/session/", params={"uncompress": "true"},
                           files={"files": (archive.name, archive.read_bytes())}, timeout=120)
    assert session.status_code == 200, session.text
    reply = requests.post(f"{server}/infer/delightsam_ct", params={"session_id": session.json()["session_id"],
                                                                   "output": "image"},
                          data={"params": json.dumps({"result_extension": ".dcm"})}, timeout=600)
    assert reply.status_code == 200, reply.text
    path = held_out["tmp"] / "answer_seg.dcm"
    path.write_bytes(reply.content)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in held_out["series"].iterdir()]
    row = np.asarray(sources[0].ImageOrientationPatient[:3], float)
    column = np.asarray(sources[0].ImageOrientationPatient[3:], float)
    normal = np.cross(row, column)
    sources.sort(key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)))
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert set(TS) <= set(numbers)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
                                               combine_segments=True)  # [slices, rows, columns], by position
    first, second = (np.asarray(d.ImagePositionPatient, float) for d in sources[:2])
    image = sitk.GetImageFromArray(pixels.astype(np.uint8))  # on the series' grid, to bring it to R-A-S
    image.SetSpacing([float(sources[0].PixelSpacing[1]), float(sources[0].PixelSpacing[0]),
                      float(np.dot(second - first, normal))])
    image.SetDirection([*np.column_stack([row, column, np.cross(row, column)]).ravel()])
    image.SetOrigin([float(v) for v in first])
    scores = _organs(_canonical(image), numbers, held_out["reference"])
    for name, least in AT_LEAST.items():
        assert scores[name] >= least, scores
