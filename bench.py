"""What λ-GRPO costs: the benchmark behind the README's tables (`python bench.py`).

  1. Process sets: `process_set_sizes` and `lambda_weights` against a recursive Python trie.
  2. A training step of `lgrpo.py train`, GRPO against λ-GRPO, split into its phases.
  3. Peak memory of the sampled tokens' log-probs: `token_logprobs` against the naive form.
  4. The reward: Math-Verify's cost per call and per step, and the boxed stop.
  5. When trl is installed: a step of `lgrpo.py train` against TRL's GRPOTrainer and
     `lgrpo.LambdaGRPOTrainer`, TRL's gradient checkpointing on and off.

Timings are printed and written with --json, never asserted: the test suite runs `--quick` as a
smoke test only.
"""

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time

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
    return f"CPU ({torch.get_num_threads()} threads)"


def ms_per_group(fn, groups, G, device, repeats):
    """Median time of fn over all `groups`, divided by their number."""
    def all_groups():
        for ids, mask in groups:
            fn(ids, mask, G)
    return timed_ms(all_groups, device, repeats) / len(groups)


def bench_process_sets(devices, shapes, repeats):
    """ms per group of process_set_sizes and lambda_weights, and of the Python trie, on three
    groups per shape (short, medium and long shared prefixes). Every answer is checked first."""
    generator, rows = torch.Generator().manual_seed(0), []
    for G, T in shapes:
        groups = [bench_group(G, T, generator, skew) for skew in (3.0, 1.0, 0.25)]
        trie_ms = []
        for ids, mask in groups:  # one run per group: the trie takes seconds at G=64, T=8192
            t0 = time.perf_counter()
            expected = python_trie_sizes(ids, mask)
            trie_ms.append((time.perf_counter() - t0) * 1e3)
            for device in devices:  # a bench that compares different answers means nothing
                got = lgrpo.process_set_sizes(ids.to(device), mask.to(device), G).cpu()
                if not torch.equal(got, expected):
                    raise AssertionError(f"process_set_sizes disagrees with the trie, G={G}, T={T}")
        for device in devices:
            on = [(ids.to(device), mask.to(device)) for ids, mask in groups]
            ours = ms_per_group(lgrpo.process_set_sizes, on, G, device, repeats)
            weights = ms_per_group(lgrpo.lambda_weights, on, G, device, repeats)
            trie = statistics.median(trie_ms)
            rows.append({"device": device_name(device), "G": G, "T": T,
                         "process_set_sizes_ms": ours, "lambda_weights_ms": weights,
                         "python_trie_cpu_ms": trie, "trie_over_ours": trie / ours})
    return rows


# ──────────────────────────────────────────────────────────────────────────────────────────────────
# 2. A training step, GRPO against λ-GRPO
# ──────────────────────────────────────────────────────────────────────────────────────────────────


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


def save_model_and_data(model, tokenizer, workdir, prompts):
    """The model with EOS suppressed (every completion full length) and `prompts` problems no
    completion can answer (every reward 0), saved for `lgrpo.py train` and TRL alike."""
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    path, data = os.path.join(workdir, "model"), os.path.join(workdir, "data.jsonl")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(data, "w") as f:
        for i in range(prompts):
            row = {"question": f"What is {i}+{i + 1}?", "answer": "#### never"}
            f.write(json.dumps(row) + "\n")
    return path, data


def lgrpo_train_steps(path, data, out, loss, group_size, prompts, new_tokens, steps):
    """`python lgrpo.py train` with β = 0.04 and its other defaults; its metrics, step by step."""
    lgrpo.main(["train", "--model", path, "--dataset", data, "--output-dir", out,
                "--loss", loss, "--seed", "0", "--group-size", str(group_size),
                "--prompts-per-step", str(prompts), "--max-new-tokens", str(new_tokens),
                "--steps", str(steps), "--beta", "0.04", "--no-stop-at-boxed"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def bench_train_step(args, device, workdir):
    """GRPO against λ-GRPO through lgrpo's own `train`, same seed, same batches.

    EOS is suppressed, so every completion is full length. No completion can reach the answer, so
    every reward is 0: the weights never move and both losses see the same batch at every step,
    while a step still does all of a real step's work (a zero advantage is multiplied, not
    skipped).
    """
    tokenizer = lgrpo.char_tokenizer()
    model = bench_model(device, args.quick, tokenizer)
    big = model.config.model_type != "llama"
    G, prompts = 8, 4
    new_tokens = 16 if args.quick else 512 if big else 64
    steps = 2 if args.quick else args.steps  # step 1 is warm-up, never reported
    model_type = model.config.model_type
    path, data = save_model_and_data(model, tokenizer, workdir, prompts)
    del model
    runs = {"grpo": [], "lambda": []}
    # ABBA order: a later run in the same process tends to be slower; this cancels a linear drift.
    for i, loss in enumerate(("grpo", "lambda", "lambda", "grpo")):
        out = os.path.join(workdir, f"{loss}-{i}")
        metrics = lgrpo_train_steps(path, data, out, loss, group_size=G, prompts=prompts,
                                    new_tokens=new_tokens, steps=steps)
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
    lgrpo.lambda_weights(ids, mask, G)  # warm-up
    weights_ms = timed_ms(lambda: lgrpo.lambda_weights(ids, mask, G), device, 20)
    return {"device": device_name(device), "model": model_type, "group_size": G,
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


def zero_reward(completions, **kwargs):
    """TRL's reward function for the bench: no completion can reach the answer, as in table 2."""
    return [0.0] * len(completions)


def trl_train_steps(path, prompts, out, trainer_class, settings):
    """Seconds per optimizer step of a TRL trainer, and the seconds of each step spent on the λ
    weights (0 for GRPOTrainer). A step is timed from the callback before its first micro-batch
    (TRL generates there) to the one after the optimizer step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig
    step_s, weights_s = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            weights_s.append(0.0)

        def on_step_end(self, args, state, control, **kwargs):
            step_s.append(time.perf_counter() - self.start)

    class Timed(trainer_class):  # only LambdaGRPOTrainer calls local_lambda_weights
        def local_lambda_weights(self, completion_ids, completion_mask):
            start = time.perf_counter()
            weights = super().local_lambda_weights(completion_ids, completion_mask)
            weights_s[-1] += time.perf_counter() - start
            return weights

    config = GRPOConfig(output_dir=out, report_to="none", save_strategy="no", disable_tqdm=True,
                        logging_steps=10**6, seed=0, **settings)
    trainer = Timed(model=path, reward_funcs=zero_reward, args=config, callbacks=[Clock()],
                    train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    return step_s, weights_s


def bench_trl(args, device, workdir):
    """Seconds per step: `lgrpo.py train` (GRPO, λ-GRPO) against TRL's GRPOTrainer and
    LambdaGRPOTrainer, TRL's gradient checkpointing on (its default) and off.

    The same tiny float32 Llama, prompts and settings for all: G = 8, 4 prompts, EOS suppressed
    (every completion full length), β = 0.04, temperature 0.75, micro-batches of 4 (TRL: 4 rows
    per device, 8 accumulation steps, one generation per step), lr 1e-6, every reward 0 as in
    table 2. The six runs go in one order and then back (ABC…CBA) to cancel a drift.
    """
    from trl import GRPOTrainer
    load_before = load_average()
    tokenizer = lgrpo.char_tokenizer()
    G, prompts = 8, 4
    new_tokens = 16 if args.quick else 64
    steps = 2 if args.quick else args.steps  # step 1 is warm-up, never reported
    path, data = save_model_and_data(lgrpo.tiny_llama(tokenizer, max_positions=512), tokenizer,
                                     workdir, prompts)
    # TRL gets the very prompt text that lgrpo's train encodes.
    with open(data) as f:
        questions = [json.loads(line)["question"] for line in f]
    tokenizer.pad_token = tokenizer.eos_token
    encoded = lgrpo.encode_prompts(tokenizer, questions, lgrpo.SYSTEM_PROMPT, "cpu")
    texts = tokenizer.batch_decode(encoded["input_ids"], skip_special_tokens=True)
    trl_settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=G * prompts // 4,
                        num_generations=G, max_completion_length=new_tokens, temperature=0.75,
                        beta=0.04, learning_rate=1e-6, max_steps=steps, bf16=False,
                        use_cpu=device.type != "cuda",
                        generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id]})
    runs = [("lgrpo train", "grpo", None), ("lgrpo train", "lambda", None)]
    for checkpointing in (True, False):
        runs += [("GRPOTrainer", "grpo", checkpointing),
                 ("LambdaGRPOTrainer", "lambda", checkpointing)]
    order = runs if args.quick else runs + runs[::-1]
    measured = {run: ([], []) for run in runs}
    for i, run in enumerate(order):
        name, loss, checkpointing = run
        out = os.path.join(workdir, f"trl-{i}")
        if checkpointing is None:
            metrics = lgrpo_train_steps(path, data, out, loss, group_size=G, prompts=prompts,
                                        new_tokens=new_tokens, steps=steps)
            step_s, weights_s = [step_seconds(r) for r in metrics], [0.0] * len(metrics)
        else:
            trainer_class = GRPOTrainer if loss == "grpo" else lgrpo.LambdaGRPOTrainer
            settings = dict(trl_settings, gradient_checkpointing=checkpointing)
            step_s, weights_s = trl_train_steps(path, texts, out, trainer_class=trainer_class,
                                                settings=settings)
        measured[run][0].extend(step_s[1:])  # the first step warms up
        measured[run][1].extend(weights_s[1:])
    lgrpo_s = {loss: statistics.median(measured["lgrpo train", loss, None][0])
               for loss in ("grpo", "lambda")}
    rows = []
    for (name, loss, checkpointing), (step_s, weights_s) in measured.items():
        trl = checkpointing is not None
        # The fastest step too: the one least slowed by other work on the machine.
        row = {"run": name, "loss": loss, "trl_checkpointing": "-",
               "step_s": statistics.median(step_s), "fastest_s": min(step_s),
               "lgrpo_over_this": None, "weights_share": None}
        if trl:
            row["trl_checkpointing"] = "on" if checkpointing else "off"
            row["lgrpo_over_this"] = lgrpo_s[loss] / row["step_s"]  # the same loss in lgrpo
        if trl and loss == "lambda":
            row["weights_share"] = statistics.median(w / s for w, s in zip(weights_s, step_s))
        rows.append(row)
    load_after = load_average()
    return {"device": device_name(device), "group_size": G, "prompts": prompts,
            "new_tokens": new_tokens, "measured_steps": len(measured[runs[0]][0]), "rows": rows,
            "load_average_1min": [load_before, load_after]}


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


def build_parser():
    p = argparse.ArgumentParser(description="Time process sets, a training step and log-prob "
                                "memory (the README's benchmark tables).")
    p.add_argument("--quick", action="store_true",
                   help="smallest configuration only (G=8, T=512; 2 steps, 16 new tokens; vocab "
                        "4096, T=128): the test suite's smoke test, under a minute on 2 CPU cores")
    p.add_argument("--steps", type=int, default=20,
                   help="training steps per loss; the first is warm-up and is not reported "
                        "(--quick: 2)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls of process_set_sizes / lambda_weights per shape, median "
                        "reported (the Python trie runs once per input, median of 3)")
    p.add_argument("--reward-only", action="store_true",
                   help="only table 4, the reward and the boxed stop (about a minute)")
    p.add_argument("--json", default=None, help="also write the tables to this file")
    return p


def bench(args):
    """The README's benchmark tables, printed and returned (and written with --json)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    shapes = [(8, 512)] if args.quick else [(G, T) for G in (8, 16, 64) for T in (512, 2048, 8192)]
    repeats = 3 if args.quick else args.repeats
    # Other work on the machine skews CPU timings (threads wait for descheduled siblings).
    load = load_average()
    result = {"quick": args.quick, "cpu_cores": os.cpu_count(), "load_average_1min": load}
    if args.reward_only:
        reward_table(args, result)
        return write_json(args, result)
    result["process_sets"] = bench_process_sets(devices, shapes, repeats)
    print(format_table(f"1. ms per group, median of {repeats} repeats over 3 groups (Python trie: "
                       f"median of 3 groups, on the CPU; load average {load} on "
                       f"{os.cpu_count()} cores)", result["process_sets"]))
    with tempfile.TemporaryDirectory() as workdir:
        step = result["train_step"] = bench_train_step(args, device, workdir)
    ratio = step["lambda_over_grpo"]
    print("\n" + format_table(f"2. Training step in s, {step['model']} random init, "
                              f"G={step['group_size']}, {step['prompts']} prompts, "
                              f"{step['new_tokens']} new tokens, median of "
                              f"{step['measured_steps']} steps ({step['device']})", step["rows"]))
    print(f"λ-GRPO / GRPO step time: {ratio['median']:.3f} (per-step range {ratio['min']:.3f}–"
          f"{ratio['max']:.3f}); lambda_weights alone: {step['lambda_weights_ms']:.3f} ms = "
          f"{step['lambda_weights_share_of_step']:.4%} of a λ-GRPO step")
    result["logprob_memory"] = bench_logprob_memory(args, device)
    print("\n" + format_table("3. Peak memory of log-probs, forward + backward, bf16 logits, MB",
                              result["logprob_memory"]))
    print()
    reward_table(args, result)
    trl_table(args, device, result)
    return write_json(args, result)


def reward_table(args, result):
    """Table 4, printed."""
    reward = result["reward"] = bench_reward(args)
    print(format_table(f"4. The reward, Math-Verify on 3-60 sentences of reasoning and a boxed "
                       f"answer, ms (the first call, imports included: "
                       f"{reward['first_call_s']:.1f} s)", reward["reward"]))
    print(format_table("   The boxed stop on n nested \\boxed{ that never close, s",
                       reward["boxed_stop"]))


def trl_table(args, device, result):
    """Table 5, printed when trl is installed."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print("\n5. lgrpo against TRL: skipped, trl is not installed "
              "(pip install 'trl>=1.16,<1.17')")
        return
    with tempfile.TemporaryDirectory() as workdir:
        step = result["trl_step"] = bench_trl(args, device, workdir)
    before, after = step["load_average_1min"]
    print("\n" + format_table(f"5. Training step in s, lgrpo against TRL, tiny Llama float32, "
                              f"G={step['group_size']}, {step['prompts']} prompts, "
                              f"{step['new_tokens']} new tokens, β=0.04, median of "
                              f"{step['measured_steps']} steps ({step['device']}; load average "
                              f"{before} → {after})", step["rows"]))


def write_json(args, result):
    """Every table so far written with --json; the result returned."""
    if args.json:
        lgrpo.write_atomically(args.json, json.dumps(result, indent=1))
    return result


BENCH_RANGES = {"steps": ("[2, inf)", "the first step is warm-up and is not reported"),
                "repeats": ("[1, inf)", "")}


def main(argv=None):
    """`python bench.py`: flags checked (and the --json file tried) before anything is timed; a
    mistake prints one line, `bench: error: ...`, and exits 2."""
    args = build_parser().parse_args(argv)
    try:
        lgrpo.check_ranges(args, BENCH_RANGES)
        if args.json:
            lgrpo.check_writable("--json", args.json)
        return bench(args)
    except lgrpo.InputError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
