"""λ-GRPO: a single-file reference implementation.

M. Sullivan and A. Koller, "GRPO is Secretly a Process Reward Model", arXiv:2509.21154 (ICML 2026).
(Not arXiv:2510.06870, an unrelated method that is also called λ-GRPO.)

The file reads top to bottom in the paper's order:

  1. GRPO                   outcome advantages, rollouts, token log-probs, the loss of eq. (2)
  2. Process sets           the prefix trie hidden in every group
  3. Step rewards           the implicit process reward model, Theorem 1
  4. λ-GRPO                 divide each token's term by the size of its process set
  5. The numerical checks   Figure 1 and Theorem 1 to machine precision (`python lgrpo.py verify`)
  6. The toy                the binary tree of Table 1, the simplest full loop (`python lgrpo.py`)
  7. Training an LLM        Table 2's setup on one GPU (`python lgrpo.py train`)
  8. Scaling out with TRL   the same loss inside TRL's GRPOTrainer (`LambdaGRPOTrainer`)

  Appendix, not needed to understand λ-GRPO: A. answer checking, B. data, C. runs (checkpoints,
  resume), D. plots, E. tiny models built in code, F. the command line.

Shapes: B completions in groups of G consecutive rows (rows g·G … g·G+G−1 answer prompt g), T
completion positions. Completions are right-padded; `completion_mask` is 1 on real tokens,
including the terminating EOS, and is the only source of truth about padding.
"""

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

import torch
import torch.nn.functional as F


class InputError(ValueError):
    """A mistake in what the user passed (flags, data, reward, paths). The command line prints it
    as one line, `lgrpo: error: ...`, without a traceback; anything else keeps its traceback."""


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 1. GRPO: a group of completions, outcome advantages, token log-probs and the loss of eq. (2)
# ──────────────────────────────────────────────────────────────────────────────────────────────────


@torch.no_grad()
def sample_completions(model, prompt_ids, prompt_mask, group_size, batch_size=None,
                       pad_token_id=0, do_sample=True, **generate_kwargs):
    """A group of `group_size` completions from π_old for every (left-padded) prompt.

    Returns completion tokens [P·G, T], right-padded with `pad_token_id`; rows g·G … g·G+G−1 are
    prompt g's group. `batch_size` bounds how many rows one HF `generate` call decodes at once.
    `do_sample=False` decodes greedily (evaluation).
    """
    ids = prompt_ids.repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    batch_size = batch_size or ids.shape[0]
    chunks = []
    for s in range(0, ids.shape[0], batch_size):
        out = model.generate(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size],
                             do_sample=do_sample, pad_token_id=pad_token_id, **generate_kwargs)
        chunks.append(out[:, ids.shape[1]:])
    width = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])


def completion_mask(completion_ids, eos_token_ids, stop_lengths=None):
    """1 on each completion's tokens up to and including its first EOS, 0 after; and which rows
    were truncated (neither an EOS nor a stop). `stop_lengths`: where a stopping rule ended each
    row, or any value > T where it did not.

    Read from the first EOS, never from `!= pad_token_id`: with pad = eos that would drop the real
    EOS from the loss, and the model would never learn to stop.
    """
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=completion_ids.device)
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

    The std is the sample (n−1) one, as in the paper's worked example. A group whose rewards are
    all equal carries no signal: its advantages are exactly 0, never 0/0. Computed in float64
    (a float32 sum of rewards near 3e38 overflows) and returned in the rewards' dtype.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0 (got {eps}): a negative ε flips the sign of every "
                         "advantage of a group whose std is below |ε|.")
    r = check_rewards(rewards, group_size)
    dtype, r = r.dtype, r.double().view(-1, group_size)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    flat = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(flat, torch.zeros_like(a), a).view(-1).to(dtype)


def logprobs_of(logits, targets, temperature):
    """log softmax(logits / temperature)[target], as logit[target] − logsumexp(logits): no
    [..., V] log_softmax tensor is kept."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model, input_ids, attention_mask, completion_start, temperature=1.0,
                   chunk_tokens=1 << 24):
    """log π(y_t | q, y_<t) for the completion positions `completion_start:` of
    [prompt | completion], the log-probabilities in the ratio P and the KL term of eq. (2).

    π is the distribution the tokens were sampled from, softmax(logits / temperature), so that
    the ratio and the gradient belong to the sampling policy (as in TRL). The prompt is
    left-padded, so positions come from the attention mask, as in generate(); otherwise scoring
    would see other positions than sampling did. Only the completion's logits are computed
    (`logits_to_keep`), and they become log-probs in chunks of about `chunk_tokens` logits; with
    bf16/fp16 logits each chunk is recomputed in the backward pass, so that no float32 copy of
    the full [B, T, V] logits is ever kept.
    """
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be > 0 and finite (got {temperature}): the logits are "
                         "divided by it; greedy decoding has no log-probs to train on.")
    B, T = input_ids.shape[0], input_ids.shape[1] - completion_start
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits  # predictions for y_0 … y_T
    targets = input_ids[:, completion_start:]
    step = max(1, chunk_tokens // (B * logits.shape[-1]))
    # One split into chunks (the last position predicts past the end and is dropped): its
    # backward assembles a single gradient, where slicing would allocate one per chunk.
    sizes = [min(step, T - s) for s in range(0, T, step)] + [1]
    chunks = logits.split(sizes, dim=1)[:-1]
    out = []
    for chunk, target in zip(chunks, targets.split(step, dim=1)):
        # Recomputing pays only when the float32 copy is new memory (bf16/fp16 logits).
        if chunk.requires_grad and chunk.dtype not in (torch.float32, torch.float64):
            out.append(torch.utils.checkpoint.checkpoint(logprobs_of, chunk, target, temperature,
                                                         use_reentrant=False))
        else:
            out.append(logprobs_of(chunk, target, temperature))
    return torch.cat(out, 1) if out else logits.new_zeros(B, 0, dtype=torch.float32)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, weights=None, clip_eps=0.2, beta=0.0,
                aggregation="token"):
    """Minus the GRPO objective of eq. (2), with optional per-token weights (λ-GRPO).

    Per token:  −min(P·A, clip(P, 1−ε, 1+ε)·A) + β·(exp(ref − logp) − (ref − logp) − 1),
    P = exp(logp − old_logp), the whole term multiplied by `weights` when given.
    `advantages` is [B] (outcome advantages a_i, the same for every token) or [B, T] (per-token
    step advantages A_{i,t}). Aggregation "token" (the paper's, DAPO-style): sum over all valid
    tokens divided by their number. "sequence": mean over each completion, then over completions.
    With old_logp = logp.detach(), P is 1 in value and clipping never acts (μ = 1).
    """
    check_loss_inputs(logp, old_logp, advantages, mask, weights=weights, aggregation=aggregation,
                      clip_eps=clip_eps, beta=beta)
    A = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp, the reference model's token log-probs.")
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1)  # k3 estimator of KL(π_θ ‖ π_ref)
    if weights is not None:
        loss = loss * weights
    m = mask.to(loss.dtype)
    if aggregation == "token":
        return (loss * m).sum() / m.sum().clamp(min=1)
    return ((loss * m).sum(1) / m.sum(1).clamp(min=1)).mean()


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 2. Process sets: the prefix trie hidden in every group
# ──────────────────────────────────────────────────────────────────────────────────────────────────
#
# A process set λ is a set of completions that share a prefix. In the group's prefix trie every
# node is one process step: a maximal run of tokens on which exactly the members of λ agree.
# λ^(i,t) is the set whose step holds token t of completion i: {k : y^(k)[:t+1] = y^(i)[:t+1]}.
# Identical completions are separate members. The vectorized functions below never build the
# trie; `build_trie` builds it the slow obvious way, for reading, printing and checking.


def shared_prefix_lengths(completion_ids, completion_mask, group_size):
    """lcp[g, i, k]: how many leading tokens completions i and k of group g share.

    Two completions agree at t when both have a real token there and it is the same token; their
    shared prefix ends at the first t where they do not. So k ∈ λ^(i,t) exactly when lcp > t.
    Pairwise within each group: one [B/G, G, G, T] boolean tensor, no Python loop over tokens.
    """
    mask = check_completions(completion_ids, completion_mask, group_size)
    shape = (completion_ids.shape[0] // group_size, group_size, completion_ids.shape[1])
    ids, mask = completion_ids.view(shape), mask.view(shape)
    differ = (ids[:, :, None] != ids[:, None]) | ~mask[:, :, None] | ~mask[:, None]
    differ = F.pad(differ, (0, 1), value=True)  # a sentinel, so that every pair differs somewhere
    return differ.view(torch.uint8).argmax(-1)  # argmax returns the first maximum


def process_set_sums(lcp, values, T):
    """Σ_{k ∈ λ^(i,t)} values_k for every (g, i, t), from `shared_prefix_lengths`.

    The members are the k with lcp[g, i, k] > t, so the sum is the total minus a running sum over
    a histogram of the lcp values: O(G²) scatters and one cumsum, never a [G, G, T] float tensor.
    """
    by_lcp = torch.zeros(*lcp.shape[:2], T + 1, dtype=values.dtype, device=lcp.device)
    by_lcp.scatter_add_(2, lcp, values[:, None, :].expand_as(lcp))
    return values.sum(1)[:, None, None] - by_lcp.cumsum(2)[..., :T]


def process_set_sizes(completion_ids, completion_mask, group_size):
    """|λ^(i,t)|, the size of the process set whose step holds token t of completion i.

    Identical completions are separate members; 0 on padding.
    """
    lcp = shared_prefix_lengths(completion_ids, completion_mask, group_size)
    ones = torch.ones(lcp.shape[:2], dtype=torch.long, device=lcp.device)
    return process_set_sums(lcp, ones, completion_ids.shape[1]).view(completion_ids.shape)


@dataclasses.dataclass
class TrieNode:
    """One process step: the tokens [start, end) on which exactly `members` agree."""
    tokens: list
    start: int
    end: int
    members: list
    reward: float = 0.0      # R̂(λ): mean outcome reward of the members
    advantage: float = 0.0   # step advantage (R̂(λ) − mean r) / (std r + ε)
    children: list = dataclasses.field(default_factory=list)

    @property
    def size(self):
        return len(self.members)


def build_trie(completions, rewards, eps=1e-4):
    """The explicit prefix trie of one group, built the slow obvious way.

    `completions` is a list of token lists (or 1-D tensors). The root is the shared prompt (no
    tokens, not a step); every other node is a maximal run of tokens shared by exactly the same
    completions. Each node carries its Monte-Carlo step reward R̂(λ) and step advantage.
    """
    if len(rewards) != len(completions):
        raise ValueError(f"{len(rewards)} rewards for {len(completions)} completions: give one "
                         "reward per completion of the group.")
    # Tokens are compared and hashed: a 0-d tensor hashes by identity, so two equal tensor tokens
    # would never share a prefix. Read them by value.
    completions = [[token_value(t) for t in c] for c in completions]
    rewards = check_rewards(rewards, len(completions)).double()
    advantages = group_advantages(rewards, len(completions), eps)

    def grow(node):
        # Extend the span while every member continues with the same token (not the root's:
        # the prompt is shared by the whole group and is not a step).
        while node.members and node is not root:
            nxt = [completions[k][node.end] if node.end < len(completions[k]) else None
                   for k in node.members]
            if None in nxt or len(set(nxt)) != 1:
                break
            node.tokens.append(nxt[0])
            node.end += 1
        node.reward = rewards[node.members].mean().item()
        node.advantage = advantages[node.members].mean().item()
        branches = {}
        for k in node.members:
            if node.end < len(completions[k]):
                branches.setdefault(completions[k][node.end], []).append(k)
        node.children = [grow(TrieNode([], node.end, node.end, ks)) for ks in branches.values()]
        return node

    root = TrieNode([], 0, 0, list(range(len(completions))))
    return grow(root)


def trie_steps(root):
    """All process steps (nodes below the root) in depth-first order."""
    for child in root.children:
        yield child
        yield from trie_steps(child)


def format_trie(root, show=str, depth=0):
    """The trie as an indented tree, one step per line, like the paper's Figure 1."""
    lines = []
    for child in root.children:
        label = " ".join(show(t) for t in child.tokens)
        lines.append(f"{'    ' * depth}{label:<{max(12, len(label))}}  |λ|={child.size}  "
                     f"R̂={child.reward:.4f}  A={child.advantage:+.4f}  members={child.members}")
        lines.append(format_trie(child, show, depth + 1))
    return "\n".join(line for line in lines if line)


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 3. Step rewards and Theorem 1: the process reward model hidden in GRPO
# ──────────────────────────────────────────────────────────────────────────────────────────────────
#
# The Monte-Carlo step reward of a process set is the mean outcome reward of its members,
# R̂(λ), and the step advantage is A_{i,t} = (R̂(λ^(i,t)) − mean r) / std r. Put A_{i,t} in place of
# a_i in eq. (2) and you get a PRM objective, L_PRM. Theorem 1: with token-level aggregation and
# μ = 1, L_GRPO = L_PRM in value and in gradient, because a token's ratio and KL terms depend
# only on its prefix, so they are the same for every member of its process set, and the members'
# a_k add up to |λ| times their mean. Section 5 checks it numerically.


def step_advantages(completion_ids, completion_mask, rewards, group_size, eps=1e-4):
    """A_{i,t} = (R̂(λ^(i,t)) − mean(r)) / (std(r) + ε), R̂(λ) the mean reward of λ's members.

    This is the process reward GRPO secretly uses: the normalization is affine, so A_{i,t} is
    also the mean of the members' outcome advantages a_k, which is how it is computed. 0 on
    padding.
    """
    if len(rewards) != completion_ids.shape[0]:
        raise ValueError(f"{len(rewards)} rewards for {completion_ids.shape[0]} completions: "
                         "give one reward per row of completion_ids.")
    a = group_advantages(rewards, group_size, eps).view(-1, group_size)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    lcp = shared_prefix_lengths(completion_ids, completion_mask, group_size)
    T = completion_ids.shape[1]
    summed = process_set_sums(lcp, a, T).view(completion_ids.shape)
    sizes = process_set_sums(lcp, torch.ones_like(a), T).view(completion_ids.shape)  # |λ^(i,t)|
    return torch.where(sizes > 0, summed / sizes.clamp(min=1), 0)  # exactly 0 on padding


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 4. λ-GRPO: each process step counted once
# ──────────────────────────────────────────────────────────────────────────────────────────────────
#
# In eq. (2) a step shared by |λ| completions is pushed |λ| times, once per member: a shared
# prefix that averages below the group mean is pushed down once per member, even when it leads
# to the best completion, and a frequent good step is over-reinforced. λ-GRPO divides each
# token's whole loss term (KL included) by |λ^(i,t)| and keeps the normalizer 1 / Σ len.


def lambda_weights(completion_ids, completion_mask, group_size, dtype=torch.float32):
    """1 / |λ^(i,t)| on real tokens, 0 on padding: the whole change from GRPO to λ-GRPO.

    With these weights in `policy_loss` every process step counts once, with its step advantage:
    L_λ-GRPO = 1/Σ len · Σ_i Σ_t (P_{i,t}·a_i − D_{i,t}) / |λ^(i,t)|.
    """
    sizes = process_set_sizes(completion_ids, completion_mask, group_size)
    return torch.where(sizes > 0, 1 / sizes.clamp(min=1).to(dtype), 0)


# The input checks of sections 1–4: a wrong shape, a NaN reward or a badly padded mask raises
# here, with the fix, instead of becoming a silently wrong loss.


def check_group_size(batch_size, group_size):
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (got {group_size}): GRPO compares the "
                         "completions of a group, and one completion has nothing to compare with.")
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} completions does not split into groups of "
                         f"{group_size}: pass B = prompts × group_size rows, group by group.")


def check_rewards(rewards, group_size):
    """The rewards as a 1-D floating tensor, one finite number per completion."""
    if not torch.is_tensor(rewards):  # Python floats are doubles: keep them so
        rewards = torch.tensor(rewards, dtype=torch.float64)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, one number per completion (got shape "
                         f"{tuple(rewards.shape)}).")
    check_group_size(rewards.numel(), group_size)
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards must be finite; rows {bad} are NaN or infinite: fix the reward "
                         "function so that it returns a real number for every completion.")
    return rewards


def check_loss_inputs(logp, old_logp, advantages, mask, weights, aggregation, clip_eps, beta):
    """Shapes, the aggregation, ε and β of `policy_loss`, and a mask of 0s and 1s only."""
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be the same [B, T] shape.")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got "
                         f"{tuple(advantages.shape)}.")
    if weights is not None and weights.shape != logp.shape:
        raise ValueError(f"weights must be [B, T] = {tuple(logp.shape)}, got "
                         f"{tuple(weights.shape)}.")
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}.")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 (got {clip_eps}): with ε ≤ 0 the clip range is "
                         "empty or inverted; pass math.inf to turn clipping off.")
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be ≥ 0 and finite (got {beta}): a negative β rewards moving "
                         "away from the reference model.")
    check_binary_mask(mask)


def check_binary_mask(mask):
    """The mask as booleans, after checking it holds only 0 and 1: it multiplies each token's
    term, so a 2 would count a token twice. (One host sync, for non-boolean masks only.)"""
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"mask must hold only 0 and 1, got the values "
                         f"{sorted(set(mask.unique().tolist()) - {0, 1})}.")
    return mask.bool()


def check_completions(completion_ids, completion_mask, group_size):
    """The mask as booleans, after checking shapes, grouping and right padding."""
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B, T].")
    check_group_size(completion_ids.shape[0], group_size)
    mask = completion_mask.bool()
    gaps = mask[:, 1:] & ~mask[:, :-1]
    if gaps.any():
        rows = gaps.any(1).nonzero().flatten().tolist()
        raise ValueError(f"completion_mask rows {rows} have a 1 after a 0: a completion must be "
                         "right-padded, its mask 1…1 0…0 (left-pad the prompt, not the "
                         "completion).")
    return mask


def token_value(token):
    """A token as a hashable value: a one-element tensor becomes its number."""
    if not torch.is_tensor(token):
        return token
    if token.numel() != 1:
        raise ValueError(f"a token must be one number, got a tensor of shape {tuple(token.shape)}: "
                         "give each completion as a list of token ids or a 1-D tensor.")
    return token.item()


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 5. The numerical checks: Figure 1 and Theorem 1 (`python lgrpo.py verify`)
# ──────────────────────────────────────────────────────────────────────────────────────────────────

# The paper's Figure 1: six completions, letters as tokens, with outcome rewards, and the step
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

# The group for the Theorem 1 checks: shared prefixes (1 2, 6 6 2), unequal lengths, a duplicate
# (rows 0 and 2) and a completion that is a prefix of another (row 3 of row 4).
THEOREM_GROUP = [[1, 2, 3, 4], [1, 2, 5, 6, 7, 3], [1, 2, 3, 4], [6, 6, 2], [6, 6, 2, 5, 1],
                 [3, 1]]
THEOREM_REWARDS = [1.0, 0.0, 1.0, 0.0, 0.5, 1.0]


def pad_completions(completions, pad_id=0):
    """Token lists → right-padded `completion_ids` and `completion_mask` tensors."""
    T = max(map(len, completions), default=0)
    ids = torch.tensor([list(c) + [pad_id] * (T - len(c)) for c in completions], dtype=torch.long)
    mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions], dtype=torch.long)
    return ids.view(len(completions), T), mask.view(len(completions), T)


def tiny_gpt2(vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0,
              dtype=torch.float32):
    """A small randomly initialized GPT-2 built from a config (no download), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng():  # leave the caller's random stream alone
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).to(dtype).eval()


@dataclasses.dataclass
class Check:
    """One numerical check: what was measured, the bound it must meet, and why it holds."""
    name: str
    measured: float
    passed: bool
    bound: str
    why: str = ""


def at_most(name, measured, tol, why=""):
    return Check(name=name, measured=measured, passed=measured <= tol, bound=f"≤ {tol:g}",
                 why=why)


def max_abs_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


def figure1_checks():
    """The paper's worked example (Figure 1): every number of both tables to 4 decimals.

    The paper computes it with ε = 0 (with ε = 1e-4 the first advantage would read 0.2213).
    """
    completions = [c.split() for c in FIGURE1_COMPLETIONS]
    rewards = torch.tensor(FIGURE1_REWARDS, dtype=torch.float64)
    G = len(completions)
    a = group_advantages(rewards, G, eps=0)
    moments = max(abs(rewards.mean().item() - 0.416667), abs(rewards.std().item() - 0.376386))
    checks = [at_most("Figure 1: mean(r) = 0.416667, sample std = 0.376386", moments, 5e-7),
              at_most("Figure 1: outcome advantages a_i",
                      max_abs_diff(a, torch.tensor(FIGURE1_ADVANTAGES)), 5e-5)]
    steps = list(trie_steps(build_trie(completions, rewards, eps=0)))
    got = [(" ".join(n.tokens), [k + 1 for k in n.members], n.size) for n in steps]
    same_steps = got == [row[:3] for row in FIGURE1_STEPS]
    diff = max(max(abs(n.reward - row[3]), abs(n.advantage - row[4]))
               for n, row in zip(steps, FIGURE1_STEPS))
    checks.append(at_most("Figure 1: the 9 process steps, members, |λ|, R̂ and A",
                          diff if same_steps else math.inf, 5e-5))
    # The vectorized functions must agree with the trie on every token.
    vocab = {t: i for i, t in enumerate(sorted({t for c in completions for t in c}))}
    ids, mask = pad_completions([[vocab[t] for t in c] for c in completions])
    sizes, A = process_set_sizes(ids, mask, G), step_advantages(ids, mask, rewards, G, eps=0)
    disagree = max(max(abs(sizes[k, t].item() - n.size), abs(A[k, t].item() - n.advantage))
                   for n in steps for k in n.members for t in range(n.start, n.end))
    checks.append(at_most("Figure 1: process_set_sizes and step_advantages agree with the trie",
                          disagree, 1e-12))
    # GRPO's summed push on each token of J K L is Σ_members a_k; λ-GRPO's is that divided by |λ|.
    jkl = next(n for n in steps if n.tokens == ["J", "K", "L"])
    grpo_push = a[jkl.members].sum().item()
    lambda_push = grpo_push / jkl.size
    checks.append(at_most(f"Figure 1: push on J K L, GRPO {grpo_push:+.4f} (paper −0.6642), "
                          f"λ-GRPO {lambda_push:+.4f} (paper −0.2214)",
                          max(abs(grpo_push + 0.6642), abs(lambda_push + 0.2214)), 5e-5,
                          "J K L M is the best completion, yet GRPO pushes its prefix down 3×"))
    return checks


def theorem1_checks(beta=0.04, tol=1e-10):
    """Theorem 1 and λ-GRPO's "each step once" reading, in value and gradient.

    A tiny float64 GPT-2 in eval mode (dropout would make two forward passes differ) scores
    THEOREM_GROUP; a second one is the KL reference. Two counterexamples show that both of the
    theorem's assumptions (token aggregation, μ = 1) are needed.
    """
    G = len(THEOREM_GROUP)
    ids, mask = pad_completions(THEOREM_GROUP)
    rewards = torch.tensor(THEOREM_REWARDS, dtype=torch.float64)
    policy, reference = (tiny_gpt2(8, seed=s, dtype=torch.float64) for s in (0, 1))
    prompt = torch.full((G, 2), 7)
    input_ids = torch.cat([prompt, ids], 1)
    attention = torch.cat([torch.ones_like(prompt), mask], 1)

    def score(model):
        return token_logprobs(model, input_ids, attention, prompt.shape[1])

    with torch.no_grad():
        ref_logp = score(reference)
    a = group_advantages(rewards, G)                        # outcome advantages, [B]
    A = step_advantages(ids, mask, rewards, G)              # step advantages, [B, T]
    w = lambda_weights(ids, mask, G, dtype=torch.float64)
    params = list(policy.parameters())

    def objective(advantages, **kw):
        def loss(logp, old_logp):
            return policy_loss(logp, old_logp, ref_logp, advantages=advantages, mask=mask,
                               beta=beta, **kw)
        return loss

    def steps_counted_once(logp, old):
        # λ-GRPO read off the trie: every process step once, with its step advantage. The terms
        # of a step are the same for all its members (they depend on the prefix only): use one.
        total = 0.0
        for node in trie_steps(build_trie(THEOREM_GROUP, rewards)):
            i, s, e = node.members[0], node.start, node.end
            step_adv = torch.tensor([node.advantage], dtype=torch.float64)
            total = total + (e - s) * policy_loss(logp[i:i + 1, s:e], old[i:i + 1, s:e],
                                                  ref_logp[i:i + 1, s:e], advantages=step_adv,
                                                  mask=mask[i:i + 1, s:e], beta=beta)
        return total / mask.sum()

    def value_and_grad(loss, model=policy, old_logp=None):
        logp = score(model)
        value = loss(logp, logp.detach() if old_logp is None else old_logp)
        return value.detach(), torch.autograd.grad(value, list(model.parameters()))

    def compare(name, f, g, equal, why="", **kw):
        (v1, g1), (v2, g2) = value_and_grad(f, **kw), value_and_grad(g, **kw)
        dv, dg = (v1 - v2).abs().item(), max_abs_diff(g1, g2)
        if equal:
            return [at_most(f"{name}: value", dv, tol, why),
                    at_most(f"{name}: gradient of all {len(params)} parameter tensors", dg, tol)]
        return [Check(name=f"{name}: value", measured=dv, passed=dv > 1e-6,
                      bound="> 1e-6, equality breaks as the paper says", why=why)]

    moved = copy.deepcopy(policy)  # μ > 1: after an update within the batch, π_θ ≠ π_old
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        old_logp = score(policy)
    ratio = torch.exp(score(moved) - old_logp).detach()[mask.bool()]
    clipped = ((ratio < 0.8) | (ratio > 1.2)).double().mean().item()

    return (compare("Theorem 1: L_GRPO (outcome a_i) = L_PRM (step A_i,t)",
                    objective(a), objective(A), equal=True,
                    why="P and D depend on the prefix only, so each step's members sum to "
                        "|λ|·mean(a)")
            + compare("λ-GRPO (weights 1/|λ|) = each process step counted once",
                      objective(a, weights=w), steps_counted_once, equal=True,
                      why="the |λ| members of a step together push it once")
            + compare("Counterexample: 'sequence' aggregation, unequal lengths",
                      objective(a, aggregation="sequence"), objective(A, aggregation="sequence"),
                      equal=False,
                      why="members of a step are divided by their own lengths, so they no longer "
                          "share one coefficient and their a_k do not sum to |λ|·A")
            + compare(f"Counterexample: μ > 1, clipping active on {clipped:.0%} of tokens",
                      objective(a), objective(A), equal=False,
                      why="min(P·a, clip(P)·a) depends on each a_k's sign, so it is not linear "
                          "in a",
                      model=moved, old_logp=old_logp)
            + compare("μ > 1 without clipping (ε = ∞): the equality still holds",
                      objective(a, clip_eps=math.inf), objective(A, clip_eps=math.inf),
                      equal=True, why="P ≠ 1 is harmless: it is still a function of the prefix",
                      model=moved, old_logp=old_logp))


def verify():
    """Run every check, print a report, return the number of failures."""
    completions = [c.split() for c in FIGURE1_COMPLETIONS]
    print("The worked example (Figure 1) as a trie:\n")
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


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 6. The toy: a depth-4 binary tree (Table 1; `python lgrpo.py`)
# ──────────────────────────────────────────────────────────────────────────────────────────────────
#
# The simplest full loop: sample a group, score it, compute advantages (and λ weights), update.
# The LLM loop of section 7 runs the same functions, `grpo_update` included.


def seed_everything(seed):
    """Seed Python and torch (CPU and CUDA) so that a run is a function of its seed."""
    random.seed(seed)
    torch.manual_seed(seed)


def grpo_update(model, optimizer, input_ids, attention_mask, completion_start, completion_mask,
                advantages, weights=None, old_logp=None, ref_logp=None, updates_per_batch=1,
                micro_batch_size=None, clip_eps=0.2, beta=0.0, aggregation="token",
                max_grad_norm=1.0, temperature=1.0):
    """μ = `updates_per_batch` optimizer steps on one batch of groups, minimizing eq. (2).

    λ-GRPO when `weights` are `lambda_weights`, GRPO when None. Each micro-batch's loss is scaled
    by its share of the batch's normalizer (tokens for "token", completions for "sequence"), so
    gradient accumulation gives exactly the full-batch gradient. `old_logp` is needed when μ > 1
    (with μ = 1 it is logp itself, detached); `ref_logp` when β > 0; all three at the sampling
    `temperature`. Returns tensor statistics: the loss and clipped share averaged over the μ
    updates, the k3 KL of the sampling policy, the gradient norm before clipping.

    Raises FloatingPointError, before the optimizer step and with the gradients cleared, when the
    loss or the gradient norm is not finite: one such step would put NaN into every weight.
    """
    B = input_ids.shape[0]
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be ≥ 1 or None (got {micro_batch_size}).")
    if updates_per_batch < 1:
        raise ValueError(f"updates_per_batch (μ) must be ≥ 1 (got {updates_per_batch}).")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (got {max_grad_norm}): the gradient is scaled "
                         "to at most this norm; pass math.inf to turn clipping off.")
    mb = micro_batch_size or B
    if updates_per_batch > 1 and old_logp is None:
        raise ValueError("updates_per_batch > 1 needs old_logp, the sampling policy's log-probs.")
    # Checked once for the whole batch; as booleans the micro-batches need no check of their own.
    completion_mask = check_binary_mask(completion_mask)
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
            # This micro-batch's share of the normalizer, in the loss's dtype (int / int would
            # be float32).
            size = mask.sum() if aggregation == "token" else mask.shape[0]
            share = torch.as_tensor(size, dtype=loss.dtype) / norm
            (loss * share).backward()
            with torch.no_grad():  # statistics stay tensors: no host sync inside the loop
                A = advantages[rows][:, None] if advantages.dim() == 1 else advantages[rows]
                ratio, valid = torch.exp(logp.detach() - old), mask.bool()
                clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))
                stats["loss"] += loss.detach() * share / updates_per_batch
                stats["clip_frac"] += (clipped & valid).sum() / n_tokens / updates_per_batch
                if ref is not None and update == 0:  # KL(π_old ‖ π_ref) on π_old's own samples
                    d = (ref - logp.detach())[valid]
                    stats["kl"] += (torch.exp(d) - d - 1).sum() / n_tokens
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm,
                                                            foreach=True)
        # One host sync per optimizer step, the price of never stepping on a NaN.
        if not torch.isfinite(stats["grad_norm"] + stats["loss"]):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"update {update + 1} of {updates_per_batch}: the loss is {float(stats['loss'])} "
                f"and the gradient norm {float(stats['grad_norm'])}; the optimizer step was not "
                "taken.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


TOY_DEPTH = 4


TOY_CLASSES = ("T", "0.7", "trap")  # what a sampled path can be, in the order of path_classes


def path_classes(paths, target, n):
    """Which of the toy's three kinds each path is (Table 1): 0 for the target T, 2 for a trap
    (shares T's first n tokens but is not T), 1 for every other path (reward 0.7)."""
    hit = (paths == target).all(1)
    trap = (paths[:, :n] == target[:n]).all(1) & ~hit
    return torch.where(hit, 0, torch.where(trap, 2, 1))


def tree_rewards(paths, target, n, r_neg):
    """The toy's outcome reward (Table 1): 1.0 for the target path T, r_neg for every other path
    that shares T's first n tokens (a trap: T's own prefix looks bad on average), 0.7 for all the
    rest."""
    values = torch.tensor([1.0, 0.7, r_neg], device=paths.device)
    return values[path_classes(paths, target, n)]


class AllowTokens:
    """Logits processor: sample only the given tokens (the toy's L and R)."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def __call__(self, input_ids, scores):
        keep = torch.full_like(scores, -math.inf)
        keep[:, self.token_ids] = 0
        return scores + keep


def toy_device(device, toy_model):
    """The toy's torch device. "auto": CUDA when there is one and a pretrained `toy_model` plays
    the policy (the paper's GPT-2 small); else the CPU, where the tiny default policy runs faster
    than on a GPU (its steps are all fixed per-call cost)."""
    if device == "auto":
        return "cuda" if toy_model is not None and torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device (use auto, cpu or "
                         "cuda).") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this machine has no CUDA device (use auto or cpu).")
    return device


def toy_policy(name_or_path, seed, device="cpu"):
    """(model, start token, [L, R] token ids): a random-init 1-layer GPT-2 over {<s>, L, R} by
    default, or a pretrained causal LM whose tokens "L" and "R" are the two actions (Table 1)."""
    if name_or_path is None:
        model = tiny_gpt2(vocab_size=3, n_layer=1, n_embd=64, n_head=2, n_positions=8, seed=seed)
        return model.to(device), 0, [1, 2]
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    actions = [tokenizer.convert_tokens_to_ids(t) for t in ("L", "R")]
    if None in actions or tokenizer.unk_token_id in actions:
        raise InputError(f"--toy-model {name_or_path}: its vocabulary lacks the token 'L' or 'R'.")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return load_causal_lm(name_or_path, torch.float32, device).eval(), start, actions


def toy_run(n, r_neg, loss, seed, steps, group_size, lr, temperature, toy_model=None,
            device="cpu"):
    """One training run on the tree of Table 1. Returns, per step, the share of sampled paths
    equal to T ("frequency") and how many paths of each kind in TOY_CLASSES were sampled
    ("counts": [T, 0.7, trap]).

    sample_completions → tree_rewards → group_advantages → lambda_weights → grpo_update
    (μ = 1, β = 0, token aggregation). The result is a function of the seed on a given device:
    on CUDA the run switches on PyTorch's deterministic kernels.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # the same arithmetic whatever the number of worker processes
    if torch.device(device).type == "cuda":
        # cuBLAS reads this when it starts; without it, deterministic matmuls raise an error.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns instead of ending the sweep.
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        seed_everything(seed)
        model, start, actions = toy_policy(toy_model, seed, device)
        # The target depends on the seed only: GRPO and λ-GRPO face the same tree.
        coin = torch.Generator().manual_seed(seed)
        target = torch.tensor(actions)[torch.randint(0, 2, (TOY_DEPTH,), generator=coin)]
        target = target.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
        prompt = torch.tensor([[start]], device=device)
        inputs_mask = torch.ones(group_size, TOY_DEPTH + 1, dtype=torch.long, device=device)
        frequency, counts = [], []
        for _ in range(steps):
            paths = sample_completions(model, prompt, torch.ones_like(prompt), group_size,
                                       max_new_tokens=TOY_DEPTH, eos_token_id=None,
                                       temperature=temperature, top_k=0, top_p=1.0,
                                       logits_processor=[AllowTokens(actions)])
            mask = torch.ones_like(paths)
            rewards = tree_rewards(paths, target, n, r_neg)
            weights = lambda_weights(paths, mask, group_size) if loss == "lambda" else None
            grpo_update(model, optimizer,
                        input_ids=torch.cat([prompt.expand(group_size, -1), paths], 1),
                        attention_mask=inputs_mask, completion_start=1, completion_mask=mask,
                        advantages=group_advantages(rewards, group_size), weights=weights,
                        temperature=temperature)
            kinds = torch.bincount(path_classes(paths, target, n), minlength=3).tolist()
            frequency.append(kinds[0] / group_size)
            counts.append(kinds)
        return {"frequency": frequency, "counts": counts}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def toy_job(job):
    """toy_run on a dict of arguments (what a worker process receives)."""
    return toy_run(**job)


def toy_sweep(args):
    """Table 1: every (n, r_neg) cell × {GRPO, λ-GRPO} × seeds, in parallel worker processes.
    Prints the table; writes the result with per-seed curves to --json and its figure to --plot."""
    import multiprocessing
    from tqdm import tqdm
    args.device = toy_device(args.device, args.toy_model)  # "auto" resolved once, for the JSON
    cells = [(n, r) for n in args.n for r in args.r_neg]
    jobs = []
    for n, r in cells:
        for loss in ("grpo", "lambda"):
            for seed in range(args.seed, args.seed + args.seeds):
                jobs.append(dict(n=n, r_neg=r, loss=loss, seed=seed, steps=args.steps,
                                 group_size=args.group_size, lr=args.lr,
                                 temperature=args.temperature, toy_model=args.toy_model,
                                 device=args.device))
    workers = min(args.workers or os.cpu_count(), len(jobs))
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            runs = list(tqdm(pool.imap(toy_job, jobs), total=len(jobs), desc="toy runs"))
    else:
        runs = [toy_run(**job) for job in tqdm(jobs, desc="toy runs")]
    last = min(50, args.steps)
    result = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "cells": []}
    for n, r in cells:
        cell = {"n": n, "r_neg": r}
        for loss in ("grpo", "lambda"):
            mine = [run for job, run in zip(jobs, runs)
                    if (job["n"], job["r_neg"], job["loss"]) == (n, r, loss)]
            curves = [run["frequency"] for run in mine]
            per_seed = [sum(c[-last:]) / last for c in curves]
            mean, ci = mean_ci95(per_seed)
            cell[loss] = {"mean": mean, "ci95": ci, "per_seed": per_seed,
                          "curve": [sum(step) / len(curves) for step in zip(*curves)],
                          "curves": curves,
                          "time_to_target": [time_to_target(c) for c in curves],
                          "outcomes": [run_outcome(run["counts"], last) for run in mine]}
        result["cells"].append(cell)
    print(format_table1(result))
    if args.json:
        write_atomically(args.json, json.dumps(result, indent=1))
    if args.plot:
        plot_toy(result, args.plot)
    return result


PAPER_TABLE1 = {  # (n, r_neg): (GRPO, λ-GRPO, Δ) as the paper reports them
    (1, -0.5): (0.3995, 0.5663, 0.1668), (1, -1.0): (0.0000, 0.7535, 0.7535),
    (1, -1.5): (0.2000, 0.4463, 0.2463), (2, -0.5): (0.1980, 0.4292, 0.2312),
    (2, -1.0): (0.0488, 0.3612, 0.3125), (2, -1.5): (0.0000, 0.3820, 0.3820)}

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
    """Time to target, our second metric for Table 1: the first step (counted from 1) at which
    the mean share of T over the last `window` steps reaches `threshold`; None if it never does.
    A run shorter than the window is read with a window of its length."""
    window = min(window, len(frequency))
    for step in range(window, len(frequency) + 1):
        if sum(frequency[step - window:step]) / window >= threshold:
            return step
    return None


def run_outcome(counts, last=50):
    """How a seed ends (Table 1): the kind in TOY_CLASSES sampled most often over the last `last`
    steps, from per-step counts [T, 0.7, trap]. A tie goes to the kind listed first."""
    totals = [sum(step[kind] for step in counts[-last:]) for kind in range(len(TOY_CLASSES))]
    return TOY_CLASSES[totals.index(max(totals))]


def reach_summary(steps):
    """Per-seed times to target → (mean step over the seeds that reach T, or None if none does;
    the number of seeds that never do)."""
    reached = [s for s in steps if s is not None]
    return (sum(reached) / len(reached) if reached else None), len(steps) - len(reached)


def reaches_sooner(steps, other):
    """Whether per-seed times to target `steps` beat `other`: T reached in more seeds, or in as
    many seeds at a lower mean step."""
    (mean, never), (other_mean, other_never) = reach_summary(steps), reach_summary(other)
    if never != other_never:
        return never < other_never
    return mean is not None and mean < other_mean


def format_reach(steps, outcomes):
    """One method's columns in the time-to-target table: mean step, seeds that never reach T,
    outcomes as T/0.7/trap."""
    mean, never = reach_summary(steps)
    tally = "/".join(str(outcomes.count(kind)) for kind in TOY_CLASSES)
    return f"{'-' if mean is None else f'{mean:.1f}':>6} {never:>5} {tally:>10}"


def format_table1(result):
    """Our Table 1 beside the paper's (the last 50 steps), then per cell and method the time to
    target and how the seeds end."""
    cells = result["cells"]
    lines = [f"{'n':>2} {'r_neg':>6} | {'GRPO':>15} {'λ-GRPO':>15} {'Δ':>7} | "
             f"paper: {'GRPO':>6} {'λ-GRPO':>6} {'Δ':>6}"]
    for cell in cells:
        g, l = cell["grpo"], cell["lambda"]
        paper = PAPER_TABLE1.get((cell["n"], cell["r_neg"]))
        paper = " ".join(f"{x:6.4f}" for x in paper) if paper else "     -      -      -"
        lines.append(f"{cell['n']:>2} {cell['r_neg']:>6} | {g['mean']:6.4f} ± {g['ci95']:6.4f} "
                     f"{l['mean']:6.4f} ± {l['ci95']:6.4f} {l['mean'] - g['mean']:+7.4f} | "
                     f"       {paper}")
    last = {loss: sum(c[loss]["mean"] for c in cells) / len(cells) for loss in ("grpo", "lambda")}
    wins = sum(c["lambda"]["mean"] > c["grpo"]["mean"] for c in cells)
    lines.append(f"mean over cells: GRPO {last['grpo']:.4f}, λ-GRPO {last['lambda']:.4f}, "
                 f"Δ {last['lambda'] - last['grpo']:+.4f}; λ-GRPO ahead in {wins} of "
                 f"{len(cells)} cells")
    # The protocol reads the last 50 steps; the mean over all steps also shows how fast T is found.
    every = {loss: sum(sum(c[loss]["curve"]) / len(c[loss]["curve"]) for c in cells) / len(cells)
             for loss in ("grpo", "lambda")}
    lines.append(f"mean over cells and all {len(cells[0]['grpo']['curve'])} steps: "
                 f"GRPO {every['grpo']:.4f}, λ-GRPO {every['lambda']:.4f}, "
                 f"Δ {every['lambda'] - every['grpo']:+.4f}")
    steps = len(cells[0]["grpo"]["curve"])
    lines += ["",
              f"Time to target: the first step at which the {min(10, steps)}-step mean frequency "
              "of T reaches 0.5 (mean over",
              "the seeds that reach it; never: how many do not). Outcomes: how many seeds end on "
              "T / on a 0.7",
              f"path / in a trap (the kind of path sampled most in the last {min(50, steps)} "
              "steps).",
              f"{'':9} | {'GRPO':^23} | {'λ-GRPO':^23} |",
              f"{'n':>2} {'r_neg':>6} | {'to T':>6} {'never':>5} {'T/0.7/trap':>10} | "
              f"{'to T':>6} {'never':>5} {'T/0.7/trap':>10} | sooner"]
    for cell in cells:
        g, l = cell["grpo"], cell["lambda"]
        sooner = ("λ-GRPO" if reaches_sooner(l["time_to_target"], g["time_to_target"]) else
                  "GRPO" if reaches_sooner(g["time_to_target"], l["time_to_target"]) else "-")
        lines.append(f"{cell['n']:>2} {cell['r_neg']:>6} | "
                     f"{format_reach(g['time_to_target'], g['outcomes'])} | "
                     f"{format_reach(l['time_to_target'], l['outcomes'])} | {sooner}")
    sooner = sum(reaches_sooner(c["lambda"]["time_to_target"], c["grpo"]["time_to_target"])
                 for c in cells)
    lines.append(f"λ-GRPO reaches T sooner in {sooner} of {len(cells)} cells")
    reached = {}
    for loss in ("grpo", "lambda"):
        times = [t for c in cells for t in c[loss]["time_to_target"]]
        mean, never = reach_summary(times)
        reached[loss] = f"{len(times) - never} of {len(times)}"
        reached[loss] += "" if mean is None else f" (mean step {mean:.1f})"
    lines.append(f"seeds that reach T, all cells: GRPO {reached['grpo']}, "
                 f"λ-GRPO {reached['lambda']}")
    return "\n".join(lines)


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 7. Training an LLM on math problems (Table 2's setup; `python lgrpo.py train`)
# ──────────────────────────────────────────────────────────────────────────────────────────────────


def train(args):
    """GRPO / λ-GRPO on a causal LM and a math dataset. Writes metrics.jsonl and checkpoints.

    Everything that can be checked is checked before the model is loaded: the run folder (held
    locked until the run ends), the reward function, the data and the prompts' length.
    """
    with lock_run_folder(args.output_dir):
        resume_from = prepare_run_folder(args)
        reward_fn = load_reward(args.reward)
        train_rows, eval_rows = load_problems(args)
        check_prompt_lengths(args, {"train": train_rows, "eval": eval_rows})
        return training_loop(args, reward_fn=reward_fn, train_rows=train_rows,
                             eval_rows=eval_rows, resume_from=resume_from)


def training_loop(args, reward_fn, train_rows, eval_rows, resume_from):
    """The loop of `train`, in a checked and locked run folder: setup, then per step 1. rollouts,
    2. rewards and advantages, 3. log-probs, 4. the update, 5. log and checkpoint."""
    from tqdm import tqdm
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(args.seed)
    model, reference, tokenizer, optimizer = setup_training(args, device, resume_from)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    start = restore_run(resume_from, optimizer)
    if not resume_from:
        write_run_config(args)
    eos_ids = eos_token_ids(tokenizer, model)
    G = args.group_size
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.loss)
    for step in bar:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # 1. Rollouts: G completions per prompt, masked through the first EOS (or the box).
        problems = step_problems(train_rows, step, args.prompts_per_step, args.seed)
        enc = encode_prompts(tokenizer, [q for q, _ in problems], args.system_prompt, device)
        completion_ids, mask, truncated = rollout(args, model, tokenizer, enc=enc,
                                                  eos_ids=eos_ids)
        t1 = time.perf_counter()
        # 2. Rewards and advantages; for λ-GRPO the weights 1/|λ|.
        texts = decode_completions(tokenizer, completion_ids, mask)
        references = [answer for _, answer in problems for _ in range(G)]
        rewards, reward_errors = compute_rewards(reward_fn, texts, references)
        rewards = rewards.to(device)
        advantages = group_advantages(rewards, G, args.adv_eps)
        weights = lambda_weights(completion_ids, mask, G) if args.loss == "lambda" else None
        # 3. Log-probs the update compares against: π_old's when μ > 1, π_ref's when β > 0.
        P = enc["input_ids"].shape[1]
        input_ids = torch.cat([enc["input_ids"].repeat_interleave(G, 0), completion_ids], 1)
        attention = torch.cat([enc["attention_mask"].repeat_interleave(G, 0), mask], 1)
        old_logp, ref_logp = reference_logprobs(args, model, reference=reference,
                                                input_ids=input_ids, attention=attention,
                                                completion_start=P)
        t2 = time.perf_counter()
        # 4. Update: μ optimizer steps on the batch.
        model.train()
        try:
            stats = grpo_update(model, optimizer, input_ids=input_ids, attention_mask=attention,
                                completion_start=P, completion_mask=mask, advantages=advantages,
                                weights=weights, old_logp=old_logp, ref_logp=ref_logp,
                                updates_per_batch=args.updates_per_batch,
                                micro_batch_size=args.micro_batch_size, clip_eps=args.clip_eps,
                                beta=args.beta, aggregation=args.aggregation,
                                max_grad_norm=args.max_grad_norm, temperature=args.temperature)
        except FloatingPointError as error:
            raise InputError(
                f"step {step + 1}, {error} Nothing of this step was logged or saved; its rewards "
                f"ranged from {rewards.min().item():g} to {rewards.max().item():g}. Fix the "
                "reward function and --resume, or start over with a lower --lr in a new "
                "--output-dir."
            ) from None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        # 5. Log and checkpoint.
        row = {"step": step + 1, "reward_mean": rewards.mean().item(),
               "reward_std": rewards.std().item(), "reward_errors": reward_errors,
               "loss": float(stats["loss"]),
               "kl": float(stats["kl"]) if args.beta > 0 else None,
               "clip_frac": float(stats["clip_frac"]), "grad_norm": float(stats["grad_norm"]),
               "completion_len": mask.sum(1).double().mean().item(),
               "truncated_frac": truncated.double().mean().item(),
               "zero_std_frac": zero_std_fraction(advantages, G),
               **trie_stats(completion_ids, mask, G),
               "tokens_per_s": mask.sum().item() / (t3 - t0), "time_gen": t1 - t0,
               "time_score": t2 - t1, "time_update": t3 - t2,
               "peak_mem_mb": peak_memory_mb(device)}
        rows = [row]
        if args.eval_every and (step + 1) % args.eval_every == 0:
            accuracy = evaluate(model, tokenizer, eval_rows[:args.eval_size],
                                reward_fn=reward_fn, args=args, eos_ids=eos_ids)
            rows.append({"step": step + 1, "eval_accuracy": accuracy})
            tqdm.write(f"step {step + 1}: eval accuracy {accuracy:.4f}")
        append_metrics(metrics_path, rows)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.4f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.output_dir, step + 1, model=model, tokenizer=tokenizer,
                            optimizer=optimizer, args=args)
    return model


def setup_training(args, device, resume_from):
    """The tokenizer, the policy (full or LoRA, from a checkpoint when resuming), the frozen
    reference when β > 0, and the optimizer."""
    from transformers import AutoTokenizer
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(resume_from or args.model,
                                              trust_remote_code=args.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # safe: masks come from the first EOS, never from pad ids
        tokenizer.pad_token = tokenizer.eos_token
    weights_from = args.model if args.lora_r else resume_from or args.model
    model = load_causal_lm(weights_from, dtype, device, args.trust_remote_code)
    if args.lora_r:
        model = add_lora(args, model, resume_from)
    reference = None
    if args.beta > 0 and not args.lora_r:  # with LoRA the reference is the base model, adapters off
        reference = load_causal_lm(args.model, dtype, device, args.trust_remote_code)
        reference.eval().requires_grad_(False)
    if args.gradient_checkpointing:  # renamed in transformers 5; 4.x has only the old name
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)
    return model, reference, tokenizer, optimizer


def load_causal_lm(name_or_path, dtype, device, trust_remote_code=False):
    """AutoModelForCausalLM with every dropout rate set to 0: with dropout, two forward passes of
    the same weights differ and the ratio P would not be exactly 1 at μ = 1."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    # `torch_dtype` was renamed `dtype` in transformers 5.0.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config,
                                                 trust_remote_code=trust_remote_code,
                                                 **{dtype_key: dtype})
    return model.to(device)


def add_lora(args, model, resume_from):
    """LoRA adapters on every linear layer (the authors' r = 64, α = 128), or the checkpoint's."""
    try:
        import peft
    except ImportError:
        raise InputError("--lora-r needs the peft package: pip install peft (or drop "
                         "--lora-r).") from None
    if resume_from:
        return peft.PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    # LoRA dropout stays 0 (the authors': 0.05) for the same reason as the model's dropout.
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def eos_token_ids(tokenizer, model):
    """Every token that ends a completion: the tokenizer's EOS and the generation config's."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return {tokenizer.eos_token_id} | {t for t in configured if t is not None}


def rollout(args, model, tokenizer, enc, eos_ids, greedy=False):
    """G sampled completions per prompt (one greedy completion when `greedy`, for evaluation),
    their masks and which were truncated.

    With --stop-at-boxed a completion ends once its first \\boxed{...} closes (the authors'
    rule); generate pads it after that, and the mask ends there too.
    """
    from transformers import StoppingCriteriaList
    P = enc["input_ids"].shape[1]
    stop = StoppingCriteriaList([StopWhenBoxed(tokenizer, P)]) if args.stop_at_boxed else None
    sampling = {} if greedy else dict(temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k)
    model.eval()
    completion_ids = sample_completions(
        model, enc["input_ids"], enc["attention_mask"], 1 if greedy else args.group_size,
        batch_size=args.generation_batch_size, pad_token_id=tokenizer.pad_token_id,
        do_sample=not greedy, eos_token_id=sorted(eos_ids), max_new_tokens=args.max_new_tokens,
        repetition_penalty=1.0, stopping_criteria=stop, **sampling)
    stops = boxed_lengths(tokenizer, completion_ids) if args.stop_at_boxed else None
    mask, truncated = completion_mask(completion_ids, eos_ids, stops)
    return completion_ids, mask, truncated


def decode_completions(tokenizer, completion_ids, mask):
    """The completions' text, each cut where its mask ends (its EOS or its box)."""
    shown = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(shown, skip_special_tokens=True)


@torch.no_grad()
def reference_logprobs(args, model, reference, input_ids, attention, completion_start):
    """(old_logp, ref_logp): π_old's token log-probs when μ > 1, else None; π_ref's when β > 0,
    else None (with LoRA, π_ref is the base model: the policy with its adapters off)."""
    def score(m):
        mb = args.micro_batch_size
        return torch.cat([token_logprobs(m, input_ids[s:s + mb], attention[s:s + mb],
                                         completion_start=completion_start,
                                         temperature=args.temperature)
                          for s in range(0, input_ids.shape[0], mb)])

    old_logp = score(model) if args.updates_per_batch > 1 else None
    if args.beta <= 0:
        return old_logp, None
    if reference is None:
        with model.disable_adapter():
            return old_logp, score(model)
    return old_logp, score(reference)


def zero_std_fraction(advantages, group_size):
    """Share of groups whose rewards are all equal: `group_advantages` gives them exactly 0
    everywhere, and only them (any other group has a reward off its mean)."""
    return (advantages.view(-1, group_size) == 0).all(1).double().mean().item()


# Does overlap happen? The paper measured the tries of its groups while it trained a 1.5B model
# with GRPO: with 6 completions per group only about 0.2% of them were flat, and both statistics
# below rose as training converged. `train` logs them at every step.


def trie_stats(completion_ids, completion_mask, group_size):
    """The paper's overlap statistics ("does overlap happen?"), averaged over groups.

    path_depth: number of process steps on a completion's path from the root, mean over the
        group's non-empty completions. Along a path the process sets only shrink, so a new step
        starts exactly where |λ| changes.
    intermediate_prop: share of a completion's tokens that lie in shared steps (|λ| > 1).
    flat_frac: share of groups whose trie is flat (every |λ| = 1: the PRM is plain ORM).
    """
    if completion_ids.shape[0] == 0:
        raise ValueError("trie_stats needs at least one group; the batch is empty.")
    sizes = process_set_sizes(completion_ids, completion_mask, group_size)
    valid = sizes > 0
    lengths = valid.sum(1)
    starts = valid & (sizes != F.pad(sizes, (1, 0))[:, :-1])
    nonempty = (lengths > 0).view(-1, group_size).double()
    members = nonempty.sum(1).clamp(min=1)

    def group_mean(per_completion):  # over each group's non-empty completions, then over groups
        per_group = (per_completion.double().view(-1, group_size) * nonempty).sum(1) / members
        return per_group.mean().item()

    flat = (sizes <= 1).view(-1, group_size * sizes.shape[1]).all(1)
    return {"path_depth": group_mean(starts.sum(1)),
            "intermediate_prop": group_mean((sizes > 1).sum(1) / lengths.clamp(min=1)),
            "flat_frac": flat.double().mean().item()}


def evaluate(model, tokenizer, problems, reward_fn, args, eos_ids):
    """Mean reward of greedy completions on held-out problems (accuracy, for the math reward),
    through the same rollout, stopping rule, decoding and reward as training."""
    total, width = 0.0, args.generation_batch_size or args.prompts_per_step * args.group_size
    for s in range(0, len(problems), width):
        batch = problems[s:s + width]
        enc = encode_prompts(tokenizer, [q for q, _ in batch], args.system_prompt, model.device)
        completion_ids, mask, _ = rollout(args, model, tokenizer, enc=enc, eos_ids=eos_ids,
                                          greedy=True)
        texts = decode_completions(tokenizer, completion_ids, mask)
        rewards, _ = compute_rewards(reward_fn, texts, [ref for _, ref in batch])
        total += rewards.sum().item()
    return total / max(1, len(problems))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # CPU: the process's peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 8. Scaling out with TRL
# ──────────────────────────────────────────────────────────────────────────────────────────────────
#
# `python lgrpo.py train` serves one GPU. For vLLM generation and several GPUs or nodes
# (accelerate, DeepSpeed, FSDP), λ-GRPO runs inside TRL's GRPOTrainer: TRL's loss_type="dapo" is
# eq. (2) with token-level aggregation, so λ-GRPO there is only the weights. TRL stays optional:
# `lgrpo.LambdaGRPOTrainer` is built on first use, and importing lgrpo never imports trl.

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


def lambda_grpo_trainer_class():
    """Build `LambdaGRPOTrainer`, a subclass of trl.GRPOTrainer (needs trl)."""
    try:
        from trl import GRPOTrainer
    except ImportError:
        message = "lgrpo.LambdaGRPOTrainer needs TRL: pip install 'trl>=1.16,<1.17'"
        raise ImportError(message) from None

    class LambdaGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer with the λ-GRPO loss: every completion token's whole per-token term,
        clipped surrogate and KL alike, multiplied by 1/|λ^(i,t)|, the normalizer left at the
        token count: L_λ-GRPO = 1/Σ len · Σ_i Σ_t (P_{i,t}·a_i − D_{i,t}) / |λ^(i,t)|.

        The same constructor and GRPOConfig as GRPOTrainer. Exact for loss_type="dapo" (TRL's
        default, eq. (2)'s token-level aggregation) with any β, gradient accumulation,
        steps_per_generation and num_iterations (μ); settings that would read the weights as a
        mask (TRL_EXACT_SETTINGS) are refused.

        The weights come from the whole generation batch, all processes' completions gathered: a
        process holds per_device_train_batch_size × steps_per_generation rows, not always a
        multiple of num_generations, so a group can straddle two processes.

        Private TRL names this relies on (trl 1.16): the method `_generate_and_score_completions`,
        overridden, and the "tool_mask" entry of its output, which `_compute_loss` multiplies into
        the per-token loss mask; dapo's normalizer `num_items_in_batch` is counted before, from
        the completion mask. So TRL's logged means over that mask (kl, entropy, clip ratios) are
        λ-weighted here.
        """

        def __init__(self, model, reward_funcs=None, args=None, *more, **kwargs):
            # Checked before TRL loads any model; args=None is TRL's default config, all exact.
            for name, (needed, why) in TRL_EXACT_SETTINGS.items():
                if args is not None and getattr(args, name) != needed:
                    raise InputError(f"LambdaGRPOTrainer is exact only with {name}={needed!r} (got "
                                     f"{getattr(args, name)!r}): {why}.")
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
            # float64: 1/3 as exact as the loss it multiplies, whether that is float32 or float64.
            weights = lambda_weights(ids, mask, group_size, dtype=torch.float64)
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


# ══════════════════════════════════════════════════════════════════════════════════════════════════
# Appendix: the plumbing. None of it is needed to understand λ-GRPO.
# ══════════════════════════════════════════════════════════════════════════════════════════════════


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# A. Answer checking
# ──────────────────────────────────────────────────────────────────────────────────────────────────

# The reward of the paper's runs: 1 for a correct final answer, else 0, as decided by Hugging
# Face's Math-Verify, the checker the authors used. Model output is parsed, never evaluated.
# Math-Verify is imported on first use only: the rest of lgrpo needs none of it.

# A box as datasets write it in reference solutions (MATH uses \boxed and, rarely, \fbox).
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_brace(text, open_index):
    """Index of the `}` that closes the `{` at `open_index`, or None."""
    depth = 0
    for i in range(open_index, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def last_boxed(text):
    """The content of the last complete \\boxed{...} (nested braces allowed), or None.

    An unclosed box (a generation cut off mid-answer) is skipped for an earlier complete one."""
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        end = _closing_brace(text, match.end() - 1)
        if end is not None:
            return text[match.end():end]
    return None


def reference_answer(reference):
    """The answer part of a dataset's solution: after the last "####" (GSM8K), else its last box
    (MATH-style, OpenRS), else the whole string (a dataset's answer column)."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = last_boxed(reference)
    return boxed if boxed is not None else reference.strip()


def load_math_verify():
    """Math-Verify's parse and verify, the answers it should extract, and its timeout error."""
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        raise InputError("the math reward needs Math-Verify: pip install 'math-verify>=0.9.0' "
                         "(or pass your own --reward module:function).") from None
    # Boxed answers first, then other LaTeX, then plain numbers ("The answer is 72."): the
    # extraction Math-Verify itself uses for MATH-style gold answers.
    targets = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return parse, verify, targets, TimeoutException


def math_rewards(completions, references):
    """Outcome rewards (1.0 or 0.0) of a step's completions, each against its reference: 1.0
    where Math-Verify finds the completion's final answer equal to the reference answer.

    Each distinct reference is parsed once. Returns (rewards, reward_errors), reward_errors
    being the number of completions that score 0 because parsing or verification raised or
    timed out inside Math-Verify (each completion of a reference it cannot read counts)."""
    if threading.current_thread() is not threading.main_thread():
        # Math-Verify times itself out with signal.alarm, which Python allows on the main thread
        # only; elsewhere every call would fail and every answer would silently score 0.
        raise RuntimeError("math_reward must run on the main thread: Math-Verify times out its "
                           "parsing with signal.alarm, which works only there. Score on the main "
                           "thread, or pass your own --reward module:function.")
    parse, verify, targets, timeout_error = load_math_verify()
    failures = (Exception, timeout_error)  # its timeout is a BaseException

    def parsed(text):
        """The extracted answers of `text` ([] when there are none), or None on an error."""
        try:
            return parse(text, targets, raise_on_error=True)
        except failures:
            return None

    def equal(gold, answer):
        """True or False, or None when a comparison failed and none matched."""
        # verify() is any() over all (gold, answer) pairs; asking pair by pair, an error in one
        # pair cannot hide a match in another, and an error without a match is seen.
        failed = False
        for g in gold:
            for a in answer:
                try:
                    if verify(g, a, raise_on_error=True):
                        return True
                except failures:
                    failed = True
        return None if failed else False

    golds, rewards, errors = {}, [], 0
    for completion, reference in zip(completions, references, strict=True):
        if reference not in golds:
            golds[reference] = parsed("\\boxed{" + reference_answer(reference) + "}")
        gold = golds[reference]
        answer = parsed(completion) if gold else None
        match = equal(gold, answer) if answer is not None else None
        rewards.append(1.0 if match else 0.0)
        errors += match is None
    return rewards, errors


def math_reward(completion, reference):
    """1.0 if the completion's final answer equals the reference answer (Math-Verify), else 0.0."""
    return math_rewards([completion], [reference])[0][0]


def load_reward(spec):
    """`module:function` → f(completion_text, reference) -> float, each value it returns checked
    (`CheckedReward`); None → math_reward. The module is found as `python -m` finds one: in the
    current folder first, then on the Python path."""
    if spec is None:
        return math_reward
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise InputError(f"--reward {spec!r}: write it as module:function, e.g. "
                         "my_rewards:score.")
    cwd = os.getcwd()
    # Only while importing: a file in the current folder must not shadow a library imported later.
    sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if module_name != error.name and not module_name.startswith(f"{error.name}."):
            raise  # the module is there, but something it imports is not: keep the traceback
        raise InputError(f"--reward {spec}: no module {module_name!r} in the current folder "
                         f"({cwd}) or on the Python path.") from None
    finally:
        sys.path.remove(cwd)
    fn = getattr(module, name, None)
    if fn is None:
        raise InputError(f"--reward {spec}: {module.__file__} defines no {name!r}.")
    if not callable(fn):
        raise InputError(f"--reward {spec}: {name} is {shorten(fn)}, not a function "
                         "f(completion_text, reference) -> float.")
    return CheckedReward(fn, spec)


class CheckedReward:
    """A --reward function whose every value is checked as it is returned: one None, string or
    NaN would otherwise end the run later with a traceback, or become a wrong reward."""

    def __init__(self, fn, spec):
        self.fn, self.spec = fn, spec

    def __call__(self, completion, reference):
        return check_reward_value(self.fn(completion, reference), self.spec, completion)


def check_reward_value(value, name, completion):
    """`value` as a float if it is a finite real number (bool, int, float, NumPy scalars), else an
    InputError naming the reward function and the completion it scored."""
    try:
        number = float(value) if isinstance(value, numbers.Real) else None
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if number is not None and math.isfinite(number):
        return number
    shown = shorten(value)
    if number is None and value is not None:
        shown = f"a {type(value).__name__}, {shown}"
    hint = " (call .item() on a one-element tensor)" if torch.is_tensor(value) else ""
    raise InputError(f"--reward {name} returned {shown} for the completion "
                     f"{shorten(completion)}: a reward must be a finite real number{hint}.")


def shorten(value, width=60):
    """repr(value), cut to about `width` characters for an error message."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "…"


def compute_rewards(reward_fn, texts, references):
    """One outcome reward per completion, and reward_errors: the completions Math-Verify failed
    on (math_reward, which parses each reference once), or None for a custom reward. In float64:
    a finite reward beyond float32's range (3.4e38) must stay finite."""
    if reward_fn is math_reward:
        rewards, errors = math_rewards(texts, references)
    else:
        rewards, errors = [float(reward_fn(t, r)) for t, r in zip(texts, references)], None
    return torch.tensor(rewards, dtype=torch.float64), errors


# The authors' stopping rule: a completion ends once the "\boxed{" it opens first has its closing
# brace. Exactly this string, as in the authors' code; it is also the box Math-Verify reads.
BOX_START = "\\boxed{"
_BRACE = re.compile(r"[{}]")


class BoxScan:
    """Whether the first \\boxed{...} has closed, reading a text a piece at a time: each
    character is looked at a bounded number of times, so the cost is linear in the length."""

    def __init__(self):
        self.tail = ""    # before the box: the last characters, which may begin BOX_START
        self.depth = 0    # open braces of the box: > 0 while it is open
        self.closed = False

    def feed(self, text):
        """Read the next piece of text; True once the first box has closed."""
        if self.closed:
            return True
        if not self.depth:
            text = self.tail + text
            at = text.find(BOX_START)
            if at < 0:
                self.tail = text[1 - len(BOX_START):]
                return False
            self.depth, text = 1, text[at + len(BOX_START):]
        for brace in _BRACE.finditer(text):
            self.depth += 1 if brace.group() == "{" else -1
            if self.depth == 0:
                self.closed = True
                break
        return self.closed


def boxed_closed(text):
    """True once the first \\boxed{ has its closing brace (the authors' stopping rule)."""
    return BoxScan().feed(text)


class StopWhenBoxed:
    """Stopping criterion: a row is done once its first \\boxed{...} closes (the authors' rule).

    Linear in the completion's length: each call decodes only a window of the newest tokens,
    plus the token before them (tokenizers need it to space a word), and scans only the new
    characters. A window that ends inside a multi-byte character waits for the next token."""

    def __init__(self, tokenizer, prompt_len):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.seen = None  # completion tokens read so far

    def restart(self, rows):
        """Fresh state for a new generate call over `rows` rows."""
        self.seen = 0
        self.ids = [[] for _ in range(rows)]
        self.start = [0] * rows  # where each row's window begins
        self.read = [0] * rows   # tokens of each row already turned into text
        self.scans = [BoxScan() for _ in range(rows)]

    def __call__(self, input_ids, scores, **kwargs):
        length = input_ids.shape[1] - self.prompt_len
        if self.seen is None or length <= self.seen or len(self.ids) != input_ids.shape[0]:
            self.restart(input_ids.shape[0])  # a new generate call (one per chunk of rows)
        new = input_ids[:, self.prompt_len + self.seen:].tolist()
        self.seen = length
        live = [r for r, scan in enumerate(self.scans) if not scan.closed]
        for r in live:
            self.ids[r] += new[r]
        windows = [self.ids[r][self.start[r]:] for r in live]
        known = [self.ids[r][self.start[r]:self.read[r]] for r in live]
        texts = self.tokenizer.batch_decode(windows + known, skip_special_tokens=True)
        for r, window, before in zip(live, texts, texts[len(live):]):
            # A UTF-8 character is at most 4 bytes, so it is whole within 4 more byte-level
            # tokens; a longer run of broken bytes is read as it stands.
            if window.endswith("\ufffd") and len(self.ids[r]) - self.start[r] < 8:
                continue
            self.scans[r].feed(window[len(before):])
            self.start[r], self.read[r] = self.read[r], len(self.ids[r])
        return torch.tensor([scan.closed for scan in self.scans], device=input_ids.device)


def boxed_lengths(tokenizer, completion_ids):
    """Per row, the number of tokens up to where the first box closed (generate pads after it),
    or T + 1 where it never closed. Binary search: once closed, the box stays closed."""
    T = completion_ids.shape[1]
    lengths = []
    for ids in completion_ids.tolist():
        lo, hi = 1, T + 1
        while lo < hi:
            mid = (lo + hi) // 2
            closed = boxed_closed(tokenizer.decode(ids[:mid], skip_special_tokens=True))
            lo, hi = (lo, mid) if closed else (mid + 1, hi)
        lengths.append(lo)
    return torch.tensor(lengths, device=completion_ids.device)


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# B. Data
# ──────────────────────────────────────────────────────────────────────────────────────────────────

FIELD_GUESSES = {"prompt": ["question", "problem", "prompt"], "answer": ["answer", "solution"]}
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_problems(args):
    """(train, eval) lists of (question, reference) from a hub dataset or a local file.

    Refuses an empty or malformed file, an unknown split, an empty split, and rows whose
    question or answer is missing, null or empty (they would train on the text "None").
    """
    import datasets
    if os.path.exists(args.dataset):
        extension = os.path.splitext(args.dataset)[1].lower()
        if extension not in DATA_FORMATS:
            raise InputError(f"--dataset {args.dataset}: use a .jsonl, .json, .csv or .parquet "
                             "file.")
        check_data_file(args.dataset)
        data = datasets.load_dataset(DATA_FORMATS[extension], data_files=args.dataset)
    else:
        data = datasets.load_dataset(args.dataset, args.dataset_config)
    for flag, split in (("--train-split", args.train_split), ("--eval-split", args.eval_split)):
        if split is not None and split not in data:
            local = " (a local file is one split, 'train'; --eval-fraction holds problems out)"
            raise InputError(f"{flag} {split!r}: {args.dataset} has no such split; its splits "
                             f"are {list(data)}{local if os.path.exists(args.dataset) else ''}.")
    train_split = data[args.train_split]
    columns = train_split.column_names
    fields = {}
    for kind, given in (("prompt", args.prompt_field), ("answer", args.answer_field)):
        name = given or next((c for c in FIELD_GUESSES[kind] if c in columns), None)
        if name not in columns:
            raise InputError(f"no {kind} field {name!r} in {args.dataset}; its columns are "
                             f"{columns}: pass --{kind}-field with one of them.")
        fields[kind] = name
    check_problem_rows(args, train_split, fields, args.train_split)
    if args.eval_split:
        evaluation = data[args.eval_split]
        check_problem_rows(args, evaluation, fields, args.eval_split)
    elif args.eval_fraction > 0:
        parts = train_split.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train_split, evaluation = parts["train"], parts["test"]
    else:
        evaluation = train_split.select([])
    return [problem_rows(split, fields) for split in (train_split, evaluation)]


def check_data_file(path):
    """Refuse an empty file, and name the line of the first malformed JSON line: the datasets
    library says only that generating the dataset failed."""
    extension = os.path.splitext(path)[1].lower()
    if os.path.getsize(path) == 0:
        raise InputError(f"--dataset {path} is empty: it holds no problems.")
    if extension not in (".json", ".jsonl"):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise InputError(f"--dataset {path} holds only blank lines: it holds no problems.")
    errors = []  # (line, column, what): the one furthest into the file is the real one
    if extension == ".json":  # one JSON document, or JSON lines
        try:
            json.loads(text)
            return
        except json.JSONDecodeError as error:
            errors.append((error.lineno, error.colno, error.msg))
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as error:
            errors.append((number, error.colno, error.msg))
            break
    else:
        return
    line, column, what = max(errors)
    raise InputError(f"--dataset {path}, line {line}: not valid JSON ({what}, column {column}); "
                     "fix or remove that line.")


def check_problem_rows(args, split, fields, name):
    """Refuse a split without rows, or with rows whose question is not text or is empty, or
    whose answer is missing, null or empty, naming those rows."""
    if len(split) == 0:
        raise InputError(f"split {name!r} of --dataset {args.dataset} has no rows.")
    bad = [row for row, (question, answer) in
           enumerate(zip(split[fields["prompt"]], split[fields["answer"]]), 1)
           if not (isinstance(question, str) and question.strip())
           or answer is None or not str(answer).strip()]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if bad[10:] else "")
        raise InputError(f"--dataset {args.dataset}, split {name!r}: rows {shown} (counting from "
                         f"1) have a missing, null or empty {fields['prompt']!r} or "
                         f"{fields['answer']!r}; fix or remove them.")


def problem_rows(split, fields):
    """(question, reference) pairs of a dataset split; references as strings."""
    return list(zip(split[fields["prompt"]], map(str, split[fields["answer"]])))


def step_problems(problems, step, k, seed):
    """The k problems of a step: consecutive slices of a seeded shuffle per epoch, a function of
    the step alone, so that a resumed run sees the same data."""
    out = []
    for j in range(step * k, (step + 1) * k):
        epoch, pos = divmod(j, len(problems))
        shuffle = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(problems), generator=shuffle)
        out.append(problems[order[pos]])
    return out


def prompt_texts(tokenizer, questions, system_prompt):
    """The prompts as text: the tokenizer's chat template when it has one (it writes its own
    special tokens), else plain text (the tokenizer adds its usual special tokens, BOS)."""
    texts = []
    for q in questions:
        if has_chat_template(tokenizer):
            messages = [{"role": "system", "content": system_prompt},
                        {"role": "user", "content": q}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True))
        else:
            texts.append(f"{system_prompt}\n\n{q}\n" if system_prompt else f"{q}\n")
    return texts


def has_chat_template(tokenizer):
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer, questions, system_prompt, device):
    """Left-padded prompt tensors of `prompt_texts`."""
    encoded = tokenizer(prompt_texts(tokenizer, questions, system_prompt), return_tensors="pt",
                        padding=True, add_special_tokens=not has_chat_template(tokenizer))
    return encoded.to(device)


def check_prompt_lengths(args, problems):
    """Refuse, before the model is loaded, a prompt that leaves no room for --max-new-tokens in
    the model's positions: a model with learned positions (GPT-2) would crash mid-run with an
    IndexError, others would read positions they were never trained on.

    `problems`: {split name: [(question, reference), ...]}.
    """
    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return  # the model names no limit
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    longest, where = 0, None
    for split, rows in problems.items():
        if not rows:
            continue  # the tokenizer cannot take an empty batch
        questions = [q for q, _ in rows]
        ids = tokenizer(prompt_texts(tokenizer, questions, args.system_prompt),
                        add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
        for row, tokens in enumerate(ids):
            if len(tokens) > longest:
                longest, where = len(tokens), f"{split} problem {row + 1}, {shorten(rows[row][0])}"
    needed = longest + args.max_new_tokens
    if needed <= limit:
        return
    fix = (f"lower --max-new-tokens to at most {limit - longest}, or shorten" if longest < limit
           else "shorten")
    raise InputError(f"the longest prompt ({where}) is {longest} tokens, system prompt included; "
                     f"with --max-new-tokens {args.max_new_tokens} it needs {needed} positions, "
                     f"and {args.model} has {limit}: {fix} --system-prompt or the longest "
                     "problems.")


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# C. Runs: checkpoints and resume
# ──────────────────────────────────────────────────────────────────────────────────────────────────


def warn(message):
    """One line on stderr, like an error's, for something the tool works around and goes on."""
    print(f"lgrpo: warning: {message}", file=sys.stderr)


def checkpoint_dirs(output_dir):
    """Finished checkpoints under `output_dir`, oldest first."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted(int(n.split("-")[1]) for n in names if re.fullmatch(r"checkpoint-\d+", n))
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in steps]


LOCK_FILE = ".lock"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
# What --resume may change: how long to train, how often to save and evaluate, how the work is
# cut into batches for memory, and permission to run the model's code. The rest defines the run.
RESUMABLE_FLAGS = ("steps", "save_every", "eval_every", "eval_size", "micro_batch_size",
                   "generation_batch_size", "gradient_checkpointing", "trust_remote_code")


def lock_run_folder(output_dir):
    """Create `output_dir` and lock it for as long as the returned file stays open (the whole
    run): a second run into the same folder refuses at once, instead of interleaving its rows
    with the first run's in metrics.jsonl and deleting its checkpoints."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = open(os.path.join(output_dir, LOCK_FILE), "a+")
    except OSError as error:  # a file by that name, no permission, a read-only disk
        raise InputError(f"--output-dir {output_dir}: cannot write there "
                         f"({error.strerror}).") from None
    if fcntl is None:  # Windows: no flock, no lock
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise InputError(f"--output-dir {output_dir} is in use by another run (process "
                         f"{holder}): wait for it to end, or choose another "
                         "--output-dir.") from None
    except OSError as error:  # a file system without locks (some network mounts)
        warn(f"cannot lock {output_dir} ({error.strerror}): make sure no other run writes there.")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def prepare_run_folder(args):
    """The checkpoint to resume from, or None for a new run, after checking the (locked) folder.

    A new run refuses a folder that holds an earlier run. --resume takes the newest complete
    checkpoint, refuses flags that would change what the run is, and cuts metrics.jsonl back
    to the checkpoint's step: later rows belong to the lost part of the run.
    """
    out, metrics = args.output_dir, os.path.join(args.output_dir, "metrics.jsonl")
    found = checkpoint_dirs(out)
    if not args.resume:
        if found:
            raise InputError(f"{out} holds an earlier run ({os.path.basename(found[-1])}): pass "
                             "--resume to continue it, or choose another --output-dir (nothing "
                             "was overwritten).")
        if os.path.exists(metrics):
            raise InputError(f"{out} holds the metrics.jsonl of an earlier run that saved no "
                             "checkpoint, so it cannot be resumed: choose another --output-dir, "
                             f"or delete {metrics} to start over in this one.")
        return None
    resume_from, state, skipped = newest_complete_checkpoint(out)
    if resume_from is None:
        what = (f"no complete checkpoint ({'; '.join(skipped)})" if skipped
                else "no checkpoint-N folder")
        if os.path.exists(metrics):
            raise InputError(f"--resume: {out} holds metrics.jsonl but {what}: the run saved "
                             "none (checkpoints need --save-every N), so it cannot be resumed. "
                             "Start over in another --output-dir, or delete what this one holds "
                             "and run without --resume.")
        raise InputError(f"--resume: {out} holds {what}; run without --resume to start, with "
                         "--save-every N to write checkpoints.")
    if skipped:
        warn(f"skipped newer checkpoints that are incomplete ({'; '.join(skipped)}); resuming "
             f"from {os.path.basename(resume_from)}.")
    check_resumed_flags(args, state["args"], resume_from)
    if state["step"] >= args.steps:
        raise InputError(f"--steps {args.steps}: the run in {out} is already at step "
                         f"{state['step']}; pass a larger --steps to train it further.")
    keep_metrics_until(metrics, state["step"])
    return resume_from


def newest_complete_checkpoint(output_dir):
    """(folder, trainer state, skipped) for the newest checkpoint with weights and a readable
    trainer_state.pt; `skipped` says why each newer one was passed over. (None, None, skipped)
    when there is none. The state is memory-mapped: only the small parts are read now."""
    skipped = []
    for path in reversed(checkpoint_dirs(output_dir)):
        state_file = os.path.join(path, "trainer_state.pt")
        if not os.path.isfile(state_file):
            problem = "no trainer_state.pt"
        elif not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
            problem = "no model weights"
        else:
            try:
                state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
                return path, state, skipped
            except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
                problem = f"unreadable trainer_state.pt: {error}"
        skipped.append(f"{os.path.basename(path)}: {problem}")
    return None, None, skipped


def check_resumed_flags(args, saved, checkpoint):
    """Refuse a resume whose flags differ from the saved run's in anything but RESUMABLE_FLAGS,
    listing each `--flag old → new`: silently mixing two configurations makes a run that is
    neither (and the optimizer state would quietly override a new --lr)."""
    changes = []
    for name, old in saved.items():
        new = getattr(args, name, old)  # a flag this version no longer has: nothing to compare
        if name in RESUMABLE_FLAGS + ("output_dir", "resume") or new == old:
            continue
        if isinstance(old, str) and isinstance(new, str) and os.path.exists(old) \
                and os.path.exists(new) and os.path.samefile(old, new):
            continue  # one model or data file, named two ways
        show = [shorten(v, 40) if isinstance(v, str) else v for v in (old, new)]
        changes.append(f"--{name.replace('_', '-')} {show[0]} → {show[1]}")
    if changes:
        allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_FLAGS)
        raise InputError(f"--resume would change the run saved in {checkpoint}: "
                         f"{'; '.join(changes)}. Pass the run's own values (only {allowed} may "
                         "change), or start a new run in another --output-dir.")


def keep_metrics_until(path, step):
    """Keep the rows of metrics.jsonl up to `step`, rewriting the file atomically. A cut-off last
    line (a crash or a full disk mid-append) is dropped, and a missing file tolerated, with a
    warning; a malformed line elsewhere is refused."""
    if not os.path.exists(path):
        warn(f"{path} is missing: the rows of steps 1 to {step} are lost; the run goes on from "
             f"step {step + 1}.")
        return
    rows, cut = parse_metrics(path)
    if cut is not None:
        warn(f"{path}: dropped its last line, cut off mid-write: {shorten(cut)}")
    kept = [json.dumps(row) + "\n" for row in rows if row.get("step", 0) <= step]
    write_atomically(path, "".join(kept))


def parse_metrics(path):
    """(rows, cut): the rows of a metrics.jsonl, and its last line when that was cut off
    mid-write (no newline yet: a crash, a full disk, or a run still writing), else None. A
    broken line before the last is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if number == len(lines):
                return rows, line
            raise InputError(f"{path}, line {number}: not a JSON row; fix or remove that "
                             "line.")
        rows.append(row)
    return rows, None


def restore_run(resume_from, optimizer):
    """The step to start from: 0 for a new run; the checkpoint's when resuming, with the
    optimizer and random state restored."""
    if not resume_from:
        return 0
    state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def write_atomically(path, text):
    """Write `text` to `path` through a temporary file and a rename: a kill at any moment leaves
    the old content or the new, never a truncated file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_run_config(args):
    """run_config.json: the run's arguments, so that `plot` (and anyone who opens the folder
    later) can tell which loss and settings made it."""
    config = {k: v for k, v in vars(args).items() if k != "func"}
    write_atomically(os.path.join(args.output_dir, "run_config.json"), json.dumps(config, indent=1))


def append_metrics(metrics_path, rows):
    """Append rows to metrics.jsonl, one JSON object per line."""
    with open(metrics_path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(output_dir, step, model, tokenizer, optimizer, args):
    """Model, tokenizer and trainer state, written to a temporary folder and then renamed, so that
    a crash mid-write never leaves a checkpoint that looks complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "args": vars(args),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# D. Plots
# ──────────────────────────────────────────────────────────────────────────────────────────────────


def new_figure(width, height):
    """A matplotlib Figure drawn off-screen. Built without pyplot, so that plotting from a notebook
    leaves its backend alone; matplotlib is imported here and only here."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, out, dpi=100):
    """Write the figure to `out` (format from its extension). A PNG is reduced to a 256-colour
    palette: a third of the bytes with no visible change, so committed figures stay small."""
    if not str(out).lower().endswith(".png"):
        fig.savefig(out, dpi=dpi)
        return
    import io
    from PIL import Image  # a dependency of matplotlib itself
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(out, optimize=True)


def trailing_mean(xs, window):
    """Mean of each value and the up to window − 1 values before it."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def read_metrics(run_dir):
    """The rows of a run's metrics.jsonl. A run that is still going may have written half a last
    line: that line is left out; a broken line before it is an error."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise InputError(f"{run_dir}: no metrics.jsonl here (plot reads the --output-dir "
                         "folders of `train`).")
    return parse_metrics(path)[0]


def run_loss(run_dir):
    """The --loss of a run: from its run_config.json, else from its latest checkpoint's saved
    arguments (runs from before run_config.json existed); None if neither is there."""
    config = os.path.join(run_dir, "run_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            return json.load(f).get("loss")
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        state = os.path.join(checkpoint, "trainer_state.pt")
        if os.path.isfile(state):  # mmap: the optimizer state is not read from disk
            return torch.load(state, weights_only=True, mmap=True)["args"].get("loss")
    return None


LOSS_NAMES = {"grpo": "GRPO", "lambda": "λ-GRPO"}


def plot_runs(run_dirs, out, smooth=10):
    """One figure comparing `train` runs: a line per run, labelled by folder and loss, for the
    reward (raw and smoothed), eval accuracy, completion length, KL and the trie statistics of
    the paper's overlap measurement (path depth, intermediate proportion) against the step."""
    if smooth < 1:
        raise InputError(f"--smooth {smooth}: the trailing mean needs at least 1 step.")
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) < len(names):  # same folder name in different places: show the paths
        names = [os.path.normpath(d) for d in run_dirs]
    runs = []
    for run_dir, name in zip(run_dirs, names):
        rows = read_metrics(run_dir)
        loss = run_loss(run_dir)
        label = f"{name} ({LOSS_NAMES.get(loss, loss)})" if loss else name
        runs.append((label, [r for r in rows if "reward_mean" in r],
                     [r for r in rows if r.get("eval_accuracy") is not None]))
    panels = [("reward_mean", "reward (mean over completions)", "no rows yet"),
              ("eval_accuracy", "eval accuracy (greedy)", "no eval rows (train --eval-every N)"),
              ("completion_len", "completion length (tokens)", "no rows yet"),
              ("kl", "KL to the reference (k3)", "no KL logged (β = 0)"),
              ("path_depth", "trie path depth (steps)", "no rows yet"),
              ("intermediate_prop", "intermediate proportion", "no rows yet")]
    fig = new_figure(12, 6)
    grid = fig.subplots(2, 3, sharex=True)
    for ax, (key, title, missing) in zip(grid.flat, panels):
        ax.set_title(title, fontsize=10)
        drawn = False
        for color, (label, steps, evals) in enumerate(runs):
            source = evals if key == "eval_accuracy" else steps
            rows = [r for r in source if r.get(key) is not None]
            if not rows:
                continue
            x, y = [r["step"] for r in rows], [r[key] for r in rows]
            if key == "reward_mean":  # noisy per step: raw faint, trailing mean on top
                ax.plot(x, y, color=f"C{color}", alpha=0.25, lw=0.8)
                ax.plot(x, trailing_mean(y, smooth), color=f"C{color}", lw=1.8,
                        label=f"{label}, {smooth}-step mean")
            else:
                ax.plot(x, y, color=f"C{color}", lw=1.2, marker="o" if len(x) < 20 else None, ms=3,
                        label=label)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes,
                    color="gray", fontsize=9)
        elif key in ("eval_accuracy", "intermediate_prop"):  # shares: the whole [0, 1] range
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in grid[-1]:
        ax.set_xlabel("step")
    if any(steps for _, steps, _ in runs):
        grid[0][0].legend(fontsize=8)
    save_figure(fig, out)
    return out


def plot_toy(result, out):
    """The toy's Table 1 as curves: one panel per (n, r_neg) cell, the share of sampled paths
    equal to T per step for GRPO and λ-GRPO; thin lines are single seeds (10-step mean), thick
    ones the mean over seeds; the shaded last 50 steps are what Table 1 averages, and a triangle
    marks the mean time to target."""
    cells = result["cells"]
    if any("curves" not in cell["grpo"] for cell in cells):
        raise InputError("this toy JSON has no per-seed curves: it was written by an older "
                         "lgrpo.py; rerun the sweep with --json.")
    ns = sorted({c["n"] for c in cells})
    r_negs = sorted({c["r_neg"] for c in cells}, reverse=True)
    fig = new_figure(3.6 * len(r_negs), 2.6 * len(ns) + 0.4)
    axes = fig.subplots(len(ns), len(r_negs), sharex=True, sharey=True, squeeze=False)
    steps = len(cells[0]["grpo"]["curve"])
    x, last = range(1, steps + 1), min(50, steps)
    for cell in cells:
        ax = axes[ns.index(cell["n"])][r_negs.index(cell["r_neg"])]
        ax.axvspan(steps - last + 0.5, steps + 0.5, color="0.9")
        ax.axhline(0.5, color="0.6", lw=0.6, ls=":")
        # Seeds in a pale tint rather than with alpha: fewer colours for save_figure's palette.
        for loss, color, pale in (("grpo", "C0", "#a9c9e4"), ("lambda", "C3", "#eba9a9")):
            for curve in cell[loss]["curves"]:
                ax.plot(x, trailing_mean(curve, 10), color=pale, lw=0.6)
            label = f"{LOSS_NAMES[loss]}: last {last} {cell[loss]['mean']:.2f}"
            reach, _ = reach_summary(cell[loss]["time_to_target"])
            if reach is not None:  # the mean time to target, marked where the curves cross 0.5
                ax.plot([reach], [0.5], marker="v", color=color, ms=6)
                label += f", T at step {reach:.0f}"
            ax.plot(x, trailing_mean(cell[loss]["curve"], 10), color=color, lw=1.6, label=label)
        ax.set_title(f"n = {cell['n']}, r_neg = {cell['r_neg']}", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(1, steps)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("share of paths = T")
    config = result.get("config", {})
    fig.suptitle(f"Table 1 toy: group {config.get('group_size')}, lr {config.get('lr')}, "
                 f"temperature {config.get('temperature')}, {config.get('seeds')} seeds; "
                 f"10-step means, thin: single seeds; shaded: the last {last} steps; "
                 "▼: mean time to target", fontsize=9)
    save_figure(fig, out)
    return out


def plot_toy_file(path, out):
    """`plot-toy`: the toy figure from a saved `--json` result, without re-running the sweep."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot read a toy result ({error}).") from None
    return plot_toy(result, out)


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# E. Tiny models built in code (the tests, the tutorial and bench.py share them)
# ──────────────────────────────────────────────────────────────────────────────────────────────────

TOKENIZER_CHARS = ("0123456789+-*/=?.,: abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                   "{}()\\#$\n'")


def char_tokenizer():
    """A character-level tokenizer built in code (no download): <s>, </s>, <unk> are ids 0, 1, 2;
    BOS is prepended as Llama's tokenizer does; there is no pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(TOKENIZER_CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character is its own token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(tokenizer, seed=0, max_positions=256, **config):
    """A randomly initialized 2-layer Llama, 32 wide, over the tokenizer's vocabulary, built from
    a config (no download). `config` overrides LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{"vocab_size": len(tokenizer), "hidden_size": 32,
                            "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": max_positions,
                            "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": True,
                            **config})
    with torch.random.fork_rng():  # leave the caller's random stream alone
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# F. Command line
# ──────────────────────────────────────────────────────────────────────────────────────────────────

SYSTEM_PROMPT = "Let's think step by step and output the final answer within \\boxed{}."


def build_parser():
    """Every hyperparameter, with the paper's value as default where the paper gives one."""
    p = argparse.ArgumentParser(description="λ-GRPO (Sullivan & Koller, arXiv:2509.21154). "
                                "With no command: the toy experiment of Table 1.")
    sub = p.add_subparsers(dest="command")

    toy = sub.add_parser("toy", help="reproduce Table 1 on the binary-tree toy (the default)")
    toy.add_argument("--n", type=int, nargs="+", default=[1, 2],
                     help="prefix lengths n (paper: 1 2)")
    toy.add_argument("--r-neg", type=float, nargs="+", default=[-0.5, -1.0, -1.5],
                     help="rewards of the paths that share T's first n tokens "
                          "(paper: -0.5 -1.0 -1.5)")
    toy.add_argument("--seeds", type=int, default=5, help="seeds per configuration (paper: 5)")
    toy.add_argument("--seed", type=int, default=0, help="first seed")
    toy.add_argument("--steps", type=int, default=250, help="training steps per run (paper: 250)")
    toy.add_argument("--group-size", type=int, default=16,
                     help="completions per group (paper: 16)")
    toy.add_argument("--lr", type=float, default=3e-4,
                     help="AdamW learning rate (the paper gives none; 3e-4 is the largest rate at "
                          "which every seed converges within 250 steps: see the README's study)")
    toy.add_argument("--temperature", type=float, default=1.0,
                     help="sampling temperature (the paper gives none; see the README's study)")
    toy.add_argument("--toy-model", default=None,
                     help="pretrained causal LM (hub id or path; the paper: gpt2) instead of the "
                          "random-init 1-layer GPT-2; all tokens but 'L' and 'R' are masked")
    toy.add_argument("--workers", type=int, default=0, help="parallel processes (0: all cores)")
    toy.add_argument("--json", default=None,
                     help="write config, per-cell results and curves to this file")
    toy.add_argument("--plot", default=None, metavar="FIGURE.png",
                     help="draw every cell's curves, seed by seed, to this image (needs "
                          "matplotlib); `plot-toy` draws it later from a --json file")
    toy.add_argument("--device", default="auto",
                     help="torch device: auto (CUDA when there is one and --toy-model is given, "
                          "else the CPU), cpu, cuda, cuda:1, ...")

    sub.add_parser("verify", help="check Theorem 1 and the worked example numerically")

    tr = sub.add_parser("train", help="GRPO / λ-GRPO on a causal LM and a math dataset")
    tr.add_argument("--model", required=True, help="hub id or local path (AutoModelForCausalLM)")
    tr.add_argument("--dtype", default="auto",
                    choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU, float32 on a CPU")
    tr.add_argument("--trust-remote-code", action="store_true",
                    help="run the model repository's own code (off: only on request)")
    tr.add_argument("--dataset", required=True,
                    help="hub name (openai/gsm8k, knoveleng/open-rs) or a "
                         ".jsonl/.json/.csv/.parquet file")
    tr.add_argument("--dataset-config", default=None, help="hub dataset config (gsm8k: main)")
    tr.add_argument("--train-split", default="train", help="split to train on")
    tr.add_argument("--eval-split", default=None, help="held-out split for --eval-every")
    tr.add_argument("--eval-fraction", type=float, default=0.0,
                    help="hold out this share of the train split instead of --eval-split")
    tr.add_argument("--prompt-field", default=None,
                    help="question column (auto: question, problem, prompt)")
    tr.add_argument("--answer-field", default=None, help="answer column (auto: answer, solution)")
    tr.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="system prompt (the authors')")
    tr.add_argument("--reward", default=None,
                    help="module:function, f(completion_text, reference) -> float (default: "
                         "math_reward, the final answer checked by Math-Verify)")
    tr.add_argument("--loss", default="lambda", choices=["lambda", "grpo"],
                    help="λ-GRPO or GRPO")
    tr.add_argument("--aggregation", default="token", choices=["token", "sequence"],
                    help="token: sum over all tokens / their number (the paper's); "
                         "sequence: mean of means")
    tr.add_argument("--group-size", type=int, default=6, help="completions per prompt (paper: 6)")
    tr.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step (paper: 4)")
    tr.add_argument("--steps", type=int, default=1000, help="training steps")
    tr.add_argument("--temperature", type=float, default=0.75,
                    help="sampling temperature (paper: 0.75)")
    tr.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (paper: 1.0)")
    tr.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (paper: 0)")
    tr.add_argument("--max-new-tokens", type=int, default=1200,
                    help="completion length limit (paper: 1200)")
    tr.add_argument("--generation-batch-size", type=int, default=None,
                    help="rows per generate call (default: the step's prompts × group size)")
    tr.add_argument("--stop-at-boxed", action=argparse.BooleanOptionalAction, default=True,
                    help="stop a completion once its \\boxed{...} closes (the authors' setting)")
    tr.add_argument("--updates-per-batch", type=int, default=1,
                    help="μ, optimizer steps per batch; > 1 brings in old log-probs and clipping "
                         "(paper: 1)")
    tr.add_argument("--clip-eps", type=float, default=0.2,
                    help="ε of the clipped ratio (paper: 0.2)")
    tr.add_argument("--beta", type=float, default=0.0, help="KL coefficient β (paper: 0 or 0.04)")
    tr.add_argument("--adv-eps", type=float, default=1e-4,
                    help="ε added to the group std (paper: 1e-4)")
    tr.add_argument("--micro-batch-size", type=int, default=4,
                    help="rows per forward/backward pass")
    tr.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    tr.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (paper: 1e-6)")
    tr.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    tr.add_argument("--gradient-checkpointing", action="store_true",
                    help="trade compute for activation memory")
    tr.add_argument("--lora-r", type=int, default=0,
                    help="LoRA rank, 0 = full fine-tuning (paper: 64; needs peft)")
    tr.add_argument("--lora-alpha", type=int, default=128, help="LoRA alpha (paper: 128)")
    tr.add_argument("--seed", type=int, default=0, help="random seed")
    tr.add_argument("--output-dir", default="runs/lgrpo",
                    help="metrics.jsonl and checkpoint-N folders")
    tr.add_argument("--save-every", type=int, default=0,
                    help="checkpoint every N steps (0: never)")
    tr.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint in --output-dir")
    tr.add_argument("--eval-every", type=int, default=0,
                    help="greedy eval accuracy every N steps (0: never)")
    tr.add_argument("--eval-size", type=int, default=100, help="held-out problems per eval")

    pl = sub.add_parser("plot", help="one figure comparing train runs (needs matplotlib)")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="--output-dir folders of train, finished or still running")
    pl.add_argument("--out", required=True, metavar="FIGURE.png",
                    help="image to write (.png, .pdf, .svg)")
    pl.add_argument("--smooth", type=int, default=10,
                    help="steps in the trailing mean drawn over the reward")
    pt = sub.add_parser("plot-toy", help="the toy's figure from a saved --json result, without "
                        "re-running it (needs matplotlib)")
    pt.add_argument("result", metavar="RESULT.json", help="written by python lgrpo.py --json")
    pt.add_argument("--out", required=True, metavar="FIGURE.png", help="image to write")
    return p


# The allowed range of every numeric flag, as an interval: "[2, inf)" is ≥ 2, "(0, 1]" is
# above 0 and at most 1. Checked before anything is created, loaded or started.
TOY_RANGES = {
    "n": (f"[1, {TOY_DEPTH - 1}]", f"the trap is T's first n of {TOY_DEPTH} tokens; with n = "
                                   f"{TOY_DEPTH} it would be T itself"),
    "r_neg": ("(-inf, inf)", ""),
    "seeds": ("[1, inf)", ""),
    "seed": ("[0, inf)", ""),
    "steps": ("[1, inf)", ""),
    "group_size": ("[2, inf)", "GRPO compares each completion with the rest of its group"),
    "lr": ("(0, inf)", ""),
    "temperature": ("(0, inf)", ""),
    "workers": ("[0, inf)", "0 uses every core"),
}
TRAIN_RANGES = {
    "group_size": ("[2, inf)", "GRPO compares each completion with the rest of its group"),
    "prompts_per_step": ("[1, inf)", ""),
    "steps": ("[1, inf)", ""),
    "temperature": ("(0, inf)", "the logits are divided by it"),
    "top_p": ("(0, 1]", "1 keeps the whole distribution"),
    "top_k": ("[0, inf)", "0 turns top-k off"),
    "max_new_tokens": ("[1, inf)", ""),
    "generation_batch_size": ("[1, inf)", "or leave it out for the whole step at once"),
    "updates_per_batch": ("[1, inf)", "μ, optimizer steps per batch"),
    "clip_eps": ("(0, inf]", "inf turns clipping off"),
    "beta": ("[0, inf)", "0 turns the KL term off"),
    "adv_eps": ("[0, inf)", "a negative ε can flip the sign of every advantage"),
    "micro_batch_size": ("[1, inf)", ""),
    "max_grad_norm": ("(0, inf]", "inf turns clipping off"),
    "lr": ("(0, inf)", ""),
    "weight_decay": ("[0, inf)", ""),
    "lora_r": ("[0, inf)", "0 is full fine-tuning"),
    "lora_alpha": ("(0, inf)", ""),
    "seed": ("[0, inf)", ""),
    "save_every": ("[0, inf)", "0 never saves"),
    "eval_every": ("[0, inf)", "0 never evaluates"),
    "eval_size": ("[1, inf)", "an evaluation on no problems measures nothing"),
    "eval_fraction": ("[0, 1)", ""),
}
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")
# A hub id: "name" or "owner/name". Anything else that does not exist is a mistyped path.
_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
# argparse (Python 3.11) reads "-1e30" as an option name, not as a negative number.
_NEGATIVE_EXPONENT = re.compile(r"-(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def check_ranges(args, ranges):
    """Refuse any flag of `ranges` whose value (or one of its values) lies outside its interval,
    naming the flag, the value and the allowed range. NaN lies in no interval."""
    for name, (interval, why) in ranges.items():
        opening, low, high, closing = _INTERVAL.fullmatch(interval).groups()
        low, high = float(low), float(high)
        values = getattr(args, name)
        for value in values if isinstance(values, list) else [values]:
            if value is None:  # an optional flag left out
                continue
            above = value > low or (opening == "[" and value == low)
            below = value < high or (closing == "]" and value == high)
            if not (above and below):
                flag = "--" + name.replace("_", "-")
                allowed = describe_interval(interval, isinstance(value, float))
                raise InputError(f"{flag} {value}: must be {allowed}"
                                 + (f" ({why})" if why else "") + ".")


def describe_interval(interval, real):
    """'[2, inf)' → '≥ 2', '(0, inf)' → '> 0' (for a real number: '> 0 and finite'),
    '(0, 1]' → 'in (0, 1]'."""
    opening, low, high, closing = _INTERVAL.fullmatch(interval).groups()
    finite = " and finite" if real and closing == ")" else ""
    if low == "-inf" and high == "inf":
        return "a finite number"
    if high == "inf":
        return f"{'≥' if opening == '[' else '>'} {low}{finite}"
    return f"in {interval}"


def check_model_path(flag, name):
    """Refuse a model path that does not exist before the hub library reads it as a malformed
    repo id, and a folder that is not a saved model."""
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise InputError(f"{flag} {name}: the folder has no config.json; point {flag} at a folder "
                         "written by save_pretrained, or at a hub id.")
    if not os.path.exists(name) and (not _HUB_ID.fullmatch(name) or ".." in name):
        raise InputError(f"{flag} {name}: no such folder (and not a hub id, 'name' or "
                         "'owner/name').")


def check_writable(flag, path):
    """Refuse an output file that cannot be written, before the minutes or hours of computing:
    open it for appending (which changes nothing) and remove it again if it is new."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot write there ({error.strerror}); name a file in "
                         "an existing, writable folder.") from None
    if not existed:
        os.remove(path)


def check_toy_args(args):
    """The toy's flags, before any worker starts."""
    check_ranges(args, TOY_RANGES)
    if args.toy_model is not None:
        check_model_path("--toy-model", args.toy_model)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(flag, path)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install matplotlib (or drop --plot).")


def check_plot_args(args):
    """`plot` and `plot-toy`: the figure's file, before the runs are read."""
    check_writable("--out", args.out)


def check_train_args(args):
    """train's flags, before the output folder is created or anything is loaded."""
    check_ranges(args, TRAIN_RANGES)
    check_model_path("--model", args.model)
    extension = os.path.splitext(args.dataset)[1].lower()
    if extension in DATA_FORMATS and not os.path.exists(args.dataset):
        raise InputError(f"--dataset {args.dataset}: no such file.")
    if args.eval_split and args.eval_fraction:
        raise InputError("pass --eval-split or --eval-fraction, not both: both name the held-out "
                         "problems.")
    if args.eval_every and not (args.eval_split or args.eval_fraction):
        raise InputError("--eval-every needs held-out problems: pass --eval-split or "
                         "--eval-fraction.")
    if args.resume and not os.path.isdir(args.output_dir):
        raise InputError(f"--resume: {args.output_dir} does not exist; run without --resume to "
                         "start a run there.")


def check_negative_exponents(argv):
    """Refuse "-1e30" as a value: argparse takes it for an option and says only "expected one
    argument". Say how to pass it."""
    for i, token in enumerate(argv):
        if _NEGATIVE_EXPONENT.fullmatch(token):
            flag = next((t for t in reversed(argv[:i]) if t.startswith("--")), "--flag")
            raise InputError(f"argparse reads {token} as an option, not a number: write "
                             f"{flag}={token}, or, among several values, with a space in front "
                             f"inside quotes: {flag} ' {token}'.")


def main(argv=None):
    """The command line. A mistake in the input (flags, data, reward, run folder) prints one line,
    `lgrpo: error: ...`, and exits 2; any other exception keeps its traceback."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["toy"] + argv
    try:
        check_negative_exponents(argv)
        args = build_parser().parse_args(argv)
        if args.command == "verify":
            sys.exit(1 if verify() else 0)
        if args.command == "toy":
            check_toy_args(args)
            toy_sweep(args)
        elif args.command == "train":
            check_train_args(args)
            train(args)
        elif args.command == "plot":
            check_plot_args(args)
            plot_runs(args.run_dirs, args.out, args.smooth)
        elif args.command == "plot-toy":
            check_plot_args(args)
            plot_toy_file(args.result, args.out)
    except InputError as error:
        print(f"lgrpo: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
