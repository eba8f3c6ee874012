"""The image's build check: the pinned torch is the one installed, transformers accepts it, and a
tiny Hyena-RTF model builds, runs a few forward steps and one training step (on the CPU: `docker
build` has no GPU). Exits non-zero, which fails the build, on any mismatch.

    python docker/smoke.py          # also runnable in any environment with the project installed
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers.utils import is_torch_available

PIN_FILE = Path(__file__).resolve().parent / "TORCH_VERSION"


def check_versions() -> None:
    pinned = Version(PIN_FILE.read_text().strip())
    installed = Version(torch.__version__.split("+")[0])
    if installed != pinned:
        sys.exit(f"smoke: torch {torch.__version__} is installed, {PIN_FILE.name} pins {pinned}")
    if not is_torch_available():  # transformers turns PyTorch off below its own minimum version
        sys.exit(f"smoke: transformers {transformers.__version__} does not accept torch {torch.__version__}")
    nvcc = shutil.which("nvcc")
    if nvcc and torch.version.cuda:
        # flash-attn and DeepSpeed's JIT ops compile with this nvcc against torch's CUDA runtime.
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"release (\d+)\.", out)
        if found and found.group(1) != torch.version.cuda.split(".")[0]:
            sys.exit(f"smoke: nvcc is CUDA {found.group(1)}.x, torch was built with CUDA {torch.version.cuda}")


def run_tiny_model() -> float:
    from models.configuration_hyena_rtf import HyenaRTFConfig
    from models.modeling_hyena_rtf import HyenaRTFForCausalLM

    torch.manual_seed(0)
    model = HyenaRTFForCausalLM(HyenaRTFConfig(vocab_size=64, d_model=32, n_layer=2, l_max=32, state_size=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 33))
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids[:, :-1]).logits
            if logits.shape != (2, 32, 64) or not torch.isfinite(logits).all():
                sys.exit(f"smoke: bad logits {tuple(logits.shape)}")
    loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
    loss.backward()
    opt.step()
    if not torch.isfinite(loss):
        sys.exit(f"smoke: non-finite loss {loss}")
    return float(loss.detach())


def main() -> int:
    check_versions()
    import deepspeed  # noqa: F401  (a broken install fails here, not at the first cluster run)

    loss = run_tiny_model()
    print(
        f"smoke: ok | torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers "
        f"{transformers.__version__} | deepspeed {deepspeed.__version__} | tiny model loss {loss:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
