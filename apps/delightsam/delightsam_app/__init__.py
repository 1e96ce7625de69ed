"""The De-LightSAM MONAI Label app's own code (kept apart from the `delightsam` model library)."""
