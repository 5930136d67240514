"""Run by test_optimum.py with the optimum side folder on the path: load a vision output folder with
optimum's ORTModelForImageClassification or ORTModelForFeatureExtraction, run it on pixel values
saved as .npy, and print its output (and the graph's output names) as JSON."""

import json
import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForImageClassification

folder, task, pixels = sys.argv[1:]
model_class = ORTModelForImageClassification if task == "classification" else ORTModelForFeatureExtraction
model = model_class.from_pretrained(folder)
out = model(pixel_values=torch.from_numpy(np.load(pixels)))
value = out.logits if task == "classification" else out.last_hidden_state
outputs = [o.name for o in model.session.get_outputs()]
print(json.dumps({"class": type(model).__name__, "outputs": outputs, "value": value.tolist()}))
