"""The app's train task: distillation fine-tuning of the served pipeline on the labels users saved as `final`."""
