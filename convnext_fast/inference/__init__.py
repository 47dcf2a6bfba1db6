"""Applying trained weights: the one preprocessing that `eval`, `predict` and `export` share (DESIGN §7).

``model.py`` rebuilds a model from its weights and holds the facts its preprocessing needs (image size, crop_pct,
mean/std, classes) read from the weights' metadata; its ``loader`` is the eval loader and its ``forward`` the eval
forward pass (flip TTA). ``inputs.py`` lists unlabelled images, ``run.py`` runs the views of each model and
averages them, ``outputs.py`` writes the prediction files, ``onnx_export.py`` exports and checks an ONNX file.
"""
