"""llama.cpp's own LoRA converter, as the reference for GGUF LoRA files safelora did not write.

``.ci/install`` unpacks the pinned llama-cpp-python source distribution (its ``vendor/llama.cpp``
holds ``convert_lora_to_gguf.py``, the ``conversion`` package and ``gguf-py``) under the venv;
``SAFELORA_LLAMA_CPP`` names another ``llama.cpp`` checkout. The converter runs in a subprocess,
offline, with this interpreter's torch and transformers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"  # the version .ci/install fetches


def converter_dir() -> Path | None:
    """The llama.cpp directory holding ``convert_lora_to_gguf.py``, or None when it is not installed."""
    given = os.environ.get("SAFELORA_LLAMA_CPP")
    where = Path(given) if given else Path(sys.prefix) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    return where if (where / "convert_lora_to_gguf.py").is_file() else None


SKIP_REASON = (
    f"llama.cpp's convert_lora_to_gguf.py is not installed: .ci/install unpacks llama-cpp-python=={LLAMA_CPP_PYTHON}'s "
    "source distribution under the venv (or set SAFELORA_LLAMA_CPP to a llama.cpp checkout)"
)


def convert(peft_dir: Path, base_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """``convert_lora_to_gguf.py --base base_dir --outtype outtype --outfile out peft_dir``."""
    root = converter_dir()
    if root is None:
        raise RuntimeError(SKIP_REASON)
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(root / "convert_lora_to_gguf.py"), "--base", str(base_dir)]
    cmd += ["--outtype", outtype, "--outfile", str(out), str(peft_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"convert_lora_to_gguf.py failed:\n{done.stderr[-4000:]}")
    return out


def tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 (dequantized), by name, through the ``gguf`` package."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = np.array(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = data.astype(np.float32)
    return out


def types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type name."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
