#!/usr/bin/env python
"""A probe of the next step for MR heads, not part of the pipeline: the MNI 2009c head with skull (a training head)
registered affinely onto each head never trained on, its brain mask carried over and dilated, and the shipped model's
whole brain kept only within it. Prints each head's whole-brain Dice: the model alone, the registered template's
brain alone, and the model within it at margins of 0, 2, 4 and 6 voxels (the model card's table, issue 32).

    python scripts/probe_brain_atlas.py [--heads robex_t1 itk_t1]

The development heads by default (ROBEX's, ITK's); ``--heads brainbrowser_t1`` (``fetch_samples --real-heads``)
looks at a held-out head, which is then development for any choice made with this probe. Needs
``fetch_samples --heads`` (the template). A few seconds of registration and a segmentation per head, 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "mni09c_head"
REGISTRATION_MM = 4.0  # the grid the registration compares on
MARGINS = (0, 2, 4, 6)  # voxels of the head's grid


def registered_brain(head: Path, samples: Path) -> np.ndarray:
    """The template's brain mask on ``head``'s voxels (x, y, z as nibabel reads them) after an affine registration
    of the template onto the head (Mattes mutual information, both smoothed and shrunk to about REGISTRATION_MM)."""
    fixed = sitk.ReadImage(str(head), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(samples / f"{TEMPLATE}.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(samples / "labels" / f"{TEMPLATE}.nii.gz"), sitk.sitkUInt8)

    def coarse(image: sitk.Image) -> sitk.Image:
        factors = [max(1, round(REGISTRATION_MM / s)) for s in image.GetSpacing()]
        return sitk.Shrink(sitk.SmoothingRecursiveGaussian(image, REGISTRATION_MM / 2), factors)

    f, m = coarse(fixed), coarse(moving)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, 1)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(sitk.CenteredTransformInitializer(
        f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS), inPlace=False)
    transform = method.Execute(f, m)
    warped = sitk.Resample(mask, fixed, transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(warped).transpose(2, 1, 0) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--heads", nargs="+", default=["robex_t1", "itk_t1"])
    args = parser.parse_args()
    from delightsam import load_model
    from delightsam.label_maps import structure_mask
    from delightsam.pipeline import segment_volume
    from delightsam.reading import read_label, read_volume

    model = load_model(ROOT / "models" / "delightsam_ct_mr" / "models" / "model.safetensors").eval()
    samples = args.data / "samples"
    print("| head | model | template's brain | " + " | ".join(f"within +{k}" for k in MARGINS) + " | registration s |")
    print("|---|---|---|" + "---|" * (len(MARGINS) + 1))
    for head in args.heads:
        path = samples / f"{head}.nii.gz"
        image = read_volume(path)
        reference = np.asarray(read_label(samples / "labels" / f"{head}.nii.gz", image)) > 0
        began = time.time()
        brain = registered_brain(path, samples).reshape(reference.shape)
        seconds = time.time() - began
        found = structure_mask(segment_volume(model, image, "mr").labels, model.config.modality("mr").structures[0])
        within = [dice(found & (ndimage.binary_dilation(brain, iterations=k) if k else brain), reference)
                  for k in MARGINS]
        print(f"| {head} | {dice(found, reference):.3f} | {dice(brain, reference):.3f} | "
              + " | ".join(f"{d:.3f}" for d in within) + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
