"""Export -> load in a fresh process, offline, with an empty Hugging Face cache.

The child process blocks `import hyena_rtf` (the project is installed in editable mode, so it
would otherwise be importable from anywhere): what it loads must come from the exported folder
alone, through trust_remote_code. It writes its results to JSON / .pt files that the test compares
with the in-memory model: logits, greedy text, tokenizer ids, pipeline output.
"""

import ast
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.helpers import NO_PROJECT, run_child, tiny_config, train_tiny_tokenizer
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from data_prep.tokenizer import hf_tokenizer
from export.folder import save_hf_checkpoint
from hf.loading import load_pretrained
from models import HyenaRTFForCausalLM

REPO = Path(__file__).resolve().parents[3]
TEXT = "The quick brown fox jumps over the lazy dog. It was"
NEW = 16

pytestmark = pytest.mark.hf

CHILD = NO_PROJECT + textwrap.dedent(r"""
    import json, os
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    torch.set_num_threads(1)
    ckpt, bf16_ckpt, out, text, new = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    modules_before = os.listdir(os.environ["HF_HOME"])
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        gen = model.generate(**enc, max_new_tokens=new, do_sample=False)
    torch.save(logits, os.path.join(out, "logits.pt"))
    pipe = pipeline("text-generation", model=ckpt, trust_remote_code=True, device="cpu")
    piped = pipe(text, max_new_tokens=new, do_sample=False)[0]["generated_text"]
    half = AutoModelForCausalLM.from_pretrained(bf16_ckpt, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        half_gen = half.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    json.dump({
        "ids": enc["input_ids"][0].tolist(),
        "eos": tok.eos_token, "pad": tok.pad_token,
        "greedy_ids": gen[0].tolist(),
        "greedy_text": tok.decode(gen[0], skip_special_tokens=True),
        "pipeline_text": piped,
        "module": type(model).__module__,
        "module_file": sys.modules[type(model).__module__].__file__,
        "modules_before": modules_before,
        "bf16_dtypes": {n: str(p.dtype) for n, p in half.named_parameters()},
        "bf16_generated": half_gen.shape[1] - enc["input_ids"].shape[1],
    }, open(os.path.join(out, "result.json"), "w"))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, checkpoint dir, result of the child process, tokenizer file)."""
    tmp = tmp_path_factory.mktemp("hf_export")
    tokenizer_file = train_tiny_tokenizer(tmp / "tokenizer.json")
    torch.manual_seed(0)
    vocab = len(Tokenizer.from_file(tokenizer_file).get_vocab())
    cfg = tiny_config(vocab_size=vocab, n_layer=3, l_max=64, attn_layers=[1], initializer_range=0.2)
    model = HyenaRTFForCausalLM(cfg).eval()
    ckpt = save_hf_checkpoint(model, tokenizer_file, tmp / "ckpt")
    bf16 = save_hf_checkpoint(model, tokenizer_file, tmp / "ckpt_bf16", dtype=torch.bfloat16)
    hf_home = tmp / "hf_home"
    hf_home.mkdir()
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    env.pop("HF_MODULES_CACHE", None)  # so the dynamic modules go under the empty HF_HOME
    run_child(
        [sys.executable, "-c", CHILD, str(ckpt), str(bf16), str(tmp), TEXT, str(NEW)], cwd=tmp, env=env, timeout=300
    )
    result = json.loads((tmp / "result.json").read_text())
    result["logits"] = torch.load(tmp / "logits.pt")
    result["hf_home"] = str(hf_home)
    result["tokenizer_file"] = tokenizer_file
    return model, ckpt, result


def test_folder_is_self_contained(exported):
    _, ckpt, _ = exported
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "configuration_hyena_rtf.py",
        "modeling_hyena_rtf.py",
        "hyena.py",
        "rtf.py",
        "modal.py",
        "long_filter.py",
        "filters.py",
        "attention.py",
        "fftconv.py",
        "precision.py",
    } <= names
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "hyena_rtf"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hyena_rtf.HyenaRTFForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_hyena_rtf.HyenaRTFConfig"
    # Exported files import each other relatively, and otherwise only the standard library, torch
    # and transformers (flash_attn is optional, inside try/except): never the repo's own packages.
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "flash_attn"}
    for py in ckpt.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, f"{py.name}: from {node.module} import ..."
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed, f"{py.name}: import {alias.name}"


def test_loaded_offline_from_exported_code_only(exported):
    _, _, res = exported
    assert res["modules_before"] == []  # the HF cache really started empty
    assert res["module"].startswith("transformers_modules.")
    assert Path(res["module_file"]).is_relative_to(res["hf_home"])


def test_same_logits_and_greedy_text(exported):
    model, _, res = exported
    ids = torch.tensor([res["ids"]])
    with torch.no_grad():
        ref = model(ids).logits
        gen = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert res["logits"].shape == ref.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.equal(res["logits"], ref)
    assert res["greedy_ids"] == gen[0].tolist()
    tok = hf_tokenizer(res["tokenizer_file"])
    assert res["greedy_text"] == tok.decode(gen[0], skip_special_tokens=True)
    assert res["pipeline_text"] == res["greedy_text"]


def test_tokenizer_round_trip(exported):
    _, _, res = exported
    assert res["ids"] == Tokenizer.from_file(res["tokenizer_file"]).encode(TEXT).ids
    assert res["eos"] == "<|endoftext|>"
    assert res["pad"] == "<|endoftext|>"


def test_bf16_export_keeps_rtf_parameters_float32(exported):
    _, _, res = exported
    dtypes = res["bf16_dtypes"]
    rtf = {n: d for n, d in dtypes.items() if ".filter." in n}
    assert rtf, rtf
    assert set(rtf.values()) == {"torch.float32"}, rtf
    assert dtypes["model.layers.0.mixer.in_proj.weight"] == "torch.bfloat16"
    assert res["bf16_generated"] == 4


def test_half_precision_export_writes_the_tied_head_once(exported, tmp_path):
    """A bf16 export stores the tied LM head once, as the float32 export does (it is the embedding:
    writing it again cost 77 MB at 125M), and loads with exactly its weights (hf.loading's strict
    check: no unused key) and the head tied again, equal to the bf16 embedding."""
    model, _, _ = exported
    folder = save_hf_checkpoint(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed.weight" in names and "lm_head.weight" not in names
    half = load_pretrained(AutoModelForCausalLM, "model", folder, dtype=torch.bfloat16)
    assert half.lm_head.weight.data_ptr() == half.model.embed.weight.data_ptr()
    assert torch.equal(half.model.embed.weight, model.model.embed.weight.to(torch.bfloat16))


def test_every_exported_file_gets_the_users_umask(tmp_path):
    """A shared cluster: with umask 022 every file of the export is 0644, the weights included
    (transformers writes them through a private 0600 temporary file)."""
    from models import HyenaRTFForCausalLM

    model = HyenaRTFForCausalLM(tiny_config(vocab_size=320))
    old = os.umask(0o022)
    try:
        out = save_hf_checkpoint(model, train_tiny_tokenizer(tmp_path / "tok.json"), tmp_path / "export")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
