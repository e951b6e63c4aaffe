"""CurvZO as a plain PyTorch optimizer: the closure returns the loss and the logits it scores, and
there is no backward (CurvZO reads the step's curvature from the two forwards' logits).

    python examples/plain_pytorch.py                  # SmolLM2-135M, 20 steps
    STEPS=5 python examples/plain_pytorch.py          # 5 steps

``MODEL`` names another model (an alias, a hub id or a local folder).
"""

import os

import curvzo
from curvzo.errors import reported

with reported():  # a model that cannot be found or fetched: one line, exit code 2
    model, tokenizer = curvzo.load_model(os.environ.get("MODEL", "smollm2-135m"))
model.eval()  # dropout off: the two perturbed forwards must evaluate the same function
texts = ["The film was a delight from start to finish.", "A dull, lifeless and overlong movie."]
batch = tokenizer(texts, return_tensors="pt", padding=True)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

# model=: perturb each module only while it runs, so a step needs no copy of the weights;
# lr (default 0.1) is the fraction of the Newton step taken, not a rate to sweep
opt = curvzo.CurvZO(model.parameters(), seed=0, model=model)


def closure():
    out = model(**batch, labels=labels)
    return out.loss, out.logits[:, :-1][labels[:, 1:] != -100]  # the rows the loss is a cross-entropy of


for step in range(int(os.environ.get("STEPS", 20))):
    loss = opt.step(closure)  # two forwards, under no_grad
    info = opt.last_step
    print(f"step {step}: loss {loss:.4f}, projected gradient {info.grad:+.3f}, step lr {info.record.step_lr(0):.2e}")
