"""Fine-tune a causal LM on SST-2 with ZOTrainer + LoRA: two forwards per step, no backward.

    python examples/zotrainer_lora.py                 # SmolLM2-135M, SST-2 from the Hugging Face Hub
    MODEL=path/to/model DATA=../shared/data/sst2 STEPS=20 OUT=/tmp/run python examples/zotrainer_lora.py

Classification as language modelling: the loss is that of the label word after the review.
"""

import os

import datasets
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq

import curvzo
from curvzo.hf import ZOTrainer, ZOTrainingArguments

model, tokenizer = curvzo.load_model(os.environ.get("MODEL", "smollm2-135m"))
model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
data = os.environ.get("DATA")  # a folder of train.jsonl / validation.jsonl, else the Hub's copy
splits = {"train": f"{data}/train.jsonl", "validation": f"{data}/validation.jsonl"} if data else None
sst2 = datasets.load_dataset("json", data_files=splits) if data else datasets.load_dataset("stanfordnlp/sst2")


def encode(example: dict) -> dict:
    prompt = tokenizer(f"{example['sentence'].strip()} It was")["input_ids"][-64:]
    answer = tokenizer(" " + ["terrible", "great"][example["label"]])["input_ids"]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


train = sst2["train"].shuffle(seed=0).select(range(1000)).map(encode, remove_columns=sst2["train"].column_names)
dev = sst2["validation"].select(range(200)).map(encode, remove_columns=sst2["validation"].column_names)
args = ZOTrainingArguments(
    os.environ.get("OUT", "runs/zotrainer-lora"), max_steps=int(os.environ.get("STEPS", 500)),
    per_device_train_batch_size=16, learning_rate=1e-3, logging_steps=10, report_to="none", zo_method="curvzo",
)
trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                    data_collator=DataCollatorForSeq2Seq(tokenizer))
trainer.train()
print(trainer.evaluate())
