"""λ-GRPO: a single-file reference implementation.

M. Sullivan and A. Koller, "GRPO is Secretly a Process Reward Model", arXiv:2509.21154 (ICML 2026).
(Not arXiv:2510.06870, an unrelated method that is also called λ-GRPO.)

The file reads top to bottom in the paper's order:

  1. Rollouts and the GRPO objective   groups, outcome advantages, token log-probs, the loss
  2. Process sets                      the prefix trie hidden in every group
  3. The implicit PRM                  Monte-Carlo step rewards and step advantages
  4. λ-GRPO                            divide each token's term by the size of its process set
  5. Theorem 1, checked numerically    `python lgrpo.py verify`
  6. Training an LLM                   `python lgrpo.py train --model ... --dataset ...`
  7. The toy task (Table 1)            `python lgrpo.py` (the default job, CPU, ~1 minute)
  8. Benchmark                         `python lgrpo.py bench`
  9. Command line

Shapes: B completions in groups of G consecutive rows (rows g·G … g·G+G−1 answer prompt g), T
completion positions. Completions are right-padded; `completion_mask` is 1 on real tokens,
including the terminating EOS, and is the only source of truth about padding.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys

import torch
import torch.nn.functional as F

# ─────────────────────────────────────────────────────────────────────────────────────────────
# 1. Rollouts and the GRPO objective (PAPER §1)
# ─────────────────────────────────────────────────────────────────────────────────────────────


def seed_everything(seed):
    """Seed Python and torch (CPU and CUDA) so that a run is a function of its seed."""
    random.seed(seed)
    torch.manual_seed(seed)


def _check_group_size(batch_size, group_size):
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (got {group_size}): GRPO compares the "
                         "completions of a group, and one completion has nothing to compare with.")
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} completions does not split into groups of "
                         f"{group_size}: pass B = prompts × group_size rows, group by group.")


def _check_rewards(rewards, group_size):
    rewards = torch.as_tensor(rewards)
    rewards = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, one number per completion (got shape "
                         f"{tuple(rewards.shape)}).")
    _check_group_size(rewards.numel(), group_size)
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards must be finite; rows {bad} are NaN or infinite: fix the reward "
                         "function so that it returns a real number for every completion.")
    return rewards


def _check_completions(completion_ids, completion_mask, group_size):
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B, T].")
    _check_group_size(completion_ids.shape[0], group_size)
    mask = completion_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        rows = (mask[:, 1:] & ~mask[:, :-1]).any(1).nonzero().flatten().tolist()
        raise ValueError(f"completion_mask rows {rows} have a 1 after a 0: a completion must be "
                         "right-padded, its mask 1…1 0…0 (left-pad the prompt, not the completion).")
    return mask


def group_advantages(rewards, group_size, eps=1e-4):
    """Outcome advantages a_i = (r_i − mean(r)) / (std(r) + ε) within each group (PAPER §1).

    The std is the sample (n−1) one, as in the paper's worked example. A group whose rewards are
    all equal carries no signal: its advantages are exactly 0, never 0/0.
    """
    r = _check_rewards(rewards, group_size).view(-1, group_size)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    flat = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(flat, torch.zeros_like(a), a).view(-1)


def completion_mask(completion_ids, eos_token_ids, lengths=None):
    """1 on the tokens of each completion up to and including its first EOS (and before
    `lengths`, where a stopping rule cut it), 0 after. Also returns which rows were truncated.

    Read from the first EOS, never from `!= pad_token_id`: with pad = eos that would drop the real
    EOS from the loss and the model would never learn to stop (PAPER §8).
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), dtype=torch.long,
                                                         device=completion_ids.device))
    before_eos = (is_eos.cumsum(1) - is_eos.long()) == 0  # no EOS strictly before t
    mask = before_eos
    finished = is_eos.any(1)
    if lengths is not None:
        positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
        mask = mask & (positions < lengths[:, None])
        finished = finished | (lengths < completion_ids.shape[1])
    return mask.long(), ~finished


@torch.no_grad()
def sample_completions(model, prompt_ids, prompt_mask, group_size, batch_size=None, pad_token_id=0,
                       **generate_kwargs):
    """Sample a group of `group_size` completions for every (left-padded) prompt with HF generate.

    Returns completion tokens [P·G, T], right-padded with `pad_token_id`; rows g·G … g·G+G−1 are
    prompt g's group. `batch_size` bounds how many rows one generate call decodes at once.
    """
    ids = prompt_ids.repeat_interleave(group_size, 0)
    mask = prompt_mask.repeat_interleave(group_size, 0)
    batch_size = batch_size or ids.shape[0]
    chunks = []
    for s in range(0, ids.shape[0], batch_size):
        out = model.generate(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size],
                             do_sample=True, pad_token_id=pad_token_id, **generate_kwargs)
        chunks.append(out[:, ids.shape[1]:])
    width = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])


def _logprobs_of(logits, targets):
    # log π(y_t) = logit[y_t] − logsumexp(logits): no [.., V] log_softmax tensor is kept.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(model, input_ids, attention_mask, completion_start, chunk_tokens=1 << 26):
    """log π(y_t | q, y_<t) for the completion positions `completion_start:` of [prompt | completion].

    The prompt is left-padded, so positions come from the attention mask, as in generate();
    otherwise scoring would see other positions than sampling did. Only the completion's logits
    are computed (`logits_to_keep`), and they are turned into log-probs in chunks of about
    `chunk_tokens` logits, each recomputed in the backward pass, so that no float32 copy of the
    full [B, T, V] logits ever exists (PAPER §8).
    """
    T = input_ids.shape[1] - completion_start
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
    targets = input_ids[:, completion_start:]
    step = max(1, chunk_tokens // max(1, logits.shape[0] * logits.shape[-1]))
    out = []
    for s in range(0, T, step):
        args = (logits[:, s:s + step], targets[:, s:s + step])
        if torch.is_grad_enabled() and logits.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(_logprobs_of, *args, use_reentrant=False))
        else:
            out.append(_logprobs_of(*args))
    return torch.cat(out, 1) if out else logits.new_zeros(input_ids.shape[0], 0, dtype=torch.float32)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, weights=None, clip_eps=0.2, beta=0.0,
                aggregation="token"):
    """Minus the GRPO objective (PAPER §1, eq. 2), with optional per-token weights (λ-GRPO, §3).

    Per token:  −min(P·A, clip(P, 1−ε, 1+ε)·A) + β·(exp(ref − logp) − (ref − logp) − 1),
    P = exp(logp − old_logp), the whole term multiplied by `weights` when given.
    `advantages` is [B] (outcome advantages a_i, the same for every token) or [B, T] (per-token
    step advantages A_{i,t}). Aggregation "token" (the paper's, DAPO-style): sum over all valid
    tokens divided by their number. "sequence": mean over each completion, then over completions.
    With old_logp = logp.detach(), P is 1 in value and clipping never acts (μ = 1).
    """
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be the same [B, T] shape.")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got "
                         f"{tuple(advantages.shape)}.")
    if weights is not None and weights.shape != logp.shape:
        raise ValueError(f"weights must be [B, T] = {tuple(logp.shape)}, got {tuple(weights.shape)}.")
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}.")
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


# ─────────────────────────────────────────────────────────────────────────────────────────────
# 2. Process sets: the prefix trie hidden in every group (PAPER §2)
# ─────────────────────────────────────────────────────────────────────────────────────────────


def _process_set_membership(completion_ids, completion_mask, group_size):
    """in_set[g, i, k, t] is True iff completion k is in λ^(i,t), i.e. y^(k)[:t+1] = y^(i)[:t+1].

    Two completions agree at t when both have a real token there and it is the same token; they
    share the prefix up to t when they agree at every position ≤ t (a running AND along t).
    Pairwise within each group: [B/G, G, G, T] booleans, no Python loop over tokens.
    """
    mask = _check_completions(completion_ids, completion_mask, group_size)
    T = completion_ids.shape[1]
    ids = completion_ids.view(-1, group_size, T)
    mask = mask.view(-1, group_size, T)
    agree = (ids[:, :, None] == ids[:, None]) & mask[:, :, None] & mask[:, None]
    return agree.cummin(-1).values


def process_set_sizes(completion_ids, completion_mask, group_size):
    """|λ^(i,t)|, the size of the process set whose step holds token t of completion i (PAPER §2).

    Identical completions are separate members; 0 on padding.
    """
    in_set = _process_set_membership(completion_ids, completion_mask, group_size)
    return in_set.sum(2).view(completion_ids.shape)


@dataclasses.dataclass
class TrieNode:
    """One process step: the tokens [start, end) on which exactly `members` agree (PAPER §2)."""
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
    """The explicit prefix trie of one group, built the slow obvious way (for reading and printing).

    `completions` is a list of token lists. The root is the shared prompt (no tokens, not a step);
    every other node is a maximal run of tokens shared by exactly the same completions. Each node
    carries its Monte-Carlo step reward and step advantage (PAPER §2).
    """
    rewards = _check_rewards(rewards, len(completions)).double()
    advantages = group_advantages(rewards, len(completions), eps)

    def grow(node):
        # Extend the span while every member continues with the same token.
        while True:
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

    root = grow(TrieNode([], 0, 0, list(range(len(completions)))))
    # The prompt is not a process step: its children are the first steps.
    assert not root.tokens or len(completions) == 0
    return root


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


def trie_stats(completion_ids, completion_mask, group_size):
    """The paper's overlap statistics (PAPER §5), averaged over groups.

    path_depth: number of process steps on a completion's path from the root, mean over the
        group's non-empty completions. Along a path the process sets only shrink, so a new step
        starts exactly where |λ| changes.
    intermediate_prop: share of a completion's tokens that lie in shared steps (|λ| > 1).
    flat_frac: share of groups whose trie is flat (every |λ| = 1: the PRM is plain ORM).
    """
    sizes = process_set_sizes(completion_ids, completion_mask, group_size)
    valid = sizes > 0
    lengths = valid.sum(1)
    starts = valid & (sizes != F.pad(sizes, (1, 0))[:, :-1])
    depth = starts.sum(1).double()
    inter = ((sizes > 1).sum(1) / lengths.clamp(min=1)).double()
    nonempty = (lengths > 0).view(-1, group_size).double()
    n = nonempty.sum(1).clamp(min=1)
    per_group = lambda x: ((x.view(-1, group_size) * nonempty).sum(1) / n).mean().item()
    return {"path_depth": per_group(depth), "intermediate_prop": per_group(inter),
            "flat_frac": (sizes <= 1).view(-1, group_size * sizes.shape[1]).all(1).double().mean().item()}


# ─────────────────────────────────────────────────────────────────────────────────────────────
# 3. The implicit PRM: Monte-Carlo step rewards and step advantages (PAPER §2)
# ─────────────────────────────────────────────────────────────────────────────────────────────


def step_advantages(completion_ids, completion_mask, rewards, group_size, eps=1e-4):
    """A_{i,t} = (R̂(λ^(i,t)) − mean(r)) / (std(r) + ε), R̂(λ) the mean reward of λ's members.

    This is the process reward GRPO secretly uses: since the normalization is affine, A_{i,t} is
    also the mean of the members' outcome advantages a_k, which is how it is computed. 0 on padding.
    """
    in_set = _process_set_membership(completion_ids, completion_mask, group_size)
    a = group_advantages(rewards, group_size, eps).view(-1, group_size)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    summed = torch.einsum("gikt,gk->git", in_set.to(a.dtype), a)
    sizes = in_set.sum(2)
    return (summed / sizes.clamp(min=1)).view(completion_ids.shape)


# ─────────────────────────────────────────────────────────────────────────────────────────────
# 4. λ-GRPO (PAPER §3)
# ─────────────────────────────────────────────────────────────────────────────────────────────


def lambda_weights(completion_ids, completion_mask, group_size, dtype=torch.float32):
    """1 / |λ^(i,t)| on real tokens, 0 on padding: the whole change from GRPO to λ-GRPO (PAPER §3).

    In GRPO a step shared by |λ| completions is pushed |λ| times, once per member; with these
    weights in `policy_loss` every process step counts once, with its step advantage.
    """
    sizes = process_set_sizes(completion_ids, completion_mask, group_size)
    return torch.where(sizes > 0, 1 / sizes.clamp(min=1).to(dtype), 0)


# ─────────────────────────────────────────────────────────────────────────────────────────────
# 5. Theorem 1 and the worked example, checked numerically (`python lgrpo.py verify`)
# ─────────────────────────────────────────────────────────────────────────────────────────────

# The paper's Figure 1 (PAPER §4): six completions, letters as tokens, with outcome rewards, and
# the step table as the paper prints it (members numbered from 1).
FIGURE1_COMPLETIONS = ["A B C D", "A B E F H I", "J K L M", "J K L N Q S T", "J K L N Q U", "V W Y Z"]
FIGURE1_REWARDS = [0.5, 0.5, 1.0, 0.0, 0.0, 0.5]
FIGURE1_ADVANTAGES = [0.2214, 0.2214, 1.5498, -1.1070, -1.1070, 0.2214]
FIGURE1_STEPS = [  # (tokens, members, |λ|, R̂, A)
    ("A B", [1, 2], 2, 0.5, 0.2214), ("C D", [1], 1, 0.5, 0.2214), ("E F H I", [2], 1, 0.5, 0.2214),
    ("J K L", [3, 4, 5], 3, 0.3333, -0.2214), ("M", [3], 1, 1.0, 1.5498),
    ("N Q", [4, 5], 2, 0.0, -1.1070), ("S T", [4], 1, 0.0, -1.1070), ("U", [5], 1, 0.0, -1.1070),
    ("V W Y Z", [6], 1, 0.5, 0.2214)]

# The group for the Theorem-1 checks: shared prefixes (1 2, 6 6 2), unequal lengths, a duplicate
# (rows 0 and 2) and a completion that is a prefix of another (row 3 of row 4).
THEOREM_GROUP = [[1, 2, 3, 4], [1, 2, 5, 6, 7, 3], [1, 2, 3, 4], [6, 6, 2], [6, 6, 2, 5, 1], [3, 1]]
THEOREM_REWARDS = [1.0, 0.0, 1.0, 0.0, 0.5, 1.0]


def pad_completions(completions, pad_id=0):
    """Token lists → right-padded `completion_ids` and `completion_mask` tensors."""
    T = max(map(len, completions), default=0)
    ids = torch.tensor([list(c) + [pad_id] * (T - len(c)) for c in completions], dtype=torch.long)
    mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions], dtype=torch.long)
    return ids.view(len(completions), T), mask.view(len(completions), T)


def tiny_gpt2(vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0, dtype=torch.float32):
    """A small randomly initialized GPT-2 built from a config (no download), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng():  # leave the caller's random stream alone
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config).to(dtype).eval()


@dataclasses.dataclass
class Check:
    name: str
    measured: float
    passed: bool
    bound: str
    why: str = ""


def _max_abs(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


def theorem1_checks(beta=0.04, tol=1e-10):
    """Theorem 1 (PAPER §2) and λ-GRPO's "each step once" reading (§3), in value and gradient.

    A tiny float64 GPT-2 in eval mode (dropout would make two forward passes differ) scores
    THEOREM_GROUP; a second one is the KL reference.
    """
    G = len(THEOREM_GROUP)
    ids, mask = pad_completions(THEOREM_GROUP)
    rewards = torch.tensor(THEOREM_REWARDS, dtype=torch.float64)
    policy, reference = (tiny_gpt2(8, seed=s, dtype=torch.float64) for s in (0, 1))
    prompt = torch.full((G, 2), 7)
    input_ids, attention = torch.cat([prompt, ids], 1), torch.cat([torch.ones_like(prompt), mask], 1)
    score = lambda model: token_logprobs(model, input_ids, attention, prompt.shape[1])
    with torch.no_grad():
        ref_logp = score(reference)
    a = group_advantages(rewards, G)                        # outcome advantages, [B]
    A = step_advantages(ids, mask, rewards, G)              # step advantages, [B, T]
    w = lambda_weights(ids, mask, G, dtype=torch.float64)
    params = list(policy.parameters())

    def value_and_grad(objective, model=policy, old_logp=None):
        logp = score(model)
        loss = objective(logp, logp.detach() if old_logp is None else old_logp)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    def compare(name, f, g, equal, why="", **kw):
        (v1, g1), (v2, g2) = value_and_grad(f, **kw), value_and_grad(g, **kw)
        dv, dg = (v1 - v2).abs().item(), _max_abs(g1, g2)
        if equal:
            return [Check(f"{name}: value", dv, dv <= tol, f"≤ {tol:g}", why),
                    Check(f"{name}: gradient of all {len(params)} parameter tensors", dg, dg <= tol,
                          f"≤ {tol:g}")]
        return [Check(f"{name}: value", dv, dv > 1e-6, "> 1e-6, equality breaks as the paper says", why)]

    loss = lambda adv, **kw: (lambda logp, old: policy_loss(logp, old, ref_logp, adv, mask, beta=beta, **kw))

    def steps_counted_once(logp, old):
        # λ-GRPO read off the trie: every process step once, with its step advantage. The terms
        # of a step are the same for all its members (they depend on the prefix only): use one.
        total = 0.0
        for node in trie_steps(build_trie(THEOREM_GROUP, rewards)):
            i, s, e = node.members[0], node.start, node.end
            step_adv = torch.tensor([node.advantage], dtype=torch.float64)
            total = total + (e - s) * policy_loss(logp[i:i + 1, s:e], old[i:i + 1, s:e],
                                                  ref_logp[i:i + 1, s:e], step_adv,
                                                  mask[i:i + 1, s:e], beta=beta)
        return total / mask.sum()

    moved = copy.deepcopy(policy)  # μ > 1: after an update within the batch, π_θ ≠ π_old
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        old_logp = score(policy)
    ratio = torch.exp(score(moved) - old_logp).detach()[mask.bool()]
    clipped = ((ratio < 0.8) | (ratio > 1.2)).double().mean().item()

    return (compare("Theorem 1: L_GRPO (outcome a_i) = L_PRM (step A_i,t)", loss(a), loss(A), True,
                    "P and D depend on the prefix only, so each step's members sum to |λ|·mean(a)")
            + compare("λ-GRPO (weights 1/|λ|) = each process step counted once", loss(a, weights=w),
                      steps_counted_once, True, "the |λ| members of a step together push it once")
            + compare("Counterexample: 'sequence' aggregation, unequal lengths",
                      loss(a, aggregation="sequence"), loss(A, aggregation="sequence"), False,
                      "members of a step are divided by their own lengths, so they no longer share "
                      "one coefficient and their a_k do not sum to |λ|·A")
            + compare(f"Counterexample: μ > 1, clipping active on {clipped:.0%} of tokens",
                      loss(a), loss(A), False,
                      "min(P·a, clip(P)·a) depends on each a_k's sign, so it is not linear in a",
                      model=moved, old_logp=old_logp)
            + compare("μ > 1 without clipping (ε = ∞): the equality still holds",
                      loss(a, clip_eps=math.inf), loss(A, clip_eps=math.inf), True,
                      "P ≠ 1 is harmless: it is still a function of the prefix",
                      model=moved, old_logp=old_logp))


def figure1_checks():
    """The paper's worked example (PAPER §4): every number of both tables to 4 decimals.

    The paper computes it with ε = 0 (with ε = 1e-4 the first advantage would read 0.2213).
    """
    completions = [c.split() for c in FIGURE1_COMPLETIONS]
    rewards = torch.tensor(FIGURE1_REWARDS, dtype=torch.float64)
    G = len(completions)
    a = group_advantages(rewards, G, eps=0)
    checks = [Check("Figure 1: mean(r) = 0.416667, sample std = 0.376386",
                    max(abs(rewards.mean().item() - 0.416667), abs(rewards.std().item() - 0.376386)),
                    True, "≤ 5e-7"),
              Check("Figure 1: outcome advantages a_i", _max_abs(a, torch.tensor(FIGURE1_ADVANTAGES)),
                    True, "≤ 5e-5")]
    steps = list(trie_steps(build_trie(completions, rewards, eps=0)))
    got = [(" ".join(n.tokens), [k + 1 for k in n.members], n.size) for n in steps]
    same_steps = got == [row[:3] for row in FIGURE1_STEPS]
    diff = max(max(abs(n.reward - row[3]), abs(n.advantage - row[4])) for n, row in zip(steps, FIGURE1_STEPS))
    checks.append(Check("Figure 1: the 9 process steps, members, |λ|, R̂ and A", diff if same_steps else math.inf,
                        True, "≤ 5e-5"))
    # The vectorized functions must agree with the trie on every token.
    vocab = {t: i for i, t in enumerate(sorted({t for c in completions for t in c}))}
    ids, mask = pad_completions([[vocab[t] for t in c] for c in completions])
    sizes, A = process_set_sizes(ids, mask, G), step_advantages(ids, mask, rewards, G, eps=0)
    disagree = max(max(abs(sizes[k, t].item() - n.size), abs(A[k, t].item() - n.advantage))
                   for n in steps for k in n.members for t in range(n.start, n.end))
    checks.append(Check("Figure 1: process_set_sizes and step_advantages agree with the trie", disagree,
                        True, "≤ 1e-12"))
    # GRPO's summed push on each token of J K L is Σ_members a_k; λ-GRPO's is that divided by |λ|.
    jkl = next(n for n in steps if n.tokens == ["J", "K", "L"])
    grpo_push, lambda_push = a[jkl.members].sum().item(), (a[jkl.members].sum() / jkl.size).item()
    checks.append(Check(f"Figure 1: push on J K L, GRPO {grpo_push:+.4f} (paper −0.6642), "
                        f"λ-GRPO {lambda_push:+.4f} (paper −0.2214)",
                        max(abs(grpo_push + 0.6642), abs(lambda_push + 0.2214)), True, "≤ 5e-5",
                        "J K L M is the best completion, yet GRPO pushes its prefix down 3×"))
    for c in checks:
        c.passed = c.measured <= float(c.bound.split("≤ ")[1])
    return checks


def verify():
    """Run every check, print a report, return the number of failures."""
    completions = [c.split() for c in FIGURE1_COMPLETIONS]
    print("The worked example (PAPER §4, Figure 1) as a trie:\n")
    print(format_trie(build_trie(completions, FIGURE1_REWARDS, eps=0)), "\n")
    checks = figure1_checks() + theorem1_checks()
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}\n      measured {c.measured:.3e}  (expected {c.bound})")
        if c.why:
            print(f"      why: {c.why}")
    failures = sum(not c.passed for c in checks)
    print(f"\n{len(checks) - failures} passed, {failures} failed")
    return failures


# ─────────────────────────────────────────────────────────────────────────────────────────────
# 9. Command line
# ─────────────────────────────────────────────────────────────────────────────────────────────


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        sys.exit(1 if verify() else 0)


if __name__ == "__main__":
    main()
