"""The attention of 03's padding-free rows (common.flat_batch): which kernel runs it, and its compilation bounded.

Both kernels read one rule (a token sees the earlier tokens of its own pack's prompt and of its own response):
- `flex`: FlexAttention with a BlockMask, compiled (the fused kernel skips the blocks no token sees); CUDA only for
  training, since FlexAttention has no backward on CPU;
- `per_pair`: one SDPA per pack, on any device (its cost grows with each pack's length, not the row's).
`choose` picks one from what the device can run (03 --attention auto|flex|per_pair) and says why in one line;
`Kernel.run` falls back from flex to per_pair, with a one-line warning, when the first forward of a kind (the
no-grad reference pass, the training step) fails to compile or launch: never a crash hours in, never a silent
unfused kernel. Compilation: the sequence length is dynamic from the first call and rows come in whole blocks, so a
run compiles once per kind (tests/test_attention.py counts it)."""
import functools
import sys

import torch
import torch.nn.functional as F

KERNELS = ("auto", "flex", "per_pair")
ROW_BLOCK = 128  # FlexAttention's block; a flex row is padded to whole blocks, two at least (one block specialises)
COMPILE_BACKEND = "inductor"  # tests count compiles with a backend that only traces
# what the fused kernels need: shared memory per block (opt-in) of A100 (164 KB) and H100/H200 (228 KB) fits the
# default tiles; boards of ~99 KB (A40, A6000, L40S, RTX 3090/4090, A10G: compute capability 8.6/8.9, and 12.x) do
# not at head_dim 128 (pytorch/pytorch#133254: the backward's default tiles need ~131 KB), so they get tiles that
# need well under 99 KB (the backward's are those PyTorch chose for 99 KB boards at head_dim 256, pytorch#198228)
FULL_TILES_BYTES = 160 * 1024
SMALL_TILES_BYTES = 99 * 1024
SMALL_TILES = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32,
               "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32, "bwd_num_stages": 2}
MAX_SMALL_TILES_HEAD_DIM = 128


def flex_plan(device_type, capability=None, smem_per_block=None, head_dim=None):
    """(kernel options, None) where FlexAttention can train on this device (None options: PyTorch's default tiles),
    else (None, why not). Pure, so the choice is tested against any device's properties."""
    if device_type != "cuda":
        return None, f"FlexAttention has no backward on {device_type}"
    if capability < (8, 0):
        return None, f"compute capability {capability[0]}.{capability[1]} (bf16 kernels need 8.0)"
    if smem_per_block >= FULL_TILES_BYTES:
        return {}, None
    if smem_per_block >= SMALL_TILES_BYTES and head_dim <= MAX_SMALL_TILES_HEAD_DIM:
        return dict(SMALL_TILES), None
    return None, f"{smem_per_block // 1024} KB of shared memory per block at head_dim {head_dim}"


def head_dim(text_config):
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def choose(requested, device, text_config):
    """The Kernel 03 runs: `requested` (flex, per_pair) or, for auto, flex where flex_plan allows it."""
    if requested == "per_pair":
        return Kernel("per_pair", "asked for")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        plan = flex_plan("cuda", (props.major, props.minor), props.shared_memory_per_block_optin,
                         head_dim(text_config))
        where = f"{props.name}, {props.shared_memory_per_block_optin // 1024} KB shared memory per block"
    else:
        plan, where = flex_plan(device.type), device.type
    options, why_not = plan
    if requested == "flex":
        return Kernel("flex", f"asked for, on {where}" + (f" (expected to fail: {why_not})" if why_not else ""),
                      options or {})
    if options is None:
        return Kernel("per_pair", f"auto: {why_not}")
    return Kernel("flex", f"auto: {where}" + (", small tiles" if options else ""), options)


class Kernel:
    """The padding-free row's kernel of one run: its name, why, FlexAttention's kernel options; falls back once."""

    def __init__(self, name, reason, options=None):
        self.name, self.reason, self.options, self.tried = name, reason, options, set()

    def describe(self):
        return f"attention: {self.name} ({self.reason})"

    def row_block(self):
        """The multiple a row's length is padded to (flex: whole blocks; per_pair needs none)."""
        return ROW_BLOCK if self.name == "flex" else 1

    def inputs(self, inputs):
        """A micro-batch's model inputs with a padding-free row's doc and seg turned into this kernel's attention
        arguments (packed_attention_forward reads them); padded rows' inputs as they are."""
        if "doc" not in inputs:
            return inputs
        rest = {k: v for k, v in inputs.items() if k not in ("doc", "seg")}
        if self.name == "flex":
            return {**rest, "attention_mask": block_mask(inputs["doc"], inputs["seg"]), "flex_options": self.options}
        return {**rest, "pack_masks": pack_masks(inputs["doc"], inputs["seg"])}

    def run(self, kind, fn):
        """fn(); the first time for each kind of forward ("reference", "train") under flex, a failure falls back to
        per_pair and fn runs again (fn must build its attention through self.inputs, so the retry takes per_pair's).
        Out of memory is not a kernel failure: it propagates."""
        if self.name != "flex" or kind in self.tried:
            return fn()
        try:
            out = fn()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            self.fall_back(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])
            return fn()
        self.tried.add(kind)
        return out

    def fall_back(self, why):
        print(f"warning: FlexAttention failed at its first call ({why}); falling back to per_pair attention (one SDPA "
              "per pair): the same results, slower on long rows", file=sys.stderr, flush=True)
        self.name, self.reason, self.options = "per_pair", f"fell back from flex: {why}", None


def block_mask(doc, seg):
    """The attention of a flat_batch row as FlexAttention's BlockMask (the kernel skips the blocks no token sees).
    create_block_mask evaluates the rule over the whole [T, T] grid once per micro-batch (booleans, chunked), not per
    layer."""
    from torch.nn.attention.flex_attention import create_block_mask
    d, s = doc[0], seg[0]

    def sees(b, h, q, k):
        return (k <= q) & (d[q] == d[k]) & ((s[k] == 0) | (s[k] == s[q]))
    return create_block_mask(sees, B=None, H=None, Q_LEN=d.numel(), KV_LEN=d.numel(), device=d.device)


def pack_masks(doc, seg):
    """The same attention, pack by pack: [(start, end, boolean mask [end - start, end - start])]: each pack's attention
    is its own small SDPA. A row's padding (doc -1) is a pack of its own, causal within itself."""
    bounds = torch.cumsum(torch.unique_consecutive(doc[0], return_counts=True)[1], 0).tolist()
    masks = []
    for start, end in zip([0] + bounds[:-1], bounds):
        s = seg[0, start:end]
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
        masks.append((start, end, causal & ((s[None, :] == 0) | (s[None, :] == s[:, None]))))
    return masks


@functools.cache
def compiled_flex(backend):
    """flex_attention compiled once per process and backend, the sequence length dynamic from the first call."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, backend=backend, dynamic=True)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, pack_masks=None,
                             flex_options=None, **kwargs):
    """transformers' attention interface ("bpo_packed", set by use_packed_attention) for flat_batch rows: with a
    BlockMask, compiled FlexAttention with `flex_options` (its kernel options); with pack_masks, one SDPA per pack.
    Returns (output [1, T, H, D], no weights)."""
    from torch.nn.attention.flex_attention import BlockMask
    gqa = key.shape[1] != query.shape[1]
    if pack_masks is None:
        if not isinstance(attention_mask, BlockMask):  # e.g. generate on a model left in this mode: say so
            raise TypeError("the bpo_packed attention takes a flat row's BlockMask or pack_masks; "
                            "attention.use_packed_attention(model, on=False) restores SDPA")
        out = compiled_flex(COMPILE_BACKEND)(query, key, value, block_mask=attention_mask, scale=scaling,
                                             enable_gqa=gqa, kernel_options=flex_options or None)
    else:
        out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=m,
                                                        scale=scaling, enable_gqa=gqa) for a, b, m in pack_masks], dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model, on=True):
    """The language model's attention through packed_attention_forward (on=False: back to SDPA); the vision
    tower keeps its own."""
    from transformers import AttentionInterface
    AttentionInterface.register("bpo_packed", packed_attention_forward)
    model.set_attn_implementation({"text_config": "bpo_packed" if on else "sdpa"})
