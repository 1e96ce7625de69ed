"""The De-LightSAM inference tasks: prompt-free auto-segmentation of a whole 3-D volume, one task per modality.

Each modality the checkpoint serves is a model of its own in `/info` (`delightsam_ct` "CT abdomen",
`delightsam_mr` "MR brain"), with its own labels, so that Slicer and OHIF list them apart and no label id means
two structures. MONAI Label glue over the served pipeline (``delightsam.pipeline.Pipeline``): MONAI's LoadImaged in (NIfTI, NRRD,
DICOM series, also inside the folder of a zipped upload), the library's slice-by-slice inference (one canonical
orientation, labels back on the input's grid), monailabel's Writer out. Bad input becomes an HTTP error whose
message names the problem, so clients show it and the server stays up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from fastapi import HTTPException
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from delightsam.geometry import VolumeError, as_volume, spacing_of
from delightsam.pipeline import PROMPTS
from delightsam.headers import HeaderError, check_geometry
from delightsam.reading import READ_ERRORS, image_reader
from delightsam.refiner_training import carries_adaptation
from delightsam.scope import CONTRASTS, Scope, dicom_contrast, scope

from .. import anatomy, guard
from ..dicom_seg import source_images, write_dicom_seg
from ..modality import dicom_header, header_modality, task_name
from ..options import InferOptions
from ..served import ServedModel

if TYPE_CHECKING:  # the request's image, resolved by the app (importing it would load the PACS client)
    from ..request_image import RequestImage

logger = logging.getLogger(__name__)


class DeLightSAMInfer(BasicInferTask):
    """Auto-segmentation of one modality of the served checkpoint."""

    def __init__(self, served: ServedModel, modality: str) -> None:
        self.served, self.modality = served, modality
        super().__init__(path=None, network=None, type=InferType.SEGMENTATION, labels={}, dimension=3,
                         description="", config={})
        self._refresh()

    def _refresh(self) -> None:
        """Labels, description and options from the checkpoint being served (it changes when training publishes)."""
        self.served.refresh()
        spec = self.served.modalities().get(self.modality)
        self.labels = self.served.structures_of(self.modality)
        if self.served.problem or spec is None:
            why = self.served.problem or f"the served checkpoint has no modality {self.modality!r}"
            self.description = f"De-LightSAM {self.modality.upper()}: NOT AVAILABLE, {why}"
        else:
            title = spec.get("title") or self.modality.upper()
            self.description = (f"{title}: prompt-free De-LightSAM auto-segmentation of {', '.join(self.labels)} "
                                f"(model {self.served.config.get('version', '?')})")
        settings, pipeline = self.served.settings, self.served.pipeline
        self.config().update({"refine": pipeline.refines(self.modality),
                              "prompts": [pipeline.prompts, *(p for p in PROMPTS if p != pipeline.prompts)],
                              "cleanup": settings.cleanup, "batch_size": settings.batch_size,
                              "model_filename": self.served.choices()})
        if (spec or {}).get("measured", {}).get("contrasts"):  # Slicer's and OHIF's option lists: auto first
            self.config()["contrast"] = ["auto", *CONTRASTS]
        else:
            self.config().pop("contrast", None)

    def request(self, options: InferOptions, image: RequestImage) -> dict:
        """What the task runs: the typed options with the server's defaults for those the request left out, and the
        image as the app resolved it: its path (and DICOM series), and the datastore id whose label and uncertainty
        join the loop's record (None: an upload or a session)."""
        if options.contrast not in (None, "auto") and self.modality != "mr":  # before the volume is read
            raise HTTPException(422, f"contrast {options.contrast!r} is an MR's; {task_name(self.modality)} segments "
                                     f"{self.modality.upper()}")
        settings = self.served.settings
        defaults = {"cleanup": settings.cleanup, "batch_size": settings.batch_size, "device": settings.device}
        # every option is in it (None where the request left it out and the server has no default), so that the
        # task's config, which monailabel merges under it (its choices as lists), cannot fill one in; `refine` and
        # `prompts` left out stay None: the served pipeline decides them (``Pipeline.for_request``)
        values = {k: defaults.get(k) if v is None else v for k, v in options.model_dump().items()}
        return {**values, "image": image.path, "series": image.series, "loop_image": image.id,
                "description": self.description, "memory_mb": self.memory_mb(image, options.refine)}

    def memory_mb(self, image: RequestImage, refine: bool | None = None) -> float:
        """The peak memory one inference of ``image`` adds (``Pipeline.memory_mb`` of the request's pipeline), by its
        header (the bytes a voxel takes as read: scaled voxels are read as float64)."""
        if image.header is None:
            raise ValueError(f"the image {image.path!r} was not resolved with its header (request_image.resolve)")
        pipeline = self.served.pipeline.for_request(self.modality, refine)
        spec = self.served.modalities().get(self.modality) or {}
        fused = len(spec.get("structures", [])) if len(spec.get("planes") or []) > 1 else 0  # as if thin (multiplanar)
        return pipeline.memory_mb(self.modality, image.header.voxels, image.header.bytes_per_voxel_read, fused)

    def _out_of_memory(self, name: str, data: dict) -> HTTPException:
        return guard.out_of_memory(repr(name), data.get("memory_mb"), self.served.settings.memory_budget_mb)

    def info(self):
        self._refresh()
        described = {} if self.served.problem else self.served.describe(self.modality)
        return {**super().info(), "label_colors": anatomy.colours(self.labels), "modality": self.modality, **described}

    def is_valid(self) -> bool:
        return True  # listed even without a checkpoint, so that /info can say why it is unavailable

    # ---- the pipeline -----------------------------------------------------------------------
    def pre_transforms(self, data=None):
        """The resolved image (``request_image``) read as it is: a DICOM series by its name, a file by its type.
        dtype=None: the file's own type (CT is int16), not a float32 copy of the whole volume."""
        if (data or {}).get("series") is not None:
            return [LoadImaged(keys="image", reader=ITKReader(series_name=data["series"].name), dtype=None)]
        return [LoadImaged(keys="image", reader=image_reader((data or {}).get("image_path", "")), dtype=None)]

    def post_transforms(self, data=None):
        return []

    def run_pre_transforms(self, data, transforms):
        name = Path(str(data.get("image_path", "?"))).name
        try:
            data = super().run_pre_transforms(data, transforms)
        except (MemoryError, *READ_ERRORS) as e:  # what readers raise for a file they cannot read, or memory
            if guard.is_out_of_memory(e):  # the header was checked: a volume within the limits that did not fit
                raise self._out_of_memory(name, data) from e
            raise guard.unreadable(name, e) from e
        try:  # the geometry as read (ITK derives a DICOM series' from its slices' positions)
            check_geometry(np.asarray(data["image"].affine)[:3, :3], name)
        except HeaderError as e:
            raise HTTPException(422, f"cannot segment {name!r}: {e}") from e
        return data

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        model = self.served.network(device, data.get("model_filename"))
        if self.modality not in model.config.modality_names:
            raise HTTPException(503, f"the served checkpoint has no modality {self.modality!r}; it serves "
                                     f"{', '.join(model.config.modality_names)}")
        image: MetaTensor = data["image"]
        channels = image.meta.get("original_channel_dim")
        has_channels = channels is not None and not (isinstance(channels, float) and np.isnan(channels))
        if has_channels and not (image.dim() == 4 and 1 in (image.shape[0], image.shape[-1])):
            raise HTTPException(422, f"expected a single-channel 3-D volume, got a {image.dim()}-D image of shape "
                                     f"{list(image.shape)}")
        header = dicom_header(data.get("image_path"))  # read once: the modality check and the scope both use it
        self._check_modality(data, header)
        self._check_seg_output(data)
        within = self._scope(model, image, data, header)
        pipeline = self.served.pipeline.for_request(self.modality, data["refine"], data["prompts"])
        loop_image = data.get("loop_image")  # a datastore image: its label and uncertainty join the loop's record
        try:
            result = pipeline.segment(model, image, self.modality, batch_size=data["batch_size"], cleanup=data["cleanup"],
                                      doubt=bool(loop_image))
        except VolumeError as e:
            raise HTTPException(422, f"cannot segment {Path(str(data.get('image_path'))).name!r}: {e}") from e
        except (MemoryError, RuntimeError) as e:
            if guard.is_out_of_memory(e):
                raise self._out_of_memory(Path(str(data.get("image_path"))).name, data) from e
            raise
        if loop_image:
            self.served.ledger.record_prediction(
                loop_image, model.config.version or "unversioned", self.modality,
                model.config.modality(self.modality).structures, result.labels, np.asarray(image.affine),
                result.doubt, data.get("loop_source", "infer"))
        # the input's grid and affine; a singleton channel axis of a 4-D input is not kept (a 3-D label)
        data["pred"] = MetaTensor(torch.from_numpy(result.labels), meta={**image.meta, "original_channel_dim": "no_channel"})
        names, refined = result.label_names, pipeline.refines(self.modality)
        data["result"] = {"modality": self.modality, "slice_axis": result.slice_axis, "plane": result.plane,
                          "planes": result.planes, "refined": refined, "prompts": pipeline.prompts if refined else None,
                          "pipeline": pipeline.describe(self.modality, carries_adaptation(model, self.modality),
                                                        model.config.modality(self.modality).planes,
                                                        model.config.modality(self.modality).symmetric),
                          "precision": pipeline.precision_on(next(model.parameters()).device),
                          "structures": names, "label_colors": anatomy.colours(names),
                          "model_version": model.config.version, "notes": result.notes,
                          # absence is an answer: a structure not in the scan is named, not drawn somewhere
                          "found": [n for n in names if n not in result.not_found], "not_found": result.not_found}
        if within is not None:
            data["result"]["scope"] = within.as_dict()
            if within.note:
                result.notes.append(within.note)
        if result.doubt:
            data["result"]["uncertainty"] = round(result.doubt["score"], 4)
        return data

    def _scope(self, model, image: MetaTensor, data: dict, header) -> Scope | None:
        """The volume against what the model was measured on (``delightsam.scope``), where the checkpoint records
        it: the request's contrast, else the DICOM series description's (``header``, or None), and the slices'
        spacing."""
        measured = model.config.modality(self.modality).measured
        contrast, source = (None if data.get("contrast") == "auto" else data.get("contrast")), "request"
        if not measured and contrast is None:
            return None
        if contrast is None and measured.get("contrasts"):
            contrast, source = (dicom_contrast(header) if header is not None else None), "DICOM series description"
        return scope(measured, self.modality, spacing_of(np.asarray(image.affine)), contrast, source)

    def _check_modality(self, data: dict, header) -> None:
        """The image must be of this model's modality: a DICOM Modality tag, or a `modality` request parameter
        (which older clients of this app send), that names another one is an error that says which model to use.
        (A modality that the datastore recorded from an earlier inference is not checked: running another
        modality's model on an image is asking for that modality, and the app records the new one.)"""
        asked = str(data.get("modality") or "").lower()
        if asked and asked not in ("auto", self.modality):
            raise HTTPException(422, f"{task_name(self.modality)} segments {self.modality.upper()} images; for "
                                     f"{asked.upper()} use {task_name(asked)} (this server has one model per modality)")
        tag = header_modality(header)
        if tag and tag.lower() != self.modality:
            other = task_name(tag.lower())
            raise HTTPException(422, f"{Path(str(data.get('image_path'))).name!r} is {tag} by its DICOM Modality tag; "
                                     f"{task_name(self.modality)} segments {self.modality.upper()} images"
                                     + (f" (use {other})" if tag.lower() in self.served.modalities() else ""))

    @staticmethod
    def _check_seg_output(data: dict) -> None:
        """A DICOM SEG result needs a DICOM series it can reference: refused before the inference, not after."""
        if data.get("result_extension") != ".dcm":
            return
        if data.get("series") is None:
            raise HTTPException(422, "DICOM SEG output (result_extension .dcm) needs a DICOM series as input")
        try:
            source_images(data["series"].files)
        except ValueError as e:
            raise HTTPException(422, f"cannot write a DICOM SEG for "
                                     f"{Path(str(data.get('image_path'))).name!r}: {e}") from e

    def writer(self, data, extension=None, dtype=None):
        source = Path(str(data.get("image_path")))
        if data.get("result_extension") == ".dcm":  # DICOM SEG referencing the source series (``_check_seg_output``)
            ids = set(np.unique(np.asarray(data["pred"])).tolist())
            present = {n: i for n, i in data["result"]["structures"].items() if i in ids}
            if not present:
                raise HTTPException(422, "nothing was segmented, and a DICOM SEG cannot be empty")
            try:
                seg = write_dicom_seg(data["series"].files, as_volume(data["pred"]).numpy(), data["pred"].affine,
                                      present, data["result"]["model_version"])
            except ValueError as e:
                raise HTTPException(422, f"cannot write a DICOM SEG for {source.name!r}: {e}") from e
            return seg, data["result"]
        if not data.get("result_extension") and source.is_dir():
            data["result_extension"] = ".nii.gz"  # a DICOM series folder has no extension to mirror
        return super().writer(data, extension, dtype)

    def __call__(self, request, callbacks=None):
        label_file, result = super().__call__(request, callbacks)
        result["label_names"] = result.get("structures", self.labels)  # this modality's names and ids
        return label_file, result


class UnavailableInfer(DeLightSAMInfer):
    """Listed when no checkpoint can be read at start: /info says why, and a request gets 503 with the reason."""

    def _refresh(self) -> None:
        super()._refresh()
        self.description = f"De-LightSAM: NOT AVAILABLE, {self.served.problem or 'the served checkpoint changed'}"

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        self.served.refresh()
        raise HTTPException(503, f"the De-LightSAM model is not available: {self.served.problem or 'restart the server'}")
