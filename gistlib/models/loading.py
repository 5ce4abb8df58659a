"""Load any Llama-architecture checkpoint, frozen, optionally in 4-bit (the llama2 tier).

    model = load_llama("meta-llama/Llama-2-7b-hf", quantization="nf4")   # one consumer GPU
    model = load_llama("/path/to/saved/tiny", quantization=None, dtype=torch.float32)

What `load_llama` does, in order:
1. resolves the device map (one whole GPU when CUDA exists, else the CPU) and refuses a CUDA
   device map on a machine without CUDA (`CudaRequiredError`);
2. reads the config and checks it is Llama-shaped (`NotLlamaError`); hub problems (gated repo,
   no such repo, offline and not cached, no such folder) become `GatedCheckpointError` /
   `CheckpointNotFoundError` with the fix in the message;
3. loads the weights with `quantization_config(kind)`:
   nf4  = 4-bit NormalFloat, double quantisation, bfloat16 compute (QLoRA's recipe; the
          `BitsAndBytesConfig(load_in_4bit=True)` defaults are fp4, fp32 compute, no double quant);
   int8 = LLM.int8(); None = plain weights in `dtype`;
4. prepares for training: for a quantised model, peft's `prepare_model_for_kbit_training`, which
   freezes every parameter and upcasts every non-quantised float16/bfloat16 parameter (embeddings,
   lm_head, RMSNorm weights) to float32, so the residual stream runs in float32 while the 4-bit
   matmuls compute in bfloat16; then (any model) non-reentrant gradient checkpointing (the
   hypernetwork captures gist K/V with forward hooks, which reentrant checkpointing would break);
5. freezes every parameter (`requires_grad=False`) and returns the model in eval mode.

Facts checked on this machine (bitsandbytes 0.50, transformers 5.24, CPU only):
- nf4 and int8 both load and run forward/backward on the CPU; only a CUDA device map needs CUDA.
- In eval mode under `torch.no_grad`, bitsandbytes repacks a 4-bit weight for the CPU kernel at
  its first forward and un-nests the double-quantised absmax (`quant_state.nested` becomes False,
  `quant_state.original_nested` keeps True). Inspect quantisation before the first forward.
- `OutOfMemoryError` is caught around loading and re-raised as `ModelOutOfMemoryError` (still a
  `torch.OutOfMemoryError`) naming the settings to lower; `out_of_memory_advice` does the same for
  a training loop.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from gistlib.core.hyper import LINEAR_MAPS

QUANTIZATIONS = ("nf4", "int8")
LLAMA_LIKE_MODEL_TYPES = ("llama",)  # model_type values whose modules match LlamaForCausalLM
ATTENTION_PROJECTIONS = LINEAR_MAPS[:4]  # q, k, v, o
MLP_PROJECTIONS = LINEAR_MAPS[4:]  # gate, up, down


# ----------------------------------------------------------------------------------------------
# errors: each names the problem and the fix


class CudaRequiredError(RuntimeError):
    """A GPU-only option (a CUDA device map) was asked for on a machine without CUDA."""


class NotLlamaError(ValueError):
    """The checkpoint's config or modules are not Llama-shaped (RoPE, q/k/v/o, gate/up/down)."""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint at that local path, on the hub, or in the offline cache."""


class GatedCheckpointError(PermissionError):
    """A gated hub checkpoint (e.g. meta-llama/*) that this account may not read yet."""


class ModelOutOfMemoryError(torch.OutOfMemoryError):
    """Out of memory, with the settings to lower in the message (still a torch.OutOfMemoryError)."""


# ----------------------------------------------------------------------------------------------
# configs


def quantization_config(kind: str | None) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for `kind`: "nf4" (QLoRA: nf4 + double quant + bf16 compute), "int8", or None."""
    if kind is None:
        return None
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # default "fp4" is worse for normally distributed weights
            bnb_4bit_use_double_quant=True,  # quantise the absmax constants too: ~0.37 bit/param saved
            bnb_4bit_compute_dtype=torch.bfloat16,  # default float32 is slow and needs more memory
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {kind!r}")


def cuda_available() -> bool:
    """`torch.cuda.is_available()`, in one place so tests can monkeypatch it."""
    return torch.cuda.is_available()


def _names_cuda(device_map: Any) -> bool:
    """True when a device map puts anything on a CUDA device ("cuda", "cuda:0", 0, {"": 0}, "auto"-free)."""
    if isinstance(device_map, dict):
        return any(_names_cuda(v) for v in device_map.values())
    if isinstance(device_map, torch.device):
        return device_map.type == "cuda"
    if isinstance(device_map, int):
        return True  # an int is a CUDA ordinal
    return isinstance(device_map, str) and device_map.startswith("cuda")


def resolve_device_map(device_map: Any = None) -> Any:
    """None -> the whole model on GPU 0 when CUDA exists ({"": 0}), else "cpu".

    Whole-model-on-one-GPU is deliberate: "auto" may offload 4-bit layers to the CPU, which
    bitsandbytes cannot train. A CUDA device map without CUDA raises `CudaRequiredError`.
    """
    if device_map is None:
        return {"": 0} if cuda_available() else "cpu"
    if _names_cuda(device_map) and not cuda_available():
        raise CudaRequiredError(
            f"device_map={device_map!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}). "
            "Fix: leave device_map=None (picks the CPU here), pass device_map='cpu', or run on a machine "
            "with an NVIDIA GPU and a CUDA build of torch."
        )
    return device_map


# ----------------------------------------------------------------------------------------------
# checkpoint discovery and hub errors


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    """A path rather than a hub id: it exists, or starts with '/', '.', '~' or a drive letter."""
    s = str(name_or_path)
    return Path(s).expanduser().exists() or s.startswith(("/", ".", "~", "\\")) or (len(s) > 1 and s[1] == ":")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def explain_hub_error(name: str, exc: BaseException) -> Exception | None:
    """Turn a transformers/huggingface_hub loading error into an actionable one, or None if unrelated."""
    from huggingface_hub import errors as hub_errors

    chain = _exception_chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    page = f"https://huggingface.co/{name}"
    if any(isinstance(e, hub_errors.GatedRepoError) for e in chain) or "gated repo" in text:
        return GatedCheckpointError(
            f"'{name}' is a gated checkpoint and this machine has no access token with access to it. Fix: "
            f"(1) request access on {page} (accept the licence; Meta's Llama-2 needs approval, usually minutes "
            "to hours); (2) run `huggingface-cli login` (or `hf auth login`, or set HF_TOKEN) with that "
            "account; or (3) download the weights elsewhere and pass the local folder instead."
        )
    if any(isinstance(e, hub_errors.LocalEntryNotFoundError) for e in chain) or (_hub_offline() and "offline" in text):
        how = "HF_HUB_OFFLINE=1 is set" if _hub_offline() else "the hub could not be reached"
        return CheckpointNotFoundError(
            f"{how} and the files of '{name}' are not in the local cache "
            f"({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}). Fix: download once while online "
            f"(`huggingface-cli download {name}`, unset HF_HUB_OFFLINE for that), or pass a local folder "
            "holding config.json and the weights."
        )
    if any(isinstance(e, hub_errors.RepositoryNotFoundError) for e in chain):
        return CheckpointNotFoundError(
            f"No model '{name}' on the hub, or it is private. Fix: check the spelling at {page}; for a private "
            "repo run `huggingface-cli login` with an account that can read it; or pass a local folder."
        )
    if any(isinstance(e, hub_errors.HFValidationError) for e in chain):
        return CheckpointNotFoundError(
            f"'{name}' is neither an existing local folder nor a valid hub id ('namespace/name'). "
            "Fix: check the path (it must be a folder with config.json and the weights) or the hub id."
        )
    if isinstance(exc, OSError) and ("does not appear to have" in text or "no file named" in text):
        return CheckpointNotFoundError(
            f"'{name}' lacks the files a checkpoint needs ({exc}). Fix: point to a folder written by "
            "`save_pretrained` (config.json plus *.safetensors), or download the complete repo."
        )
    return None


@contextlib.contextmanager
def hub_errors_explained(name: str) -> Iterator[None]:
    """Re-raise hub/loading errors from the block as `GatedCheckpointError` / `CheckpointNotFoundError`."""
    try:
        yield
    except (OSError, ValueError) as exc:
        better = explain_hub_error(name, exc)
        if better is None:
            raise
        raise better from exc


def load_config(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> PretrainedConfig:
    """`AutoConfig.from_pretrained` with missing-folder and hub errors explained."""
    name = str(name_or_path)
    if looks_like_local_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise CheckpointNotFoundError(
                f"No checkpoint folder at '{folder}'. Fix: check the path, or save one with "
                "`model.save_pretrained(folder)`; to use the hub instead, pass an id like 'meta-llama/Llama-2-7b-hf'."
            )
        if not (folder / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"'{folder}' has no config.json, so it is not a transformers checkpoint. Fix: point to the "
                "folder that `save_pretrained` wrote (config.json plus *.safetensors)."
            )
    with hub_errors_explained(name):
        return AutoConfig.from_pretrained(name, **hub_kwargs)


# ----------------------------------------------------------------------------------------------
# Llama-shape checks


def check_llama_config(config: PretrainedConfig) -> None:
    """Raise `NotLlamaError` unless the config describes a Llama-architecture decoder with RoPE."""
    model_type = getattr(config, "model_type", None)
    problems = []
    if model_type not in LLAMA_LIKE_MODEL_TYPES:
        problems.append(f"model_type is {model_type!r}, not one of {LLAMA_LIKE_MODEL_TYPES}")
    else:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
        if rope is None:
            problems.append("no rotary position embedding settings (rope_parameters / rope_theta)")
        for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(config, field, None) is None:
                problems.append(f"no {field}")
    if problems:
        raise NotLlamaError(
            "The checkpoint is not Llama-shaped: " + "; ".join(problems) + ". gistlib needs a decoder-only "
            "Llama architecture (RoPE, q/k/v/o attention projections, gate/up/down SwiGLU MLP), e.g. "
            "Llama-2, TinyLlama, or a model built by gistlib.models.tiny.build_tiny_llama. Fix: pick such a checkpoint."
        )


def check_llama_modules(model: torch.nn.Module) -> None:
    """Raise `NotLlamaError` unless every decoder layer has q/k/v/o and gate/up/down and the model has RoPE."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0:
        raise NotLlamaError(
            f"{type(model).__name__} has no `model.layers` decoder stack, so it is not Llama-shaped. "
            "Fix: use a Llama-architecture checkpoint (LlamaForCausalLM)."
        )
    if getattr(base, "rotary_emb", None) is None:
        raise NotLlamaError(
            f"{type(model).__name__} has no rotary embedding (`model.rotary_emb`). Fix: use a Llama checkpoint."
        )
    for i, layer in enumerate(layers):
        missing = [f"self_attn.{p}" for p in ATTENTION_PROJECTIONS if not hasattr(getattr(layer, "self_attn", None), p)]
        missing += [f"mlp.{p}" for p in MLP_PROJECTIONS if not hasattr(getattr(layer, "mlp", None), p)]
        if missing:
            raise NotLlamaError(
                f"Decoder layer {i} of {type(model).__name__} lacks {', '.join(missing)}; the hypernetwork puts "
                "LoRA on q,k,v,o,gate,up,down. Fix: use a Llama-architecture checkpoint."
            )


# ----------------------------------------------------------------------------------------------
# out of memory


def out_of_memory_message(stage: str, quantization: str | None, gradient_checkpointing: bool) -> str:
    """What to lower, in the order that saves the most (see `python -m gistlib.models.memory`)."""
    steps = []
    if quantization != "nf4":
        steps.append(f"quantization='nf4' (now {quantization!r}; 4-bit weights take ~0.52 byte/param)")
    if not gradient_checkpointing:
        steps.append("gradient_checkpointing=True (keeps only each layer's input)")
    steps += [
        "the batch size (activations grow linearly with it)",
        "the max lengths: hypernetwork input (hyper_len) and downstream input (down_len)",
        "the LoRA rank or a smaller checkpoint (7B instead of 13B)",
    ]
    return (
        f"Out of memory while {stage}. Lower, in this order: "
        + "; ".join(f"({i + 1}) {s}" for i, s in enumerate(steps))
        + ". `python -m gistlib.models.memory` estimates what fits on your card."
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # the CPU allocator's wording
    )


@contextlib.contextmanager
def out_of_memory_advice(
    stage: str, quantization: str | None = "nf4", gradient_checkpointing: bool = True
) -> Iterator[None]:
    """Re-raise out-of-memory errors from the block as `ModelOutOfMemoryError` with what to lower."""
    try:
        yield
    except ModelOutOfMemoryError:
        raise
    except (RuntimeError, MemoryError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise ModelOutOfMemoryError(out_of_memory_message(stage, quantization, gradient_checkpointing)) from exc


# ----------------------------------------------------------------------------------------------
# freezing and training preparation


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Set `requires_grad=False` on every parameter (base weights, quantised weights, embeddings, norms)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing of every decoder layer; the KV cache is off while it is on."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def prepare_for_training(
    model: PreTrainedModel,
    quantized: bool,
    gradient_checkpointing: bool = True,
    prepare_for_kbit_training: bool = True,
) -> PreTrainedModel:
    """k-bit preparation (quantised models only), gradient checkpointing, then freeze everything.

    peft's `prepare_model_for_kbit_training` freezes all parameters and upcasts non-quantised
    fp16/bf16 parameters to fp32; applied to an unquantised bf16 model it would upcast *all* of it,
    so for `quantized=False` we only freeze. It enables checkpointing only for k-bit models, so we
    enable it ourselves (idempotent) in every case.
    """
    if quantized and prepare_for_kbit_training:
        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():  # peft calls the deprecated gradient_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return freeze(model)


def load_llama(
    name_or_path: str | os.PathLike,
    quantization: str | None = "nf4",  # "nf4" | "int8" | None
    dtype: torch.dtype = torch.bfloat16,  # dtype of the non-quantised weights at load time
    attn_implementation: str = "sdpa",  # "eager" for output_attentions=True
    gradient_checkpointing: bool = True,
    prepare_for_kbit_training: bool = True,
    device_map: Any = None,  # None: {"": 0} with CUDA, else "cpu"
    **hub_kwargs: Any,  # revision=, token=, cache_dir=, ... passed to from_pretrained
) -> PreTrainedModel:
    """Load a Llama-architecture causal LM, every parameter frozen, ready for adapter training.

    Raises `CudaRequiredError`, `NotLlamaError`, `CheckpointNotFoundError`, `GatedCheckpointError`,
    `ModelOutOfMemoryError` (see the module docstring). With quantization set, the linear layers
    of the decoder become `bnb.nn.Linear4bit` (nf4) or `bnb.nn.Linear8bitLt` (int8); embeddings,
    lm_head and norms stay unquantised (float32 after k-bit preparation).
    """
    name = str(name_or_path)
    qconfig = quantization_config(quantization)  # validates `quantization` before any I/O
    device_map = resolve_device_map(device_map)
    config = load_config(name, **hub_kwargs)
    check_llama_config(config)
    with (
        hub_errors_explained(name),
        out_of_memory_advice(f"loading '{name}'", quantization, gradient_checkpointing),
    ):
        model = AutoModelForCausalLM.from_pretrained(
            name,
            config=config,
            quantization_config=qconfig,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            **hub_kwargs,
        )
        check_llama_modules(model)
        model = prepare_for_training(model, qconfig is not None, gradient_checkpointing, prepare_for_kbit_training)
    return keep_4bit_differentiable(model).eval()


def keep_4bit_differentiable(model: torch.nn.Module) -> torch.nn.Module:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel, in place.

    On a CPU with AVX512-BF16, a `Linear4bit` run in eval mode on an input without gradient repacks its weight
    into a format whose kernel has no backward; every later pass, training included, then returns no gradient
    to the layer's input, so LoRA layers below it stop learning after the first validation pass. Returns `model`."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def is_frozen(model: torch.nn.Module) -> bool:
    """True when no parameter requires a gradient."""
    return not any(p.requires_grad for p in model.parameters())
