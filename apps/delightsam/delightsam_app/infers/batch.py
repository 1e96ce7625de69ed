"""Batch pre-segmentation (``POST /batch/infer/<model>``) on a CPU-only server: monailabel 0.8.5's batch path spreads
work over CUDA devices and fails without one; this one runs the images one after another on the server's device,
says ``progress i/n`` as it goes (the task's status), and saves each label as `original` (never `final`). It runs in
a process of its own; its request is typed there (``options.BatchOptions``) and its inferences take the app's work
slots in turn with the users' (``gate``)."""

from __future__ import annotations

import logging
import time
from typing import Callable

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from ..modality import image_modality, task_modality
from ..options import BatchOptions, parse
from ..served import ServedModel

logger = logging.getLogger(__name__)


class CPUBatchInfer(BatchInferTask):
    def __init__(self, served: ServedModel) -> None:
        self.served = served

    def __call__(self, request, datastore: Datastore, infer: Callable):
        """``infer``: the app's loop inference (it saves each label; ``DeLightSAMApp.batch_infer``)."""
        options = parse(BatchOptions, request, f"batch inference with {request.get('model')!r}")
        model = options.model
        modality = task_modality(model)
        declared = options.modality or self.served.settings.modality  # what the request says unknown ones are
        todo, skipped = [], {}
        for image_id in sorted(self.get_images(options.model_dump(), datastore)):
            found, why = image_modality(datastore, image_id, self.served, declared)
            if found != modality:
                skipped[image_id] = why or f"it is {found.upper()}; {model} segments {modality.upper()} images"
            else:
                todo.append(image_id)
        if options.max_batch_size:
            todo = todo[: options.max_batch_size]
        tag = options.label_tag
        done, failed, began = [], {}, time.time()
        logger.info(f"batch inference with {model}: {len(todo)} images, {len(skipped)} skipped")
        for image_id, why in skipped.items():
            logger.info(f"batch inference: skipping {image_id}: {why}")
        for i, image_id in enumerate(todo):
            try:
                infer({"model": model, "image": image_id, "save_label": True, "label_tag": tag,
                       "loop_source": "batch", "result_extension": ".nii.gz"}, datastore)
                done.append(image_id)
            except Exception as e:  # the others go on; the result says which failed and why
                failed[image_id] = f"{type(e).__name__}: {getattr(e, 'detail', e)}"
                logger.warning(f"batch inference: {image_id} failed: {failed[image_id]}")
            logger.info(f"batch inference: progress {i + 1}/{len(todo)} ({image_id}, {time.time() - began:.0f} s)")
        # the last lines are what the task's status keeps: the outcome, with every reason, on one line
        logger.info(f"batch inference: {len(done)}/{len(todo)} done in {time.time() - began:.0f} s; failed: "
                    f"{failed or 'none'}; " + "; ".join(f"skipping {k}: {v}" for k, v in skipped.items()))
        return {"model": model, "label_tag": tag, "done": done, "failed": failed, "skipped": skipped,
                "seconds": time.time() - began}
