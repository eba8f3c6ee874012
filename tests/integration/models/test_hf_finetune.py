"""Fine-tuning an exported checkpoint the way Hugging Face users do (`transformers.Trainer`, PEFT
LoRA), then decoding it with the cache: through `generate()` and through generate.py's own loop.

Each decode is checked with `assert_greedy` (every token a greedy choice of a full parallel forward,
no cache) and by counting
the positions fed, so a cache that silently stopped working cannot pass. The loss Trainer logs and
back-propagates under gradient accumulation is checked against a float64 recomputation.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from support.helpers import assert_greedy, load_script, spy_on_forward, tiny_config, train_tiny_tokenizer
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from data_prep.tokenizer import hf_tokenizer
from export.folder import save_hf_checkpoint
from models import HyenaRTFForCausalLM

pytestmark = pytest.mark.hf

gen = load_script("generate.py")

SEQ, NEW = 24, 10
PROMPTS = ["the cat sat on", "def return the big"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(checkpoint folder, tokenizer): a random hybrid model exported with a 320-token BPE."""
    tmp = tmp_path_factory.mktemp("finetune")
    tokenizer_file = train_tiny_tokenizer(tmp / "tokenizer.json")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=320, pad_vocab_size_multiple=8, n_layer=3, attn_layers=[1], initializer_range=0.2)
    model = HyenaRTFForCausalLM(config).eval()
    return save_hf_checkpoint(model, tokenizer_file, tmp / "start"), hf_tokenizer(tokenizer_file)


def lm_examples(tokenizer, n: int, ragged: bool = False) -> list[dict]:
    """n examples of SEQ tokens; ragged: labels -100 after a different length in each (so the
    examples contribute different numbers of predicted tokens)."""
    text = " ".join(["the quick red fox jumps over the lazy dog and ran to the big house"] * 8)
    ids = tokenizer(text)["input_ids"]
    examples = []
    for i in range(n):
        row = torch.tensor(ids[i : i + SEQ])
        labels = row.clone()
        if ragged:
            labels[4 + 5 * i :] = -100
        examples.append({"input_ids": row, "labels": labels})
    return examples


def training_args(out: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(
        **{
            **dict(
                output_dir=str(out),
                per_device_train_batch_size=2,
                learning_rate=2e-3,
                max_steps=3,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
                dataloader_num_workers=0,
                seed=0,
            ),
            **overrides,
        }
    )


def cached_decoding_is_greedy(model, tokenizer) -> None:
    """generate() and generate.py's loop, both fed one token per step, decode greedily."""
    model.generation_config.eos_token_id = None
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    prompt_len = enc["input_ids"].shape[1]
    calls = spy_on_forward(model)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert [c.positions for c in calls] == [prompt_len] + [1] * (NEW - 1)
    assert out.shape[1] == prompt_len + NEW
    assert_greedy(model, out, prompt_len, enc["attention_mask"])
    calls.clear()
    args = SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=NEW)
    tokens, _ = gen.decode_batch(model, tokenizer, PROMPTS, args)
    steps = tokens.shape[1]  # generate.py stops at the tokenizer's end-of-text and pads after it
    assert [c.positions for c in calls] == [prompt_len] + [1] * (steps - 1)
    rows = tokens.tolist()
    assert steps == NEW or all(tokenizer.eos_token_id in row for row in rows)  # it stops early only then
    for r, row in enumerate(rows):  # each row: greedy up to its end-of-text, padding after
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else steps
        assert row[end:] == [tokenizer.pad_token_id] * (steps - end)
        sequence = torch.cat([enc["input_ids"][r : r + 1], tokens[r : r + 1, :end]], dim=1)
        assert_greedy(model, sequence, prompt_len, enc["attention_mask"][r : r + 1])


@pytest.mark.slow
def test_trainer_fine_tune_save_reload_then_cached_decoding(start, tmp_path):
    """Gradient accumulation 2 and gradient checkpointing; Trainer writes use_cache: false."""
    ckpt, tokenizer = start
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    args = training_args(tmp_path / "trainer", gradient_accumulation_steps=2, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=lm_examples(tokenizer, 8), processing_class=tokenizer).train()
    assert model.model.gradient_checkpointing  # Trainer switched it on; the blocks ran under it
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it did train
    model.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    if config.get("use_cache") is not False:  # what Trainer does today; keep the case under test
        config["use_cache"] = False
        (tmp_path / "tuned" / "config.json").write_text(json.dumps(config))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    assert tuned.config.use_cache is False
    cached_decoding_is_greedy(tuned, tokenizer)


class GradientGrabber(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_loss_and_gradient_under_gradient_accumulation(start, tmp_path, accumulation):
    """One optimizer step over 4 examples whose predicted-token counts differ (19, 14, 9, 4): the
    logged loss must be their token-weighted mean NLL (recomputed in float64; tolerance 1e-5
    relative, float32 sums of ~50 terms), and the gradient that of that mean, whether the step is
    one batch of 4 or 2 accumulated batches of 2. Before num_items_in_batch was handled, the
    accumulated step logged and back-propagated twice the loss."""
    ckpt, tokenizer = start
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    examples = lm_examples(tokenizer, 4, ragged=True)
    grabber = GradientGrabber()
    args = training_args(
        tmp_path / "trainer",
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[grabber])
    reference_model = AutoModelForCausalLM.from_pretrained(ckpt).double()
    trainer.train()
    logged = next(log["loss"] for log in trainer.state.log_history if "loss" in log)

    ids = torch.stack([e["input_ids"] for e in examples])
    labels = torch.stack([e["labels"] for e in examples])
    logits = reference_model(ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    mean = nll / (labels[:, 1:] != -100).sum()
    assert logged == pytest.approx(mean.item(), rel=1e-5)
    mean.backward()
    for name, p in reference_model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            torch.testing.assert_close(grabber.grads[name].double(), p.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.slow
def test_peft_lora_train_merge_then_cached_decoding(start, tmp_path):
    peft = pytest.importorskip("peft")
    ckpt, tokenizer = start
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["in_proj", "out_proj", "qkv"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    Trainer(model=lora, args=training_args(tmp_path / "trainer"), train_dataset=lm_examples(tokenizer, 6)).train()
    lora.eval()
    model.generation_config.eos_token_id = None
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    calls = spy_on_forward(lora.get_base_model())
    with torch.no_grad():  # decoding through the PEFT wrapper uses the cache too
        wrapped = lora.generate(**enc, max_new_tokens=NEW, do_sample=False)
    assert [c.positions for c in calls] == [enc["input_ids"].shape[1]] + [1] * (NEW - 1)
    merged = lora.merge_and_unload().eval()
    assert type(merged) is HyenaRTFForCausalLM
    assert wrapped.shape[1] == enc["input_ids"].shape[1] + NEW
    assert_greedy(merged, wrapped, enc["input_ids"].shape[1])
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    cached_decoding_is_greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), tokenizer)
