"""Write a Hugging Face checkpoint folder that loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `AutoTokenizer`.

The folder holds config.json (with auto_map), the model code (modeling_hyena_rtf.py and every file
it imports relatively), model.safetensors, generation_config.json and the tokenizer files. It is
built in a staging folder beside the target and swapped in at the end (utils/atomic.py), so a
crash never leaves a folder that looks complete and never loses the previous export.

A model transformers has built in (the GPT-NeoX baseline train.py trains with model.arch=gpt_neox)
is written as a plain folder: no code, no auto_map, loadable without trust_remote_code. Its
config.json carries one extra key, EXPORT_MARKER = its model_type, which is how a later export
knows the folder as its own: a folder of the same model_type that some other tool wrote (a
downloaded Pythia, say) lacks it and is never replaced.

Nothing the export did not write is ever deleted: an existing target is replaced only if it is an
export of ours (a Hyena-RTF export, or a plain one with the marker) holding nothing but an
export's own files (`check_export_target`; Python files only where the export writes code),
unless the caller passes overwrite=True; a target that is a file is always refused.

Folder layout and the custom-code rules: docs/transformers.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hyena_rtf.data_prep.tokenizer import hf_tokenizer
from hyena_rtf.models.configuration_hyena_rtf import HyenaRTFConfig
from hyena_rtf.models.modeling_hyena_rtf import HyenaRTFForCausalLM, HyenaRTFModel
from hyena_rtf.models.precision import is_filter_param
from hyena_rtf.utils.atomic import check_replaceable, locked, remove_stale, replace_dir

EXPORT_KIND = "Hugging Face export of this project"  # Hyena-RTF, or a plain one (GPT-NeoX)
# Every name save_hf_checkpoint writes: the model code, configs, weights (sharded or not), tokenizer.
_EXPORT_FILES = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*\.py|(config|generation_config|tokenizer|tokenizer_config|"
    r"special_tokens_map|model\.safetensors\.index)\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"chat_template\.jinja"
)


# The config.json key that marks a plain (code-free) export as ours; its value is the model_type.
EXPORT_MARKER = "hyena_rtf_export"


def export_kind(config_json: Path) -> str | None:
    """ "custom" for the config.json of a Hyena-RTF export (model code in the folder), "plain" for
    one of a plain export of ours (EXPORT_MARKER equal to its model_type), else None."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type == HyenaRTFConfig.model_type:
        return "custom"
    return "plain" if model_type is not None and config.get(EXPORT_MARKER) == model_type else None


def is_export(config_json: Path) -> bool:
    """True when `config_json` is the config.json of an export of ours (`export_kind`)."""
    return export_kind(config_json) is not None


def check_export_target(out_dir: str | os.PathLike, overwrite: bool = False, also_owned: tuple[str, ...] = ()) -> None:
    """Raise NotReplaceableError (one line) unless `out_dir` may receive an export: it does not
    exist, is empty, or is an earlier export of ours with only an export's files in it (Python
    files count as ours only in a Hyena-RTF export, which writes its code), plus the names in
    `also_owned` (files a caller writes beside an export), or any folder with overwrite=True. Call
    it before any long work, so a bad target fails at once."""
    plain = export_kind(Path(out_dir) / "config.json") == "plain"

    def owned(name: str) -> bool:
        if name in also_owned:
            return True
        return _EXPORT_FILES.fullmatch(name) is not None and not (plain and name.endswith(".py"))

    check_replaceable(
        out_dir, marker="config.json", kind=EXPORT_KIND, is_kind=is_export, owned=owned, overwrite=overwrite
    )


def save_hf_checkpoint(
    model: PreTrainedModel,
    tokenizer_file: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    also_owned: tuple[str, ...] = (),
) -> Path:
    """Save `model` (+ tokenizer) as a self-contained HF folder at `out_dir`; returns the path.
    A HyenaRTFForCausalLM gets its code and auto_map, any other model a plain folder (the module
    docstring).

    dtype: optional dtype for the saved weights (the long filters always stay float32,
    models/precision.py). An existing `out_dir` is replaced only once the new folder is complete,
    and only as `check_export_target` allows (with `also_owned`: names of the caller's own files
    that an earlier run left beside the export; they go with the old folder).
    """
    out = Path(out_dir)
    check_export_target(out, overwrite, also_owned)
    config = model.config
    tok = None
    if tokenizer_file is not None:
        tok = hf_tokenizer(tokenizer_file)
        if len(tok) > config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_file} has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}"
            )
        if tok.eos_token_id is not None:
            config.eos_token_id = tok.eos_token_id
            config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id
    if isinstance(model, HyenaRTFForCausalLM):
        # auto_map: AutoConfig, AutoModel (the decoder without its head) and AutoModelForCausalLM.
        type(config).register_for_auto_class()
        type(model).register_for_auto_class("AutoModelForCausalLM")
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModel": f"{HyenaRTFModel.__module__.rsplit('.', 1)[-1]}.{HyenaRTFModel.__name__}",
        }
    else:
        setattr(config, EXPORT_MARKER, config.model_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out):
        remove_stale(out)
        check_export_target(out, overwrite, also_owned)  # again: another export may have finished meanwhile
        with replace_dir(out) as staging:
            if dtype is not None and dtype != torch.float32:
                state = {k: (v if is_filter_param(k) else v.to(dtype)) for k, v in model.state_dict().items()}
                config.dtype = str(dtype).removeprefix("torch.")
                model.save_pretrained(staging, state_dict=state)
            else:
                model.save_pretrained(staging)
            if tok is not None:
                tok.save_pretrained(staging)
            with_user_umask(staging)
    return out


def with_user_umask(folder: Path) -> None:
    """Give every file in `folder` the mode a new file gets under the user's umask: transformers writes
    the weights through a private temporary file (mode 0600), which a teammate on a shared cluster
    could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)
