"""TIGER (Rajput et al. 2023): a T5 encoder-decoder over semantic-ID tokens, with optional
SCoTER fusion on the encoder side (SCoTER-T, App. A.1) and prefix-trie constrained beam
search (TwiSTAR's M_fast, 4.2 / E.1.2).

  vocabulary  0 = padding, 1 = decoder start, then one token per (level, code)
  encoder     the history's items as their SID tokens, flattened, most recent last
  decoder     the target item's SID tokens (teacher forcing), cross-entropy per token
  ranking     beam search over the catalogue's SID trie; a beam's score is the summed
              log-probability of its tokens, so only catalogue items can be produced

Training examples: TIGER trains on every next item of a user's training sequence, not only
on its last one. `training_split` turns each cache train row (history -> last train item)
into one example per item of the row: (the history up to position t -> the item at t + 1),
the row itself being the last example. A T5 encoder is bidirectional, so every prefix needs
its own encoder pass: an epoch costs about max_len / 2 times the encoder work of one pass
over the rows (SASRec gets all positions from one causal pass). The examples' lengths
(`Split.lengths`) make the loop batch examples of similar length together
(`train.data.bucketed_order`): a batch is padded to its longest history, so a plainly
shuffled epoch pays about twice the real tokens, a bucketed one about 1.03 times.

Where the fusion applies: as in train.model, a row's chain was generated from its whole
history, which holds the targets of the shorter prefixes; only the example that is the row
itself gets the row's reasoning, the shorter prefixes get none (all-zero steps: plain
encoder states, left out of InfoNCE).

`transformers` is imported only here: `import train.loop` must not pull it in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config
from train.data import Cache, CacheError, Split
from train.fusion import ScoterFusion, info_nce

PAD, START, FIRST_CODE = 0, 1, 2
#: most decoder rows (rows x beams) per beam-search call; bounds its activations
BEAM_ROWS = 4096
SID_FIX = "run `factory sids --collisions extra-level`, then `factory export cache --sids`"


def build(cfg: Config, cache: Cache, fusion: Callable[[int], ScoterFusion | None]) -> Tiger:
    return Tiger(check_sids(cache), cfg, fusion(cfg.dim))


def check_sids(cache: Cache) -> np.ndarray:
    """The cache's SID codes (n_items + 1, levels); TIGER decodes one item per SID, so a
    cache without SIDs or with two items sharing one is refused (CacheError, one line)."""
    if cache.sid is None:
        raise CacheError(f"{cache.path}: TIGER needs semantic IDs, and items.parquet has no "
                         f"sid column: {SID_FIX}")
    codes = np.asarray(cache.sid[1:])
    shared = len(codes) - len(np.unique(codes, axis=0))
    if shared:
        raise CacheError(f"{cache.path}: {shared} items share a semantic ID with another item, "
                         f"so TIGER cannot tell them apart: {SID_FIX}")
    return np.asarray(cache.sid)


class Trie(nn.Module):
    """The catalogue's SIDs as tensors. Level l has P_l prefixes (the distinct first l codes;
    level 0 has one, the empty prefix); `allowed[l]` (P_l, V_l) says which codes may follow
    each prefix and `child[l]` (P_l, V_l) names the prefix they make at level l + 1, or at
    the last level the item_idx (0 where not allowed)."""

    def __init__(self, sid: np.ndarray):
        super().__init__()
        codes = sid[1:]
        n, self.levels = codes.shape
        self.sizes = [int(codes[:, lvl].max()) + 1 for lvl in range(self.levels)]
        prefix = np.zeros(n, dtype=np.int64)  # each item's prefix id at the current level
        for lvl in range(self.levels):
            if lvl + 1 < self.levels:
                nxt = np.unique(codes[:, :lvl + 1], axis=0, return_inverse=True)[1].reshape(-1)
            else:
                nxt = np.arange(1, n + 1)  # sid row i + 1 is item_idx i + 1
            allowed = np.zeros((int(prefix.max()) + 1, self.sizes[lvl]), dtype=bool)
            child = np.zeros(allowed.shape, dtype=np.int64)
            allowed[prefix, codes[:, lvl]] = True
            child[prefix, codes[:, lvl]] = nxt
            self.register_buffer(f"allowed{lvl}", torch.from_numpy(allowed), persistent=False)
            self.register_buffer(f"child{lvl}", torch.from_numpy(child), persistent=False)
            prefix = nxt

    def allowed(self, level: int) -> torch.Tensor:
        return getattr(self, f"allowed{level}")

    def child(self, level: int) -> torch.Tensor:
        return getattr(self, f"child{level}")

    def item(self, codes: torch.Tensor) -> torch.Tensor:
        """item_idx of SID code rows (..., levels); 0 for a SID not in the catalogue."""
        prefix = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        ok = torch.ones(codes.shape[:-1], dtype=torch.bool, device=codes.device)
        for lvl in range(self.levels):
            c = codes[..., lvl]
            ok &= (c >= 0) & (c < self.sizes[lvl])
            c = c.clamp(0, self.sizes[lvl] - 1)
            ok &= self.allowed(lvl)[prefix, c]
            prefix = torch.where(ok, self.child(lvl)[prefix, c], 0)
        return prefix


class Tiger(nn.Module):
    def __init__(self, sid: np.ndarray, cfg: Config, fusion: ScoterFusion | None = None):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        self.trie = Trie(sid)
        self.levels = self.trie.levels
        self.offsets = [FIRST_CODE + sum(self.trie.sizes[:lvl]) for lvl in range(self.levels)]
        tokens = torch.from_numpy(sid) + torch.tensor(self.offsets)
        tokens[0] = PAD
        self.register_buffer("item_tokens", tokens, persistent=False)  # (n_items + 1, levels)
        self.config = T5Config(
            vocab_size=self.offsets[-1] + self.trie.sizes[-1], d_model=cfg.dim,
            d_kv=cfg.d_kv or 64, d_ff=cfg.ffn_dim or 4 * cfg.dim, num_layers=cfg.layers,
            num_decoder_layers=cfg.layers, num_heads=cfg.heads, dropout_rate=cfg.dropout,
            feed_forward_proj="relu", pad_token_id=PAD, decoder_start_token_id=START,
            eos_token_id=None, is_encoder_decoder=True)
        self.t5 = T5ForConditionalGeneration(self.config)  # random init, nothing downloaded
        self.fusion = fusion
        self.lam, self.temperature = cfg.lam, cfg.temperature

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, seq: torch.Tensor, reasoning: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encoder states (B, T, d) of the histories' SID tokens (fused with the reasoning
        where a row has any), their mask (B, T), and z_K and the fused-rows mask."""
        tokens = self.item_tokens[seq].flatten(1)
        mask = tokens != PAD
        start = int(mask.any(0).long().argmax())  # left padding: drop all-padding columns
        tokens, mask = tokens[:, start:], mask[:, start:]
        h = self.t5.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.fusion is None:
            return h, mask, None, None
        if reasoning is None:
            raise ValueError("this model fuses reasoning: the batch needs its steps")
        fused, z_last = self.fusion(h, reasoning)
        # all-zero steps (`export cache --missing skip`, or a shorter training prefix): the
        # row keeps its plain states and stays out of InfoNCE, as in train.model
        has = reasoning.flatten(1).abs().amax(1) > 0
        return torch.where(has[:, None, None], fused, h), mask, z_last[has], has

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """An item's vector for InfoNCE: the mean of its SID tokens' embeddings in the shared
        (encoder, decoder and output) table. TIGER has no item-ID embedding; these tokens are
        what the decoder must emit, so pulling z_K toward them aligns the reasoning with the
        target's codes. Mean and sum are the same under eq. 6's cosine."""
        return self.t5.shared(self.item_tokens[items]).mean(-2)

    # -- training --------------------------------------------------------------------------
    def losses(self, seq: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
               reasoning: torch.Tensor | None = None, time: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Cross-entropy of the target's SID tokens (teacher forcing), plus lambda * InfoNCE
        when fusing. `labels` is unused: sliding prefixes come from `training_split`."""
        h, mask, z_last, has = self.encode(seq, reasoning)
        want = self.item_tokens[target]  # (B, levels)
        start = torch.full_like(want[:, :1], START)
        logits = self.t5(encoder_outputs=(h,), attention_mask=mask.long(),
                         decoder_input_ids=torch.cat([start, want[:, :-1]], 1)).logits
        rec = F.cross_entropy(logits.float().flatten(0, 1), want.flatten())
        out = {"rec": rec, "loss": rec}
        if (z_last is not None and has is not None and len(z_last)
                and "contrastive" not in self.fusion.ablate):
            nce = info_nce(z_last.float(), self.item_vectors(target[has]).float(), target[has],
                           self.temperature)
            out["nce"] = nce
            out["loss"] = rec + self.lam * nce
        return out

    def training_split(self, split: Split, reasoning_rows: np.ndarray | None = None) -> Split:
        """One example per next item of every training row (module docstring)."""
        return prefix_split(split, reasoning_rows)

    # -- ranking ---------------------------------------------------------------------------
    @torch.no_grad()
    def ranked(self, seq: torch.Tensor, reasoning: torch.Tensor | None, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k beams as (items (B, k) best first, summed log-probabilities (B, k));
        item 0 / -inf where the catalogue has fewer than k SIDs."""
        step = max(1, BEAM_ROWS // k)
        parts = [self._beam_search(seq[i:i + step],
                                   None if reasoning is None else reasoning[i:i + step], k)
                 for i in range(0, len(seq), step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _beam_search(self, seq: torch.Tensor, reasoning: torch.Tensor | None, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Level by level, every beam's whole SID prefix (at most `levels` tokens) is decoded
        again, all beams of a row in one decoder sequence: beam j is the j-th block of
        `level + 1` tokens, causal within its block and blind to the others (`_beam_mask`).
        T5's decoder position bias depends only on the distance between two positions, which
        within a block is the distance inside the beam's own prefix, so each beam's logits
        are those of decoding it alone. The encoder states stay one per row: the beams of a
        row share their cross-attention keys and values (projected once, at the first level,
        and kept in `cross`) instead of copying them per beam; the self-attention cache is a
        fresh one per level, its prefixes being recomputed."""
        from transformers import DynamicCache, EncoderDecoderCache

        h, mask, _, _ = self.encode(seq, reasoning)
        b, dev = len(seq), seq.device
        score = torch.zeros(b, 1, device=dev)  # one beam: the empty prefix
        prefix = torch.zeros(b, 1, dtype=torch.long, device=dev)
        dec = torch.full((b, 1, 1), START, dtype=torch.long, device=dev)  # (rows, beams, tokens)
        cross = DynamicCache()  # the encoder states' keys and values, one per row
        for lvl in range(self.levels):
            nb, n = dec.shape[1], dec.shape[2]
            logits = self.t5(encoder_outputs=(h,), attention_mask=mask.long(),
                             decoder_input_ids=dec.flatten(1),
                             decoder_attention_mask=_beam_mask(nb, n, h.dtype, dev),
                             cache=EncoderDecoderCache(DynamicCache(), cross),
                             use_cache=True).logits
            size, lo = self.trie.sizes[lvl], self.offsets[lvl]
            logp = logits.view(b, nb, n, -1)[:, :, -1].float().log_softmax(-1)[..., lo:lo + size]
            cand = (score[:, :, None] + logp).masked_fill(~self.trie.allowed(lvl)[prefix],
                                                          float("-inf"))
            score, idx = cand.flatten(1).topk(min(k, nb * size), dim=1)
            beam, code = idx // size, idx % size
            prefix = self.trie.child(lvl)[prefix.gather(1, beam), code]
            prefix = prefix.masked_fill(score == float("-inf"), 0)
            # each new beam is its parent's tokens plus its code
            dec = torch.cat([dec.gather(1, beam[:, :, None].expand(-1, -1, n)),
                             (code + lo)[:, :, None]], 2)
        items = prefix.masked_fill(score == float("-inf"), 0)
        if items.shape[1] < k:  # fewer SIDs in the catalogue than beams asked for
            pad = k - items.shape[1]
            items = F.pad(items, (0, pad), value=0)
            score = F.pad(score, (0, pad), value=float("-inf"))
        return items, score


def _beam_mask(beams: int, tokens: int, dtype: torch.dtype, device: torch.device
               ) -> torch.Tensor:
    """Additive decoder self-attention mask (1, 1, beams * tokens, beams * tokens) for
    `beams` blocks of `tokens` positions: 0 where a position may attend (its own block, at
    or before itself), the dtype's minimum elsewhere, as transformers builds its masks."""
    pos = torch.arange(beams * tokens, device=device)
    see = (pos[:, None] // tokens == pos[None, :] // tokens) & (pos[:, None] >= pos[None, :])
    return torch.zeros(see.shape, dtype=dtype, device=device).masked_fill(
        ~see, torch.finfo(dtype).min)[None, None]


# -- sliding-prefix training examples --------------------------------------------------------
class _Prefixes:
    """(N, L) view of a split's histories: example i is row `row[i]` cut after position
    `end[i]` and left-padded again; read per batch, never materialised."""

    def __init__(self, seq: np.ndarray, row: np.ndarray, end: np.ndarray):
        self.seq, self.row, self.end = seq, row, end
        self.shape = (len(row), seq.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        hist = np.asarray(self.seq[self.row[idx]])
        cols = np.arange(hist.shape[1]) - (hist.shape[1] - 1 - self.end[idx])[:, None]
        out = np.take_along_axis(hist, np.clip(cols, 0, None), axis=1)
        out[cols < 0] = 0
        return out


class _OwnRowOnly:
    """(N, ...) view of a reasoning array: the row's reasoning (of row `perm[row]` under
    the shuffled-steps control) for the example that is the row itself, zeros for the
    shorter prefixes, whose targets the chain has seen."""

    def __init__(self, source: np.ndarray, row: np.ndarray, own: np.ndarray,
                 perm: np.ndarray | None):
        self.source, self.row, self.own, self.perm = source, row, own, perm
        self.shape = (len(row), *source.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        out = np.zeros((len(idx), *self.source.shape[1:]), dtype=np.float32)
        own = self.own[idx]
        src = self.row[idx][own]
        if self.perm is not None:
            src = self.perm[src]
        order = np.argsort(src)  # memmapped reads in increasing order
        picked = np.empty((len(src), *self.source.shape[1:]), dtype=np.float32)
        picked[order] = np.asarray(self.source[src[order]], dtype=np.float32)
        out[own] = picked
        return out


def prefix_split(split: Split, reasoning_rows: np.ndarray | None = None) -> Split:
    """A split with one example per history item t of every row: (history up to t -> the
    item after t), the item after the last one being the row's target. No example's
    target is at or before its own last input position. `reasoning_rows` is the loop's
    shuffled-steps permutation of the original rows."""
    seq = np.asarray(split.seq)
    row, end = np.nonzero(seq > 0)  # row-major: each row's examples together, row order kept
    first = (seq > 0).argmax(1)  # histories are left-padded
    length = seq.shape[1]
    own = end == length - 1
    nxt = np.where(own, 0, end + 1).clip(max=length - 1)
    target = np.where(own, np.asarray(split.target)[row], seq[row, nxt]).astype(np.int32)

    def view(a: np.ndarray | None) -> _OwnRowOnly | None:
        return None if a is None else _OwnRowOnly(a, row, own, reasoning_rows)
    return replace(split, seq=_Prefixes(seq, row, end), target=target,  # type: ignore[arg-type]
                   steps=view(split.steps), chain=view(split.chain), time=None, older=None,
                   lengths=end - first[row] + 1)  # length-bucketed batches
