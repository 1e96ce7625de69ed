"""De-LightSAM MONAI Label app: prompt-free auto-segmentation of CT and MR volumes.

    monailabel start_server --app apps/delightsam --studies data/studies --conf models delightsam

Every modality of the served checkpoint is a model of its own (`delightsam_ct`, `delightsam_mr`, ...);
`--conf models delightsam` (or `all`) serves them all, `--conf models delightsam_ct` only that one. Other --conf
keys (all optional): checkpoint, modality, device, img_size, batch_size, threads, cleanup, model_dir; see
README.md in this folder.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from fastapi import HTTPException
from monailabel.config import settings as ml_settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.utils.async_tasks.utils import processes, tasks

import delightsam
from delightsam import headers
from delightsam_app import compat, edge, guard, labels, ohif, options, pacs, request_image
from delightsam_app.activelearning.strategies import Last, Random, Uncertain
from delightsam_app.datastore import AtomicLocalDatastore
from delightsam_app.gate import MemoryBudget, OverBudget, WorkGate
from delightsam_app.infers.batch import CPUBatchInfer
from delightsam_app.infers.delightsam import DeLightSAMInfer, UnavailableInfer
from delightsam_app.modality import PREFIX, dicom_modalities, image_modality, task_modality, task_name
from delightsam_app.scoring.agreement import agree_with_final
from delightsam_app.scoring.uncertainty import UncertaintyScoring
from delightsam_app.served import ServedModel
from delightsam_app.settings import AppSettings
from delightsam_app.trainers.delightsam import DeLightSAMTrain

logger = logging.getLogger(__name__)


class DeLightSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        compat.check()  # a library without what the app reaches into stops it here, by name
        self.requested = [m.strip() for m in conf.get("models", PREFIX).split(",") if m.strip()]
        self.settings = AppSettings.from_conf(conf, app_dir)
        headers.use_limits(self.settings.limits)  # every reader of this process (labels, training, scoring)
        self.model_dir = str(self.settings.model_dir)
        os.makedirs(self.model_dir, exist_ok=True)
        self.served = ServedModel(self.settings, self.model_dir)
        # the CPU work of every process of this app: the server's inferences, batch and scoring processes'
        self.gate = WorkGate(self.settings.model_dir / "gate", self.settings.infer_workers)
        # and their memory: each holds its estimate (by the volume's header) within --conf memory_budget_mb
        self.memory = MemoryBudget(self.settings.model_dir / "gate", self.settings.memory_budget_mb)
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="agreement")  # saved labels, one at a time
        logger.info(f"De-LightSAM app: checkpoint {self.settings.checkpoint}, {self.settings}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="De-LightSAM",
                         description="Prompt-free De-LightSAM auto-segmentation of CT and MR volumes",
                         version=delightsam.__version__)
        from monailabel.app import app as server  # the running FastAPI server (already imported by then)

        ohif.serve_error_details(server)
        edge.install(server, self.settings)
        self._serve_model_card(server)
        warn_if_exposed(sys.argv)

    def _serve_model_card(self, server) -> None:
        """GET /model_card: the served model's card (its bundle's docs/README.md), linked from /info."""
        from fastapi.responses import PlainTextResponse

        def model_card():
            card = self.served.model_card()
            if card is None:
                raise HTTPException(404, f"the checkpoint {self.settings.checkpoint} has no model card (it is not in "
                                         f"a MONAI bundle with docs/README.md)")
            return PlainTextResponse(card.read_text(), media_type="text/markdown")

        if not any(getattr(r, "path", None) == "/model_card" for r in server.router.routes):
            server.add_api_route("/model_card", model_card, methods=["GET"], tags=["Model"],
                                 summary="The served model's card (markdown)")
            compat.openapi_changed(server)

    def _load_sessions(self, load=False):
        if not load:
            return None
        return guard.GuardedSessions(ml_settings.MONAI_LABEL_SESSION_PATH, ml_settings.MONAI_LABEL_SESSION_EXPIRY,
                                     guard.UploadLimits.from_settings(self.settings))

    def info(self):
        """monailabel's app info, and how busy inference is (clients can back off; tests wait on it)."""
        from monailabel.app import app as server

        info = super().info()
        gate = getattr(server.state, "delightsam_admission", None)
        if gate is not None:
            info["inference"] = {"running_or_queued": gate.in_flight, "workers": gate.workers, "queue": gate.queue,
                                 "memory_budget_mb": self.memory.budget_mb, "memory_held_mb": round(self.memory.held_mb()),
                                 "waiting_for_memory": self.memory.waiting}
        return info

    def init_datastore(self):
        """monailabel's datastore; a local one saves labels and its index atomically (``datastore.py``)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return AtomicLocalDatastore(self.studies, extensions=ml_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                    auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                    read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                                    label_check=self._check_label, modalities=lambda: list(self.served.modalities()))

    def _check_label(self, image_id: str, image: str, label: str, params: dict) -> tuple[str, dict, list[str]]:
        """A label being saved, read against its image (``labels.check_saved_label``), its values matched to the
        structures of the image's modality when that is known."""
        modality, _ = image_modality(self.datastore(), image_id, self.served, self.settings.modality)
        structures = self.served.structures_of(modality) if modality else None
        info, notes = labels.check_saved_label(label, image, params, structures)
        return label, info, notes

    def init_infers(self):
        """One task per modality of the checkpoint (as --conf models selects); without a readable checkpoint,
        one task per requested name that says why it is unavailable."""
        available = {task_name(m): m for m in self.served.modalities()}
        if any(r in (PREFIX, "all") for r in self.requested):
            chosen = list(available)
        else:
            chosen = self.requested
        if self.served.problem:
            names = [r for r in chosen if r != "all"] or [PREFIX]
            logger.error(f"De-LightSAM is not available: {self.served.problem}")
            return {name: UnavailableInfer(self.served, task_modality(name)) for name in names}
        unknown = [r for r in chosen if r not in available]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} in --conf models; this checkpoint serves: "
                             f"{', '.join([PREFIX, *available])}")
        return {name: DeLightSAMInfer(self.served, available[name]) for name in chosen}

    def init_trainers(self):
        return {PREFIX: DeLightSAMTrain(self.served, self.model_dir, self.settings.modality)}

    def init_strategies(self):
        return {"uncertain": Uncertain(self.served), "random": Random(), "first": First(), "last": Last()}

    def init_scoring_methods(self):
        return {"uncertainty": UncertaintyScoring(self.served, self.loop_infer)}

    def init_batch_infer(self):
        return CPUBatchInfer(self.served)

    def batch_infer(self, request, datastore=None):
        """monailabel's batch task, with the app's own inference (which saves each label)."""
        return compat.run_batch(self, request, datastore or self.datastore(), self.loop_infer)

    def next_sample(self, request):
        """Next Sample, its options typed after monailabel merged them."""
        parsed = options.parse(options.NextSampleOptions, request, f"the strategy {request.get('strategy')!r}")
        return super().next_sample(parsed.model_dump(exclude_none=True))

    def async_scoring(self, method, params=None):
        """monailabel scores at start, after each Next Sample and after training, each time in a new process:
        started only when none is running or waiting and the served version has unlabelled images of a known
        modality left to score."""
        if method is None:
            busy = processes("scoring") or any(t.get("status") == "SUBMITTED" for t in tasks("scoring"))
            try:
                if busy or not compat.scoring_methods(self)["uncertainty"].pending(self.datastore())[0]:
                    return {}
            except Exception as e:  # never a reason for the server not to start or a Next Sample to fail
                logger.exception(f"could not tell whether any image is left to score: {e}")
                return {}
        return super().async_scoring(method, params)

    def on_save_label(self, image_id, label_id):
        """A user's final label: each stored version's label of the image is scored against it (the loop's
        record), in the background, so that the save answers at once; never fails the save. The answer says what
        the label annotates (``labels.check_saved_label``'s notes)."""
        self._scorer.submit(self._agree, image_id)
        store, notes = self.datastore(), []
        if not isinstance(store, DICOMWebDatastore):  # the label just saved: the image's latest (its tag is not told)
            saved = [store.get_label_info(image_id, tag) or {} for tag in store.get_labels_by_image_id(image_id)]
            notes = max(saved, key=lambda info: info.get("ts", 0), default={}).get("notes", [])
        return {"agreement": "each model version's label of this image is being scored against it", "notes": notes}

    def _agree(self, image_id: str) -> None:
        if isinstance(self.datastore(), DICOMWebDatastore):  # a SEG in the PACS: not scored yet (README)
            logger.info(f"the saved SEG of {image_id} is not scored against the model's labels (PACS datastore)")
            return
        try:
            with self.gate():
                agree_with_final(self.datastore(), self.served, image_id)
        except Exception as e:
            logger.exception(f"could not score the model's labels of {image_id} against the saved one: {e}")

    def _init_dicomweb_datastore(self):
        if "googleapis.com" in self.studies:  # monailabel's Google Cloud credentials path, as it is
            return compat.monailabel_dicomweb_datastore(self)
        compat.download_seg_tools(self)  # the SEG writer monailabel's DICOMweb datastore uses
        return pacs.PacsDatastore.from_settings(self.studies, lambda: dicom_modalities(self.served),
                                                self.served.structures_of)

    def infer(self, request, datastore=None):
        """An inference a client asked for: monailabel's /infer route calls this with the request it merged
        (`params` into the route's fields), which is parsed here into ``options.InferOptions``."""
        return self._infer(request, datastore, options.InferOptions)

    def infer_wsi(self, request, datastore=None):
        """monailabel's whole-slide image route would run a model's task on the raw request (untyped, ungated):
        none of this app's models segments pathology slides."""
        raise HTTPException(404, f"this server has no whole-slide image models; its models segment 3-D volumes "
                                 f"through POST /infer/<model> ({', '.join(compat.infer_tasks(self))})")

    def loop_infer(self, request, datastore=None):
        """The app's own inferences (batch, uncertainty scoring), which may save their label (``LoopInferOptions``)."""
        return self._infer(request, datastore, options.LoopInferOptions)

    def _infer(self, request, datastore, kind: type[options.InferOptions]) -> dict:
        """monailabel's infer, with the request typed and its image resolved once (``request_image``): a datastore id
        (or a PACS series) through the datastore, never as a path relative to the server's folder; a path only where
        monailabel put an upload or a session, or anywhere with --conf allow_server_paths."""
        tasks = compat.infer_tasks(self)
        task = tasks.get(request.get("model"))
        if task is None:  # monailabel answers an unknown model with a bare 500; say what exists instead
            raise HTTPException(404, f"no model named {request.get('model')!r}; this server has: {', '.join(tasks)}")
        context = {"max_batch_size": self.settings.max_batch_size, "model_files": self.served.choices()}
        parsed = options.parse(kind, request, request["model"], context)
        store = datastore or self.datastore()
        sessions = self.sessions()
        image = request_image.resolve(parsed.image, parsed.session is not None, store,
                                      sessions.store_path if sessions else None, self.settings.allow_server_paths,
                                      lambda: dicom_modalities(self.served), self.settings.limits)
        request = task.request(parsed, image)
        try:
            self.memory.check(request["memory_mb"])
        except OverBudget as e:
            raise HTTPException(503, f"{image.header.name!r} {e}") from e
        # its memory estimate within the budget (waiting while others hold it), then one of infer_workers slots;
        # both shared with the batch and scoring processes
        with self.memory(request["memory_mb"]), self.gate():
            label_file, result = task(request)
        label_id = None
        if getattr(parsed, "save_label", False) and image.id and label_file:
            label_id = store.save_label(image.id, label_file, parsed.label_tag, {"model": parsed.model, "params": result})
        if image.id and not isinstance(store, DICOMWebDatastore):
            self._record_modality(store, image.id, task.modality, result)
        return {"label": label_id or label_file, "tag": getattr(parsed, "label_tag", "original"), "file": label_file,
                "params": result}

    @staticmethod
    def _record_modality(store, image_id: str, modality: str, params: dict) -> None:
        """The modality a datastore image was segmented as, in its image info: training reads it from there."""
        before = (store.get_image_info(image_id) or {}).get("modality")
        if before != modality:
            store.update_image_info(image_id, {"modality": modality})
            if before:
                params.setdefault("notes", []).append(f"the image's recorded modality changed from {before} to "
                                                      f"{modality}")


def warn_if_exposed(argv: list[str]) -> bool:
    """A warning when the server listens beyond loopback with monailabel's auth off (its own default host is
    0.0.0.0: every interface). True if it warned."""
    host = "0.0.0.0"
    for i, arg in enumerate(argv):
        if arg in ("-i", "--host") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or ml_settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    logger.warning(f"the server listens on {host}, beyond this machine, and authentication is off: anyone who can "
                   f"reach it can read the datastore's images and labels and start training. Start it with --host "
                   f"127.0.0.1, or enable monailabel's auth (MONAI_LABEL_AUTH_ENABLE=true with a Keycloak realm) "
                   f"first; see apps/delightsam/README.md")
    return True
