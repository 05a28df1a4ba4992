"""The attention of 03's packed rows (common.flat_batch, common.packed_batch): the rule, which kernel runs it, and its
compilation bounded.

One rule (`sees`): a token sees the earlier tokens of its own pack's prompt and of its own response; where the family
says so (families/), an image's tokens also see each other both ways (Gemma 3), and on its sliding-attention layers a
token sees only the last `window` positions (positions, not places in the row: a second response continues the
prompt's positions). Three kernels read it:
- `flex`: FlexAttention with a BlockMask, compiled (the fused kernel skips the blocks no token sees); CUDA only for
  training, since FlexAttention has no backward on CPU;
- `per_pair`: one SDPA per pack, on any device (its cost grows with each pack's length, not the row's);
- `padded` (03 --no-padding_free): right-padded rows, SDPA with a dense boolean [B, 1, T, T] mask.
`choose` picks one from what the device can run (03 --attention auto|flex|per_pair) and says why in one line;
`Kernel.run` falls back from flex to per_pair, with a one-line warning, when the first forward of a kind (the
no-grad reference pass, the training step) fails to compile or launch: never a crash hours in, never a silent
unfused kernel. Compilation: the sequence length is dynamic from the first call and rows come in whole blocks, so a
run compiles once per kind (tests/test_attention.py counts it)."""
import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from families import family_of

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


class Rule(NamedTuple):
    """What a model's packed attention must honour besides the packing (rule_for)."""
    image_token: int = None  # an image's tokens (this id) see each other both ways
    window: int = None  # sliding-attention layers see this many positions back


def rule_for(config):
    family = family_of(config)
    return Rule(family.image_token_id(config) if family.bidirectional_images else None,
                family.sliding_window(config.get_text_config()))


def choose(requested, device, config, padding_free=True):
    """The Kernel 03 runs for a model of this config: padded rows (padding_free False), `requested` (flex, per_pair)
    or, for auto, flex where flex_plan allows it."""
    rule = rule_for(config)
    if not padding_free:
        return Kernel("padded", "--no-padding_free: right-padded rows, a dense mask", rule=rule)
    if requested == "per_pair":
        return Kernel("per_pair", "asked for", rule=rule)
    text_config = config.get_text_config()
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
                      options or {}, rule)
    if options is None:
        return Kernel("per_pair", f"auto: {why_not}", rule=rule)
    return Kernel("flex", f"auto: {where}" + (", small tiles" if options else ""), options, rule)


class Kernel:
    """The packed rows' kernel of one run: its name, why, FlexAttention's kernel options, the model's Rule; falls back
    from flex once."""

    def __init__(self, name, reason, options=None, rule=Rule()):
        self.name, self.reason, self.options, self.rule, self.tried = name, reason, options, rule, set()

    def describe(self):
        return f"attention: {self.name} ({self.reason})"

    def row_block(self):
        """The multiple a row's length is padded to (flex: whole blocks; per_pair needs none)."""
        return ROW_BLOCK if self.name == "flex" else 1

    def inputs(self, inputs):
        """A micro-batch's model inputs (common.pack_pairs') with its rows' doc and seg turned into this kernel's
        attention arguments: for padded rows a dense boolean mask (a dict by layer type where sliding layers have a
        window, as transformers takes it), for a flat row the BlockMasks or per-pack masks packed_attention_forward
        reads (a dict by layer type likewise)."""
        rest = {k: v for k, v in inputs.items() if k not in ("doc", "seg")}
        seg = inputs["seg"]
        # a padded row is one pack, its padding another (it sees itself: no all-masked softmax row)
        doc = inputs["doc"] if "doc" in inputs else torch.where(seg >= 0, 0, -1)
        seg = seg.clamp(min=0)
        img = torch.where(inputs["input_ids"] == self.rule.image_token, doc, -1) if self.rule.image_token is not None \
            else torch.full_like(doc, -1)
        pos = inputs["position_ids"]
        windows = {"full_attention": None, **({"sliding_attention": self.rule.window} if self.rule.window else {})}
        if self.name == "padded":
            made = {k: dense_mask(doc, seg, img, pos, w) for k, w in windows.items()}
            return {**rest, "attention_mask": made if self.rule.window else made["full_attention"]}
        if self.name == "flex":
            made = {k: block_mask(doc, seg, img, pos, w) for k, w in windows.items()}
            return {**rest, "block_masks": made, "flex_options": self.options}
        return {**rest, "pack_masks": {k: pack_masks(doc, seg, img, pos, w) for k, w in windows.items()}}

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


def sees(q, k, dq, dk, sq, sk, iq, ik, pq, pk, window):
    """Whether query token q attends to key token k, from their places (q, k), packs (d), segments (s: 0 the prompt,
    i response i), image blocks (i: -1 none) and positions (p): same pack, and k earlier in the prompt or in q's own
    response, or both in one image block; within `window` positions on sliding layers. Elementwise on tensors."""
    ok = (dq == dk) & (((k <= q) & ((sk == 0) | (sk == sq))) | ((iq >= 0) & (iq == ik)))
    return ok if window is None else ok & (pq - pk < window)


def dense_mask(doc, seg, img, pos, window):
    """sees() as a boolean mask [B, 1, T, T] of right-padded rows (their doc, seg, img, 1-D pos [B, T])."""
    T = doc.shape[1]
    q = torch.arange(T, device=doc.device)
    g = lambda x: (x[:, :, None], x[:, None, :])
    return sees(q[:, None], q[None, :], *g(doc), *g(seg), *g(img), *g(pos if pos.dim() == 2 else pos[0]),
                window)[:, None]


def block_mask(doc, seg, img, pos, window):
    """sees() over a flat row as FlexAttention's BlockMask (the kernel skips the blocks no token sees). The rule is
    evaluated over the whole [T, T] grid once per micro-batch (booleans, chunked), not per layer."""
    from torch.nn.attention.flex_attention import create_block_mask
    d, s, i, p = doc[0], seg[0], img[0], pos.reshape(-1, pos.shape[-1])[0]

    def mask_mod(b, h, q, k):
        return sees(q, k, d[q], d[k], s[q], s[k], i[q], i[k], p[q], p[k], window)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=d.numel(), KV_LEN=d.numel(), device=d.device)


def pack_masks(doc, seg, img, pos, window):
    """sees() pack by pack: [(start, end, boolean mask [end - start, end - start])]: each pack's attention is its own
    small SDPA. A row's padding (doc -1) is a pack of its own, causal within itself."""
    bounds = torch.cumsum(torch.unique_consecutive(doc[0], return_counts=True)[1], 0).tolist()
    p = pos.reshape(-1, pos.shape[-1])[0]
    masks = []
    for start, end in zip([0] + bounds[:-1], bounds):
        one = lambda x: (x[0, start:end, None], x[0, None, start:end])
        q = torch.arange(end - start, device=doc.device)
        pq, pk = p[start:end, None], p[None, start:end]
        masks.append((start, end, sees(q[:, None], q[None, :], *one(doc), *one(seg), *one(img), pq, pk, window)))
    return masks


@functools.cache
def compiled_flex(backend):
    """flex_attention compiled once per process and backend, the sequence length dynamic from the first call."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, backend=backend, dynamic=True)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                             block_masks=None, pack_masks=None, flex_options=None, **kwargs):
    """transformers' attention interface ("bpo_packed", set by use_packed_attention) for flat_batch rows (Kernel.inputs'
    masks, by layer type: transformers passes `sliding_window` on a sliding layer): with block_masks, compiled
    FlexAttention with `flex_options` (its kernel options); with pack_masks, one SDPA per pack. Returns (output
    [1, T, H, D], no weights)."""
    layer = "sliding_attention" if sliding_window else "full_attention"
    gqa = key.shape[1] != query.shape[1]
    if block_masks is None and pack_masks is None:  # e.g. generate on a model left in this mode: say so
        raise TypeError("the bpo_packed attention takes a flat row's block_masks or pack_masks (attention.Kernel.inputs);"
                        " attention.use_packed_attention(model, on=False) restores SDPA")
    if block_masks is not None:
        out = compiled_flex(COMPILE_BACKEND)(query, key, value, block_mask=block_masks[layer], scale=scaling,
                                             enable_gqa=gqa, kernel_options=flex_options or None)
    else:
        pack_masks = pack_masks[layer]
        out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=m,
                                                        scale=scaling, enable_gqa=gqa) for a, b, m in pack_masks], dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model, on=True):
    """The language model's attention through packed_attention_forward (on=False: back to SDPA); the vision
    tower keeps its own."""
    from transformers import AttentionInterface
    AttentionInterface.register("bpo_packed", packed_attention_forward)
    model.set_attn_implementation({"text_config": "bpo_packed" if on else "sdpa"})
