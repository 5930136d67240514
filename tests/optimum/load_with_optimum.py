"""Run by test_optimum.py with the optimum side folder on the path: load an output folder with
optimum's ORTModelForSequenceClassification and print the logits as JSON."""

import json
import sys

from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer

folder, seq_len, *texts = sys.argv[1:]
model = ORTModelForSequenceClassification.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
encoded = tokenizer(texts, padding="max_length", max_length=int(seq_len), truncation=True, return_tensors="pt")
print(json.dumps({"class": type(model).__name__, "logits": model(**encoded).logits.tolist()}))
