"""λ-GRPO: a single-file reference implementation.

M. Sullivan and A. Koller, "GRPO is Secretly a Process Reward Model", arXiv:2509.21154 (ICML 2026).
(Not arXiv:2510.06870, an unrelated method that is also called λ-GRPO.)

Read top to bottom, in the paper's order:
  1. GRPO           outcome advantages, token log-probs, the loss of eq. (2) and its update
  2. Process sets   the prefix trie hidden in every group
  3. Step rewards   the implicit process reward model, Theorem 1
  4. λ-GRPO         divide each token's term by the size of its process set
  5. Checks         the explicit trie, Figure 1 and Theorem 1 (`python lgrpo.py verify`)
  6. The toy        the binary tree of Table 1, the simplest full loop (`python lgrpo.py`)
  7. An LLM         Table 2's setup on one GPU (`python lgrpo.py train`)
  8. TRL            the same loss inside TRL's GRPOTrainer (`LambdaGRPOTrainer`)
Then an appendix of plumbing, not needed to understand λ-GRPO.

Shapes: B completions in groups of G consecutive rows (rows g·G … g·G+G−1 answer prompt g), T
completion positions. Completions are right-padded; `completion_mask` is 1 on real tokens,
including the terminating EOS, and is the only source of truth about padding."""

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import numbers
import os
import random
import re
import shutil
import sys
import textwrap
import threading
import time
import warnings

import torch
import torch.nn.functional as F


class InputError(ValueError):
    """A mistake in what the user passed (data, reward, run folder). The command line prints it
    as one line, `lgrpo: error: ...`, and exits 2; any other exception keeps its traceback."""


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 1. GRPO: a group of completions, outcome advantages, token log-probs, the loss of eq. (2)
# ──────────────────────────────────────────────────────────────────────────────────────────────


@torch.no_grad()
def sample_completions(model, prompt_ids, prompt_mask, group_size, batch_size=None,
                       pad_token_id=0, do_sample=True, **generate_kwargs):
    """G = `group_size` completions from π_old per (left-padded) prompt: [P·G, T], right-padded,
    rows g·G … g·G+G−1 for prompt g; at most `batch_size` rows per `generate` call."""
    ids = prompt_ids.repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    step = batch_size or ids.shape[0]
    chunks = [model.generate(input_ids=ids[s:s + step], attention_mask=mask[s:s + step],
                             pad_token_id=pad_token_id, do_sample=do_sample,
                             **generate_kwargs)[:, ids.shape[1]:]
              for s in range(0, ids.shape[0], step)]
    width = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])


def completion_mask(completion_ids, eos_token_ids, stop_lengths=None):
    """(mask, truncated): 1 up to and including each row's first EOS (or where a stopping rule
    ended it, `stop_lengths`, > T where none did), 0 after; rows that ended with neither.

    Read from the first EOS, never from `!= pad_token_id`: with pad = eos that would drop the real
    EOS from the loss, and the model would never learn to stop."""
    eos = torch.tensor(sorted(eos_token_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos)
    mask = (is_eos.cumsum(1) - is_eos.long()) == 0  # no EOS strictly before t
    finished = is_eos.any(1)
    if stop_lengths is not None:
        positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
        mask = mask & (positions < stop_lengths[:, None])
        finished = finished | (stop_lengths <= completion_ids.shape[1])
    return mask.long(), ~finished


def group_advantages(rewards, group_size, eps=1e-4):
    """Outcome advantages a_i = (r_i − mean(r)) / (std(r) + ε) within each group.

    The sample (n−1) std, as in the paper's worked example. A group whose rewards are all equal
    carries no signal: its advantages are exactly 0, never 0/0. Computed in float64 (a float32
    sum of rewards near 3e38 overflows), returned in the rewards' dtype."""
    r = check_rewards(rewards)
    check_group(len(r), group_size)
    dtype, r = r.dtype, r.double().view(-1, group_size)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    flat = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(flat, torch.zeros_like(a), a).view(-1).to(dtype)


def logprobs_of(logits, targets, temperature):
    """log softmax(logits / temperature)[target] as logit − logsumexp: no [..., V] tensor kept."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model, input_ids, attention_mask, completion_start, temperature=1.0,
                   chunk_tokens=1 << 24):
    """log π(y_t | q, y_<t) of the completion tokens `completion_start:`: P and D of eq. (2).

    π is softmax(logits / temperature), the distribution the tokens were sampled from (as in
    TRL). Positions come from the attention mask (prompts are left-padded), as in generate().
    Only the completion's logits are computed, turned into log-probs in chunks of about
    `chunk_tokens` logits; bf16/fp16 chunks are recomputed in the backward pass, so no float32
    copy of [B, T, V] is ever kept."""
    B, T = input_ids.shape[0], input_ids.shape[1] - completion_start
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits  # predictions for y_0 … y_T
    targets = input_ids[:, completion_start:]
    step = max(1, chunk_tokens // (B * logits.shape[-1]))
    # One split (the last position predicts past the end and is dropped): its backward builds a
    # single gradient, where slicing would allocate one per chunk.
    chunks = logits.split([min(step, T - s) for s in range(0, T, step)] + [1], dim=1)[:-1]
    out = []
    for chunk, target in zip(chunks, targets.split(step, dim=1)):
        if chunk.requires_grad and chunk.dtype not in (torch.float32, torch.float64):
            out.append(torch.utils.checkpoint.checkpoint(logprobs_of, chunk, target, temperature,
                                                         use_reentrant=False))
        else:
            out.append(logprobs_of(chunk, target, temperature))
    return torch.cat(out, 1) if out else logits.new_zeros(B, 0, dtype=torch.float32)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, weights=None, clip_eps=0.2, beta=0.0,
                aggregation="token"):
    """Minus the GRPO objective of eq. (2), with optional per-token weights (λ-GRPO, section 4).

    Per token: −min(P·A, clip(P, 1−ε, 1+ε)·A) + β·(exp(ref − logp) − (ref − logp) − 1), with
    P = exp(logp − old_logp), the whole term multiplied by `weights` when given. `advantages` is
    [B] (outcome a_i) or [B, T] (step advantages A_{i,t}). "token" aggregation (the paper's,
    DAPO's): the sum over all real tokens of the batch divided by their number. "sequence": the
    mean over each completion, then over completions. With old_logp = logp.detach(), P is 1 in
    value and clipping never acts (μ = 1)."""
    if not logp.shape == old_logp.shape == mask.shape or (
            weights is not None and weights.shape != logp.shape):
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp, mask and weights must all be "
                         "one [B, T] shape.")
    A = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if beta:
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1)  # k3 estimator of KL(π_θ ‖ π_ref)
    if weights is not None:
        loss = loss * weights
    m = binary_mask(mask).to(loss.dtype)
    if aggregation == "token":
        return (loss * m).sum() / m.sum().clamp(min=1)
    if aggregation == "sequence":
        return ((loss * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    raise ValueError(f"aggregation must be 'token' or 'sequence', not {aggregation!r}.")


def grpo_update(model, optimizer, input_ids, attention_mask, completion_start, completion_mask,
                advantages, weights=None, old_logp=None, ref_logp=None, updates_per_batch=1,
                micro_batch_size=None, clip_eps=0.2, beta=0.0, aggregation="token",
                max_grad_norm=1.0, temperature=1.0):
    """μ = `updates_per_batch` optimizer steps on one batch of groups, minimizing eq. (2).

    λ-GRPO when `weights` are `lambda_weights`, GRPO when None. Each micro-batch's loss is scaled
    by its share of the batch's normalizer (tokens, or rows for "sequence"), so accumulation
    gives exactly the full-batch gradient. `old_logp` (needed when μ > 1) and `ref_logp` (β > 0)
    are scored at `temperature`, like logp. Returns tensors: loss and clipped share averaged over
    the μ updates, KL(π_old ‖ π_ref), the gradient norm. Raises FloatingPointError, without
    stepping, on a non-finite loss or gradient norm."""
    B, mb = input_ids.shape[0], micro_batch_size or input_ids.shape[0]
    completion_mask = binary_mask(completion_mask)  # once: boolean slices need no check
    n_tokens = completion_mask.sum().clamp(min=1)
    norm = n_tokens if aggregation == "token" else B
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
    for update in range(updates_per_batch):
        for s in range(0, B, mb):
            rows, mask = slice(s, s + mb), completion_mask[s:s + mb]
            logp = token_logprobs(model, input_ids[rows], attention_mask[rows],
                                  completion_start=completion_start, temperature=temperature)
            old = logp.detach() if old_logp is None else old_logp[rows]
            ref = None if ref_logp is None else ref_logp[rows]
            loss = policy_loss(logp, old, ref, advantages=advantages[rows], mask=mask,
                               weights=None if weights is None else weights[rows],
                               clip_eps=clip_eps, beta=beta, aggregation=aggregation)
            size = mask.sum() if aggregation == "token" else mask.shape[0]
            share = torch.as_tensor(size, dtype=loss.dtype) / norm  # int / int would be float32
            (loss * share).backward()
            with torch.no_grad():  # statistics stay tensors: no host sync inside the loop
                A = advantages[rows][:, None] if advantages.dim() == 1 else advantages[rows]
                ratio = torch.exp(logp.detach() - old)
                clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))
                stats["loss"] += loss.detach() * share / updates_per_batch
                stats["clip_frac"] += (clipped & mask).sum() / n_tokens / updates_per_batch
                if ref is not None and update == 0:  # KL(π_old ‖ π_ref) on π_old's samples
                    d = (ref - logp.detach())[mask]
                    stats["kl"] += (torch.exp(d) - d - 1).sum() / n_tokens
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if not torch.isfinite(stats["grad_norm"] + stats["loss"]):  # one NaN step ruins the model
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"update {update + 1} of {updates_per_batch}: loss "
                                     f"{float(stats['loss'])}, gradient norm "
                                     f"{float(stats['grad_norm'])}; the step was not taken.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 2. Process sets: the prefix trie hidden in every group
# ──────────────────────────────────────────────────────────────────────────────────────────────
#
# A process set λ is a set of completions that share a prefix. In the group's prefix trie each
# node is one process step: a maximal run of tokens on which exactly the members of λ agree.
# λ^(i,t) = {k : y^(k)[:t+1] = y^(i)[:t+1]}; identical completions are separate members. These
# functions never build the trie; `build_trie` (section 5) does, the slow obvious way.


def shared_prefix_lengths(completion_ids, completion_mask, group_size):
    """lcp[g, i, k]: the number of leading tokens completions i and k of group g share, so that
    k ∈ λ^(i,t) exactly when lcp > t. One [B/G, G, G, T] boolean tensor, no loop over tokens."""
    mask = check_completions(completion_ids, completion_mask, group_size)
    shape = (-1, group_size, completion_ids.shape[1])
    ids, mask = completion_ids.view(shape), mask.view(shape)
    differ = (ids[:, :, None] != ids[:, None]) | ~mask[:, :, None] | ~mask[:, None]
    differ = F.pad(differ, (0, 1), value=True)  # a sentinel: every pair differs somewhere
    return differ.view(torch.uint8).argmax(-1)  # argmax returns the first maximum


def process_set_sums(lcp, values, T):
    """Σ_{k ∈ λ^(i,t)} values_k for every (g, i, t): the total minus a running sum over a
    histogram of the lcp values, never a [G, G, T] float tensor."""
    by_lcp = torch.zeros(*lcp.shape[:2], T + 1, dtype=values.dtype, device=lcp.device)
    by_lcp.scatter_add_(2, lcp, values[:, None, :].expand_as(lcp))
    return values.sum(1)[:, None, None] - by_lcp.cumsum(2)[..., :T]


def process_set_sizes(completion_ids, completion_mask, group_size):
    """|λ^(i,t)|, the size of the process set of token t of completion i; 0 on padding."""
    lcp = shared_prefix_lengths(completion_ids, completion_mask, group_size)
    ones = torch.ones(lcp.shape[:2], dtype=torch.long, device=lcp.device)
    return process_set_sums(lcp, ones, completion_ids.shape[1]).view(completion_ids.shape)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 3. Step rewards and Theorem 1: the process reward model hidden in GRPO
# ──────────────────────────────────────────────────────────────────────────────────────────────
#
# R̂(λ), the mean outcome reward of λ's members, is a Monte-Carlo step reward, and
# A_{i,t} = (R̂(λ^(i,t)) − mean r) / std r a step advantage. With A_{i,t} in place of a_i, eq. (2)
# becomes L_PRM. Theorem 1: with token aggregation and μ = 1, L_GRPO = L_PRM in value and
# gradient, because a token's ratio and KL depend only on its prefix, the same for every member
# of its process set, and the members' a_k add up to |λ| times their mean. Section 5 checks it.


def step_advantages(completion_ids, completion_mask, rewards, group_size, eps=1e-4):
    """A_{i,t} = (R̂(λ^(i,t)) − mean r) / (std r + ε), computed as the mean of the members'
    outcome advantages a_k (the normalization is affine); 0 on padding."""
    check_rewards(rewards, len(completion_ids))
    a = group_advantages(rewards, group_size, eps).view(-1, group_size)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    lcp = shared_prefix_lengths(completion_ids, completion_mask, group_size)
    T = completion_ids.shape[1]
    summed = process_set_sums(lcp, a, T).view(completion_ids.shape)
    sizes = process_set_sums(lcp, torch.ones_like(a), T).view(completion_ids.shape)
    return torch.where(sizes > 0, summed / sizes.clamp(min=1), 0)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 4. λ-GRPO: each process step counted once
# ──────────────────────────────────────────────────────────────────────────────────────────────
#
# In eq. (2) a step shared by |λ| completions is pushed |λ| times: a shared prefix that averages
# below the group mean is pushed down once per member, even when it leads to the best
# completion. λ-GRPO divides each token's whole term (KL included) by |λ^(i,t)| and keeps the
# normalizer 1 / Σ len.


def lambda_weights(completion_ids, completion_mask, group_size, dtype=torch.float32):
    """1 / |λ^(i,t)| on real tokens, 0 on padding: the whole change from GRPO to λ-GRPO,
    L_λ-GRPO = 1/Σ len · Σ_i Σ_t (P_{i,t}·a_i − D_{i,t}) / |λ^(i,t)|."""
    sizes = process_set_sizes(completion_ids, completion_mask, group_size)
    return torch.where(sizes > 0, 1 / sizes.clamp(min=1).to(dtype), 0)


# The library's only input checks: each stops a silently wrong number.


def check_group(rows, group_size):
    if rows % group_size:
        raise ValueError(f"{rows} completions do not split into groups of {group_size}: pass "
                         "prompts × group_size rows, group by group.")


def check_rewards(rewards, rows=None):
    """The rewards as a 1-D floating tensor of finite numbers, `rows` of them when given."""
    if not torch.is_tensor(rewards):
        rewards = torch.tensor(rewards, dtype=torch.float64)  # Python floats are doubles
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.dim() != 1 or rows is not None and len(rewards) != rows:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)}: give one number per "
                         f"completion ({rows if rows is not None else 'B'}).")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards of rows {bad} are NaN or infinite: a reward must be finite.")
    return rewards


def check_completions(completion_ids, completion_mask, group_size):
    """The mask as booleans, after checking shapes, groups and right padding."""
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B, T].")
    check_group(len(completion_ids), group_size)
    mask = binary_mask(completion_mask)
    gaps = (mask[:, 1:] & ~mask[:, :-1]).any(1)
    if gaps.any():
        raise ValueError(f"completion_mask rows {gaps.nonzero().flatten().tolist()} have a 1 "
                         "after a 0: right-pad completions (left-pad the prompt).")
    return mask


def binary_mask(mask):
    """The mask as booleans, after checking it holds only 0 and 1 (a 2 would count a token
    twice). Boolean masks need no check and cost no host sync."""
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"mask values {sorted(set(mask.unique().tolist()) - {0, 1})}: a mask "
                         "holds only 0 and 1.")
    return mask.bool()


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 5. The numerical checks: the explicit trie, Figure 1 and Theorem 1 (`python lgrpo.py verify`)
# ──────────────────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class TrieNode:
    """One process step: the tokens [start, end) on which exactly `members` agree, with the
    step reward R̂(λ) (the members' mean outcome reward) and the step advantage A."""
    tokens: list
    start: int
    end: int
    members: list
    reward: float = 0.0
    advantage: float = 0.0
    children: list = dataclasses.field(default_factory=list)

    @property
    def size(self):
        return len(self.members)


def build_trie(completions, rewards, eps=1e-4):
    """The prefix trie of one group (section 2) from token lists, the slow obvious way. The root
    is the shared prompt, not a step."""
    # A 0-d tensor hashes by identity: read tensor tokens by value.
    seqs = [[t.item() if torch.is_tensor(t) else t for t in c] for c in completions]
    rewards = check_rewards(rewards, len(seqs)).double()
    advantages = group_advantages(rewards, len(seqs), eps)

    def grow(node):
        while node is not root:  # extend while every member continues with the same token
            nxt = {seqs[k][node.end] if node.end < len(seqs[k]) else None for k in node.members}
            if len(nxt) != 1 or None in nxt:
                break
            node.tokens.append(nxt.pop())
            node.end += 1
        node.reward = rewards[node.members].mean().item()
        node.advantage = advantages[node.members].mean().item()
        branches = {}
        for k in node.members:
            if node.end < len(seqs[k]):
                branches.setdefault(seqs[k][node.end], []).append(k)
        node.children = [grow(TrieNode([], node.end, node.end, ks)) for ks in branches.values()]
        return node

    root = TrieNode([], 0, 0, list(range(len(seqs))))
    return grow(root)


def trie_steps(root):
    """All process steps (the nodes below the root), depth first."""
    for child in root.children:
        yield child
        yield from trie_steps(child)


def format_trie(root, show=str, depth=0):
    """The trie as an indented tree, one step per line, like Figure 1; `show` prints a token."""
    lines = []
    for child in root.children:
        label = " ".join(map(show, child.tokens))
        lines.append(f"{'    ' * depth}{label:<12}  |λ|={child.size}  R̂={child.reward:.4f}  "
                     f"A={child.advantage:+.4f}  members={child.members}")
        lines += [line for line in [format_trie(child, show, depth + 1)] if line]
    return "\n".join(lines)


# The paper's Figure 1: six completions, letters as tokens, their outcome rewards, and the step
# table as the paper prints it (members numbered from 1).
FIGURE1_COMPLETIONS = ["A B C D", "A B E F H I", "J K L M", "J K L N Q S T", "J K L N Q U",
                       "V W Y Z"]
FIGURE1_REWARDS = [0.5, 0.5, 1.0, 0.0, 0.0, 0.5]
FIGURE1_ADVANTAGES = [0.2214, 0.2214, 1.5498, -1.1070, -1.1070, 0.2214]
FIGURE1_STEPS = [  # (tokens, members, |λ|, R̂, A)
    ("A B", [1, 2], 2, 0.5, 0.2214), ("C D", [1], 1, 0.5, 0.2214),
    ("E F H I", [2], 1, 0.5, 0.2214), ("J K L", [3, 4, 5], 3, 0.3333, -0.2214),
    ("M", [3], 1, 1.0, 1.5498), ("N Q", [4, 5], 2, 0.0, -1.1070), ("S T", [4], 1, 0.0, -1.1070),
    ("U", [5], 1, 0.0, -1.1070), ("V W Y Z", [6], 1, 0.5, 0.2214)]

# The Theorem 1 group: shared prefixes (1 2, 6 6 2), unequal lengths, a duplicate (rows 0 and 2)
# and a completion that is a prefix of another (row 3 of row 4).
THEOREM_GROUP = [[1, 2, 3, 4], [1, 2, 5, 6, 7, 3], [1, 2, 3, 4], [6, 6, 2], [6, 6, 2, 5, 1], [3, 1]]
THEOREM_REWARDS = [1.0, 0.0, 1.0, 0.0, 0.5, 1.0]


def pad_completions(completions, pad_id=0):
    """Token lists → right-padded `completion_ids` and `completion_mask`."""
    T = max(map(len, completions), default=0)
    ids = [list(c) + [pad_id] * (T - len(c)) for c in completions]
    mask = [[1] * len(c) + [0] * (T - len(c)) for c in completions]
    return (torch.tensor(ids, dtype=torch.long).view(len(ids), T),
            torch.tensor(mask, dtype=torch.long).view(len(ids), T))


@dataclasses.dataclass
class Check:
    """One numerical check: what was measured, whether it passed, the bound, why it holds."""
    name: str
    measured: float
    passed: bool
    bound: str
    why: str = ""


def at_most(name, measured, tol, why=""):
    return Check(name, measured, measured <= tol, f"≤ {tol:g}", why)


def figure1_checks():
    """The paper's worked example (Figure 1): every number of both tables to 4 decimals, with
    ε = 0 as the paper computes it."""
    completions = [c.split() for c in FIGURE1_COMPLETIONS]
    rewards = torch.tensor(FIGURE1_REWARDS, dtype=torch.float64)
    a = group_advantages(rewards, 6, eps=0)
    moments = max(abs(rewards.mean().item() - 0.416667), abs(rewards.std().item() - 0.376386))
    steps = list(trie_steps(build_trie(completions, rewards, eps=0)))
    same = [(" ".join(n.tokens), [k + 1 for k in n.members], n.size) for n in steps] == \
        [row[:3] for row in FIGURE1_STEPS]
    diff = max(max(abs(n.reward - row[3]), abs(n.advantage - row[4]))
               for n, row in zip(steps, FIGURE1_STEPS)) if same else math.inf
    # The vectorized functions must agree with the explicit trie on every token.
    vocab = {t: i for i, t in enumerate(sorted({t for c in completions for t in c}))}
    ids, mask = pad_completions([[vocab[t] for t in c] for c in completions])
    sizes, A = process_set_sizes(ids, mask, 6), step_advantages(ids, mask, rewards, 6, eps=0)
    disagree = max(max(abs(sizes[k, t].item() - n.size), abs(A[k, t].item() - n.advantage))
                   for n in steps for k in n.members for t in range(n.start, n.end))
    # GRPO's summed push on each token of J K L is Σ_members a_k; λ-GRPO's divides it by |λ|.
    jkl = next(n for n in steps if n.tokens == ["J", "K", "L"])
    grpo_push = a[jkl.members].sum().item()
    lambda_push = grpo_push / jkl.size
    return [at_most("Figure 1: mean(r) = 0.416667, sample std = 0.376386", moments, 5e-7),
            at_most("Figure 1: outcome advantages a_i",
                    (a - torch.tensor(FIGURE1_ADVANTAGES)).abs().max().item(), 5e-5),
            at_most("Figure 1: the 9 process steps, members, |λ|, R̂ and A", diff, 5e-5),
            at_most("Figure 1: process_set_sizes and step_advantages agree with the trie",
                    disagree, 1e-12),
            at_most(f"Figure 1: push on J K L, GRPO {grpo_push:+.4f} (paper −0.6642), "
                    f"λ-GRPO {lambda_push:+.4f} (paper −0.2214)",
                    max(abs(grpo_push + 0.6642), abs(lambda_push + 0.2214)), 5e-5,
                    "J K L M is the best completion, yet GRPO pushes its prefix down 3×")]


def steps_counted_once(logp, old, ref_logp, mask, rewards, beta):
    """λ-GRPO read off the explicit trie: each process step once, with its step advantage, its
    terms taken from one member (they depend on the prefix only)."""
    total = 0.0
    for node in trie_steps(build_trie(THEOREM_GROUP, rewards)):
        i, s, e = node.members[0], node.start, node.end
        step_adv = torch.tensor([node.advantage], dtype=torch.float64)
        total = total + (e - s) * policy_loss(logp[i:i + 1, s:e], old[i:i + 1, s:e],
                                              ref_logp[i:i + 1, s:e], advantages=step_adv,
                                              mask=mask[i:i + 1, s:e], beta=beta)
    return total / mask.sum()


def compare(name, score, f, g, params, equal, tol, why="", old_logp=None):
    """Value and gradient of two objectives f(logp, old_logp) and g on the same log-probs: equal
    within `tol`, or (equal=False) different by more than 1e-6."""
    results = []
    for loss in (f, g):
        logp = score()
        value = loss(logp, logp.detach() if old_logp is None else old_logp)
        results.append((value.detach(), torch.autograd.grad(value, params)))
    (v1, g1), (v2, g2) = results
    dv, dg = (v1 - v2).abs().item(), max((x - y).abs().max().item() for x, y in zip(g1, g2))
    if not equal:
        return [Check(f"{name}: value", dv, dv > 1e-6, "> 1e-6: equality breaks", why)]
    return [at_most(f"{name}: value", dv, tol, why),
            at_most(f"{name}: gradient of all {len(params)} parameter tensors", dg, tol)]


def theorem1_checks(beta=0.04, tol=1e-10):
    """Theorem 1 and λ-GRPO's "each step once", in value and gradient, on a tiny float64 GPT-2
    (dropout off), a second one as the KL reference; and two counterexamples showing that both
    assumptions (token aggregation, μ = 1) are needed."""
    ids, mask = pad_completions(THEOREM_GROUP)
    rewards = torch.tensor(THEOREM_REWARDS, dtype=torch.float64)
    policy, reference = (tiny_gpt2(8, seed=s, dtype=torch.float64) for s in (0, 1))
    prompt = torch.full((6, 2), 7)
    inputs, attention = torch.cat([prompt, ids], 1), torch.cat([torch.ones_like(prompt), mask], 1)

    def scorer(model):
        return functools.partial(token_logprobs, model, inputs, attention, completion_start=2)

    with torch.no_grad():
        ref_logp = scorer(reference)()
    a, A = group_advantages(rewards, 6), step_advantages(ids, mask, rewards, 6)
    w = lambda_weights(ids, mask, 6, dtype=torch.float64)

    def objective(advantages, **kw):
        return functools.partial(policy_loss, ref_logp=ref_logp, advantages=advantages,
                                 mask=mask, beta=beta, **kw)

    moved = copy.deepcopy(policy)  # μ > 1: after an update within the batch, π_θ ≠ π_old
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        old_logp = scorer(policy)()
        ratio = torch.exp(scorer(moved)() - old_logp)[mask.bool()]
    clipped = ((ratio < 0.8) | (ratio > 1.2)).double().mean().item()
    base = dict(score=scorer(policy), params=list(policy.parameters()), tol=tol)
    after = dict(score=scorer(moved), params=list(moved.parameters()), tol=tol, old_logp=old_logp)
    return (compare("Theorem 1: L_GRPO (outcome a_i) = L_PRM (step A_i,t)", f=objective(a),
                    g=objective(A), equal=True, **base,
                    why="P and D depend on the prefix only, so a step's members sum to |λ|·A")
            + compare("λ-GRPO (weights 1/|λ|) = each process step counted once",
                      f=objective(a, weights=w), equal=True, **base,
                      g=functools.partial(steps_counted_once, ref_logp=ref_logp, mask=mask,
                                          rewards=rewards, beta=beta),
                      why="the |λ| members of a step together push it once")
            + compare("Counterexample: 'sequence' aggregation, unequal lengths",
                      f=objective(a, aggregation="sequence"), equal=False, **base,
                      g=objective(A, aggregation="sequence"),
                      why="a step's members are divided by their own lengths, so their a_k no "
                          "longer share one coefficient")
            + compare(f"Counterexample: μ > 1, clipping active on {clipped:.0%} of tokens",
                      f=objective(a), g=objective(A), equal=False, **after,
                      why="min(P·a, clip(P)·a) depends on each a_k's sign: not linear in a")
            + compare("μ > 1 without clipping (ε = ∞): the equality still holds",
                      f=objective(a, clip_eps=math.inf), g=objective(A, clip_eps=math.inf),
                      equal=True, **after, why="P ≠ 1 is harmless: it depends on the prefix"))


def verify():
    """Run every check, print a report, return the number of failures."""
    print("The worked example (Figure 1) as a trie:\n")
    completions = [c.split() for c in FIGURE1_COMPLETIONS]
    print(format_trie(build_trie(completions, FIGURE1_REWARDS, eps=0)), "\n")
    checks = figure1_checks() + theorem1_checks()
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}\n"
              f"      measured {c.measured:.3e}  (expected {c.bound})")
        if c.why:
            print(f"      why: {c.why}")
    failures = sum(not c.passed for c in checks)
    print(f"\n{len(checks) - failures} passed, {failures} failed")
    return failures


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 6. The toy: a depth-4 binary tree (Table 1; `python lgrpo.py`)
# ──────────────────────────────────────────────────────────────────────────────────────────────
#
# The simplest full loop: sample a group, score it, compute advantages (and λ weights), update.
# The LLM loop of section 7 runs the same functions, `grpo_update` included.

TOY_DEPTH = 4
TOY_CLASSES = ("T", "0.7", "trap")  # the kinds of path, in the order of path_classes


def path_classes(paths, target, n):
    """0 for the target path T, 2 for a trap (shares T's first n tokens but is not T), 1 for
    every other path (Table 1)."""
    hit = (paths == target).all(1)
    trap = (paths[:, :n] == target[:n]).all(1) & ~hit
    return torch.where(hit, 0, torch.where(trap, 2, 1))


def tree_rewards(paths, target, n, r_neg):
    """The toy's outcome reward (Table 1): 1.0 for T, r_neg for a trap (so T's own prefix looks
    bad on average), 0.7 for every other path."""
    return torch.tensor([1.0, 0.7, r_neg], device=paths.device)[path_classes(paths, target, n)]


class AllowTokens:
    """Logits processor: sample only the given tokens (the toy's L and R)."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def __call__(self, input_ids, scores):
        keep = torch.full_like(scores, -math.inf)
        keep[:, self.token_ids] = 0
        return scores + keep


def toy_policy(name_or_path, seed, device="cpu"):
    """(model, start token, [L, R] token ids): a random-init 1-layer GPT-2 over {<s>, L, R}, or a
    pretrained causal LM whose tokens "L" and "R" are the two actions (the paper: GPT-2 small)."""
    if name_or_path is None:
        model = tiny_gpt2(vocab_size=3, n_layer=1, n_embd=64, n_head=2, n_positions=8, seed=seed)
        return model.to(device), 0, [1, 2]
    from transformers import AutoTokenizer
    tokenizer = from_hub("--toy-model", AutoTokenizer.from_pretrained, name_or_path)
    actions = [tokenizer.convert_tokens_to_ids(t) for t in ("L", "R")]
    if None in actions or tokenizer.unk_token_id in actions:
        raise InputError(f"--toy-model {name_or_path}: its vocabulary lacks the token 'L' or 'R'.")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model = load_causal_lm("--toy-model", name_or_path, torch.float32, device)
    return model.eval(), start, actions


def toy_target(actions, seed):
    """The target path T of a seed: both losses face the same tree."""
    coin = torch.Generator().manual_seed(seed)
    return torch.tensor(actions)[torch.randint(0, 2, (TOY_DEPTH,), generator=coin)]


def toy_run(n, r_neg, loss, seed, steps, group_size, lr, temperature, toy_model=None, device="cpu"):
    """One run on the tree of Table 1: per step, the share of sampled paths equal to T
    ("frequency") and the count of each kind of TOY_CLASSES ("counts"). sample_completions →
    tree_rewards → group_advantages → lambda_weights → grpo_update (μ = 1, β = 0). A function
    of the seed on a given device (on CUDA with PyTorch's deterministic kernels)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # the same arithmetic whatever the number of worker processes
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        seed_everything(seed)
        model, start, actions = toy_policy(toy_model, seed, device)
        target = toy_target(actions, seed).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
        prompt = torch.tensor([[start]], device=device)
        attention = torch.ones(group_size, TOY_DEPTH + 1, dtype=torch.long, device=device)
        frequency, counts = [], []
        for _ in range(steps):
            paths = sample_completions(model, prompt, torch.ones_like(prompt), group_size, top_k=0,
                                       max_new_tokens=TOY_DEPTH, temperature=temperature, top_p=1.0,
                                       eos_token_id=None, logits_processor=[AllowTokens(actions)])
            mask = torch.ones_like(paths)
            rewards = tree_rewards(paths, target, n, r_neg)
            weights = lambda_weights(paths, mask, group_size) if loss == "lambda" else None
            grpo_update(model, optimizer, attention_mask=attention, completion_start=1,
                        input_ids=torch.cat([prompt.expand(group_size, -1), paths], 1),
                        completion_mask=mask, weights=weights, temperature=temperature,
                        advantages=group_advantages(rewards, group_size))
            kinds = torch.bincount(path_classes(paths, target, n), minlength=3).tolist()
            frequency.append(kinds[0] / group_size)
            counts.append(kinds)
        return {"frequency": frequency, "counts": counts}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def toy_job(job):
    """toy_run on a dict of arguments, as a worker process receives it."""
    return toy_run(**job)


def toy_sweep(args, run=toy_job):
    """Table 1: every (n, r_neg) cell × {GRPO, λ-GRPO} × seeds, in parallel processes. Prints the
    table; writes the result with per-seed curves to --json and its figure to --plot. `run`: what
    each job goes through (smollm2.py's keeps each run's result, to resume a long sweep)."""
    import multiprocessing
    from tqdm import tqdm
    if args.device == "auto":  # the tiny default policy is faster on the CPU than on a GPU
        args.device = "cuda" if args.toy_model and torch.cuda.is_available() else "cpu"
    cells = [(n, r) for n in args.n for r in args.r_neg]
    jobs = [dict(n=n, r_neg=r, loss=loss, seed=seed, steps=args.steps, group_size=args.group_size,
                 lr=args.lr, temperature=args.temperature, toy_model=args.toy_model,
                 device=args.device)
            for n, r in cells for loss in ("grpo", "lambda")
            for seed in range(args.seed, args.seed + args.seeds)]
    workers = min(args.workers or os.cpu_count(), len(jobs))
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            runs = list(tqdm(pool.imap(run, jobs), total=len(jobs), desc="toy runs"))
            pool.close()  # workers exit on their own, releasing their locks (terminate leaks them)
            pool.join()
    else:  # the bar wraps the runs, so an error in one closes it before the error is printed
        runs = list(tqdm(map(run, jobs), total=len(jobs), desc="toy runs"))
    last = min(50, args.steps)
    result = {"config": {k: v for k, v in vars(args).items() if k != "command"}, "cells": []}
    for n, r in cells:
        cell = {"n": n, "r_neg": r}
        for loss in ("grpo", "lambda"):
            mine = [run for job, run in zip(jobs, runs) if (job["n"], job["r_neg"], job["loss"])
                    == (n, r, loss)]
            curves = [run["frequency"] for run in mine]
            per_seed = [sum(c[-last:]) / last for c in curves]
            mean, ci = mean_ci95(per_seed)
            cell[loss] = {"mean": mean, "ci95": ci, "per_seed": per_seed,
                          "curve": [sum(step) / len(curves) for step in zip(*curves)],
                          "curves": curves, "time_to_target": [time_to_target(c) for c in curves],
                          "outcomes": [run_outcome(run["counts"], last) for run in mine]}
        result["cells"].append(cell)
    print(format_table1(result))
    if args.json:
        write_atomically(args.json, json.dumps(result, indent=1))
    if args.plot:
        plot_toy(result, args.plot)
    return result


# The toy's statistics: a 95% interval over seeds, time to target, how each seed ends.

T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # Student-t 97.5% quantiles, 1…30 d.o.f.


def mean_ci95(xs):
    """Mean and half-width of a Student-t 95% confidence interval over seeds."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    t = T_975[len(xs) - 2] if len(xs) - 1 <= len(T_975) else 1.96
    return m, t * sd / math.sqrt(len(xs))


def time_to_target(frequency, threshold=0.5, window=10):
    """Our second metric: the first step (from 1) at which the mean share of T over the last
    `window` steps reaches `threshold`; None if it never does."""
    window = min(window, len(frequency))
    for step in range(window, len(frequency) + 1):
        if sum(frequency[step - window:step]) / window >= threshold:
            return step
    return None


def run_outcome(counts, last=50):
    """How a seed ends: the kind of TOY_CLASSES sampled most in the last `last` steps (ties: the
    first listed)."""
    totals = [sum(step[kind] for step in counts[-last:]) for kind in range(len(TOY_CLASSES))]
    return TOY_CLASSES[totals.index(max(totals))]


def reach_summary(steps):
    """Times to target → (mean step over the seeds that reach T or None, seeds that never do)."""
    reached = [s for s in steps if s is not None]
    return (sum(reached) / len(reached) if reached else None), len(steps) - len(reached)


def reaches_sooner(steps, other):
    """T reached in more seeds, or in as many seeds at a lower mean step."""
    (mean, never), (other_mean, other_never) = reach_summary(steps), reach_summary(other)
    if never != other_never:
        return never < other_never
    return mean is not None and mean < other_mean


PAPER_TABLE1 = {  # (n, r_neg): (GRPO, λ-GRPO, Δ) as the paper reports them
    (1, -0.5): (0.3995, 0.5663, 0.1668), (1, -1.0): (0.0000, 0.7535, 0.7535),
    (1, -1.5): (0.2000, 0.4463, 0.2463), (2, -0.5): (0.1980, 0.4292, 0.2312),
    (2, -1.0): (0.0488, 0.3612, 0.3125), (2, -1.5): (0.0000, 0.3820, 0.3820)}


def format_table1(result):
    """What is reproduced, our Table 1 beside the paper's (the share of T over the last 50
    steps), the time to target and how seeds end, and a verdict naming each claim's metric."""
    cells, config = result["cells"], result["config"]
    steps = len(cells[0]["grpo"]["curve"])
    last, window = min(50, steps), min(10, steps)
    lines = ["Table 1 of the paper: a depth-4 binary tree of L/R tokens. The target path T earns "
             "1.0, paths that share",
             "T's first n tokens earn r_neg (traps), all others 0.7. Group "
             f"{config['group_size']}, {steps} steps, {config['seeds']} seeds, lr {config['lr']}, "
             f"temperature {config['temperature']}.", "",
             f"Share of sampled paths equal to T over the last {last} steps (mean ± 95% CI "
             "over seeds):",
             f"{'n':>2} {'r_neg':>6} | {'GRPO':>15} {'λ-GRPO':>15} {'Δ':>7} | "
             f"paper: {'GRPO':>6} {'λ-GRPO':>6} {'Δ':>6}"]
    for c in cells:
        g, l = c["grpo"], c["lambda"]
        paper = PAPER_TABLE1.get((c["n"], c["r_neg"]))
        paper = " ".join(f"{x:6.4f}" for x in paper) if paper else "     -      -      -"
        lines.append(f"{c['n']:>2} {c['r_neg']:>6} | {g['mean']:6.4f} ± {g['ci95']:6.4f} "
                     f"{l['mean']:6.4f} ± {l['ci95']:6.4f} {l['mean'] - g['mean']:+7.4f} | "
                     f"       {paper}")
    mean = {loss: sum(c[loss]["mean"] for c in cells) / len(cells) for loss in ("grpo", "lambda")}
    lines += ["", f"Time to target: the first step at which the {window}-step mean share of T "
              "reaches 0.5 (mean over the seeds",
              "that reach it; never: seeds that do not). Ends: seeds whose most sampled kind of "
              f"path in the last {last} steps",
              "is T / a 0.7 path / a trap.",
              f"{'':9} | {'GRPO':^23} | {'λ-GRPO':^23} |",
              f"{'n':>2} {'r_neg':>6} | {'to T':>6} {'never':>5} {'T/0.7/trap':>10} | "
              f"{'to T':>6} {'never':>5} {'T/0.7/trap':>10}"]
    for c in cells:
        lines.append(f"{c['n']:>2} {c['r_neg']:>6} | {format_reach(c['grpo'])} | "
                     f"{format_reach(c['lambda'])}")
    higher = sum(c["lambda"]["mean"] > c["grpo"]["mean"] for c in cells)

    def reached(loss):
        times = [t for c in cells for t in c[loss]["time_to_target"]]
        mean, never = reach_summary(times)
        shown = f" (mean step {mean:.1f})" if mean else ""
        return f"{len(times) - never} of {len(times)}{shown}"

    sooner = sum(reaches_sooner(c["lambda"]["time_to_target"], c["grpo"]["time_to_target"])
                 for c in cells)
    lines += ["", "Verdict:",
              f"- share of T over the last {last} steps (the paper's metric): λ-GRPO higher in "
              f"{higher} of {len(cells)} cells (mean over cells: GRPO {mean['grpo']:.4f}, λ-GRPO "
              f"{mean['lambda']:.4f});",
              f"- time to target: λ-GRPO reaches T sooner in {sooner} of {len(cells)} cells; "
              f"seeds that reach T: {reached('grpo')} for GRPO, {reached('lambda')} for λ-GRPO."]
    return "\n".join(lines)


def format_reach(method):
    """One method's time-to-target columns: mean step, seeds that never reach T, how seeds end."""
    mean, never = reach_summary(method["time_to_target"])
    ends = "/".join(str(method["outcomes"].count(kind)) for kind in TOY_CLASSES)
    return f"{'-' if mean is None else f'{mean:.1f}':>6} {never:>5} {ends:>10}"


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 7. Training an LLM on math problems (Table 2's setup; `python lgrpo.py train`)
# ──────────────────────────────────────────────────────────────────────────────────────────────


def train(args):
    """GRPO / λ-GRPO on a causal LM and a math dataset: metrics.jsonl, a checkpoint every
    --save-every steps and at the end. Folder, reward, data and prompt lengths are checked
    before the model is loaded."""
    from tqdm import tqdm
    quiet_libraries()
    args.score_temperature = args.score_temperature or args.temperature  # the sampling policy's
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with run_folder(args) as resume_from:
        reward_fn = load_reward(args.reward)
        train_rows, eval_rows = load_problems(args)
        check_prompt_lengths(args, train_rows + eval_rows)
        seed_everything(args.seed)
        model, reference, tokenizer, optimizer = setup_training(args, device, resume_from)
        start = restore_run(resume_from, optimizer)
        if not resume_from:
            write_atomically(os.path.join(args.output_dir, "run_config.json"),
                             json.dumps(vars(args), indent=1))
        eos_ids = eos_token_ids(tokenizer, model)
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.loss)
        for step in bar:
            problems = step_problems(train_rows, step, args.prompts_per_step, args.seed)
            row = train_step(args, step, model=model, reference=reference, tokenizer=tokenizer,
                             optimizer=optimizer, problems=problems, reward_fn=reward_fn,
                             eos_ids=eos_ids)
            rows = [row]
            if args.eval_every and (step + 1) % args.eval_every == 0:
                rows.append({"step": step + 1, "eval_accuracy": evaluate(
                    model, tokenizer, eval_rows[:args.eval_size], reward_fn, args, eos_ids)})
                tqdm.write(f"step {step + 1}: eval accuracy {rows[-1]['eval_accuracy']:.4f}")
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}")
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                save_checkpoint(args, step + 1, model, tokenizer, optimizer)
    final = os.path.join(args.output_dir, f"checkpoint-{args.steps}")
    saved = [n for n in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+", n)]
    print(f"lgrpo: wrote {args.output_dir}: metrics.jsonl, run_config.json and {len(saved)} "
          f"checkpoint folder(s); the final model and tokenizer are in {final} "
          f"({'PeftModel' if args.lora_r else 'AutoModelForCausalLM'}.from_pretrained reads it)")
    return model


def train_step(args, step, model, reference, tokenizer, optimizer, problems, reward_fn, eos_ids):
    """One step of `train`: rollouts; rewards, advantages and λ weights; the log-probs of π_old
    and π_ref; μ updates. Returns the step's metrics row."""
    t0, G, device = time.perf_counter(), args.group_size, model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    enc = encode_prompts(tokenizer, [q for q, _ in problems], args.system_prompt, device)
    completion_ids, mask, truncated = rollout(args, model, tokenizer, enc, eos_ids)
    t1 = time.perf_counter()
    texts = decode_completions(tokenizer, completion_ids, mask)
    rewards, reward_errors = compute_rewards(reward_fn, texts, [a for _, a in problems
                                                                for _ in range(G)])
    advantages = group_advantages(rewards.to(device), G, args.adv_eps)
    weights = lambda_weights(completion_ids, mask, G) if args.loss == "lambda" else None
    P = enc["input_ids"].shape[1]
    input_ids = torch.cat([enc["input_ids"].repeat_interleave(G, 0), completion_ids], 1)
    attention = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), mask], 1)
    old_logp, ref_logp = reference_logprobs(args, model, reference, input_ids=input_ids,
                                            attention=attention, completion_start=P)
    t2 = time.perf_counter()
    model.train()
    try:
        stats = grpo_update(model, optimizer, input_ids=input_ids, attention_mask=attention,
                            completion_start=P, completion_mask=mask, advantages=advantages,
                            weights=weights, old_logp=old_logp, ref_logp=ref_logp, beta=args.beta,
                            updates_per_batch=args.updates_per_batch, clip_eps=args.clip_eps,
                            micro_batch_size=args.micro_batch_size, aggregation=args.aggregation,
                            max_grad_norm=args.max_grad_norm, temperature=args.score_temperature)
    except FloatingPointError as error:
        raise InputError(f"step {step + 1}, {error} Nothing of it was logged or saved; its "
                         f"rewards ranged from {rewards.min():g} to {rewards.max():g}. Fix the "
                         "reward and --resume, or lower --lr in a new --output-dir.") from None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # the CPU: the process's peak resident memory
        import resource
        peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t3 = time.perf_counter()
    return {"step": step + 1, "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(), "reward_errors": reward_errors,
            "loss": float(stats["loss"]), "kl": float(stats["kl"]) if args.beta > 0 else None,
            "clip_frac": float(stats["clip_frac"]), "grad_norm": float(stats["grad_norm"]),
            "completion_len": mask.sum(1).double().mean().item(),
            "truncated_frac": truncated.double().mean().item(),
            # group_advantages gives exactly 0 to the groups whose rewards are all equal, only
            "zero_std_frac": (advantages.view(-1, G) == 0).all(1).double().mean().item(),
            **trie_stats(completion_ids, mask, G),
            "tokens_per_s": mask.sum().item() / (t3 - t0), "time_gen": t1 - t0,
            "time_score": t2 - t1, "time_update": t3 - t2, "peak_mem_mb": peak_mem_mb}


def setup_training(args, device, resume_from):
    """The tokenizer, the policy (full or LoRA; from the checkpoint when resuming), the frozen
    reference when β > 0, and the optimizer."""
    from transformers import AutoTokenizer
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = from_hub("--model", AutoTokenizer.from_pretrained, resume_from or args.model,
                         trust_remote_code=args.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # safe: masks come from the first EOS, never from pad ids
        tokenizer.pad_token = tokenizer.eos_token
    weights_from = args.model if args.lora_r else resume_from or args.model
    model = load_causal_lm("--model", weights_from, dtype, device, args.trust_remote_code)
    if args.lora_r:
        model = add_lora(args, model, resume_from)
    reference = None
    if args.beta > 0 and not args.lora_r:  # with LoRA the reference is the base: adapters off
        reference = load_causal_lm("--model", args.model, dtype, device, args.trust_remote_code)
        reference.eval().requires_grad_(False)
    if args.gradient_checkpointing:  # renamed in transformers 5
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    return model, reference, tokenizer, optimizer


def load_causal_lm(flag, name_or_path, dtype, device, trust_remote_code=False):
    """AutoModelForCausalLM with every dropout rate set to 0: with dropout, two forward passes of
    the same weights differ and the ratio P would not be exactly 1 at μ = 1."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = from_hub(flag, AutoConfig.from_pretrained, name_or_path,
                      trust_remote_code=trust_remote_code)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    model = from_hub(flag, AutoModelForCausalLM.from_pretrained, name_or_path, config=config,
                     trust_remote_code=trust_remote_code, dtype=dtype)
    if name_or_path.endswith(".gguf"):
        # Dequantized, but still marked quantized, which save_pretrained refuses: made plain.
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        model = plain
    return model.to(device)


def add_lora(args, model, resume_from):
    """LoRA adapters on every linear layer (the authors' r = 64, α = 128), or the checkpoint's.
    LoRA dropout stays 0 (the authors': 0.05) for the same reason as the model's."""
    import peft
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5.x deprecates
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        if resume_from:
            return peft.PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)


def eos_token_ids(tokenizer, model):
    """Every token that ends a completion: the tokenizer's EOS and the generation config's."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return {tokenizer.eos_token_id} | {t for t in configured if t is not None}


def rollout(args, model, tokenizer, enc, eos_ids, greedy=False):
    """(completion_ids, mask, truncated): G sampled completions per prompt, or one greedy one
    (evaluation); with --stop-at-boxed each ends, mask included, once its first box closes."""
    P = enc["input_ids"].shape[1]
    stop = [StopWhenBoxed(tokenizer, P)] if args.stop_at_boxed else None
    sampling = {} if greedy else dict(temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k)
    model.eval()
    completion_ids = sample_completions(
        model, enc["input_ids"], enc["attention_mask"], 1 if greedy else args.group_size,
        batch_size=args.generation_batch_size, pad_token_id=tokenizer.pad_token_id,
        do_sample=not greedy, eos_token_id=sorted(eos_ids), max_new_tokens=args.max_new_tokens,
        repetition_penalty=1.0, stopping_criteria=stop, **sampling)
    stops = boxed_lengths(tokenizer, completion_ids) if args.stop_at_boxed else None
    return (completion_ids, *completion_mask(completion_ids, eos_ids, stops))


def decode_completions(tokenizer, completion_ids, mask):
    """The completions' text, each cut where its mask ends (its EOS or its box)."""
    shown = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(shown, skip_special_tokens=True)


@torch.no_grad()
def reference_logprobs(args, model, reference, input_ids, attention, completion_start):
    """(old_logp, ref_logp): π_old's token log-probs when μ > 1, π_ref's when β > 0, else None
    (with LoRA, π_ref is the policy with its adapters off)."""
    def score(m):
        mb = args.micro_batch_size
        return torch.cat([token_logprobs(m, input_ids[s:s + mb], attention[s:s + mb],
                                         completion_start=completion_start,
                                         temperature=args.score_temperature)
                          for s in range(0, input_ids.shape[0], mb)])

    old_logp = score(model) if args.updates_per_batch > 1 else None
    if args.beta <= 0:
        return old_logp, None
    if reference is None:
        with model.disable_adapter():
            return old_logp, score(model)
    return old_logp, score(reference)


def trie_stats(completion_ids, completion_mask, group_size):
    """The paper's overlap statistics, averaged over groups: path_depth, the process steps on a
    completion's path (a step starts where |λ| changes); intermediate_prop, the share of its
    tokens in shared steps (|λ| > 1); flat_frac, the share of flat tries (the PRM is an ORM)."""
    sizes = process_set_sizes(completion_ids, completion_mask, group_size)
    valid = sizes > 0
    lengths = valid.sum(1)
    starts = valid & (sizes != F.pad(sizes, (1, 0))[:, :-1])
    nonempty = (lengths > 0).view(-1, group_size).double()

    def group_mean(per_completion):  # over each group's non-empty completions, then groups
        per_group = (per_completion.double().view(-1, group_size) * nonempty).sum(1)
        return (per_group / nonempty.sum(1).clamp(min=1)).mean().item()

    flat = (sizes <= 1).view(-1, group_size * sizes.shape[1]).all(1)
    return {"path_depth": group_mean(starts.sum(1)),
            "intermediate_prop": group_mean((sizes > 1).sum(1) / lengths.clamp(min=1)),
            "flat_frac": flat.double().mean().item()}


def evaluate(model, tokenizer, problems, reward_fn, args, eos_ids):
    """Mean reward of greedy completions on held-out problems (accuracy, for the math reward),
    with training's rollout, stopping rule, decoding and reward."""
    total, width = 0.0, args.generation_batch_size or args.prompts_per_step * args.group_size
    for s in range(0, len(problems), width):
        batch = problems[s:s + width]
        enc = encode_prompts(tokenizer, [q for q, _ in batch], args.system_prompt, model.device)
        completion_ids, mask, _ = rollout(args, model, tokenizer, enc, eos_ids, greedy=True)
        texts = decode_completions(tokenizer, completion_ids, mask)
        total += compute_rewards(reward_fn, texts, [ref for _, ref in batch])[0].sum().item()
    return total / max(1, len(problems))


def seed_everything(seed):
    """Seed Python and torch (CPU and CUDA): a run is a function of its seed."""
    random.seed(seed)
    torch.manual_seed(seed)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 8. Scaling out with TRL
# ──────────────────────────────────────────────────────────────────────────────────────────────
#
# `python lgrpo.py train` serves one GPU. For vLLM and several GPUs or nodes, λ-GRPO runs inside
# TRL's GRPOTrainer, whose loss_type="dapo" is eq. (2) with token aggregation: only the weights
# change. `lgrpo.LambdaGRPOTrainer` is built on first use; importing lgrpo never imports trl.
# docs/trl.md: how to use it, the equivalence measured, and the options it refuses.

# TRL options that the weights would silently change. The weights reach TRL's loss through its
# per-token loss mask, which these options also read, as a normalizer or an average.
TRL_EXACT_SETTINGS = {  # option: (the value λ-GRPO needs, what the option does with the mask)
    "loss_type": ("dapo", "the only supported loss type, TRL's default; the others are not the "
                  "paper's token-level sum, or divide by the sum of the mask that carries the "
                  "weights"),
    "importance_sampling_level": ("token", "'sequence' averages log-ratios over the mask"),
    "top_entropy_quantile": (1.0, "the entropy quantile is taken over masked entropies"),
    "off_policy_mask_threshold": (None, "the off-policy filter averages the KL over the mask"),
    "entropy_coef": (0.0, "the entropy bonus averages the entropy over the mask"),
    "use_adaptive_entropy": (False, "the entropy bonus averages the entropy over the mask"),
}

# The paper, as the model card of a LambdaGRPOTrainer run cites it.
LAMBDA_GRPO_CITATION = """@inproceedings{sullivan2026grpo,
  title     = {{GRPO} is Secretly a Process Reward Model},
  author    = {Sullivan, Michael and Koller, Alexander},
  booktitle = {Proceedings of the 43rd International Conference on Machine Learning (ICML)},
  year      = {2026},
  eprint    = {2509.21154},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2509.21154}
}"""


# LambdaGRPOTrainer: TRL's GRPOTrainer, the same constructor and GRPOConfig, with every token's
# whole term (surrogate and KL) times 1/|λ^(i,t)| and the normalizer left at the token count;
# exact with any β, gradient accumulation, steps_per_generation and num_iterations (μ).
# - The weights come from the whole generation batch gathered from every process: a group can
#   straddle two processes (a process holds per_device_train_batch_size × steps_per_generation
#   rows, not always a multiple of num_generations).
# - |λ| counts the rows in TRL's loss mask: a truncated completion zeroed by
#   mask_truncated_completions is in no process set; a completion whose rewards are all None
#   stays (TRL keeps it at advantage 0). Either way a step's weights in the loss add up to 1.
# - Private TRL names (trl 1.16): `_generate_and_score_completions`, overridden, and its output's
#   "tool_mask", which `_compute_loss` multiplies into the per-token loss mask after counting
#   dapo's normalizer from the completion mask (so TRL's logged means are λ-weighted). The model
#   card reads `_name`, `_tag_names`, `_paper`.


def lambda_grpo_trainer_class():
    """Build `LambdaGRPOTrainer`, a subclass of trl.GRPOTrainer (needs trl)."""
    try:
        from trl import GRPOTrainer
    except ImportError:
        message = "lgrpo.LambdaGRPOTrainer needs TRL: pip install 'trl>=1.16,<1.17'"
        raise ImportError(message) from None

    class LambdaGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer with the λ-GRPO loss: every completion token's whole per-token term
        multiplied by 1/|λ^(i,t)|, the normalizer left at the token count (see above)."""

        _name = "λ-GRPO"
        _tag_names = ["trl", "grpo", "lambda-grpo"]
        _paper = {"title": "GRPO is Secretly a Process Reward Model", "id": "2509.21154",
                  "citation": LAMBDA_GRPO_CITATION}

        def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
            # Checked before TRL loads any model; args=None is TRL's default config, all exact.
            for name, (needed, why) in TRL_EXACT_SETTINGS.items():
                if args is not None and getattr(args, name) != needed:
                    raise InputError(f"LambdaGRPOTrainer is exact only with {name}={needed!r} (got "
                                     f"{getattr(args, name)!r}): {why}.")
            # vLLM's correction multiplies each completion's surrogate by its own sampling ratio:
            # the members of one process set get different factors on their shared prefix.
            if args is not None and args.use_vllm and args.vllm_importance_sampling_correction:
                raise InputError("LambdaGRPOTrainer is exact only with "
                                 "vllm_importance_sampling_correction=False when use_vllm=True: "
                                 "it gives the members of a process set different factors.")
            super().__init__(model, reward_funcs, args, *more, **kwargs)

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            weights = self.local_lambda_weights(output["completion_ids"], output["completion_mask"])
            if weights is not None:
                tool_mask = output.get("tool_mask")  # 0 on tool output; the weights multiply it
                output["tool_mask"] = weights if tool_mask is None else tool_mask * weights
            return output

        def local_lambda_weights(self, completion_ids, completion_mask):
            """1/|λ^(i,t)| for this process's rows, from the whole batch of every process; None
            where a group is a single completion (all weights 1: nothing to change)."""
            group_size = self.num_generations if self.model.training else self.num_generations_eval
            if group_size < 2:
                return None
            accelerator = self.accelerator
            # Each process pads to its own longest completion: pad to a common width to gather.
            ids = accelerator.gather(accelerator.pad_across_processes(completion_ids, dim=1))
            mask = accelerator.gather(accelerator.pad_across_processes(completion_mask, dim=1))
            # float32, which every device has (Apple's MPS has no float64): the set sizes are
            # integers, so each weight is 1/|λ| rounded once, as exact as TRL's float32 loss.
            weights = lambda_weights(ids, mask, group_size, dtype=torch.float32)
            rows, width = completion_ids.shape
            start = accelerator.process_index * rows  # the rows TRL gave this process
            return weights[start:start + rows, :width]

    # It reads (and pickles) as lgrpo.LambdaGRPOTrainer, the name users import, not as a local.
    LambdaGRPOTrainer.__module__, LambdaGRPOTrainer.__qualname__ = __name__, "LambdaGRPOTrainer"
    return LambdaGRPOTrainer


def __getattr__(name):
    # `lgrpo.LambdaGRPOTrainer` is built when first asked for, so that only its users need trl.
    if name == "LambdaGRPOTrainer":
        globals()[name] = lambda_grpo_trainer_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ══════════════════════════════════════════════════════════════════════════════════════════════
# Appendix: the plumbing. None of it is needed to understand λ-GRPO.
# ══════════════════════════════════════════════════════════════════════════════════════════════


# ──────────────────────────────────────────────────────────────────────────────────────────────
# A. The reward: the final answer checked by Math-Verify, and the authors' boxed stop
# ──────────────────────────────────────────────────────────────────────────────────────────────
#
# The paper's reward: 1 for a correct final answer, else 0, decided by Hugging Face's Math-Verify
# as the authors did. Model output is parsed, never evaluated; Math-Verify loads on first use.

BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")  # MATH writes \boxed and, rarely, \fbox
BRACE = re.compile(r"[{}]")


def last_boxed(text):
    """The content of the last closed \\boxed{...}, or None: a cut-off, unclosed one is skipped."""
    for match in reversed(list(BOX_OPEN.finditer(text))):
        depth = 1
        for brace in BRACE.finditer(text, match.end()):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                return text[match.end():brace.start()]
    return None


def reference_answer(reference):
    """A dataset's answer: after the last "####" (GSM8K), else its last box (MATH), else all."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = last_boxed(reference)
    return boxed if boxed is not None else reference.strip()


def math_rewards(completions, references):
    """(rewards, reward_errors): 1.0 where Math-Verify finds a completion's final answer equal to
    its reference's, else 0.0; and how many scored 0 because Math-Verify raised or timed out."""
    if threading.current_thread() is not threading.main_thread():  # else all would score 0
        raise RuntimeError("math_reward must run on the main thread (Math-Verify's timeouts use "
                           "signal.alarm); or pass your own --reward module:function.")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
    targets = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

    def attempt(fn, *args):  # fn's result, or None where Math-Verify raised or timed out
        try:
            return fn(*args, raise_on_error=True)
        except (Exception, TimeoutException):  # its timeout is a BaseException
            return None

    @functools.cache  # each distinct reference is parsed once
    def gold(reference):
        return attempt(parse, "\\boxed{" + reference_answer(reference) + "}", targets)

    def score(completion, reference):  # (reward, failed); pair by pair: an error hides no match
        golds = gold(reference)
        answers = attempt(parse, completion, targets) if golds else None
        if answers is None:
            return 0.0, True
        verified = []
        for g in golds:
            for a in answers:
                verified.append(attempt(verify, g, a))
                if verified[-1]:
                    return 1.0, False
        return 0.0, None in verified

    scores = [score(c, r) for c, r in zip(completions, references, strict=True)]
    return [reward for reward, _ in scores], sum(failed for _, failed in scores)


def math_reward(completion, reference):
    """1.0 if the completion's final answer equals the reference answer (Math-Verify), else 0.0."""
    return math_rewards([completion], [reference])[0][0]


def load_reward(spec):
    """`module:function` → f(completion_text, reference) -> float, each value checked; None →
    math_reward. The module is found as `python -m` finds one: the current folder first."""
    if spec is None:
        return math_reward
    import importlib
    module_name, _, name = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # only while importing: it must not shadow later imports
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in (module_name, module_name.split(".")[0]):
            raise  # the module is there, but something it imports is not: keep the traceback
        raise InputError(f"--reward {spec}: no module {module_name!r} in the current folder or "
                         "on the Python path.") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--reward {spec}: {module.__file__} defines no function {name!r}.")

    def checked(completion, reference):  # one None or NaN would become a wrong reward
        value = fn(completion, reference)
        try:
            number = float(value) if isinstance(value, numbers.Real) else math.nan
        except OverflowError:  # an int beyond float's range
            number = math.inf
        if not math.isfinite(number):
            raise InputError(f"--reward {spec} returned {shorten(value)} for the completion "
                             f"{shorten(completion)}: a reward must be a finite real number.")
        return number
    return checked


def compute_rewards(reward_fn, texts, references):
    """(float64 rewards, reward_errors: Math-Verify's failures, or None for a custom reward)."""
    if reward_fn is math_reward:
        rewards, errors = math_rewards(texts, references)
    else:
        rewards, errors = [reward_fn(t, r) for t, r in zip(texts, references)], None
    return torch.tensor(rewards, dtype=torch.float64), errors


def shorten(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[:width] + "…"


def boxed_closed(text):
    """True once the first \\boxed{ closes: the authors' stopping rule, on exactly "\\boxed{"."""
    start = text.find("\\boxed{")
    depth = 1
    for brace in BRACE.finditer(text, start + len("\\boxed{")) if start >= 0 else ():
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return True
    return False


class StopWhenBoxed:
    """Stopping criterion: a row is done once its first \\boxed{...} closes. A box can close only
    at a "}", so a row's text is decoded in full only when its newest token holds one."""

    def __init__(self, tokenizer, prompt_len):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        completions = input_ids[:, self.prompt_len:]
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        newest = self.tokenizer.batch_decode(completions[:, -1:])
        rows = [r for r, text in enumerate(newest) if "}" in text]
        if rows:
            texts = self.tokenizer.batch_decode(completions[rows], skip_special_tokens=True)
            done[rows] = torch.tensor([boxed_closed(t) for t in texts], device=done.device)
        return done


def boxed_lengths(tokenizer, completion_ids):
    """Per row, the tokens up to where the first box closed (generate pads after it), or T + 1
    where it never closed. A binary search: once closed, a box stays closed."""
    lengths = []
    for ids in completion_ids.tolist():
        lo, hi = 1, len(ids) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            closed = boxed_closed(tokenizer.decode(ids[:mid], skip_special_tokens=True))
            lo, hi = (lo, mid) if closed else (mid + 1, hi)
        lengths.append(lo)
    return torch.tensor(lengths, device=completion_ids.device)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# B. Data and hub access
# ──────────────────────────────────────────────────────────────────────────────────────────────

FIELD_GUESSES = {"prompt": ["question", "problem", "prompt"], "answer": ["answer", "solution"]}
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def from_hub(flag, load, name, *args, **kwargs):
    """load(name, ...); a hub or file failure (no network, a misspelt id, gated) as one line. A
    .gguf file is read from its folder with `gguf_file=`: transformers dequantizes it."""
    gguf = name.endswith(".gguf")
    try:
        if gguf:
            return load(os.path.dirname(os.path.abspath(name)), *args,
                        gguf_file=os.path.basename(name), **kwargs)
        return load(name, *args, **kwargs)
    # ValueError: a missing config, an unknown model; a damaged .gguf fails in more ways (a file
    # cut off raises struct.error), all of them one line here.
    except Exception if gguf else (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        fix = ("transformers reads the GGUF architectures and quantizations it knows, with "
               "`pip install gguf`" if gguf else "Check the name, the network, and access (a "
               "gated repository needs `hf auth login`)")
        raise InputError(f"{flag} {name}: cannot load it ({reason}). {fix}.") from None


def load_problems(args):
    """(train, eval) lists of (question, reference) from a hub dataset or a local file."""
    import datasets
    if os.path.exists(args.dataset):
        builder = DATA_FORMATS.get(os.path.splitext(args.dataset)[1].lower())
        try:
            data = datasets.load_dataset(builder, data_files=args.dataset)
        except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as error:
            cause = str(error.__cause__ or error).strip() or "it holds no rows"
            raise InputError(f"--dataset {args.dataset}: cannot read it as {builder} "
                             f"({cause.splitlines()[-1]}).") from None
    else:
        data = from_hub("--dataset", datasets.load_dataset, args.dataset, args.dataset_config)
    for flag, split in (("--train-split", args.train_split), ("--eval-split", args.eval_split)):
        if split is not None and split not in data:
            raise InputError(f"{flag} {split}: {args.dataset} has the splits {list(data)} (a local "
                             "file is one split, 'train'; --eval-fraction holds problems out).")
    used = [data[s] for s in (args.train_split, args.eval_split) if s is not None]
    columns = [c for c in used[0].column_names if all(c in split.column_names for split in used)]
    fields = []
    for kind, given in (("prompt", args.prompt_field), ("answer", args.answer_field)):
        fields.append(given or next((c for c in FIELD_GUESSES[kind] if c in columns), None))
        if fields[-1] not in columns:
            raise InputError(f"--{kind}-field {fields[-1]}: not a column of {args.dataset}; its "
                             f"columns are {columns}.")
    train, held_out = args.train_split, args.eval_split
    if args.eval_fraction:  # a DatasetDict of the splits "train" and "test"
        data = data[train].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train, held_out = "train", "test"
    return (problem_rows(args, data[train], *fields),
            problem_rows(args, data[held_out], *fields) if held_out else [])


def problem_rows(args, split, question, answer):
    """A split's (question, reference) pairs, refusing an empty split and rows with blank fields."""
    pairs = list(zip(split[question], split[answer]))
    bad = [i for i, (q, a) in enumerate(pairs, 1)
           if not isinstance(q, str) or not q.strip() or a is None or not str(a).strip()]
    if not pairs or bad:
        raise InputError(f"--dataset {args.dataset}: " + (
            f"rows {bad[:10]} (from 1) have a missing or empty {question!r} or {answer!r}"
            if bad else "a split has no rows") + "; fix or remove them.")
    return [(q, str(a)) for q, a in pairs]


def step_problems(problems, step, k, seed):
    """The k problems of a step, from a seeded shuffle per epoch: a resumed run sees the same."""
    out = []
    for j in range(step * k, (step + 1) * k):
        epoch, pos = divmod(j, len(problems))
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed + epoch))
        out.append(problems[order[pos]])
    return out


def tokenize_prompts(tokenizer, questions, system_prompt, **kwargs):
    """The prompts tokenized: by the chat template when there is one, else as plain text (+ BOS)."""
    plain = not getattr(tokenizer, "chat_template", None)  # a template writes its own tokens
    if plain:
        texts = [f"{system_prompt}\n\n{q}\n" if system_prompt else f"{q}\n" for q in questions]
    else:
        texts = [tokenizer.apply_chat_template([{"role": "system", "content": system_prompt},
                                                {"role": "user", "content": q}],
                                               tokenize=False, add_generation_prompt=True)
                 for q in questions]
    return tokenizer(texts, add_special_tokens=plain, **kwargs)


def encode_prompts(tokenizer, questions, system_prompt, device):
    """Left-padded prompt tensors (`tokenize_prompts`)."""
    return tokenize_prompts(tokenizer, questions, system_prompt, return_tensors="pt",
                            padding=True).to(device)


def check_prompt_lengths(args, problems):
    """Refuse, before the model loads, a prompt that leaves no room for --max-new-tokens in the
    model's positions (GPT-2 would crash mid-run; others read positions never trained on)."""
    from transformers import AutoConfig, AutoTokenizer
    config = from_hub("--model", AutoConfig.from_pretrained, args.model,
                      trust_remote_code=args.trust_remote_code)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    tokenizer = from_hub("--model", AutoTokenizer.from_pretrained, args.model,
                         trust_remote_code=args.trust_remote_code)
    ids = tokenize_prompts(tokenizer, [q for q, _ in problems], args.system_prompt)["input_ids"]
    lengths = [len(row) for row in ids]
    longest = max(lengths)
    if longest + args.max_new_tokens > limit:
        fix = f"lower --max-new-tokens to {limit - longest} or" if longest < limit else "and"
        raise InputError(f"--max-new-tokens {args.max_new_tokens}: the longest prompt, "
                         f"{shorten(problems[lengths.index(longest)][0])}, is {longest} tokens "
                         f"and {args.model} has {limit} positions: {fix} shorten the prompts.")


# ──────────────────────────────────────────────────────────────────────────────────────────────
# C. Runs: the locked folder, checkpoints, resume
# ──────────────────────────────────────────────────────────────────────────────────────────────

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_model.safetensors", "adapter_model.bin")
# What --resume may change: how long to train, how often to save and evaluate, how the work is
# cut into batches for memory, permission to run the model's code. The rest defines the run.
RESUMABLE_FLAGS = ("steps", "save_every", "eval_every", "eval_size", "micro_batch_size",
                   "generation_batch_size", "gradient_checkpointing", "trust_remote_code",
                   "output_dir", "resume")


@contextlib.contextmanager
def run_folder(args):
    """--output-dir, created and locked for the whole run; yields the checkpoint to resume from
    (None for a new run). A run that fails before it wrote anything leaves no folder behind."""
    import fcntl
    out = args.output_dir
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")
    except OSError as error:
        raise InputError(f"--output-dir {out}: cannot write there ({error.strerror}).") from None
    with lock:  # closing it releases the flock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--output-dir {out} is in use by another run: wait for it, or "
                             "choose another --output-dir.") from None
        try:
            yield resume_checkpoint(args)
        except BaseException:
            if created and os.listdir(out) == [".lock"]:
                shutil.rmtree(out, ignore_errors=True)
            raise


def resume_checkpoint(args):
    """The newest complete checkpoint for --resume, its flags checked; None for a new run."""
    out, metrics = args.output_dir, os.path.join(args.output_dir, "metrics.jsonl")
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(out)
                   if re.fullmatch(r"checkpoint-\d+", n))
    if not args.resume:
        if steps or os.path.exists(metrics):
            fix = "pass --resume to continue it" if steps else f"delete {metrics} to start over"
            raise InputError(f"--output-dir {out} holds an earlier run: {fix}, or choose another "
                             "--output-dir (nothing was overwritten).")
        return None
    for step in reversed(steps):
        path = os.path.join(out, f"checkpoint-{step}")
        try:
            if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
                raise OSError("no model weights")
            state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
            break
        except (OSError, RuntimeError, EOFError) as error:
            warn(f"skipped checkpoint-{step}, incomplete ({error}).")
    else:
        raise InputError(f"--resume: {out} holds no complete checkpoint; start over in another "
                         "--output-dir.")
    # Two configurations mixed make a run that is neither.
    changes = [f"--{name.replace('_', '-')} {shorten(old, 40)} → {shorten(getattr(args, name), 40)}"
               for name, old in state["args"].items()
               if name not in RESUMABLE_FLAGS and getattr(args, name, old) != old]
    if changes:
        raise InputError(f"--resume would change the run saved in {path}: {'; '.join(changes)}. "
                         "Pass its own values, or start a new run in another --output-dir.")
    if state["step"] >= args.steps:
        raise InputError(f"--steps {args.steps}: the run in {out} is at step {state['step']} "
                         "already; pass a larger --steps.")
    keep_metrics_until(metrics, state["step"])
    return path


def keep_metrics_until(path, step):
    """The rows of metrics.jsonl up to `step` kept, atomically; a missing file is a warning."""
    if not os.path.exists(path):
        return warn(f"{path} is missing: the run goes on from step {step + 1}.")
    rows = read_metrics(path)
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


def read_metrics(path):
    """The rows of a metrics.jsonl; a last line cut off mid-write is left out with a warning."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise InputError(f"{path}, line {number}: not a JSON row; fix or remove it.")
            warn(f"{path}: left out its last line, cut off mid-write: {shorten(line)}")
    return rows


def restore_run(resume_from, optimizer):
    """The step to start from: 0, or the checkpoint's, with optimizer and random state restored."""
    if not resume_from:
        return 0
    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    torch.cuda.set_rng_state_all(state["cuda_rng"])  # [] when saved without CUDA
    return state["step"]


def save_checkpoint(args, step, model, tokenizer, optimizer):
    """Written to a temporary folder and renamed: a crash never leaves one that looks complete."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():  # peft 0.21, on a LoRA of a .gguf: its folder has no config
        warnings.filterwarnings("ignore", "Could not find a config file", UserWarning)
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args),
                "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all()},
               os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def write_atomically(path, text):
    """Through a temporary file and a rename: a kill leaves the old content or the new."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def warn(message):
    print(f"lgrpo: warning: {message}", file=sys.stderr)


def quiet_libraries():
    """No progress bars of the hub libraries inside train's own, no second error line."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)  # errors: lgrpo's one line
    transformers.utils.logging.disable_progress_bar()


# ──────────────────────────────────────────────────────────────────────────────────────────────
# D. Plots (matplotlib, imported here only)
# ──────────────────────────────────────────────────────────────────────────────────────────────

COLORS = {"grpo": "C0", "lambda": "C3"}  # GRPO blue and λ-GRPO red in every figure
LOSS_NAMES = {"grpo": "GRPO", "lambda": "λ-GRPO"}


def new_figure(width, height):
    """A Figure drawn off-screen, without pyplot, so that a notebook's backend is left alone."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def trailing_mean(xs, window):
    """Mean of each value and the up to window − 1 values before it."""
    return [sum(xs[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(xs))]


def plot_runs(run_dirs, out, smooth=10):
    """`plot`: train runs against the step: reward (raw and smoothed), eval accuracy, completion
    length, KL, and the trie statistics of the paper's overlap measurement."""
    panels = [("reward_mean", "reward (mean over completions)"), ("eval_accuracy",
              "eval accuracy (greedy)"), ("completion_len", "completion length (tokens)"),
              ("kl", "KL to the reference (k3)"), ("path_depth", "trie path depth (steps)"),
              ("intermediate_prop", "intermediate proportion")]
    fig = new_figure(12, 6)
    grid = fig.subplots(2, 3, sharex=True)
    for ax, (_, title) in zip(grid.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in grid[-1]:
        ax.set_xlabel("step")
    seen = {"grpo": 0, "lambda": 0}  # runs of one loss share its colour, in other line styles
    for run_dir in run_dirs:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        config = os.path.join(run_dir, "run_config.json")
        if not (os.path.isfile(metrics) and os.path.isfile(config)):
            raise InputError(f"{run_dir}: no metrics.jsonl and run_config.json here (plot reads "
                             "the --output-dir of train).")
        with open(config) as f:
            loss = json.load(f)["loss"]
        style = ["-", "--", ":", "-."][seen[loss] % 4]
        seen[loss] += 1
        label = f"{os.path.basename(os.path.normpath(run_dir))} ({LOSS_NAMES[loss]})"
        rows = read_metrics(metrics)
        for ax, (key, _) in zip(grid.flat, panels):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            x, y = zip(*points)
            if key == "reward_mean":  # noisy per step: raw faint, the trailing mean on top
                ax.plot(x, y, color=COLORS[loss], ls=style, alpha=0.25, lw=0.8)
                y = trailing_mean(y, smooth)
            ax.plot(x, y, color=COLORS[loss], ls=style, lw=1.5, label=label)
    grid[0][0].legend(fontsize=8)
    fig.savefig(out, dpi=100)
    return out


def plot_toy(result, out):
    """Table 1 as curves: per (n, r_neg) cell the share of sampled paths equal to T per step
    (10-step means; thin: single seeds), the last 50 steps shaded, ▼ the mean time to target."""
    cells, config = result["cells"], result["config"]
    ns, r_negs = sorted({c["n"] for c in cells}), sorted({c["r_neg"] for c in cells}, reverse=True)
    width = 3.6 * len(r_negs)
    fig = new_figure(width, 2.6 * len(ns) + 0.6)
    axes = fig.subplots(len(ns), len(r_negs), sharex=True, sharey=True, squeeze=False)
    steps = len(cells[0]["grpo"]["curve"])
    x, last = range(1, steps + 1), min(50, steps)
    for cell in cells:
        ax = axes[ns.index(cell["n"])][r_negs.index(cell["r_neg"])]
        ax.axvspan(steps - last + 0.5, steps + 0.5, color="0.9")
        for loss, color in COLORS.items():
            for curve in cell[loss]["curves"]:
                ax.plot(x, trailing_mean(curve, 10), color=color, alpha=0.3, lw=0.6)
            label = f"{LOSS_NAMES[loss]}: last {last} {cell[loss]['mean']:.2f}"
            reach, _ = reach_summary(cell[loss]["time_to_target"])
            if reach is not None:
                ax.plot([reach], [0.5], marker="v", color=color, ms=6)
                label += f", T at step {reach:.0f}"
            ax.plot(x, trailing_mean(cell[loss]["curve"], 10), color=color, lw=1.6, label=label)
        ax.set_title(f"n = {cell['n']}, r_neg = {cell['r_neg']}", fontsize=10)
        ax.set(ylim=(0, 1.02), xlim=(1, steps), xlabel="step", ylabel="share of paths = T")
        ax.legend(fontsize=7, loc="lower right")
        ax.label_outer()  # axis labels on the outer panels only
    title = (f"Table 1 toy: group {config['group_size']}, lr {config['lr']}, temperature "
             f"{config['temperature']}, {config['seeds']} seeds; shaded: the last {last} steps; "
             "▼: mean time to target")
    fig.suptitle(textwrap.fill(title, int(width * 14)), fontsize=9)  # ~14 characters an inch
    fig.savefig(out, dpi=100)
    return out


def plot_toy_file(path, out):
    """`plot-toy`: the toy's figure from a saved --json result."""
    try:
        with open(path) as f:
            result = json.load(f)
        if not {"config", "cells"} <= set(result) or "curves" not in result["cells"][0]["grpo"]:
            raise ValueError("no toy cells with curves")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise InputError(f"{path}: not a toy result written by `python lgrpo.py --json` "
                         f"({error}).") from None
    return plot_toy(result, out)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# E. Tiny models built in code, no download (the tests, the tutorial and bench.py share them)
# ──────────────────────────────────────────────────────────────────────────────────────────────


def char_tokenizer():
    """Characters as tokens: <s>, </s>, <unk> are ids 0, 1, 2; <s> is prepended, as Llama's
    tokenizer does; there is no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = "0123456789+-*/=?.,: abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ{}()\\#$\n'"
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_llama(tokenizer, seed=0, max_positions=256, **config):
    """A random-init 2-layer, 32-wide Llama for the tokenizer; `config` overrides LlamaConfig's."""
    from transformers import LlamaConfig, LlamaForCausalLM
    defaults = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():  # leave the caller's random stream alone
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**(defaults | config)))


def tiny_gpt2(vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0,
              dtype=torch.float32):
    """A small random-init GPT-2, dropout off (two forward passes must agree)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).to(dtype).eval()


# ──────────────────────────────────────────────────────────────────────────────────────────────
# F. The command line: every flag checked by argparse before anything starts
# ──────────────────────────────────────────────────────────────────────────────────────────────


def flag_type(convert, ok, rule):
    """An argparse type: convert the text, refuse a value outside the rule (exit 2, one line)."""
    def parse(text):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text}: must be {rule}")
        return value
    parse.__name__ = rule  # argparse says "invalid <rule> value" when convert fails
    return parse


COUNT = flag_type(int, lambda v: v >= 1, "an integer ≥ 1")
NATURAL = flag_type(int, lambda v: v >= 0, "an integer ≥ 0")
GROUP = flag_type(int, lambda v: v >= 2, "an integer ≥ 2 (GRPO compares within a group)")
PREFIX = flag_type(int, lambda v: 1 <= v < TOY_DEPTH, f"an integer from 1 to {TOY_DEPTH - 1}")
POSITIVE = flag_type(float, lambda v: 0 < v < math.inf, "a finite number > 0")
NONNEGATIVE = flag_type(float, lambda v: 0 <= v < math.inf, "a finite number ≥ 0")
POSITIVE_OR_INF = flag_type(float, lambda v: v > 0, "a number > 0 (inf turns it off)")
FINITE = flag_type(float, math.isfinite, "a finite number")
PROBABILITY = flag_type(float, lambda v: 0 < v <= 1, "in (0, 1]")
FRACTION = flag_type(float, lambda v: 0 <= v < 1, "in [0, 1)")
MODULE_FUNCTION = flag_type(str, lambda v: re.fullmatch(r"[\w.]+:\w+", v), "module:function")
SYSTEM_PROMPT = "Let's think step by step and output the final answer within \\boxed{}."


def model_flag(text):
    """A saved-model folder (with config.json), a .gguf file, or a hub id ("name", "owner/name")."""
    if os.path.isdir(text) and not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text}: no config.json (not saved by save_pretrained)")
    if os.path.isfile(text) != text.endswith(".gguf"):  # a file, or a name, but not both
        raise argparse.ArgumentTypeError(f"{text}: a model file must be an existing .gguf file")
    if not os.path.exists(text) and not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", text):
        raise argparse.ArgumentTypeError(f"{text}: no such folder, and not a hub id")
    return text


def dataset_flag(text):
    """A hub dataset name, or a .jsonl/.json/.csv/.parquet file that exists."""
    extension = os.path.splitext(text)[1].lower()
    if os.path.exists(text) and extension not in DATA_FORMATS:
        raise argparse.ArgumentTypeError(f"{text}: use a .jsonl, .json, .csv or .parquet file")
    if extension in DATA_FORMATS and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def output_file(text):
    """A file that can be written: checked now, not after the minutes of computing."""
    existed = os.path.exists(text)
    try:
        os.makedirs(os.path.dirname(text) or ".", exist_ok=True)
        open(text, "a").close()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text}: cannot write there ({error.strerror})")
    if not existed:
        os.remove(text)
    return text


def device_flag(text):
    try:
        device = torch.device("cpu" if text == "auto" else text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text}: not a torch device (auto, cpu, cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device")
    return text


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once: none for a required flag, a None default or one the help gives."""
    def _get_help_string(self, action):
        given = action.required or action.default is None or "default:" in (action.help or "")
        return action.help if given else super()._get_help_string(action)


def add_train_parser(sub):
    tr = sub.add_parser("train", formatter_class=DefaultsOnce, help="GRPO / λ-GRPO on a causal LM "
                        "and a math dataset", description="GRPO or λ-GRPO on a causal LM and a "
                        "math dataset (Table 2's setup) on one GPU; paper values as defaults.")
    arg = tr.add_argument
    arg("--model", type=model_flag, required=True, help="hub id, saved folder or .gguf file")
    arg("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a GPU, float32 on a CPU")
    arg("--trust-remote-code", action="store_true", help="run the model repository's own code")
    arg("--dataset", type=dataset_flag, required=True,
        help="hub name (openai/gsm8k, knoveleng/open-rs) or a .jsonl/.json/.csv/.parquet file")
    arg("--dataset-config", help="hub dataset config (gsm8k: main)")
    arg("--train-split", default="train", help="split to train on")
    arg("--eval-split", help="held-out split for --eval-every")
    arg("--eval-fraction", type=FRACTION, default=0.0,
        help="hold out this share of the train split instead")
    arg("--prompt-field", help="question column (default: question, problem or prompt)")
    arg("--answer-field", help="answer column (default: answer or solution)")
    arg("--system-prompt", default=SYSTEM_PROMPT, help="system prompt (the authors')")
    arg("--reward", type=MODULE_FUNCTION, help="module:function, f(completion_text, reference) "
        "-> float (default: math_reward, the final answer checked by Math-Verify)")
    arg("--loss", default="lambda", choices=["lambda", "grpo"], help="λ-GRPO or GRPO")
    arg("--aggregation", default="token", choices=["token", "sequence"],
        help="token: the sum over tokens / their number (the paper's); sequence: mean of means")
    arg("--group-size", type=GROUP, default=6, help="completions per prompt (paper: 6)")
    arg("--prompts-per-step", type=COUNT, default=4, help="prompts per step (paper: 4)")
    arg("--steps", type=COUNT, default=1000, help="training steps")
    arg("--temperature", type=POSITIVE, default=0.75, help="sampling temperature (paper: 0.75)")
    arg("--score-temperature", type=POSITIVE, default=None, help="temperature of the log-probs "
        "in the loss (default: --temperature, the sampling policy's; the authors' code: 1)")
    arg("--top-p", type=PROBABILITY, default=1.0, help="nucleus sampling (paper: 1.0)")
    arg("--top-k", type=NATURAL, default=0, help="top-k sampling, 0 = off (paper: 0)")
    arg("--max-new-tokens", type=COUNT, default=1200, help="completion length (paper: 1200)")
    arg("--generation-batch-size", type=COUNT, help="rows per generate call (default: all)")
    arg("--stop-at-boxed", action=argparse.BooleanOptionalAction, default=True,
        help="end a completion once its \\boxed{...} closes (the authors' rule)")
    arg("--updates-per-batch", type=COUNT, default=1, help="μ, optimizer steps per batch")
    arg("--clip-eps", type=POSITIVE_OR_INF, default=0.2, help="ε of the clipped ratio")
    arg("--beta", type=NONNEGATIVE, default=0.0, help="KL coefficient β (paper: 0 or 0.04)")
    arg("--adv-eps", type=NONNEGATIVE, default=1e-4, help="ε added to the group std")
    arg("--micro-batch-size", type=COUNT, default=4, help="rows per forward/backward pass")
    arg("--max-grad-norm", type=POSITIVE_OR_INF, default=1.0, help="gradient clipping")
    arg("--lr", type=POSITIVE, default=1e-6, help="AdamW learning rate (paper: 1e-6)")
    arg("--weight-decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay")
    arg("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    arg("--lora-r", type=NATURAL, default=0, help="LoRA rank, 0 = full (paper: 64; needs peft)")
    arg("--lora-alpha", type=POSITIVE, default=128, help="LoRA alpha (paper: 128)")
    arg("--seed", type=NATURAL, default=0, help="random seed")
    arg("--output-dir", default="runs/lgrpo", help="metrics.jsonl and checkpoint-N folders")
    arg("--save-every", type=COUNT, default=100, help="checkpoint every N steps and the last")
    arg("--resume", action="store_true", help="continue from the newest checkpoint")
    arg("--eval-every", type=NATURAL, default=0, help="greedy eval every N steps (0: never)")
    arg("--eval-size", type=COUNT, default=100, help="held-out problems per eval")


def build_parser():
    p = argparse.ArgumentParser(prog="lgrpo.py", description="λ-GRPO (Sullivan & Koller, "
                                "arXiv:2509.21154). With no command: the toy of Table 1.")
    sub = p.add_subparsers(dest="command")
    toy = sub.add_parser("toy", formatter_class=DefaultsOnce,
                         help="Table 1 on the binary-tree toy (the default command)",
                         description="Table 1 on the binary-tree toy, the default command. "
                         "Others: verify, train, plot, plot-toy (python lgrpo.py COMMAND --help).")
    arg = toy.add_argument
    arg("--n", type=PREFIX, nargs="+", default=[1, 2], help="trap prefix lengths n (paper: 1 2)")
    arg("--r-neg", type=FINITE, nargs="+", default=[-0.5, -1.0, -1.5],
        help="reward of the traps (paper: -0.5 -1.0 -1.5); an exponent: --r-neg=-1e30")
    arg("--seeds", type=COUNT, default=5, help="seeds per cell (paper: 5)")
    arg("--seed", type=NATURAL, default=0, help="first seed")
    arg("--steps", type=COUNT, default=250, help="steps per run (paper: 250)")
    arg("--group-size", type=GROUP, default=16, help="group size G (paper: 16)")
    arg("--lr", type=POSITIVE, default=3e-4, help="AdamW learning rate (the paper gives none; "
        "docs/toy.md: the largest rate at which every seed converges)")
    arg("--temperature", type=POSITIVE, default=1.0,
        help="sampling temperature (the paper gives none; docs/toy.md)")
    arg("--toy-model", type=model_flag, help="a pretrained causal LM as the policy, every token "
        "but 'L' and 'R' masked (paper: gpt2; without it a random-init 1-layer GPT-2)")
    arg("--workers", type=NATURAL, default=0, help="processes (0: every core)")
    arg("--json", type=output_file, help="write config, cells and curves here")
    arg("--plot", type=output_file, metavar="FIGURE.png",
        help="draw the curves of every cell here (needs matplotlib)")
    arg("--device", type=device_flag, default="auto",
        help="auto: CUDA for a --toy-model when there is one, else the CPU")
    sub.add_parser("verify", help="check Theorem 1 and the worked example numerically",
                   description="Checks to machine precision Figure 1's numbers, Theorem 1 (L_GRPO "
                   "= L_PRM) in value and gradient, λ-GRPO = each process step counted once, and "
                   "that the equality breaks without token aggregation or with μ > 1 and clipping.")
    add_train_parser(sub)
    plot = sub.add_parser("plot", help="one figure comparing train runs (needs matplotlib)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="--output-dir folders")
    plot.add_argument("--out", type=output_file, required=True, metavar="FIGURE.png")
    plot.add_argument("--smooth", type=COUNT, default=10, help="steps of the reward's mean")
    plot_toy = sub.add_parser("plot-toy", help="the toy's figure from a --json result")
    plot_toy.add_argument("result", metavar="RESULT.json", help="written by python lgrpo.py --json")
    plot_toy.add_argument("--out", type=output_file, required=True, metavar="FIGURE.png")
    return p


def main(argv=None):
    """The command line. A mistake in the input prints one line, `lgrpo: error: ...`, exit 2."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv or argv[0].startswith("-"):
        argv = ["toy"] + argv  # the toy is the default command, its flags the default --help
    parser = build_parser()
    args = parser.parse_args(argv)
    # What no single flag's type can check, refused the same way: argparse's one line, exit 2.
    from importlib.util import find_spec
    plots = args.command in ("plot", "plot-toy") or getattr(args, "plot", None)
    if plots and find_spec("matplotlib") is None:
        parser.error("plot needs matplotlib: pip install matplotlib")
    if getattr(args, "lora_r", 0) and find_spec("peft") is None:
        parser.error("--lora-r needs peft: pip install peft")
    for flag in ("model", "toy_model"):
        if (getattr(args, flag, None) or "").endswith(".gguf") and find_spec("gguf") is None:
            parser.error(f"--{flag.replace('_', '-')}: a .gguf file needs gguf: pip install gguf")
    if args.command == "train" and args.eval_split and args.eval_fraction:
        parser.error("--eval-split and --eval-fraction both name the held-out problems")
    if args.command == "train" and args.eval_every and not (args.eval_split or args.eval_fraction):
        parser.error("--eval-every needs --eval-split or --eval-fraction")
    try:
        if args.command == "verify":
            sys.exit(1 if verify() else 0)
        elif args.command == "toy":
            toy_sweep(args)
        elif args.command == "train":
            train(args)
        elif args.command == "plot":
            plot_runs(args.run_dirs, args.out, args.smooth)
        elif args.command == "plot-toy":
            plot_toy_file(args.result, args.out)
    except InputError as error:
        print(f"lgrpo: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
