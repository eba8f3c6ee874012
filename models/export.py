"""Write a Hugging Face checkpoint folder that loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `AutoTokenizer`.

The folder holds config.json (with auto_map), the model code (modeling_hyena_rtf.py and every file
it imports relatively), model.safetensors, generation_config.json and the tokenizer files. It is
written under a temporary name and renamed at the end, so a crash never leaves a folder that looks
complete. This module is not part of the exported code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from .configuration_hyena_rtf import HyenaRTFConfig
from .modeling_hyena_rtf import HyenaRTFForCausalLM, HyenaRTFModel


def load_tokenizer(tokenizer_file: str | os.PathLike, eos_token: str | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a `tokenizers` JSON file, with EOS / pad set from the file when it
    names an end-of-text token (GPT-2 / GPT-NeoX `<|endoftext|>`) or from `eos_token`."""
    # No token_type_ids: the model takes ids and a mask only, so `model(**tokenizer(text))` works.
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), model_input_names=["input_ids", "attention_mask"])
    vocab = tok.get_vocab()
    eos = eos_token or next((t for t in ("<|endoftext|>", "</s>", "<eos>") if t in vocab), None)
    if eos is not None:
        tok.eos_token = eos
        if tok.pad_token is None:
            tok.pad_token = eos
    return tok


def save_hf_checkpoint(model: HyenaRTFForCausalLM, tokenizer_file: str | os.PathLike | None,
                       out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save `model` (+ tokenizer) as a self-contained HF folder at `out_dir`; returns the path.

    dtype: optional dtype for the saved weights (the RTF parameters are always kept in float32).
    An existing `out_dir` is replaced only once the new folder is complete.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    config: HyenaRTFConfig = model.config
    if tokenizer_file is not None:
        tok = load_tokenizer(tokenizer_file)
        if len(tok) > config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_file} has {len(tok)} tokens but the model's vocab_size "
                             f"is {config.vocab_size}")
        if tok.eos_token_id is not None:
            config.eos_token_id = tok.eos_token_id
            config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id
    # auto_map: AutoConfig, AutoModel (the decoder without its head) and AutoModelForCausalLM.
    type(config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    config.auto_map = {**(getattr(config, "auto_map", None) or {}),
                       "AutoModel": f"{HyenaRTFModel.__module__.rsplit('.', 1)[-1]}.{HyenaRTFModel.__name__}"}
    if dtype is not None and dtype != torch.float32:
        state = {k: (v if _is_rtf_param(k) else v.to(dtype)) for k, v in model.state_dict().items()}
        config.dtype = str(dtype).removeprefix("torch.")
        model.save_pretrained(tmp, state_dict=state)
    else:
        model.save_pretrained(tmp)
    if tokenizer_file is not None:
        tok.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old-export")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def _is_rtf_param(name: str) -> bool:
    return ".filter." in name and name.rsplit(".", 1)[-1] in ("a", "b", "h0", "slack")
