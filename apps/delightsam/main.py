"""De-LightSAM MONAI Label app: prompt-free auto-segmentation of CT and MR volumes.

    monailabel start_server --app apps/delightsam --studies data/studies --conf models delightsam

--conf keys (all optional but `models`): checkpoint, modality, device, img_size, batch_size, threads, cleanup;
see README.md in this folder.
"""

from __future__ import annotations

import functools
import logging
import os

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp

import delightsam
from delightsam_app import ohif, pacs
from delightsam_app.infer import DeLightSAMInfer
from delightsam_app.settings import AppSettings
from delightsam_app.train import DeLightSAMTrain

logger = logging.getLogger(__name__)
MODEL = "delightsam"


class DeLightSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        models = [m.strip() for m in conf.get("models", MODEL).split(",") if m.strip()]
        unknown = [m for m in models if m not in (MODEL, "all")]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} in --conf models; this app has: {MODEL}")
        self.settings = AppSettings.from_conf(conf, app_dir)
        self.model_dir = str(self.settings.model_dir)
        os.makedirs(self.model_dir, exist_ok=True)
        logger.info(f"De-LightSAM app: checkpoint {self.settings.checkpoint}, {self.settings}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="De-LightSAM",
                         description="Prompt-free De-LightSAM auto-segmentation of CT and MR volumes",
                         version=delightsam.__version__)
        from monailabel.app import app as server  # the running FastAPI server (already imported by then)

        ohif.serve_error_details(server)

    def init_infers(self):
        self.infer_task = DeLightSAMInfer(self.settings, self.model_dir)
        return {MODEL: self.infer_task}

    def init_trainers(self):
        return {MODEL: DeLightSAMTrain(self.infer_task, self.model_dir, self.settings.modality)}

    def _init_dicomweb_datastore(self):
        datastore = super()._init_dicomweb_datastore()
        # monailabel lists the series of one QIDO filter (default Modality=CT; QIDO has no "CT or MR"):
        # list the series of every modality this app serves
        url = datastore._client.base_url
        pacs.limit_waiting(datastore._client)  # a PACS that went away or hangs must not hold every request
        datastore.list_images = pacs.tolerant(functools.partial(pacs.list_series, datastore,
                                                                self.served_dicom_modalities), url)
        datastore.get_labeled_images = pacs.tolerant(datastore.get_labeled_images, url)
        datastore.save_label = pacs.save_label_with_codes(datastore, self.structures_of, datastore.save_label)
        return datastore

    def structures_of(self, modality: str) -> dict[str, int]:
        """Structure name -> label id of one modality of the served model ({} if it does not serve it)."""
        return self.infer_task.structures_of(modality) if hasattr(self, "infer_task") else {}

    def served_dicom_modalities(self) -> list[str]:
        names = self.infer_task.served_modalities() if hasattr(self, "infer_task") else []
        return sorted({n.upper() for n in names} & pacs.IMAGE_MODALITIES) or ["CT"]

    def infer(self, request, datastore=None):
        # monailabel answers an unknown model with a bare 500; say what exists instead.
        if request.get("model") not in self._infers:
            raise HTTPException(404, f"no model named {request.get('model')!r}; this server has: "
                                     f"{', '.join(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            store = self.datastore()
            if isinstance(store, DICOMWebDatastore):
                pacs.fetch_series(store, image, self.served_dicom_modalities())  # then monailabel finds it cached
            elif not store.get_image_uri(image):
                raise HTTPException(404, f"no image {image!r} in the datastore")
        return super().infer(request, datastore)
