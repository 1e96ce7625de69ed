"""One geometry path: the same anatomy gives the same labels whatever its file's voxel order.

Real volumes, the shipped (trained) starter model: the held-out CT (a DICOM series, which ITK reads L-P-S)
and copies of it stored R-A-S, L-P-S and with permuted axes, as NIfTI and NRRD; a real brain MR likewise.
Each goes through a real server's `/infer`, `delightsam evaluate` and training's slices; after mapping back to a
common frame the answers are identical, and they are answers (the liver where the reference has it)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from nibabel import orientations

from helpers import REPO, monailabel_server
from delightsam import load_model
from delightsam.cli import main as cli
from delightsam.training_data import SliceData, TrainItem

STARTER = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"
TS_LIVER, CT_LIVER = 5, 1


def _reoriented(image: nib.Nifti1Image, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    transform = orientations.ornt_transform(orientations.io_orientation(image.affine), orientations.axcodes2ornt(codes))
    data = orientations.apply_orientation(np.asarray(image.dataobj), transform)
    affine = image.affine @ orientations.inv_ornt_aff(transform, image.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def _copies(source: sitk.Image, folder, stem: str) -> dict[str, str]:
    """The volume as its source stores it (NRRD), and stored R-A-S, L-P-S and S-P-L (axes permuted), as NIfTI, and
    R-A-S and L-P-S as NRRD; name -> path. (L-A-S, one flip fewer than L-P-S, was dropped to keep CI short.)"""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"source.nrrd": str(folder / f"{stem}_source.nrrd")}
    sitk.WriteImage(source, paths["source.nrrd"])
    sitk.WriteImage(source, str(folder / f"{stem}_source.nii.gz"))
    stored = nib.load(folder / f"{stem}_source.nii.gz")
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("S", "P", "L")):
        name = "".join(codes).lower()
        paths[f"{name}.nii.gz"] = str(folder / f"{stem}_{name}.nii.gz")
        nib.save(_reoriented(stored, codes), paths[f"{name}.nii.gz"])
        assert nib.aff2axcodes(nib.load(paths[f"{name}.nii.gz"]).affine) == codes
    for name in ("ras", "lps"):  # ITK keeps the voxel order when it writes an NRRD
        paths[f"{name}.nrrd"] = str(folder / f"{stem}_{name}.nrrd")
        sitk.WriteImage(sitk.ReadImage(paths[f"{name}.nii.gz"]), paths[f"{name}.nrrd"])
    return paths


def _canonical(path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("orientation")
    series = samples / "samples" / "ts_ct_dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ct = _copies(reader.Execute(), tmp / "ct", "ct")
    mr = _copies(sitk.ReadImage(str(samples / "studies" / "radiomics_brain1.nrrd")), tmp / "mr", "mr")
    # the reference liver in the model's id, R-A-S (the label file is stored with y reversed to the series)
    reference = nib.as_closest_canonical(nib.load(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz"))
    liver = (np.asarray(reference.dataobj) == TS_LIVER).astype(np.uint8)
    nib.save(nib.Nifti1Image(liver, reference.affine), tmp / "liver_ras.nii.gz")
    return {"tmp": tmp, "series": str(series), "ct": ct, "mr": mr, "liver": liver,
            "liver_path": tmp / "liver_ras.nii.gz"}


@pytest.fixture(scope="module")
def server(volumes):
    """A real server with the shipped starter model (no checkpoint configured: the default)."""
    # the storage variants and the DICOM series are named by server path (allowed on a single-user workstation)
    conf = ["--conf", "model_dir", str(volumes["tmp"] / "model"), "--conf", "allow_server_paths", "true"]
    with monailabel_server(volumes["tmp"], volumes["tmp"] / "ct", conf) as url:
        yield url


def _infer(url: str, model: str, path: str, out) -> np.ndarray:
    reply = requests.post(f"{url}/infer/{model}", params={"image": path, "output": "image"},
                          files={"params": (None, json.dumps({"result_extension": ".nii.gz"}))}, timeout=600)
    assert reply.status_code == 200, reply.text
    out.write_bytes(reply.content)
    return _canonical(out)


@pytest.mark.server
def test_infer_gives_the_same_labels_in_every_storage_order(server, volumes):
    tmp = volumes["tmp"]
    results = {name: _infer(server, "delightsam_ct", path, tmp / f"ct_out_{name.replace('.', '_')}.nii.gz")
               for name, path in volumes["ct"].items()}
    results["dicom series"] = _infer(server, "delightsam_ct", volumes["series"], tmp / "ct_out_series.nii.gz")
    first = results["ras.nii.gz"]
    liver = _dice(first == CT_LIVER, volumes["liver"] == 1)
    assert liver > 0.6, liver  # an answer: the liver where the reference has it
    for name, labels in results.items():
        np.testing.assert_array_equal(labels, first, err_msg=name)
    brains = {name: _infer(server, "delightsam_mr", path, tmp / f"mr_out_{name.replace('.', '_')}.nii.gz")
              for name, path in volumes["mr"].items()}
    first = brains["ras.nii.gz"]
    assert 0.05 < (first > 0).mean() < 0.9  # a brain, not nothing and not everything
    for name, labels in brains.items():
        np.testing.assert_array_equal(labels, first, err_msg=name)


@pytest.mark.slow
def test_evaluate_scores_every_storage_order_alike(volumes):
    images, labels = volumes["tmp"] / "eval_images", volumes["tmp"] / "eval_labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for name, path in volumes["ct"].items():
        stem = name.replace(".", "_")
        shutil.copyfile(path, images / f"{stem}{'.nrrd' if name.endswith('nrrd') else '.nii.gz'}")
        shutil.copyfile(volumes["liver_path"], labels / f"{stem}.nii.gz")  # read onto each image's grid by affines
    out = volumes["tmp"] / "report"
    assert cli(["evaluate", "--checkpoint", str(STARTER), "--data", f"ct:{images}:{labels}", "--output", str(out),
                "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    dice = {e["case"]: next(iter(e["methods"].values()))["structures"]["liver"]["dice"]
            for e in report["sets"]["evaluation"]}
    assert len(dice) == len(volumes["ct"]) and min(dice.values()) > 0.6, dice
    assert max(dice.values()) - min(dice.values()) < 1e-9, dice


def test_training_sees_the_same_slices_in_every_storage_order(volumes):
    model = load_model(STARTER)
    reference = None
    for name, path in volumes["ct"].items():
        data = SliceData([TrainItem(name, path, str(volumes["liver_path"]), "ct")], model)
        if reference is None:
            reference = data
            assert data.masks[0][:, 0].any()
            continue
        assert torch.equal(data.grey[0], reference.grey[0]), name
        assert torch.equal(data.masks[0], reference.masks[0]), name
