"""Fine-tune on your own data: a task defined as data, read from two small JSONL files.

    python examples/own_data.py

Run from the repository root. The files are examples/data/reviews_{train,test}.jsonl, one JSON
object per line with the fields the template names (``review``) and an integer ``label`` that
indexes ``doc_to_choice``; the format is in docs/api.md ("Your own data"). The same task as a
config file, without Python: ``curvzo train --config configs/custom-task.yaml``. ``MODEL`` and
``STEPS`` change the model (default ``smollm2-135m``) and the number of steps (20).
"""

import os

import curvzo
from curvzo.errors import reported

task = {
    "name": "my_reviews",
    "data_files": {"train": "examples/data/reviews_train.jsonl", "test": "examples/data/reviews_test.jsonl"},
    "doc_to_text": "Review: {review}\nSentiment:",
    "doc_to_choice": [" negative", " positive"],  # label 0, label 1; the leading space is what the LM sees
    "doc_to_target": "label",
}
with reported():  # a missing file, a bad row or a typo in the task: one line, exit code 2
    cfg = curvzo.TrainConfig(
        model=os.environ.get("MODEL", "smollm2-135m"), task=task, steps=int(os.environ.get("STEPS", 20)),
        num_train=24, num_dev=16, num_test=16, batch_size=8, eval_every=10,
        output_dir=os.environ.get("OUT", "runs/own-data"),
    )
    curvzo.train(cfg, overwrite=True)  # prints the result line, as `curvzo train` does
