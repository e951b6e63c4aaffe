"""Fine-tune a causal LM on SST-2 with ZOTrainer + LoRA: two forwards per step, no backward.

    python examples/zotrainer_lora.py                                   # SST-2 from the Hugging Face Hub
    DATA=../shared/data STEPS=20 OUT=runs/zotrainer-lora-local python examples/zotrainer_lora.py

Run from the repository root. ``MODEL`` (default ``smollm2-135m``), ``DATA`` (a folder holding
``sst2/train.jsonl`` and ``sst2/validation.jsonl``; unset: the hub), ``STEPS`` (500) and ``OUT``
(``runs/zotrainer-lora``) change the run. Without a network the hub form stops with one line and
exit code 2, as the CLI does. Classification as language modelling: the loss is that of the label
word after the review, with curvzo's SST-2 prompt.
"""

import os

import datasets
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq

import curvzo
from curvzo.data import load_splits
from curvzo.errors import reported
from curvzo.hf import ZOTrainer, ZOTrainingArguments

with reported():
    task = curvzo.get_task("sst2")
    splits = load_splits(task, data_dir=os.environ.get("DATA"), num_train=1000, num_dev=200, num_test=0)
    model, tokenizer = curvzo.load_model(os.environ.get("MODEL", "smollm2-135m"))
model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))


def encode(doc: dict) -> dict:
    example = task.render(doc)  # prompt, choices (" terrible", " great") and the gold index
    prompt = tokenizer(example.prompt)["input_ids"][-64:]
    answer = tokenizer(example.choices[example.target])["input_ids"]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


train = datasets.Dataset.from_list([encode(doc) for doc in splits.train])
dev = datasets.Dataset.from_list([encode(doc) for doc in splits.dev])
args = ZOTrainingArguments(
    os.environ.get("OUT", "runs/zotrainer-lora"), max_steps=int(os.environ.get("STEPS", 500)),
    per_device_train_batch_size=16, learning_rate=1e-3, logging_steps=10, report_to="none", zo_method="curvzo",
)
trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                    data_collator=DataCollatorForSeq2Seq(tokenizer))
trainer.train()
print(trainer.evaluate())
