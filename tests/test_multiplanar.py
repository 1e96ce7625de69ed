"""Multi-planar inference (``delightsam.multiplanar``): a volume with no axis 2.5 times the next is seen in three
planes, each plane's probabilities put back on the same voxels; a thick-sliced series in its own plane only."""

from __future__ import annotations

import dataclasses
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from delightsam.config import DeLightSAMConfig, Modality, Structure, released_config
from delightsam.first_stage import FittedSliceNetwork, segment_with
from delightsam.multiplanar import planes_for

PLANES = ["axial", "coronal", "sagittal"]


class BrightIsFound(FittedSliceNetwork):
    """A stand-in for a trained network where only geometry is tested: a pixel is the structure where it is bright
    (the real networks run through the same fitting, batching and layouts)."""

    def __init__(self):
        super().__init__(64, torch.device("cpu"))
        self.seen = []  # (slices, rows, columns) of each batch

    def forward(self, slices, spacing=None):
        self.seen.append((slices.shape[0], *slices.shape[2:]))
        return super().forward(slices, spacing)

    def logits(self, grey, fitted, guide):
        return (grey - 128.0) / 8.0


def _spec(planes) -> Modality:
    return Modality("mr", "mr", "mr", [Structure("brain", 1, 0)], intensity={"percentiles": [0.5, 99.5]},
                    planes=list(planes), symmetric=True)


def _object(shape=(30, 34, 38)) -> np.ndarray:
    """An off-centre object without a mirror symmetry (a box with a bar on one side), in RAS order."""
    mask = np.zeros(shape, dtype=bool)
    mask[5:16, 8:25, 10:30] = True
    mask[16:24, 8:13, 10:18] = True
    return mask


def _stored(mask: np.ndarray, order: str, spacing=(1.0, 1.0, 1.0)) -> nib.Nifti1Image:
    """``mask`` (RAS) as a grey volume stored in another voxel order (``order``: axis codes, e.g. "PIR")."""
    image = nib.Nifti1Image(np.where(mask, 900.0, -500.0).astype(np.float32), np.diag([*spacing, 1.0]))
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(order)))
    return image.as_reoriented(transform)


def _as_ras(labels: np.ndarray, image: nib.Nifti1Image) -> np.ndarray:
    return nib.as_closest_canonical(nib.Nifti1Image(labels.astype(np.uint8), image.affine)).get_fdata() > 0


def test_a_thin_volume_is_seen_in_the_modalitys_planes_and_a_thick_one_in_its_own():
    thin, thick = np.diag([2.0, 2.0, 3.0, 1.0]), np.diag([2.0, 2.0, 5.0, 1.0])
    assert planes_for(_spec(PLANES), thin) == PLANES  # 3 mm slices of 2 mm pixels: seen in every plane
    assert planes_for(_spec(PLANES), np.diag([1.0, 1.0, 2.4, 1.0])) == PLANES
    assert planes_for(_spec(PLANES), thick) == []  # 2.5 times the in-plane spacing: its own plane alone
    assert planes_for(_spec([]), thin) == [] and planes_for(_spec(["axial"]), thin) == []


@pytest.mark.parametrize("order", ["RAS", "PIR", "LSA"])
def test_each_planes_probabilities_land_on_the_voxels_they_came_from(order):
    """Each plane's slices are decoded in their own layout and put back; a plane put back flipped or transposed
    would move the off-centre object. Every plane is used (slices of each plane's shape reach the network), about
    as many slices decoded in all as the axial plane alone has, and the storage order changes nothing."""
    mask = _object()
    image = _stored(mask, order)
    network = BrightIsFound()
    result = segment_with(network, torch.as_tensor(image.get_fdata()), _spec(PLANES), affine=image.affine)
    found = _as_ras(result.labels, image)
    assert 2 * (found & mask).sum() / (found.sum() + mask.sum()) > 0.97
    assert np.allclose(np.argwhere(found).mean(0), np.argwhere(mask).mean(0), atol=0.3)
    assert any("seen in axial, coronal, sagittal slices" in n for n in result.notes)
    rows_columns = {(34, 30), (38, 30), (38, 34)}  # RAS (30, 34, 38): axial P-L, coronal I-L, sagittal I-P
    assert {seen[1:] for seen in network.seen} == rows_columns
    assert 38 - 3 <= sum(seen[0] for seen in network.seen) <= 38 + 3  # about the axial plane's slices


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 3.0, 2.0)])
@pytest.mark.parametrize("order", ["RAS", "PIR", "LSA"])
@pytest.mark.parametrize("plane", PLANES)
def test_each_plane_alone_puts_its_slices_back_where_they_came_from(order, plane, spacing):
    """One plane's probabilities alone, every slice decoded (a plane put back flipped or transposed is outvoted by
    the two others in the average, so each is checked by itself): the object, voxel for voxel, into the axial layout
    of a 1 mm volume and into the coronal layout of 3 mm coronal slices of 2 mm pixels (thick by ``THICK_SLICE``,
    seen in three planes)."""
    from delightsam.geometry import grey_levels, orient
    from delightsam.multiplanar import fused_probabilities

    mask = _object()
    image = _stored(mask, order, spacing)
    volume = torch.as_tensor(image.get_fdata())
    into = orient(volume, image.affine)
    levels = grey_levels(into.data, {"percentiles": [0.5, 99.5]})
    fused = fused_probabilities(BrightIsFound(), volume, image.affine, [plane], levels, into, 8, slices=10 ** 6)
    found = _as_ras(into.to_input((fused[0] > 0.5).numpy()), image)
    assert np.array_equal(found, mask), (plane, order)


@pytest.mark.parametrize("order", ["RAS", "PIR", "LSA"])
def test_coronal_slices_of_3_mm_and_2_mm_pixels_are_seen_in_three_planes(order):
    """ITK's example head's geometry (2x2x3 mm, coronal slices): its acquisition plane is coronal, it is seen in
    all three planes, and the object comes back where it is in every storage order."""
    mask = _object()
    image = _stored(mask, order, spacing=(2.0, 3.0, 2.0))
    network = BrightIsFound()
    result = segment_with(network, torch.as_tensor(image.get_fdata()), _spec(PLANES), affine=image.affine)
    assert result.plane == "coronal" and result.planes == PLANES
    assert {seen[1:] for seen in network.seen} == {(34, 30), (38, 30), (38, 34)}  # every plane reached the network
    found = _as_ras(result.labels, image)
    assert 2 * (found & mask).sum() / (found.sum() + mask.sum()) > 0.97
    assert np.allclose(np.argwhere(found).mean(0), np.argwhere(mask).mean(0), atol=0.3)


def test_a_thick_series_is_segmented_in_its_acquisition_plane_alone():
    mask = _object((30, 34, 13))
    image = _stored(mask, "RAS", spacing=(1.0, 1.0, 3.0))
    network = BrightIsFound()
    result = segment_with(network, torch.as_tensor(image.get_fdata()), _spec(PLANES), affine=image.affine)
    alone = segment_with(BrightIsFound(), torch.as_tensor(image.get_fdata()), _spec([]), affine=image.affine)
    assert np.array_equal(result.labels, alone.labels) and result.labels.any()
    assert {seen[1:] for seen in network.seen} == {(34, 30)} and not any("seen in" in n for n in result.notes)


def test_a_checkpoints_planes_are_checked_and_kept():
    config = released_config()
    with_planes = [{**m.__dict__, "structures": [s.__dict__ for s in m.structures], "planes": PLANES}
                   for m in config.modalities]
    name = config.modalities[0].name
    assert type(config).from_dict(config.replace(modalities=with_planes).to_dict()).modality(name).planes == PLANES
    for bad in (["oblique", "axial"], ["axial", "axial"], ["sagittal"], "axial", 3):
        with pytest.raises(ValueError, match="planes must be"):
            config.replace(modalities=[{**m, "planes": bad} for m in with_planes])


def test_training_cuts_a_thin_volume_in_every_plane_inference_sees_it_in(tmp_path):
    """A 3-D MR is trained on in the three planes inference sees it in (each plane's slices, their masks on the same
    voxels); a thick series and a modality seen in one plane in their acquisition plane only; one box atlas entry a
    volume."""
    import delightsam
    from helpers import make_test_checkpoint
    from delightsam.training_data import SliceData, TrainItem

    model = delightsam.load_model(make_test_checkpoint(tmp_path / "m.safetensors", mr_planes=PLANES))
    mask = _object()
    items = []
    for name, spacing, modality in (("thin", (1.0, 1.0, 1.0), "mr"), ("thick", (1.0, 1.0, 3.0), "mr"),
                                    ("ct", (1.0, 1.0, 1.0), "ct")):
        image = _stored(mask, "PIR", spacing)
        nib.save(image, tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image((image.get_fdata() > 0).astype(np.uint8), image.affine),
                 tmp_path / f"{name}_label.nii.gz")
        items.append(TrainItem(name, str(tmp_path / f"{name}.nii.gz"), str(tmp_path / f"{name}_label.nii.gz"),
                               modality, {1: 4 if modality == "mr" else 1}))
    data = SliceData(items, model)
    assert data.modality == ["mr"] * 4 + ["ct"]  # the thin MR three times, the thick one and the CT once each
    depths = [g.shape[0] for g in data.grey]
    assert depths == [38, 34, 30, 38, 38]  # axial (S), coronal (A) and sagittal (R) slices of the RAS (30, 34, 38)
    for grey, masks in zip(data.grey, data.masks):  # each plane's masks lie on its own bright voxels
        bright = grey[:, 0].float() > 128
        assert masks[:, 0].any() and (masks[:, 0] == bright).float().mean() > 0.99
    assert [len(v) for v in data.atlas.values()] == [2, 1]


def test_training_leaves_out_the_acquisition_plane_where_inference_does(tmp_path):
    """A modality seen in coronal and sagittal slices only is trained on in those two: the axial slices of a thin
    volume stored axially would be trained on and never seen. The box atlas still reads the acquisition plane."""
    import delightsam
    from helpers import make_test_checkpoint
    from delightsam.training_data import SliceData, TrainItem

    model = delightsam.load_model(make_test_checkpoint(tmp_path / "m.safetensors", mr_planes=["coronal", "sagittal"]))
    image = _stored(_object(), "RAS")
    nib.save(image, tmp_path / "thin.nii.gz")
    nib.save(nib.Nifti1Image((image.get_fdata() > 0).astype(np.uint8), image.affine), tmp_path / "label.nii.gz")
    data = SliceData([TrainItem("thin", str(tmp_path / "thin.nii.gz"), str(tmp_path / "label.nii.gz"), "mr",
                                {1: 4})], model)
    assert [g.shape[0] for g in data.grey] == [34, 30]  # coronal (A) and sagittal (R) slices; no axial (S: 38)
    assert [len(v) for v in data.atlas.values()] == [1]


class OneEyed(BrightIsFound):
    """A network that finds a bright pixel surely in the left half of the slice it is shown and misses it (p 0.38)
    in the right half: what the mirror image adds is the other half, seen on the left."""

    def logits(self, grey, fitted, guide):
        left = torch.arange(grey.shape[-1]) < fitted[1] / 2
        return torch.where((grey > 128) & left, 20.0, torch.where(grey > 128, -0.5, -20.0))


@pytest.mark.parametrize("shape, spacing, plane", [((30, 34, 13), (1.0, 1.0, 3.0), "axial"),
                                                   ((30, 34, 38), (1.0, 3.0, 1.0), "coronal")])
@pytest.mark.parametrize("order", ["RAS", "PIR", "LSA"])
def test_a_thick_series_is_decoded_as_it_is_and_mirrored_left_right(order, shape, spacing, plane):
    """A series too thick for several planes (3 mm axial or coronal slices of 1 mm pixels) of a multi-planar
    modality: each slice is decoded as it is and mirrored, the mirrored probabilities flipped back onto the voxels
    they came from (a flip back along the wrong axis, or none, moves the off-centre object), and the two averaged; a
    modality of one plane (CT) is not."""
    mask = _object(shape)
    image = _stored(mask, order, spacing=spacing)
    volume = torch.as_tensor(image.get_fdata())
    network, alone = OneEyed(), OneEyed()
    result = segment_with(network, volume, _spec(PLANES), affine=image.affine)
    plain = segment_with(alone, volume, _spec([]), affine=image.affine)
    found, half = _as_ras(result.labels, image), _as_ras(plain.labels, image)
    assert 2 * (found & mask).sum() / (found.sum() + mask.sum()) > 0.97
    assert np.allclose(np.argwhere(found).mean(0), np.argwhere(mask).mean(0), atol=0.3)
    assert 0.2 < half.sum() / mask.sum() < 0.8  # one eye alone: a part of the object
    assert sum(s[0] for s in network.seen) == 2 * sum(s[0] for s in alone.seen)
    assert max(s[0] for s in network.seen) <= 8  # half the slices a batch, with their mirror images: no more memory
    assert result.plane == plane and any(f"its {plane} slices decoded as they are and mirrored left-right" in n
                                         for n in result.notes)
    assert not any("mirrored" in n for n in plain.notes)


def test_only_a_thick_axial_or_coronal_series_of_a_multiplanar_modality_is_mirrored():
    from delightsam.multiplanar import mirrors

    assert mirrors(_spec(PLANES), [], "axial") and mirrors(_spec(PLANES), [], "coronal")
    assert not mirrors(_spec(PLANES), [], "sagittal")  # a sagittal slice mirrored is the one across the midline
    assert not mirrors(_spec(PLANES), PLANES, "axial")  # a thin volume's views are its planes
    assert not mirrors(_spec([]), [], "axial")  # CT: one plane, decoded once
    undeclared = dataclasses.replace(_spec(PLANES), symmetric=False)
    assert not mirrors(undeclared, [], "axial")  # nobody said its structures are their own mirror images


@pytest.mark.parametrize("name", ["kidney_left", "spleen", "Left-Hippocampus", "hippocampus_L", "lh.cortex",
                                  "RightAmygdala", "Lt-Hippocampus"])
def test_a_modality_declared_symmetric_names_no_structure_of_one_side(name):
    """A mirrored left hippocampus is the right one: a checkpoint that declares such a modality symmetric (so that its
    thick series would be decoded mirrored) is refused by the configuration (which ``load_model`` reads), naming the
    structure; without the declaration it is taken, decoded once, and described so."""
    from delightsam.multiplanar import mirrors
    from delightsam.pipeline import Pipeline

    config = DeLightSAMConfig(query_groups={"mr": 2}, modalities=[
        Modality("mr", "mr", "mr", [Structure("brain", 1, 0), Structure(name, 2, 1)], planes=PLANES)])
    symmetric = config.to_dict()
    symmetric["modalities"][0]["symmetric"] = True
    with pytest.raises(ValueError, match=f"declared symmetric.*{re.escape(name)}"):
        DeLightSAMConfig.from_dict(symmetric)
    undeclared = config.modality("mr")
    assert not mirrors(undeclared, [], "axial") and "mirror" not in Pipeline().describe("mr", False, PLANES)
    assert "mirror images" in Pipeline().describe("mr", False, PLANES, symmetric=True)
    for whole in ("grey_matter", "lateral_ventricles", "cerebellum", "vertebrae_L1"):  # its own mirror image
        symmetric["modalities"][0]["structures"][1]["name"] = whole
        assert DeLightSAMConfig.from_dict(symmetric).modality("mr").symmetric
