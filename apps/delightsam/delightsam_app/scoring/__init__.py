"""The annotation loop's record: how unsure the served model is of each unlabelled image, and how each model
version's labels agree with the labels users saved."""
