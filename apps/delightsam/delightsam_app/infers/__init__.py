"""The app's inference tasks: one auto-segmentation task per modality of the served model, and batch inference."""
