"""A memory planner for HyperLlama training on one GPU, and a tensor-memory meter to check it.

    python -m gistlib.models.memory          # the planner table for Llama-2 7B/13B on 8/12/16/24 GB cards

The planner adds up, in bytes (formulas in the docstring of each function):

    total = weights + adapters + gradients + optimizer + activations + overhead

for one HyperLlama training step: a hypernetwork pass (base + LoRA on q,k,v,o,gate,up,down) over
`hyper_len` tokens, a downstream pass (base, adapters off) over `down_len` tokens behind a
`k`-token prefix, a loss on the downstream logits, and backward through both passes.

Conventions. Sizes: d = hidden, L = layers, H = heads, d_kv = kv_heads * d / H, f = intermediate,
V = vocab, B = batch, r = LoRA rank, k = gist tokens, T_h = hyper_len, T_d = down_len.
`act` = bytes per activation element: 4 for what `gistlib.models.loading.load_llama` gives (k-bit
preparation upcasts the embeddings to float32, so the residual stream, the norms, the LoRA paths
and the attention all run in float32; only the 4-bit matmuls compute in bfloat16), 2 under bf16
autocast. GiB = 2**30 bytes; a "16 GB" card is taken as 16 GiB.

`TensorMemoryTracker` counts every tensor storage created by an op and still alive (any device,
the CPU included), so `measure_base_lora_step` gets an exact peak of live tensor bytes for a
float32 LoRA step of a tiny Llama; tests check the planner's formulas against it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gistlib.core.hyper import LINEAR_MAPS

GiB = 2**30
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
NF4_NESTED_BLOCK = 256  # double quantisation: one float32 absmax per 256 (8-bit) absmax values
LORA_TARGETS = LINEAR_MAPS
# Not measured here: the CUDA context (~0.3-0.5 GiB), cuBLAS workspaces and caching-allocator
# fragmentation. A stated constant; the GPU check (benchmarks/gpu_check.py) should calibrate it.
RUNTIME_OVERHEAD_BYTES = 1 * GiB
LOGITS_COPIES = 4  # loss peak: logits (held by the caller), log_softmax (saved), and their two gradients
HELD_LOGITS_COPIES = 1  # after the loss backward, the caller still holds the logits


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-architecture decoder that memory depends on."""

    hidden: int  # d
    layers: int  # L
    heads: int  # H, query heads
    kv_heads: int  # key/value heads (GQA when < heads)
    intermediate: int  # f, SwiGLU width
    vocab: int  # V
    tied_embeddings: bool = False  # Llama-2: separate lm_head
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the 7 linear maps of one decoder layer."""
        d, dkv, f = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (d, d), "k_proj": (d, dkv), "v_proj": (d, dkv), "o_proj": (d, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }  # fmt: skip

    def linear_params(self) -> int:
        """Weights in all decoder linears: L * (2 d^2 + 2 d d_kv + 3 d f)."""
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    def unquantized_params(self) -> int:
        """Embeddings, lm_head and RMSNorm weights: V d (x2 unless tied) + (2L + 1) d."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + (2 * self.layers + 1) * self.hidden

    def num_parameters(self) -> int:
        return self.linear_params() + self.unquantized_params()

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelShape:
        """From a transformers `LlamaConfig` (or anything with the same field names)."""
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            name=name or getattr(config, "name_or_path", "") or "",
        )


LLAMA2_7B = ModelShape(
    hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, name="Llama-2-7B"
)
LLAMA2_13B = ModelShape(
    hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000, name="Llama-2-13B"
)


@dataclass
class MemoryEstimate:
    """Bytes of one training step's peak, by kind."""

    weights: float  # frozen base: quantised linears + unquantised embeddings/lm_head/norms
    adapters: float  # trainable parameters: LoRA + gist embeddings, float32
    gradients: float  # one float32 gradient per trainable parameter
    optimizer: float  # AdamW: two float32 states per trainable parameter
    activations: float  # saved tensors + backward transients at the peak
    overhead: float  # runtime constant (CUDA context, workspaces, fragmentation)
    details: dict[str, float] = field(default_factory=dict)  # the activation terms

    @property
    def total(self) -> float:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations + self.overhead

    def gib(self) -> dict[str, float]:
        parts = {k: v for k, v in asdict(self).items() if k != "details"}
        return {k: v / GiB for k, v in {**parts, "total": self.total}.items()}


# ----------------------------------------------------------------------------------------------
# parameters


def linear_weight_bytes(shape: ModelShape, quantization: str | None, dtype_bytes: int = 2) -> float:
    """Bytes of the decoder linears, n = shape.linear_params():

    nf4 (double quant): n/2 (two 4-bit codes per byte) + n/64 (8-bit absmax per 64-block)
                        + 4 n/(64*256) (float32 absmax of the absmax) = 0.5159 n
    int8 (LLM.int8):    n + 4 * out_features per linear (float32 row scales)
    None:               n * dtype_bytes
    Per-tensor constants (16-value code book, offsets) are ignored: < 2 KB per linear.
    """
    n = shape.linear_params()
    if quantization == "nf4":
        return n / 2 + n / NF4_BLOCK + 4 * n / (NF4_BLOCK * NF4_NESTED_BLOCK)
    if quantization == "int8":
        return n + 4 * shape.layers * sum(o for _, o in shape.linear_shapes().values())
    if quantization is None:
        return n * dtype_bytes
    raise ValueError(f"quantization must be 'nf4', 'int8' or None, got {quantization!r}")


def weight_bytes(
    shape: ModelShape, quantization: str | None, dtype_bytes: int = 2, prepare_for_kbit_training: bool = True
) -> float:
    """Frozen base = linears (see `linear_weight_bytes`) + unquantised params * u, where u = 4 when a
    quantised model went through k-bit preparation (it upcasts them to float32), else dtype_bytes."""
    upcast = quantization is not None and prepare_for_kbit_training
    return linear_weight_bytes(shape, quantization, dtype_bytes) + shape.unquantized_params() * (
        4 if upcast else dtype_bytes
    )


def lora_params(shape: ModelShape, rank: int) -> int:
    """LoRA A (r x in) and B (out x r) on the 7 linears of every layer: L r sum(in + out) = L r (8d + 2d_kv + 3f)."""
    return shape.layers * rank * sum(i + o for i, o in shape.linear_shapes().values())


def trainable_params(shape: ModelShape, lora_rank: int, num_gist_tokens: int) -> int:
    """LoRA + k gist embeddings (k d). The identity prefix head has none."""
    return lora_params(shape, lora_rank) + num_gist_tokens * shape.hidden


# ----------------------------------------------------------------------------------------------
# activations


def layer_activation_elements(shape: ModelShape, lora_rank: int | None) -> int:
    """Elements one decoder layer saves for backward, per token (fused SDPA, no T x T matrix):

    no LoRA: layer input x (d) + 2 RMSNorm rsqrt (2) + q, k, v after RoPE (3d: k and v repeated to
             all heads, which transformers does when a mask is passed) + SDPA output (d) + logsumexp (H)
             + residual h (d) + gate out, SiLU out, up out (3f)        = 6d + 3f + H + 2
             (the norm outputs feed frozen matmuls only, whose inputs are not saved:
             bitsandbytes' MatMul4Bit keeps just the packed weight)
    LoRA:    + the inputs of the LoRA A matrices that no one else saved: norm1 out (d),
             attention output (d), norm2 out (d), SiLU*up (f), + the 7 LoRA A outputs (7r)
                                                                       = 9d + 4f + H + 2 + 7r
    """
    d, f, h = shape.hidden, shape.intermediate, shape.heads
    base = 6 * d + 3 * f + h + 2
    return base if lora_rank is None else base + 3 * d + f + 7 * lora_rank


@dataclass
class PassMemory:
    """Activation bytes of one forward pass over B x T tokens (see `pass_memory`)."""

    stored: float  # kept until this pass's backward
    transient: float  # extra at the peak of this pass's backward


def pass_memory(
    shape: ModelShape,
    batch: int,
    tokens: int,
    lora_rank: int | None,
    gradient_checkpointing: bool,
    act: int,
    key_tokens: int | None = None,
    mask: bool = True,
) -> PassMemory:
    """One pass over N = B T tokens (T_k = key_tokens, the keys each query may see, T by default):

    stored   = ckpt: L N d act            (non-reentrant checkpointing keeps each layer's input)
               else: L N a act            (a = layer_activation_elements)
             + N (d + 1) act              (final RMSNorm)
             + 2 N hd act                 (RoPE cos, sin)
             + B T T_k (1 + act)          (bool gist mask + additive float mask; 0 when mask=False)
    transient = ((a if ckpt else 0) + 2f + 2d) N act
                 (the one layer recomputed during backward, plus the gradient buffers alive at once
                  inside a layer's backward: the MLP's, 2f, and the residual stream's, 2d; measured
                  on the CPU: 0.7x of 2f + 2d without checkpointing)
    """
    n = batch * tokens
    a = layer_activation_elements(shape, lora_rank)
    per_layer = shape.hidden if gradient_checkpointing else a
    stored = shape.layers * n * per_layer * act + n * (shape.hidden + 1) * act + 2 * n * shape.head_dim * act
    if mask:
        stored += batch * tokens * (key_tokens or tokens) * (1 + act)
    workspace = 2 * shape.intermediate + 2 * shape.hidden
    transient = ((a if gradient_checkpointing else 0) + workspace) * n * act
    return PassMemory(stored=stored, transient=transient)


def logits_bytes(batch: int, tokens: int, vocab: int) -> float:
    """One float32 tensor of B x T x V: 4 B T V."""
    return batch * tokens * vocab * 4


def dequant_workspace_bytes(shape: ModelShape, quantization: str | None, compute_bytes: int = 2) -> float:
    """A quantised matmul dequantises its weight to the compute dtype: the largest linear, in*out*2."""
    if quantization is None:
        return 0.0
    return max(i * o for i, o in shape.linear_shapes().values()) * compute_bytes


def _activation_bytes(quantization: str | None, dtype_bytes: int, prepare_for_kbit_training: bool) -> int:
    return 4 if quantization is not None and prepare_for_kbit_training else dtype_bytes


def _parameter_terms(shape: ModelShape, n_trainable: int, quantization, dtype_bytes, prepare) -> dict[str, float]:
    return {
        "weights": weight_bytes(shape, quantization, dtype_bytes, prepare),
        "adapters": n_trainable * 4.0,
        "gradients": n_trainable * 4.0,
        "optimizer": n_trainable * 8.0,
    }


def estimate_memory(
    shape: ModelShape,
    quantization: str | None = "nf4",
    lora_rank: int = 8,
    num_gist_tokens: int = 16,
    batch_size: int = 4,
    hyper_len: int = 1024,  # hypernetwork input incl. the k gist tokens
    down_len: int = 384,  # downstream input
    gradient_checkpointing: bool = True,
    dtype_bytes: int = 2,  # load dtype of unquantised weights (bf16)
    activation_bytes: int | None = None,  # None: 4 after k-bit preparation, else dtype_bytes
    prepare_for_kbit_training: bool = True,
    runtime_overhead_bytes: float = RUNTIME_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Peak memory of one HyperLlama training step.

    weights, adapters (= 4 P), gradients (= 4 P), optimizer (= 8 P), P = trainable_params.
    activations = max(phase A, phase B) where, with hyper = pass_memory(B, T_h, LoRA) and
    down = pass_memory(B, T_d, no LoRA, key_tokens = k + T_d):
      prefix  = L B k (2 d_kv + 2 d) act   (captured gist K/V + their copies inside the downstream keys)
      logits  = 4 B T_d V                  (`logits_bytes`: float32)
      phase A (downstream backward) = hyper.stored + down.stored + prefix
                                      + max(4 logits, 1 logits + down.transient + dequant)
      phase B (hypernetwork backward) = hyper.stored + prefix + 1 logits + hyper.transient + dequant
    The loss peak (LOGITS_COPIES = 4: logits, log_softmax, their two gradients) and a layer's
    backward do not overlap in time, hence the max; the caller's logits (1 copy) stay throughout.
    overhead = runtime_overhead_bytes (a constant, not a measurement).
    """
    act = activation_bytes or _activation_bytes(quantization, dtype_bytes, prepare_for_kbit_training)
    hyper = pass_memory(shape, batch_size, hyper_len, lora_rank, gradient_checkpointing, act)
    down = pass_memory(
        shape, batch_size, down_len, None, gradient_checkpointing, act, key_tokens=num_gist_tokens + down_len
    )
    prefix = shape.layers * batch_size * num_gist_tokens * (2 * shape.kv_dim + 2 * shape.hidden) * act
    dequant = dequant_workspace_bytes(shape, quantization)
    logits = logits_bytes(batch_size, down_len, shape.vocab)
    held = HELD_LOGITS_COPIES * logits
    phase_a = hyper.stored + down.stored + prefix + max(LOGITS_COPIES * logits, held + down.transient + dequant)
    phase_b = hyper.stored + prefix + held + hyper.transient + dequant
    params = _parameter_terms(
        shape,
        trainable_params(shape, lora_rank, num_gist_tokens),
        quantization,
        dtype_bytes,
        prepare_for_kbit_training,
    )
    details = {
        "hyper_stored": hyper.stored, "hyper_transient": hyper.transient, "down_stored": down.stored,
        "down_transient": down.transient, "prefix": prefix, "logits": logits, "dequant": dequant,
        "phase_a": phase_a, "phase_b": phase_b,
    }  # fmt: skip
    return MemoryEstimate(**params, activations=max(phase_a, phase_b), overhead=runtime_overhead_bytes, details=details)


def estimate_lora_step_memory(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    lora_rank: int = 8,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    dtype_bytes: int = 4,
    activation_bytes: int | None = None,
    prepare_for_kbit_training: bool = True,
    runtime_overhead_bytes: float = 0.0,
) -> MemoryEstimate:
    """The "base LoRA step": LoRA on all 7 linears, plain LM loss on B x T tokens, causal (no mask tensor).

    The same terms as `estimate_memory` with a single pass: activations =
    pass.stored + max(4 logits, 1 logits + pass.transient + dequant), logits = 4 B T V. Defaults: float32, no
    quantisation, no runtime overhead: the configuration `measure_base_lora_step` measures on a CPU.
    """
    act = activation_bytes or _activation_bytes(quantization, dtype_bytes, prepare_for_kbit_training)
    one = pass_memory(shape, batch_size, seq_len, lora_rank, gradient_checkpointing, act, mask=False)
    dequant = dequant_workspace_bytes(shape, quantization)
    logits = logits_bytes(batch_size, seq_len, shape.vocab)
    activations = one.stored + max(LOGITS_COPIES * logits, HELD_LOGITS_COPIES * logits + one.transient + dequant)
    params = _parameter_terms(
        shape, lora_params(shape, lora_rank), quantization, dtype_bytes, prepare_for_kbit_training
    )
    details = {"stored": one.stored, "transient": one.transient, "logits": logits, "dequant": dequant}
    return MemoryEstimate(**params, activations=activations, overhead=runtime_overhead_bytes, details=details)


# ----------------------------------------------------------------------------------------------
# the planner table

DEFAULT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("nf4, B4, ckpt, fp32 acts", {"batch_size": 4}),
    ("nf4, B4, ckpt, bf16 autocast", {"batch_size": 4, "activation_bytes": 2}),
    ("nf4, B1, ckpt, fp32 acts", {"batch_size": 1}),
    ("nf4, B4, no ckpt, fp32 acts", {"batch_size": 4, "gradient_checkpointing": False}),
)


def planner_table(
    shapes: Sequence[ModelShape],
    cards_gb: Sequence[int] = (8, 12, 16, 24),
    settings: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_SETTINGS,
    **common: Any,  # passed to estimate_memory for every row (hyper_len, down_len, lora_rank, ...)
) -> str:
    """A markdown table: model, setting, weights / trainable+optimizer / activations / total GiB, fits per card."""
    head = ["model", "setting", "weights", "LoRA+grad+Adam", "activations", "total GiB"]
    head += [f"{gb} GB" for gb in cards_gb]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for shape in shapes:
        for label, kwargs in settings:
            est = estimate_memory(shape, **{**common, **kwargs})
            g = est.gib()
            cells = [
                shape.name,
                label,
                f"{g['weights']:.2f}",
                f"{g['adapters'] + g['gradients'] + g['optimizer']:.2f}",
            ]
            cells += [f"{g['activations']:.2f}", f"{g['total']:.1f}"]
            cells += ["yes" if est.total <= gb * GiB else "no" for gb in cards_gb]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# measuring: live tensor bytes, any device


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at the same time.

    Every op's outputs are seen at dispatch (forward, autograd's backward on this thread, the
    optimizer). An output is a new allocation unless it shares storage with one of the op's inputs
    (views, in-place ops). A storage is dropped from the count as soon as it is freed (a weak
    reference to the C++ storage expires). Allocations inside a kernel (workspaces) are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors`."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live bytes of tensors that `fn()` allocates (see `TensorMemoryTracker`)."""
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak


def measure_base_lora_step(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    lora_rank: int = 8,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Measured peak of one float32 "base LoRA step" on a tiny Llama of `shape`, with its estimate.

    The step: peft LoRA (r, alpha 2r, dropout 0) on q,k,v,o,gate,up,down; `out = model(ids,
    labels=ids)`; `out.loss.backward()`; AdamW step, gradients set to None before. One warm-up step
    creates the AdamW states first. measured = all parameters + AdamW states (alive throughout)
    + the tracked peak of everything the step allocates (activations, logits, gradients, temporaries).
    """
    from peft import LoraConfig

    from gistlib.core.prefix import peft_wrap
    from gistlib.models.tiny import build_tiny_llama

    model = build_tiny_llama(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
        num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate, seed=seed,
    )  # fmt: skip
    model = peft_wrap(
        model,
        LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS)),
    )
    if gradient_checkpointing:
        model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, shape.vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)  # the caller holds the logits, as training loops do
        out.loss.backward()
        optimizer.step()

    step()  # warm-up: AdamW states now exist
    optimizer.zero_grad(set_to_none=True)
    states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    static = tensor_bytes(list(model.parameters())) + tensor_bytes(states)
    peak = measure_peak_bytes(step)
    est = estimate_lora_step_memory(
        shape, batch_size, seq_len, lora_rank, gradient_checkpointing=gradient_checkpointing
    )
    measured_params = tensor_bytes(list(model.parameters()))
    return {
        "measured": float(static + peak),
        "estimated": est.total,
        "measured_step_alloc": float(peak),
        "estimated_activations_and_grads": est.activations + est.gradients,
        "measured_params": float(measured_params),
        "estimated_params": est.weights + est.adapters,
    }


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HyperLlama memory planner (estimates, GiB)")
    parser.add_argument("--hyper-len", type=int, default=1024)
    parser.add_argument("--down-len", type=int, default=384)
    parser.add_argument("--gist-tokens", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args(argv)
    common = {
        "hyper_len": args.hyper_len,
        "down_len": args.down_len,
        "num_gist_tokens": args.gist_tokens,
        "lora_rank": args.lora_rank,
    }
    print(
        f"HyperLlama step: hypernetwork {args.hyper_len} tokens + downstream {args.down_len} tokens, "
        f"k={args.gist_tokens}, LoRA r{args.lora_rank} on q,k,v,o,gate,up,down; estimates include "
        f"{RUNTIME_OVERHEAD_BYTES / GiB:.1f} GiB runtime overhead (a constant, not measured).\n"
    )
    print(planner_table([LLAMA2_7B, LLAMA2_13B], **common))


if __name__ == "__main__":
    main()
